"""Command-line entry points (the top-level scripts only call these)."""

from __future__ import annotations

import argparse
import os

from cnnprior.config import Config, load_config
from cnnprior.errors import UserError, cli_main
from cnnprior.schema import describe_keys

STAGES = ("classifier", "priors", "gan")

TRAIN_EPILOG = """stages (run in this order; each reads what the previous one wrote):
  classifier  train the target CNN            -> cnn.checkpoint (best val accuracy; default models/<name>-cnn.pt)
                                                 and <checkpoint>-last.pt (full state, --resume)
  priors      all-layer Grad-CAM, cumulative  -> priors.out-<split>.npy + .json for priors.splits
              averages, target maps              (default npys/<name>)
  gan         train the LSFT/GSFT generator   -> gan.out-{best,last}.pt (full state, --resume) and gan.out.pt
                                                 (generator only, for inference); default models/<name>-<variant>
  all         the three above (default)

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
    p.add_argument("--stage", default="all", choices=STAGES + ("all",), help="which stage to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--resume", action="store_true", help="classifier, gan: continue from the full-state `last` "
                                                         "checkpoint; priors: continue a partially written prior file")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of the stage (no stage "
                                                            "replaces any without it)")
    return p


@cli_main
def train_main(argv: list[str] | None = None) -> int:
    """`train.py`: run one stage or all of them."""
    args = build_train_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    stages = STAGES if args.stage == "all" else (args.stage,)
    if args.stage == "all" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--stage all under torchrun: run the stages one at a time (--stage classifier, then priors, "
                        "then gan), each with the same torchrun command")
    for stage in stages:
        if stage == "classifier":
            from cnnprior.cnn import cnn_paths, train_cnn

            paths = cnn_paths(cfg)
            resumable = args.resume and paths["last"].is_file()
            if args.stage == "all" and paths["best"].exists() and not args.overwrite and not resumable:
                print(f"classifier: {paths['best']} exists, skipping (--resume continues an unfinished run from "
                      f"{paths['last'].name}, --overwrite retrains)")
                continue
            train_cnn(cfg, resume=args.resume, overwrite=args.overwrite)
        elif stage == "priors":
            from cnnprior.distributed import joined
            from cnnprior.prior_stage import run_priors_stage
            from cnnprior.random_priors import run_random_priors_stage

            with joined(cfg.priors.device):  # one process group for the whole stage under torchrun
                run_priors_stage(cfg, resume=args.resume, overwrite=args.overwrite)
                run_random_priors_stage(cfg, resume=args.resume, overwrite=args.overwrite)
        elif stage == "gan":
            from cnnprior.gan import run_gan_stage

            run_gan_stage(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0
