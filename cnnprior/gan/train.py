"""The GAN stage: pix2pix training of an LSFT/GSFT generator, full-state checkpoints, exact resume, DDP."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cnnprior.core import runtime
from cnnprior.core.budget import Budget, count_flops
from cnnprior.core.config import Config, to_dict
from cnnprior.core.distributed import Dist, all_sum, everywhere, joined, shard
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import Log, load_checkpoint, state_sha256
from cnnprior.core.stage import FinishCallback, Outputs, Stage, StepCallback
from cnnprior.gan.checkpoint import ARCH_KEYS, GAN_FORMAT, INPUT_KEYS, SCHEMA_KEYS, check_format, export_generator
from cnnprior.gan.data import AGREE_KEYS, MapData, load_gan_data

# the step and what it runs on live in cnnprior.gan.step; these names are this module's too (the loop calls
# `train_step` by this module's name, bench/generator.py as cnnprior.gan.train.train_step)
from cnnprior.gan.step import (
    GANLoss,
    Trainer,
    adam,
    build_trainer,
    compile_trainer,
    load_optimizer,
    precision,
    train_step,
    training_backends,
)

__all__ = [
    "adam", "build_trainer", "check_adversarial", "check_architecture", "compile_trainer", "EPOCH_STATS",
    "gan_outputs", "gan_paths", "GANLoss", "load_init", "precision", "run_gan_stage", "Trainer", "train_step",
    "training_backends"
]

EPOCH_STATS = ("d_real", "d_fake", "g_adv", "l1", "d_loss")

# The progress bar shows the last step's L1 and D(real) every BAR_EVERY steps: the only host reads of the loop
# besides checkpoints and the epoch's end (on CUDA each read waits for the queued kernels).
BAR_EVERY = 10


# ----------------------------------------------------------------------------------------- state
def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------- checkpoints
def gan_paths(cfg: Config) -> dict[str, Path]:
    """The stage's outputs: `last` and `best` checkpoints and the resolved YAML."""
    prefix = cfg.gan_prefix
    return {"last": Path(f"{prefix}-last.pt"), "best": Path(f"{prefix}-best.pt"), "yaml": Path(f"{prefix}.yaml"),
            "export": Path(f"{prefix}.pt"), **{f"s{m}": Path(f"{prefix}-s{m}.pt") for m in cfg.gan.milestones}}


def gan_outputs(cfg: Config) -> Outputs:
    """The stage's outputs (gan_paths) for the stage skeleton; a fresh run removes an old `last`, `best` and
    milestone generators."""
    return Outputs(gan_paths(cfg), kind="GAN", state="GAN checkpoint", key="gan.out",
                   stale=("last", "best", *(f"s{m}" for m in cfg.gan.milestones)))


def _resumable_checkpoint(cfg: Config, last: Path, world: int) -> dict:
    """The checkpoint in `last`, checked against the config (and, saved mid-epoch, the batch and process count)."""
    ckpt = load_checkpoint(last, "GAN")
    check_format(ckpt, last)
    saved = (ckpt.get("config") or {}).get("gan") or {}
    check_architecture(saved, cfg, f"{last}: was trained with", "keep it, or --overwrite to start over")
    for key, default in INPUT_KEYS.items():
        if saved.get(key, default) != getattr(cfg.gan, key):
            raise UserError(f"{last}: was trained with gan.{key}: {saved.get(key, default)} but the config says "
                            f"{getattr(cfg.gan, key)}; keep it, or --overwrite to start over")
    check_adversarial(saved, cfg, str(last))
    if not SCHEMA_KEYS <= ckpt.keys():
        raise UserError(f"{last}: GAN checkpoint lacks {', '.join(sorted(SCHEMA_KEYS - ckpt.keys()))}; "
                        f"it cannot be resumed (use --overwrite to start over)")
    if ckpt["batch_in_epoch"] > 0:
        for what, old, new in (("gan.batch_size", saved.get("batch_size"), cfg.gan.batch_size),
                               ("processes", ckpt.get("world_size", 1), world)):
            if old != new:
                raise UserError(f"{last}: saved mid-epoch with {what} {old}, now {new}; resume with {old}")
    return ckpt


def check_architecture(saved: dict, cfg: Config, where: str, hint: str) -> None:
    """A saved run's gan section (`saved`) has the config's ARCH_KEYS: "<where> gan.<key>: <old> but the config
    says <new>; <hint>" otherwise."""
    for key in ARCH_KEYS:
        if saved.get(key) != getattr(cfg.gan, key):
            raise UserError(f"{where} gan.{key}: {saved.get(key)!r} but the config says {getattr(cfg.gan, key)!r}; "
                            f"{hint}")


def check_adversarial(saved: dict, cfg: Config, path: str) -> None:
    """A run that continues (resume) or starts from (gan.init) another keeps its kind: adversarial or L1-only
    (gan.adv_weight 0), so an L1-only twin never holds adversarially trained weights, nor the reverse."""
    old, new = float(saved.get("adv_weight", 1.0)), float(cfg.gan.adv_weight)
    if (old == 0) != (new == 0):
        raise UserError(f"{path}: was trained with gan.adv_weight {old:g} but the config says {new:g}; an L1-only run "
                        f"(weight 0) and an adversarial one cannot continue each other (--overwrite starts over)")


def load_init(tr: Trainer, cfg: Config) -> None:
    """gan.init: start from another run's generator and discriminator weights (architecture must match)."""
    path = cfg.gan.init
    ckpt = load_checkpoint(path, "GAN")
    check_format(ckpt, path)
    saved = (ckpt.get("config") or {}).get("gan") or {}
    check_architecture(saved, cfg, f"gan.init: {path} has", "warm starts need the same architecture")
    check_adversarial(saved, cfg, f"gan.init: {path}")
    try:
        tr.g.load_state_dict(ckpt["generator"])
        if "discriminator" in ckpt:  # an exported generator (a shipped model) holds none: D starts fresh
            tr.d.load_state_dict(ckpt["discriminator"])
    except RuntimeError as exc:
        raise UserError(f"gan.init: {path}: weights do not fit ({str(exc).splitlines()[0][:160]})") from None


# ----------------------------------------------------------------------------------------- training
def _build(cfg: Config, n_priors: int, device: torch.device) -> Trainer:
    return build_trainer(cfg.gan, n_priors, device)


def _wrap_ddp(tr: Trainer, device: torch.device) -> None:
    ids = [device.index] if device.type == "cuda" else None
    tr.g_run, tr.d_run = DDP(tr.g, device_ids=ids), DDP(tr.d, device_ids=ids)


def _restore(tr: Trainer, ckpt: dict, cfg: Config, device: torch.device) -> None:
    tr.g.load_state_dict(ckpt["generator"])
    tr.d.load_state_dict(ckpt["discriminator"])
    load_optimizer(tr.opt_g, ckpt["optim_g"], cfg.gan)
    load_optimizer(tr.opt_d, ckpt["optim_d"], cfg.gan)
    runtime.set_rng_state(ckpt["rng"], device)


def _fmt_epoch(epoch: int, epochs: int, h: dict) -> str:
    adv = (f" G adv {h['g_adv']:.3f} | D(real) {h['d_real']:.2f} D(fake) {h['d_fake']:.2f}"
           if not math.isnan(h["d_real"]) else " (L1 only: no discriminator)")
    return (f"epoch {epoch}/{epochs}: L1 {h['l1']:.3f}{adv} | val L1 {h['val_l1']:.3f} r {h['val_r']:.3f} ssim "
            f"{h['val_ssim']:.3f} | {h['seconds']:.1f}s")


def run_gan_stage(cfg: Config, resume: bool = False, overwrite: bool = False, log: Log = print,
                  on_step: StepCallback | None = None, on_finish: FinishCallback | None = None) -> dict:
    """`train.py --stage gan`: train the generator (single process, or one rank of a torchrun job).

    `on_step(step)` runs after every trained step (before its checkpoint); `on_finish(rank, summary)` at the end,
    with the hashes of the final generator and discriminator weights (core/stage.py).
    """
    with joined(cfg.gan.device) as (ctx, device), training_backends(device):
        stage = Stage(gan_outputs(cfg), ctx, device, log, cfg.gan.checkpoint_every, on_step, on_finish)
        return _train(cfg, resume, overwrite, stage)


@dataclass
class _Run:
    """One training run: the networks and what a checkpoint saves besides them (progress, history, last scores)."""

    cfg: Config
    tr: Trainer
    stage: Stage  # the outputs, the process's place in the job, the caller's callbacks
    pmeta: dict
    epoch: int = 0
    step: int = 0
    start_batch: int = 0
    order: Tensor | None = None  # this epoch's sample order (None: not drawn yet)
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # the last validation scores
    sums: Tensor | None = None  # this epoch's EPOCH_STATS sums so far
    best_r: float = -math.inf  # the best validation r so far
    budget: Budget = field(default_factory=Budget)  # samples, steps, FLOPs so far (core/budget.py)
    started: float = field(default_factory=time.time)  # when this process started the run

    @property
    def ctx(self) -> Dist:
        return self.stage.ctx

    @property
    def device(self) -> torch.device:
        return self.stage.device

    @property
    def paths(self) -> dict[str, Path]:
        return self.stage.paths

    def save(self, key: str, batch_in_epoch: int, done_epochs: int, data_order: Tensor, epoch_sums: Tensor) -> None:
        """A full-state checkpoint as output `key` (rank 0): networks, optimisers, RNG states, progress (exact
        resume)."""
        gc, tr = self.cfg.gan, self.tr
        self.stage.save(key, lambda: {
            "format": GAN_FORMAT, "variant": gc.variant, "precision": tr.precision, "generator_config": tr.g.config(),
            "generator": _cpu_state(tr.g),
            "discriminator_config": {"width": gc.disc_width, "n_layers": gc.disc_layers},
            "discriminator": _cpu_state(tr.d), "optim_g": tr.opt_g.state_dict(), "optim_d": tr.opt_d.state_dict(),
            "epoch": done_epochs, "step": self.step, "batch_in_epoch": batch_in_epoch,
            "rng": runtime.rng_state(self.device),
            "data_order": data_order.cpu(), "epoch_sums": epoch_sums.cpu(), "world_size": self.ctx.world,
            "config": to_dict(self.cfg), "priors_meta": self.pmeta, "metrics": self.metrics, "history": self.history,
            "budget": self.budget_entry(),
        })

    def budget_entry(self) -> dict:
        """The budget so far, its wall seconds including this process's."""
        return self.budget.as_dict(wall_s=self.budget.wall_s + time.time() - self.started)

    def save_milestones(self, before: int) -> None:
        """gan.milestones: the generator as `<prefix>-s<samples>.pt` for each milestone the last step reached (the
        samples seen went from `before` to past it): what inference loads, with the budget spent so far."""
        gc, tr = self.cfg.gan, self.tr
        for m in (m for m in gc.milestones if before < m <= self.budget.samples):
            self.stage.save(f"s{m}", lambda m=m: {
                "format": GAN_FORMAT, "variant": gc.variant, "precision": tr.precision,
                "generator_config": tr.g.config(), "generator": _cpu_state(tr.g), "epoch": self.epoch,
                "step": self.step, "config": to_dict(self.cfg), "priors_meta": self.pmeta, "metrics": {},
                "history": self.history, "milestone": m, "budget": self.budget_entry()})

    def count_step_flops(self, data: MapData) -> None:
        """The FLOPs of one step (core/budget.py): `train_step` on copies of the networks and optimisers with a
        batch of gan.batch_size samples, so the run's weights and RNG streams stay untouched; times the processes."""
        gc, tr = self.cfg.gan, self.tr
        idx = torch.arange(min(gc.batch_size, len(data)))
        image, priors, target = data.batch(idx, self.device)
        reference, paired = data.reference(idx, self.device) if gc.sanity_weight > 0 else (None, None)
        g, d = copy.deepcopy(tr.g), copy.deepcopy(tr.d)
        twin = dataclasses.replace(tr, g=g, d=d, g_run=g, d_run=d, d_frozen=None,
                                   opt_g=adam(g.parameters(), gc, self.device),
                                   opt_d=adam(d.parameters(), gc, self.device))
        flops = count_flops(lambda: train_step(twin, image, priors, target, reference, paired), self.device)
        self.budget.step_flops = flops * self.ctx.world

    def train_epoch(self, data: MapData) -> int:
        """Train the rest of the current epoch (saving `last` every gan.checkpoint_every steps); its batch count."""
        gc, ctx = self.cfg.gan, self.ctx
        if self.order is None:
            self.order = runtime.epoch_order(gc.seed, self.epoch, len(data))
        mine = shard(self.order, ctx.rank, ctx.world)
        batches = math.ceil(len(mine) / gc.batch_size)
        bar = tqdm(total=batches, initial=self.start_batch, desc=f"epoch {self.epoch + 1}/{gc.epochs}",
                   dynamic_ncols=True, leave=False, disable=not ctx.main)
        for b in range(self.start_batch, batches):
            idx = mine[b * gc.batch_size:(b + 1) * gc.batch_size]
            image, priors, target = data.batch(idx, self.device)
            if gc.image_dropout > 0:  # global RNG: seeded, saved in checkpoints, so resume stays exact
                keep = (torch.rand(len(image)) >= gc.image_dropout).to(image.device, image.dtype)
                image = image * keep.view(-1, 1, 1, 1)
            reference, paired = data.reference(idx, self.device) if gc.sanity_weight > 0 else (None, None)
            stats = train_step(self.tr, image, priors, target, reference, paired)
            self.sums += stats  # on the device: no host read per step
            self.step += 1
            before = self.budget.samples
            self.budget.add_step(len(idx) * ctx.world)
            bar.update(1)
            if ctx.main and b % BAR_EVERY == 0:
                d_real, l1 = stats[[0, 3]].tolist()  # one host read
                bar.set_postfix(l1=f"{l1:.3f}", **({} if math.isnan(d_real) else {"d_real": f"{d_real:.2f}"}))
            if self.stage.step_done(self.step, mid_epoch=b + 1 < batches):
                # every rank resumes with the ranks' mean partial sums, so the epoch's all-reduced total is right
                partial = all_sum(ctx, self.sums.clone()) / ctx.world
                self.save("last", b + 1, self.epoch, self.order, partial)
            self.save_milestones(before)
        bar.close()
        return batches

    def end_epoch(self, batches: int, val: MapData, count: int, t0: float) -> dict:
        """Validate, record the epoch in the history and save `best` (if it is) and `last`; the epoch's entry."""
        gc, ctx = self.cfg.gan, self.ctx
        means = (all_sum(ctx, self.sums.clone()) / (batches * ctx.world)).tolist()
        self.metrics = self.tr.validate(val, gc.batch_size, self.device, ctx)
        self.epoch += 1
        entry = {"epoch": self.epoch, "step": self.step, **dict(zip(EPOCH_STATS, means, strict=True)),
                 **{f"val_{k}": v for k, v in self.metrics.items()}, "seconds": time.time() - t0}
        self.history.append(entry)
        self.start_batch, self.order = 0, None
        self.sums.zero_()
        if ctx.main:
            next_order = runtime.epoch_order(gc.seed, self.epoch, count)
            if entry["val_r"] > self.best_r:
                self.best_r = entry["val_r"]
                self.save("best", 0, self.epoch, next_order, self.sums)
            self.save("last", 0, self.epoch, next_order, self.sums)
        return entry


def _check_resumed_data(ckpt: dict, pmeta: dict, count: int, last: Path) -> None:
    """A resumed run must train on prior files like the ones it started with, of the same size."""
    for key in AGREE_KEYS:
        if ckpt["priors_meta"].get(key) != pmeta[key]:
            raise UserError(f"{last}: trained on priors with {key} {ckpt['priors_meta'].get(key)!r},"
                            f" the prior files now have {pmeta[key]!r}")
    if len(ckpt["data_order"]) != count:
        raise UserError(f"{last}: trained on {len(ckpt['data_order'])} samples, the training "
                        f"files now hold {count}; resume with the same gan.train files")


def _resumed_budget(ckpt: dict, world: int) -> Budget:
    """The budget a checkpoint recorded; for one of an earlier version (none), estimated from its step count, batch
    size and history."""
    saved = Budget.from_dict(ckpt.get("budget"))
    if saved is not None:
        return saved
    batch = int(((ckpt.get("config") or {}).get("gan") or {}).get("batch_size", 0))
    return Budget(samples=int(ckpt["step"]) * batch * int(ckpt.get("world_size", world)), steps=int(ckpt["step"]),
                  wall_s=float(sum(h.get("seconds", 0.0) for h in ckpt["history"])), estimated=True)


def _start(cfg: Config, ckpt: dict | None, pmeta: dict, stage: Stage, data: MapData, started: float) -> _Run:
    """The networks (seeded), restored from `ckpt` when resuming, and the run's progress and budget (one step's
    FLOPs counted on copies, rank 0); compiled (gan.compile) after the DDP wrap."""
    ctx, device = stage.ctx, stage.device
    run = _Run(cfg, _build(cfg, pmeta["n"], device), stage, pmeta,
               sums=torch.zeros(len(EPOCH_STATS), dtype=torch.float64, device=device), started=started)
    if ckpt is None and cfg.gan.init:
        load_init(run.tr, cfg)
    if ckpt is not None:
        _restore(run.tr, ckpt, cfg, device)
        run.epoch, run.step, run.start_batch = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["batch_in_epoch"])
        run.order, run.history = ckpt["data_order"], list(ckpt["history"])
        if run.start_batch:
            run.sums = ckpt["epoch_sums"].to(device=device, dtype=torch.float64)
        run.metrics = dict(ckpt["metrics"])
        run.budget = _resumed_budget(ckpt, ctx.world)
    run.budget.threads, run.budget.processes = torch.get_num_threads(), ctx.world
    run.budget.precision, run.budget.device = run.tr.precision, device.type
    if run.budget.step_flops is None and ctx.main:
        run.count_step_flops(data)
    run.best_r = max((h["val_r"] for h in run.history), default=-math.inf)
    if ctx.enabled:
        _wrap_ddp(run.tr, device)
    if cfg.gan.compile:
        compile_trainer(run.tr, device, stage.log)
    return run


def _train(cfg: Config, resume: bool, overwrite: bool, stage: Stage) -> dict:
    started = time.time()
    gc, ctx, device, log, paths = cfg.gan, stage.ctx, stage.device, stage.log, stage.paths
    train_data, val_data, pmeta = everywhere(ctx, lambda: load_gan_data(cfg))
    ckpt = stage.begin(resume, overwrite, lambda last: _resumable_checkpoint(cfg, last, ctx.world))
    if ckpt is not None:
        everywhere(ctx, lambda: _check_resumed_data(ckpt, pmeta, len(train_data), paths["last"]))
    if gc.amp == "bf16":
        log("gan: gan.amp is deprecated; gan.amp: bf16 trains as gan.precision: bf16 (set that and drop gan.amp)")
    run = _start(cfg, ckpt, pmeta, stage, train_data, started)
    stage.write_config(cfg)
    n_params = sum(p.numel() for p in run.tr.g.parameters())
    log(f"gan: {gc.variant} generator ({n_params:,} params) on {len(train_data)} train / {len(val_data)} val samples "
        f"(S={pmeta['size']}, n={pmeta['n']}), batch {gc.batch_size}"
        + (f" x {ctx.world} processes" if ctx.enabled else "") + f", {device}, {run.tr.precision}"
        + (", compiled" if run.tr.d_frozen is not None else "")
        + (f"; resuming at epoch {run.epoch + 1}, batch {run.start_batch}, step {run.step}" if ckpt is not None
           else f"; warm start from {gc.init}" if gc.init else ""))
    if run.epoch >= gc.epochs:
        log(f"gan: nothing to do ({run.epoch} of {gc.epochs} epochs done; raise gan.epochs to train on)")
    run.tr.g.train()
    run.tr.d.train()
    while run.epoch < gc.epochs:
        t0 = time.time()
        batches = run.train_epoch(train_data)
        entry = run.end_epoch(batches, val_data, len(train_data), t0)
        log(_fmt_epoch(run.epoch, gc.epochs, entry))
    stage.finish(lambda: {"generator": state_sha256(_cpu_state(run.tr.g)),
                          "discriminator": state_sha256(_cpu_state(run.tr.d)), "step": run.step,
                          "world_size": ctx.world})
    return _finish(run, log)


def _finish(run: _Run, log: Log) -> dict:
    """Export the best epoch's generator (rank 0) and summarise the run."""
    paths, history = run.paths, run.history
    best = max(history, key=lambda h: h["val_r"], default=None)
    if best is not None and run.ctx.rank == 0 and paths["best"].is_file():
        export_generator(paths["best"], paths["export"], history=history)
        log(f"gan: best epoch {best['epoch']} (val L1 {best['val_l1']:.3f} r {best['val_r']:.3f} ssim "
            f"{best['val_ssim']:.3f}) -> {paths['best']}; last -> {paths['last']}; generator only -> "
            f"{paths['export']}")
    return {"best_epoch": best["epoch"] if best else None, "best_metrics": best, "metrics": run.metrics,
            "history": history, "epochs": run.epoch, "step": run.step, "best": str(paths["best"]),
            "last": str(paths["last"]), "budget": run.budget_entry()}
