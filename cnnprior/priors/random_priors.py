"""Prior files from re-initialised copies of the target CNN: training data that only the priors can explain.

Every training pair of a generator trained on one CNN shows that CNN's habits, so "draw the usual blob on the
object" is a cheap solution that ignores the priors, and the generator then fails the model-randomisation
sanity check. Records made with a cascading-randomised copy of the CNN (`randomise.randomised_copy`: the
classifier head, then block after block re-initialised) have priors *and* target recomputed from that same copy,
for the class the trained CNN predicts; mixed into training (`gan.randomised_share`), they leave the priors as
the only source of where the map goes.

Files: `<priors.out>-train-random-<stage>-s<seed>.npy` (+ sidecar with `randomised: {steps, stage, seed, order,
init}`); for another `priors.randomised_order` / `priors.randomised_init` than the top-down cascade with PyTorch's
default init, `<priors.out>-train-random-<order>_<init>-<stage>-s<seed>.npy`. One per configured stage and seed, each on `priors.randomised_limit` train images (a different slice per file). Under
torchrun the files are dealt out to the ranks whole (file k to rank k mod world): each is still one ordinary
prior file, the same one a single process writes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Subset

from cnnprior.cnn.randomise import INITS, ORDERS, model_stages, randomise
from cnnprior.core.distributed import everywhere, joined
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import Log
from cnnprior.priors import cams
from cnnprior.priors.extract import PriorExtractor, extractor_for_checkpoint, extractor_from
from cnnprior.priors.stage import file_meta, split_dataset, write_prior_file

__all__ = [
    "FixedClassExtractor", "parse_random_prior_path", "random_prior_path", "rank_log", "run_random_priors_stage",
    "stage_steps"
]

_NAME = re.compile(rf"-train-random-(?:({'|'.join(ORDERS)})_({'|'.join(INITS)})-)?(.+)-s(\d+)\.npy$")


class FixedClassExtractor:
    """An extractor on a randomised copy that explains the class the trained CNN predicts for each image."""

    def __init__(self, trained: nn.Module, extractor: PriorExtractor):
        self.trained, self.extractor, self.spec = trained, extractor, extractor.spec

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        device = next(self.trained.parameters()).device
        with torch.no_grad():
            classes = self.trained(images.to(device)).argmax(1)
        return self.extractor(images, labels, classes=classes)


def random_prior_path(prefix: str, stage: str, seed: int, order: str = "top_down", init: str = "default") -> Path:
    """Where the randomised-copy prior file of (stage, seed) goes (order and init named unless top_down/default)."""
    scheme = "" if (order, init) == ("top_down", "default") else f"{order}_{init}-"
    return Path(f"{prefix}-train-random-{scheme}{stage.replace('+', '_')}-s{seed}.npy")


def parse_random_prior_path(path: str) -> dict | None:
    """{order, init, stage, seed} of a `random_prior_path` name, or None for another name."""
    m = _NAME.search(str(path))
    if m is None:
        return None
    return {"order": m.group(1) or "top_down", "init": m.group(2) or "default", "stage": m.group(3),
            "seed": int(m.group(4))}


def stage_steps(model: nn.Module, names: list[str], order: str = "top_down") -> list[tuple[int, str]]:
    """(step of `order`, stage name) for each configured stage name; `all` = every stage. The step re-initialises
    the cascade down to the stage (top_down), from the stem up to it (bottom_up), or the stage alone (independent)."""
    stages = [n for n, _ in model_stages(model)]
    if names == ["all"]:
        names = stages
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise UserError(f"priors.randomised_stages: {unknown[0]!r} is not a stage of this CNN "
                        f"(stages top-down: {', '.join(stages)}, or all)")
    if order == "bottom_up":
        return [(len(stages) - stages.index(n), n) for n in names]
    return [(stages.index(n) + 1, n) for n in names]


def rank_log(log: Log, rank: int) -> Log:
    """`log` with each line prefixed by the rank that writes it."""

    def logged(msg: str) -> object:
        return log(f"[rank {rank}] {msg}")

    return logged


def run_random_priors_stage(cfg, resume: bool = False, overwrite: bool = False, log: Log = print) -> list[Path]:
    """Write the randomised-copy training prior files that `priors.randomised_stages` asks for (all of them; under
    torchrun each rank writes every world-th file)."""
    pc = cfg.priors
    if not pc.randomised_stages:
        return []
    cams.get(pc.method, "priors.method", one_pass=True)  # a bad method: one line, before any work
    with joined(pc.device) as (ctx, device):
        if ctx.enabled:
            log = rank_log(log, ctx.rank)
        trained_ex, model, cnn_meta = everywhere(ctx, lambda: extractor_for_checkpoint(cfg, device))
        ds = split_dataset(cfg, "train")
        per_file = min(pc.randomised_limit or len(ds), len(ds))
        n_stages = len(model_stages(model))
        order, init = pc.randomised_order, pc.randomised_init
        jobs = [(step, stage, seed) for step, stage in stage_steps(model, list(pc.randomised_stages), order)
                for seed in range(pc.randomised_seeds)]
        paths = [random_prior_path(cfg.priors_prefix, stage, seed, order, init) for _, stage, seed in jobs]
        mine = [(job, path) for k, (job, path) in enumerate(zip(jobs, paths, strict=True))
                if k % ctx.world == ctx.rank]

        def plan() -> list:
            todo = []
            for job, path in mine:
                if path.exists() and resume and not overwrite:
                    log(f"priors: {path} exists (--resume: kept)")
                elif path.exists() and not overwrite:
                    raise UserError(f"{path}: prior file exists; use --resume to keep it, --overwrite to replace it")
                else:
                    todo.append((job, path))
            return todo

        def write(todo: list) -> None:
            for (step, stage, seed), path in todo:
                # each (stage, seed) file its own slice of the train images, whatever stages/seeds a run asks for
                start = ((step - 1 + n_stages * seed) * per_file) % len(ds)
                part = Subset(ds, [(start + i) % len(ds) for i in range(per_file)])
                part.class_names, part.has_masks = ds.class_names, ds.has_masks
                copy = randomise(model, order, step, seed, init).to(device).eval()
                ex = FixedClassExtractor(model, extractor_from(copy, trained_ex.spec))
                meta = file_meta(cfg, ex.extractor, cnn_meta, part, "train",
                                 randomised={"steps": step, "stage": stage, "seed": seed, "order": order,
                                             "init": init,
                                             "explained": "the trained CNN's predicted class"})
                log(f"priors: randomised copy ({order}, init {init}) at {stage} (step {step}), seed {seed}: "
                    f"{len(part)} train images")
                write_prior_file(ex, part, path, meta, pc.batch_size, resume, overwrite, cfg.data.num_workers,
                                 progress=ctx.main)

        todo = everywhere(ctx, plan)
        everywhere(ctx, lambda: write(todo))
        return paths
