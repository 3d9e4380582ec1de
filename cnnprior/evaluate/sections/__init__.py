"""Evaluation sections registered by name (see `base`); importing this package registers them all."""

from cnnprior.evaluate.sections import (  # noqa: F401  (registration)
    control,
    curves,
    datarand,
    faithfulness,
    fidelity,
    generalisation,
    gridpg,
    localisation,
    mprt,
    relevance,
    smprt,
    swap,
)
from cnnprior.evaluate.sections.base import (
    OPTIONS,
    SECTIONS,
    EvalContext,
    Section,
    default_names,
    describe_options,
    metrics_entries,
    options_of,
    render_sections,
    run_sections,
    section_names,
    selectable_names,
    set_options,
)

__all__ = ["OPTIONS", "SECTIONS", "EvalContext", "Section", "default_names", "describe_options", "metrics_entries",
           "options_of", "render_sections", "run_sections", "section_names", "selectable_names",
           "set_options"]
