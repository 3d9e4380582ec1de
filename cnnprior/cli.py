"""Command-line entry points: `train.py` (train_main) and the `cnnprior` command (main) that `pip install .`
installs; the top-level scripts only call these."""

from __future__ import annotations

import argparse
import os
import sys

from cnnprior.cnn.importer import main as import_cnn_main
from cnnprior.cnn.train import cnn_paths, train_cnn
from cnnprior.core.config import Config, load_config
from cnnprior.core.distributed import joined
from cnnprior.core.errors import UserError, cli_main
from cnnprior.core.schema import describe_keys
from cnnprior.core.version import __version__
from cnnprior.data.splits import source_opener
from cnnprior.evaluate.run import main as evaluate_main
from cnnprior.explain.inference import main as inference_main
from cnnprior.gan.models.base import DEFAULT as DEFAULT_GENERATOR
from cnnprior.gan.models.base import get as get_generator
from cnnprior.gan.train import run_gan_stage
from cnnprior.priors import cams
from cnnprior.priors.cli import main as priors_main
from cnnprior.priors.random_priors import run_random_priors_stage
from cnnprior.priors.stage import run_priors_stage
from cnnprior.study.run import main as study_main
from cnnprior.zoo.stage import build_zoo

__all__ = [
    "build_train_parser", "check_names", "COMMANDS", "EXTRA_STAGES", "main", "STAGES", "TRAIN_EPILOG", "train_main"
]

STAGES = ("classifier", "priors", "gan")
EXTRA_STAGES = ("zoo",)  # run only by name, never by `all`

TRAIN_EPILOG = """stages (run in this order; each reads what the previous one wrote):
  classifier  train the target CNN            -> cnn.checkpoint (best val accuracy; default models/<name>-cnn.pt)
                                                 and <checkpoint>-last.pt (full state, --resume)
  priors      all-layer Grad-CAM, cumulative  -> priors.out-<split>.npy + .json for priors.splits
              averages, target maps              (default npys/<name>)
  gan         train the LSFT/GSFT generator   -> gan.out-{best,last}.pt (full state, --resume) and gan.out.pt
                                                 (generator only, for inference); default models/<name>-<variant>
  all         the three above (default)
  zoo         a population of small CNNs      -> zoo.out/<member>/ (checkpoint, priors of each split and of
              (configs/zoo_fashion.yaml,         randomised copies) and zoo.report/zoo.json; finished members
              docs/zoo.md; not in `all`)         are kept; --jobs K workers; torchrun: member i on rank i % world

examples:
  python train.py --config configs/shapes_resnet18.yaml --stage classifier
  python train.py --config configs/shapes_resnet18.yaml --stage classifier --resume   # after a crash / kill
  python train.py --config configs/fashion_resnet18.yaml --stage priors --set priors.train_limit=2000
  python train.py --config configs/fashion_lsft_cpu.yaml --stage gan --resume
  torchrun --nproc_per_node=2 train.py --config configs/fashion_resnet18.yaml --stage classifier
  torchrun --nproc_per_node=2 train.py --config configs/fashion_resnet18.yaml --stage priors
  torchrun --nproc_per_node=2 train.py --config configs/fashion_lsft_paper.yaml --stage gan
  (under torchrun: one stage per command; see README "Scaling out")

config keys (override any with --set section.key=value):
"""


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description="Run the cnnprior pipeline from a YAML config: classifier -> priors -> gan.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=TRAIN_EPILOG + describe_keys(Config))
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--stage", default="all", choices=STAGES + ("all",) + EXTRA_STAGES,
                   help="which stage to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--resume", action="store_true", help="classifier, gan: continue from the full-state `last` "
                                                         "checkpoint; priors: continue a partially written prior file")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of the stage (no stage "
                                                            "replaces any without it)")
    p.add_argument("--jobs", type=int, default=None, metavar="K", help="zoo: local worker processes, one thread "
                                                                          "each (default zoo.jobs)")
    return p


def check_names(cfg: Config, where: str) -> None:
    """The config's registered names (image source, CAM method, generator) exist: one line each where not, before
    any stage starts (the stages check again when called from Python)."""
    source_opener(cfg.data.source, f"{where}: key 'data.source'")
    cams.get(cfg.priors.method, f"{where}: key 'priors.method'", one_pass=True)
    get_generator(cfg.gan.variant, f"{where}: key 'gan.variant'")


@cli_main
def train_main(argv: list[str] | None = None) -> int:
    """`train.py`: run one stage or all of them."""
    args = build_train_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_names(cfg, args.config)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.stage == "all" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--stage all under torchrun: run the stages one at a time (--stage classifier, then priors, "
                        "then gan), each with the same torchrun command")
    for stage in stages:
        if stage == "classifier":
            paths = cnn_paths(cfg)
            resumable = args.resume and paths["last"].is_file()
            if args.stage == "all" and paths["best"].exists() and not args.overwrite and not resumable:
                print(f"classifier: {paths['best']} exists, skipping (--resume continues an unfinished run from "
                      f"{paths['last'].name}, --overwrite retrains)")
                continue
            train_cnn(cfg, resume=args.resume, overwrite=args.overwrite)
        elif stage == "priors":
            with joined(cfg.priors.device):  # one process group for the whole stage under torchrun
                run_priors_stage(cfg, resume=args.resume, overwrite=args.overwrite)
                run_random_priors_stage(cfg, resume=args.resume, overwrite=args.overwrite)
        elif stage == "gan":
            run_gan_stage(cfg, resume=args.resume, overwrite=args.overwrite)
        elif stage == "zoo":
            build_zoo(cfg, resume=args.resume, overwrite=args.overwrite, jobs=args.jobs)
    return 0


COMMANDS = {
    "train": "run the pipeline from a YAML config: classifier -> priors -> gan (= python train.py)",
    "explain": "run a generator on a prior file or on images, write outputs/<run>/ (= lsft_inference.py; "
               "--variant gsft = gsft_inference.py)",
    "evaluate": "write an evaluation report (= python -m cnnprior.evaluate)",
    "priors": "inspect, verify or convert prior files (= python -m cnnprior.priors)",
    "import-cnn": "make a project CNN checkpoint from your torchvision state_dict (= python -m cnnprior.cnn import)",
    "study": "train arms x seeds to budget milestones and compare them at equal samples and FLOPs "
             "(= python -m cnnprior.study)",
}


def _explain(argv: list[str]) -> int:
    """`cnnprior explain [--variant NAME] ...`: the inference scripts under one command, for any registered
    generator (lsft by default; learned baselines are also scored beside a GAN with --learned FILE)."""
    pick = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pick.add_argument("--variant", default=DEFAULT_GENERATOR)
    known, rest = pick.parse_known_args(argv)
    variant = known.variant
    get_generator(variant, "--variant")
    return inference_main(rest, variant=variant, prog="cnnprior explain" + ("" if variant == DEFAULT_GENERATOR
                                                                             else f" --variant {variant}"))


@cli_main
def main(argv: list[str] | None = None) -> int:
    """`cnnprior <command> ...`: one command for every stage (installed by `pip install .`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        print("usage: cnnprior {" + ",".join(COMMANDS) + "} ...\n\nInterpret CNNs with conditional GANs that use "
              "per-layer Grad-CAM maps as conditional priors.\n\ncommands:\n"
              + "\n".join(f"  {k:<{width}}  {v}" for k, v in COMMANDS.items())
              + "\n\n`cnnprior <command> --help` describes each command's options.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "--version":
        print(f"cnnprior {__version__}")
        return 0
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)} (cnnprior --help)")
    run = {"train": train_main, "explain": _explain, "evaluate": evaluate_main, "priors": priors_main,
           "import-cnn": lambda args: import_cnn_main(["import", *args]), "study": study_main}[command]
    return int(run(rest) or 0)
