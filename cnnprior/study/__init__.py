"""Studies: arms x seeds trained to budget milestones, scored on val (every milestone) and test (the val-chosen
one), with learning curves and margins at equal samples and equal training FLOPs (docs/study.md)."""

from cnnprior.study.bootstrap import hierarchical_bootstrap
from cnnprior.study.config import StudyConfig, load_study_config
from cnnprior.study.run import run_study

__all__ = ["hierarchical_bootstrap", "load_study_config", "run_study", "StudyConfig"]
