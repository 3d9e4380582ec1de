"""The classifier stage: train the target CNN (one process or a torchrun job with DDP) and resume an interrupted
run (building any torchvision classifier and saving / loading its checkpoints: model.py; its CAM layers: layers.py;
importing your own: importer.py).

Under torchrun the classifier stage trains with DistributedDataParallel: `cnn.batch_size` is per process (as
`gan.batch_size`), so a step sees batch_size x processes images and an epoch has 1/processes as many steps (the
learning rate is not scaled: raise cnn.lr yourself if you want to). Each rank takes its DistributedSampler-style
shard of the epoch's seeded order; batch norm normalises with each rank's own batch (plain DDP, no SyncBatchNorm)
and the running statistics are averaged over the ranks at every epoch's end; validation is split over the ranks.
Rank 0 alone writes checkpoints, the resolved YAML and the log.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from cnnprior.cnn.model import TargetCNN, build_cnn, save_cnn, set_bn_momentum
from cnnprior.core import runtime
from cnnprior.core.budget import Budget, count_flops
from cnnprior.core.config import Config, to_dict
from cnnprior.core.distributed import (
    Dist,
    all_sum,
    everywhere,
    gather_objects,
    joined,
    main_first,
    mean_batchnorm_stats,
    rank_seed,
    shard,
)
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import Log, load_checkpoint, seed_everything, state_sha256
from cnnprior.core.stage import FinishCallback, Outputs, Stage, StepCallback
from cnnprior.data.relabel import Relabelled
from cnnprior.data.splits import SplitView, load_split

__all__ = [
    "cnn_outputs", "cnn_paths", "cnn_seed", "CNN_STATE_FORMAT", "EpochBatches", "evaluate_accuracy",
    "prepare_cnn_outputs", "RESUME_FREE_KEYS", "train_cnn"
]

CNN_STATE_FORMAT = "cnnprior-cnn-state/1"  # the classifier stage's full-state `-last.pt` (for --resume)
# data/cnn config keys that may change between a classifier run and its resumption (they change no number)
RESUME_FREE_KEYS = frozenset({"data.root", "data.homepage", "data.download", "data.num_workers", "cnn.device",
                              "cnn.checkpoint", "cnn.checkpoint_every", "cnn.save_half"})


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip + random translation by up to 1/16 of the size (reflect padding), batched."""
    b, _, h, w = x.shape
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1).to(x.device), x.flip(-1), x)
    pad = max(1, h // 16)
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    return xp[:, :, dy:dy + h, dx:dx + w]


@torch.no_grad()
def _count_correct(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "val",
                   quiet: bool = False) -> tuple[int, int]:
    """(top-1 hits, images) of `model` over a loader of {image, label} batches, in eval mode."""
    model.eval()
    correct = total = 0
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=quiet):
        logits = model(batch["image"].to(device, non_blocking=True))
        correct += (logits.argmax(1).cpu() == batch["label"]).sum().item()
        total += len(batch["label"])
    return correct, total


def evaluate_accuracy(model: nn.Module, loader: DataLoader, device: torch.device, desc: str = "val") -> float:
    """Top-1 accuracy of `model` over a loader of {image, label} batches."""
    correct, total = _count_correct(model, loader, device, desc)
    return correct / max(total, 1)


class EpochBatches:
    """Batch sampler: epoch `e` visits `epoch_order(seed, e)` (core/runtime.py) in batches, from batch `start` on
    (mid-epoch resume); in a job of `world` processes, only rank `rank`'s shard of it (DistributedSampler's
    padding and striding: every rank has the same number of batches)."""

    def __init__(self, count: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.count, self.batch_size, self.seed, self.rank, self.world = count, batch_size, seed, rank, world
        mine = math.ceil(count / world)
        # the last partial batch is dropped when there is more than one batch (no tiny batch-norm batches)
        self.batches = mine // batch_size if mine > batch_size else 1
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Visit epoch `epoch` next, from its batch `start` on."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.batches - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = shard(runtime.epoch_order(self.seed, self.epoch, self.count), self.rank, self.world).tolist()
        for b in range(self.start, self.batches):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]


def cnn_paths(cfg: Config) -> dict[str, Path]:
    """The classifier stage's outputs: best-validation checkpoint, full-state `last` (for --resume), resolved YAML."""
    best = Path(cfg.cnn_checkpoint)
    return {"best": best, "last": best.with_name(f"{best.stem}-last.pt"), "yaml": best.with_suffix(".yaml")}


def cnn_outputs(cfg: Config) -> Outputs:
    """The classifier stage's outputs (cnn_paths) for the stage skeleton; a fresh run removes an old `last`."""
    return Outputs(cnn_paths(cfg), kind="classifier", state="classifier state", key="cnn.checkpoint",
                   restart="retrain")


def prepare_cnn_outputs(cfg: Config, resume: bool, overwrite: bool, world: int = 1) -> dict | None:
    """Refuse to replace existing outputs without --overwrite (a fresh run removes an old `last`); with --resume
    load `last` and check it fits (and, if it was saved mid-epoch, that `world` processes resume it, as many as
    saved it)."""
    return cnn_outputs(cfg).prepare(resume, overwrite, lambda last: _resumable_state(cfg, last, world))


def _resumable_state(cfg: Config, last: Path, world: int) -> dict:
    """The classifier state in `last`, checked against the config and the process count."""
    state = load_checkpoint(last, "classifier state")
    if state.get("format") != CNN_STATE_FORMAT:
        raise UserError(f"{last}: not a classifier state (format {state.get('format')!r}, expected "
                        f"{CNN_STATE_FORMAT!r})")
    saved, now = state.get("config") or {}, to_dict(cfg)
    for section in ("data", "cnn"):
        for key, value in now[section].items():
            old = (saved.get(section) or {}).get(key, value)
            if f"{section}.{key}" not in RESUME_FREE_KEYS and old != value:
                raise UserError(f"{last}: was trained with {section}.{key}: {old!r} but the config says {value!r}; "
                                f"keep it to resume, or --overwrite to start over")
    saved_world = int(state.get("world_size", 1))
    if state["progress"]["batch"] > 0 and saved_world != world:
        raise UserError(f"{last}: saved mid-epoch by {saved_world} process(es), now {world}; resume with "
                        f"{saved_world} (the process count may change only where an epoch ended)")
    return state


@dataclass
class _ClassifierRun:
    """One classifier run: the model, optimiser, schedule, augmentation RNG and progress; `last` holds all."""

    cfg: Config
    model: TargetCNN
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    aug: torch.Generator
    device: torch.device
    train_count: int
    stage: Stage  # the outputs, the process's place in the job, the caller's callbacks
    # completed epochs, batches done in the current epoch, global step, best val accuracy, history, the running
    # (EMA) train loss and accuracy of the current epoch (this rank's), seconds spent in earlier processes, samples
    # seen (all ranks), one step's FLOPs (core/budget.py; None until counted), whether samples are estimated
    progress: dict = field(default_factory=lambda: {"epoch": 0, "batch": 0, "step": 0, "best": -1.0,
                                                    "history": [], "loss": 0.0, "acc": 0.0, "seconds": 0.0,
                                                    "samples": 0, "step_flops": None, "estimated": False})
    ddp: nn.Module | None = None  # what training calls in a torchrun job: the model's DDP wrapper

    @property
    def ctx(self) -> Dist:
        return self.stage.ctx

    def rank_state(self) -> dict:
        """What differs between the ranks of a job: RNG states (global and augmentation), the running loss/accuracy."""
        return {"rng": runtime.rng_state(self.device), "augment_rng": self.aug.get_state(),
                "loss": self.progress["loss"], "acc": self.progress["acc"]}

    def save_state(self, seconds: float) -> None:
        """Atomically write the full state (weights, optimiser, scheduler, RNGs, progress) as `last`, for --resume.

        Every rank calls it (it gathers the ranks' RNG states); rank 0 writes: its own state as in a one-process
        run, the other ranks' under `ranks`.
        """
        ranks = gather_objects(self.ctx, self.rank_state())
        self.stage.save("last", lambda: {
            "format": CNN_STATE_FORMAT, "model": {k: v.detach().cpu() for k, v in self.model.net.state_dict().items()},
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "rng": ranks[0]["rng"],
            "augment_rng": ranks[0]["augment_rng"], "progress": dict(self.progress, seconds=seconds),
            "class_names": list(self.model.class_names), "train_count": self.train_count,
            "config": to_dict(self.cfg), "world_size": self.ctx.world, "ranks": ranks[1:],
            "budget": self.budget(seconds)})

    def restore(self, state: dict, path: Path) -> None:
        """Continue from a `save_state` file (already checked against the config by prepare_cnn_outputs)."""
        if state["class_names"] != list(self.model.class_names) or state["train_count"] != self.train_count:
            raise UserError(f"{path}: trained on {state['train_count']} images of classes {state['class_names']}, "
                            f"the data now gives {self.train_count} of {list(self.model.class_names)}; resume with "
                            f"the same data")
        self.model.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.progress = dict(state["progress"])
        if "samples" not in self.progress:  # a state of an earlier version: samples estimated from its steps
            self.progress.update(samples=self.progress["step"] * self.cfg.cnn.batch_size * int(state.get(
                "world_size", 1)), step_flops=None, estimated=True)
        rank, others = self.ctx.rank, state.get("ranks") or []
        # a rank the saved run did not have (more processes, from an epoch's end) keeps its fresh seeds
        own = state if rank == 0 else others[rank - 1] if rank <= len(others) else None
        if own is not None:
            self.aug.set_state(own["augment_rng"])
            runtime.set_rng_state(own["rng"], self.device)
            if rank:
                self.progress["loss"], self.progress["acc"] = own["loss"], own["acc"]

    def budget(self, seconds: float) -> dict:
        """The run's budget so far (core/budget.py), as checkpoints record it."""
        p = self.progress
        return Budget(samples=int(p["samples"]), steps=int(p["step"]), wall_s=seconds, threads=torch.get_num_threads(),
                      processes=self.ctx.world, precision="fp32", device=self.device.type,
                      step_flops=p["step_flops"], estimated=bool(p["estimated"])).as_dict()

    def count_step_flops(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """FLOPs of one step (core/budget.py): forward, loss and backward of a copy of the model on this batch (the
        run's weights, batch-norm statistics and RNG streams stay untouched), times the processes."""
        net = copy.deepcopy(self.model)
        return count_flops(lambda: F.cross_entropy(net(x), y, label_smoothing=0.05).backward(),
                           self.device) * self.ctx.world

    def reposition_schedule(self, step: int) -> None:
        """Put the learning-rate schedule at `step` of its own steps (after a change of process count, which
        changes the steps per epoch: the schedule follows the epochs, not the step count)."""
        self.sched.last_epoch = step
        for group, base, fn in zip(self.opt.param_groups, self.sched.base_lrs, self.sched.lr_lambdas, strict=True):
            group["lr"] = base * fn(step)

    def train_epoch(self, loader: DataLoader, sampler: EpochBatches, elapsed: Callable[[], float]) -> None:
        """Train the rest of the current epoch; `last` every cnn.checkpoint_every steps (not at its end)."""
        p = self.progress
        sampler.set_epoch(p["epoch"], p["batch"])
        net = self.ddp or self.model
        net.train()
        bar = tqdm(total=sampler.batches, initial=p["batch"], desc=f"epoch {p['epoch'] + 1}/{self.cfg.cnn.epochs}",
                   dynamic_ncols=True, disable=not self.ctx.main)
        for batch in loader:
            x = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = batch["label"].to(self.device, non_blocking=True)
            if self.cfg.cnn.augment:
                x = _augment(x, self.aug)
            if p["step_flops"] is None and self.ctx.main:
                p["step_flops"] = self.count_step_flops(x, y)
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            acc = (logits.argmax(1) == y).float().mean().item()
            first = p["batch"] == 0
            p["loss"] = loss.item() if first else 0.9 * p["loss"] + 0.1 * loss.item()
            p["acc"] = acc if first else 0.9 * p["acc"] + 0.1 * acc
            p["batch"], p["step"] = p["batch"] + 1, p["step"] + 1
            p["samples"] += len(y) * self.ctx.world
            bar.update(1)
            bar.set_postfix(loss=f"{p['loss']:.3f}", acc=f"{p['acc']:.3f}")
            if self.stage.step_done(p["step"], mid_epoch=p["batch"] < sampler.batches):
                self.save_state(elapsed())
        bar.close()


def cnn_seed(cfg: Config) -> int:
    """The seed of the CNN's weights, augmentation and batch order: `cnn.seed`, or `data.seed` when it is -1."""
    return cfg.cnn.seed if cfg.cnn.seed >= 0 else cfg.data.seed


def _classifier_run(cfg: Config, class_names: list[str], train_count: int, steps: int, stage: Stage) -> _ClassifierRun:
    """A fresh run: seeded model (channels_last, the same on every rank), optimiser and warm-up + cosine schedule
    over `steps`; each rank's own seed for what it draws later (dropout, augmentation)."""
    ctx, device = stage.ctx, stage.device
    seed_everything(cnn_seed(cfg))
    model = build_cnn(cfg.cnn.arch, class_names, cfg.data.image_size, cfg.cnn.pretrained).to(device)
    if cfg.cnn.bn_momentum >= 0:
        set_bn_momentum(model, cfg.cnn.bn_momentum)
    model = model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.cnn.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.cnn.lr, momentum=0.9, weight_decay=cfg.cnn.weight_decay, nesterov=True)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.cnn.lr, weight_decay=cfg.cnn.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    seed = rank_seed(cnn_seed(cfg), ctx.rank)
    if ctx.rank:
        seed_everything(seed)
    return _ClassifierRun(cfg, model, opt, sched, torch.Generator().manual_seed(seed), device, train_count, stage)


def _loaders(cfg: Config, train_set: Dataset, val_set: Dataset, device: torch.device,
             ctx: Dist) -> tuple[DataLoader, EpochBatches, DataLoader]:
    """Train loader over an EpochBatches sampler (this rank's shard), and the val loader (every world-th image from
    the rank's own); neither draws from the global RNG."""
    sampler = EpochBatches(len(train_set), cfg.cnn.batch_size, cnn_seed(cfg), ctx.rank, ctx.world)
    # own generators: a loader iterator draws a worker seed, which must not come from the global RNG (dropout's)
    train = DataLoader(train_set, batch_sampler=sampler, generator=torch.Generator().manual_seed(cnn_seed(cfg)),
                       **_loader_kw(cfg, device))
    return train, sampler, _eval_loader(cfg, val_set, device, ctx)


def _loader_kw(cfg: Config, device: torch.device) -> dict:
    return dict(num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                persistent_workers=cfg.data.num_workers > 0)


def _eval_loader(cfg: Config, dataset: Dataset, device: torch.device, ctx: Dist) -> DataLoader:
    """An in-order loader over every world-th image from the rank's own (validation, or fitting the train set)."""
    if ctx.enabled:
        dataset = Subset(dataset, range(ctx.rank, len(dataset), ctx.world))
    return DataLoader(dataset, batch_size=cfg.cnn.batch_size, shuffle=False,
                      generator=torch.Generator().manual_seed(cnn_seed(cfg)), **_loader_kw(cfg, device))


def train_cnn(cfg: Config, resume: bool = False, overwrite: bool = False, log: Log = print,
              on_step: StepCallback | None = None, on_finish: FinishCallback | None = None) -> dict:
    """The classifier stage: train the target CNN; keep the best-validation checkpoint and a full-state `last`.

    One process, or one rank of a torchrun job (DDP; gloo on CPU, nccl on GPU): see the module docstring.
    `on_step(step)` runs after every trained step (before its checkpoint); `on_finish(rank, summary)` at the end,
    with the hashes of the final weights and optimiser moments (core/stage.py).
    """
    with joined(cfg.cnn.device) as (ctx, device):
        stage = Stage(cnn_outputs(cfg), ctx, device, log, cfg.cnn.checkpoint_every, on_step, on_finish)
        return _train(cfg, resume, overwrite, stage)


def _validate(model: nn.Module, loader: DataLoader, device: torch.device, ctx: Dist) -> float:
    """Validation accuracy; in a job each rank counts its share and the counts are summed."""
    correct, total = _count_correct(model, loader, device, quiet=not ctx.main)
    if ctx.enabled:
        correct, total = (int(v) for v in all_sum(ctx, torch.tensor([correct, total], device=device)).tolist())
    return correct / max(total, 1)


def _ranks_mean(ctx: Dist, value: float, device: torch.device) -> float:
    """The mean of a number over the ranks (the number itself when run alone)."""
    if not ctx.enabled:
        return value
    return all_sum(ctx, torch.tensor([value], dtype=torch.float64, device=device)).item() / ctx.world


def _train_val(cfg: Config) -> tuple[SplitView | Relabelled, SplitView]:
    """The train and val splits (train relabelled when cnn.random_labels > 0); neither may be empty."""
    train_set, val_set = load_split(cfg.data, "train"), load_split(cfg.data, "val")
    if len(train_set) == 0 or len(val_set) == 0:
        raise UserError(f"{cfg.source_file or 'config'}: data gives {len(train_set)} train / {len(val_set)} val "
                        f"images; raise data.limit or data.val_fraction")
    if cfg.cnn.random_labels > 0:
        return Relabelled(train_set, cfg.cnn.random_labels, cnn_seed(cfg)), val_set
    return train_set, val_set


def _train(cfg: Config, resume: bool, overwrite: bool, stage: Stage) -> dict:
    ctx, device, log, paths = stage.ctx, stage.device, stage.log, stage.paths
    state = stage.begin(resume, overwrite, lambda last: _resumable_state(cfg, last, ctx.world))
    t0 = time.time()
    # rank 0 first: a dataset extracted into the cache on first use is extracted once
    train_set, val_set = main_first(ctx, lambda: _train_val(cfg))
    train_loader, sampler, val_loader = _loaders(cfg, train_set, val_set, device, ctx)
    relabelled = isinstance(train_set, Relabelled)
    fit_loader = _eval_loader(cfg, train_set, device, ctx) if relabelled else None
    steps = max(1, cfg.cnn.epochs * sampler.batches)
    run = everywhere(ctx, lambda: _classifier_run(cfg, train_set.class_names, len(train_set), steps, stage))
    if state is not None:
        everywhere(ctx, lambda: run.restore(state, paths["last"]))
        if int(state.get("world_size", 1)) != ctx.world:  # only where an epoch ended (_resumable_state)
            run.reposition_schedule(run.progress["epoch"] * sampler.batches)
    stage.write_config(cfg)
    if ctx.enabled:
        run.ddp = DDP(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    p = run.progress

    def elapsed() -> float:
        return p["seconds"] + time.time() - t0

    log(f"classifier: {cfg.cnn.arch} ({cfg.data.image_size}px) on {device}"
        + (f" x {ctx.world} processes (batch {cfg.cnn.batch_size} each)" if ctx.enabled else "")
        + f"; data {train_set.describe()}"
        + (f"; resuming at epoch {p['epoch'] + 1}, batch {p['batch']}, step {p['step']}" if state else ""))
    if state is not None and p["epoch"] >= cfg.cnn.epochs:
        log(f"classifier: nothing to do ({p['epoch']} of {cfg.cnn.epochs} epochs done)")
    while p["epoch"] < cfg.cnn.epochs:
        run.train_epoch(train_loader, sampler, elapsed)
        mean_batchnorm_stats(ctx, run.model)
        acc = _validate(run.model, val_loader, device, ctx)
        train_loss = _ranks_mean(ctx, p["loss"], device)
        p["epoch"], p["batch"] = p["epoch"] + 1, 0
        entry = {"epoch": p["epoch"], "val_accuracy": acc, "train_loss": train_loss, "seconds": elapsed()}
        if relabelled and p["epoch"] == cfg.cnn.epochs:  # the data-randomisation CNN: how well it fits its permuted
            entry["train_accuracy"] = _validate(run.model, fit_loader, device, ctx)  # train labels, at the end only
        log(f"epoch {p['epoch']}: val accuracy {acc:.4f}"
            + (f", train accuracy on the permuted labels {entry['train_accuracy']:.4f}" if "train_accuracy" in entry
               else "") + f" ({elapsed():.0f}s)")
        p["history"].append(entry)
        if acc > p["best"] or relabelled:  # permuted labels: validation cannot choose, the last epoch is kept
            p["best"] = acc
            if ctx.main:
                save_cnn(run.model, paths["best"], val_accuracy=acc, epoch=p["epoch"], config=to_dict(cfg),
                         dataset=cfg.data.source, history=p["history"], half=cfg.cnn.save_half,
                         extra={"budget": run.budget(elapsed())})
        run.save_state(elapsed())
    if cfg.cnn.epochs == 0:
        p["best"] = _validate(run.model, val_loader, device, ctx)
        if ctx.main:
            save_cnn(run.model, paths["best"], val_accuracy=p["best"], epoch=0, config=to_dict(cfg),
                     dataset=cfg.data.source, half=cfg.cnn.save_half)
    stage.finish(lambda: _weights_summary(run))
    log(f"classifier: best val accuracy {p['best']:.4f}, checkpoint {paths['best']} ({elapsed():.0f}s)")
    return {"checkpoint": str(paths["best"]), "val_accuracy": p["best"], "seconds": elapsed(),
            "history": p["history"], "budget": run.budget(elapsed())}


def _weights_summary(run: _ClassifierRun) -> dict:
    """What on_finish is given: hashes of the final weights and optimiser moments, the step count, the processes."""
    moments = {f"{i}.{k}": v for i, s in run.opt.state_dict()["state"].items() for k, v in s.items()
               if isinstance(v, torch.Tensor)}
    return {"model": state_sha256(run.model.net.state_dict()), "optimizer": state_sha256(moments),
            "step": run.progress["step"], "world_size": run.ctx.world}
