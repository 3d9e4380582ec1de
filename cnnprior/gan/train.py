"""The GAN stage: pix2pix training of an LSFT/GSFT generator, full-state checkpoints, exact resume, DDP."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from cnnprior.core import generators, runtime
from cnnprior.core.config import Config, save_config, to_dict
from cnnprior.core.distributed import Dist, all_sum, everywhere, from_main, init_distributed, shard
from cnnprior.core.errors import UserError
from cnnprior.core.metrics import fidelity
from cnnprior.core.runtime import Log, atomic_torch_save, load_checkpoint, seed_everything, state_sha256
from cnnprior.core.testhooks import TestHooks
from cnnprior.gan.checkpoint import ARCH_KEYS, GAN_FORMAT, INPUT_KEYS, SCHEMA_KEYS, check_format, export_generator
from cnnprior.gan.data import AGREE_KEYS, MapData, load_gan_data
from cnnprior.gan.models import build_discriminator, build_generator

__all__ = ["check_adversarial", "EPOCH_STATS", "gan_paths", "GANLoss", "load_init", "run_gan_stage"]

EPOCH_STATS = ("d_real", "d_fake", "g_adv", "l1", "d_loss")


# ----------------------------------------------------------------------------------------- loss, state
class GANLoss(nn.Module):
    """Adversarial loss on logits against all-real / all-fake labels: BCE-with-logits or LSGAN's MSE."""

    def __init__(self, kind: str = "bce") -> None:
        super().__init__()
        self.kind = kind
        self.fn = nn.BCEWithLogitsLoss() if kind == "bce" else nn.MSELoss()

    def forward(self, logits: Tensor, real: bool) -> Tensor:
        return self.fn(logits, torch.full_like(logits, 1.0 if real else 0.0))

    def score(self, logits: Tensor) -> Tensor:
        """Mean D output: sigmoid probability for BCE, the raw regression value (target 1/0) for LSGAN."""
        return (torch.sigmoid(logits) if self.kind == "bce" else logits).mean()


def _set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------------- checkpoints
def gan_paths(cfg: Config) -> dict[str, Path]:
    """The stage's outputs: `last` and `best` checkpoints and the resolved YAML."""
    prefix = cfg.gan_prefix
    return {"last": Path(f"{prefix}-last.pt"), "best": Path(f"{prefix}-best.pt"), "yaml": Path(f"{prefix}.yaml"),
            "export": Path(f"{prefix}.pt")}


def _prepare_outputs(cfg: Config, resume: bool, overwrite: bool, world: int) -> dict | None:
    """Refuse to clobber outputs; on resume load `last` and check it fits the config."""
    paths = gan_paths(cfg)
    if resume:
        last = paths["last"]
        if not last.is_file():
            raise UserError(f"{last}: no GAN checkpoint to resume from; drop --resume to start a new run")
        ckpt = load_checkpoint(last, "GAN")
        check_format(ckpt, last)
        saved = (ckpt.get("config") or {}).get("gan") or {}
        for key in ARCH_KEYS:
            if saved.get(key) != getattr(cfg.gan, key):
                raise UserError(f"{last}: was trained with gan.{key}: {saved.get(key)!r} but the config says "
                                f"{getattr(cfg.gan, key)!r}; keep it, or --overwrite to start over")
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
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{existing[0]}: GAN outputs exist; use --resume to continue, --overwrite to start over, "
                        f"or another gan.out")
    for key in ("last", "best"):
        paths[key].unlink(missing_ok=True)
    return None


def check_adversarial(saved: dict, cfg: Config, path: str) -> None:
    """A run that continues (resume) or starts from (gan.init) another keeps its kind: adversarial or L1-only
    (gan.adv_weight 0), so an L1-only twin never holds adversarially trained weights, nor the reverse."""
    old, new = float(saved.get("adv_weight", 1.0)), float(cfg.gan.adv_weight)
    if (old == 0) != (new == 0):
        raise UserError(f"{path}: was trained with gan.adv_weight {old:g} but the config says {new:g}; an L1-only run "
                        f"(weight 0) and an adversarial one cannot continue each other (--overwrite starts over)")


def load_init(tr: _Trainer, cfg: Config) -> None:
    """gan.init: start from another run's generator and discriminator weights (architecture must match)."""
    path = cfg.gan.init
    ckpt = load_checkpoint(path, "GAN")
    check_format(ckpt, path)
    saved = (ckpt.get("config") or {}).get("gan") or {}
    for key in ARCH_KEYS:
        if saved.get(key) != getattr(cfg.gan, key):
            raise UserError(f"gan.init: {path} has gan.{key}: {saved.get(key)!r} but the config says "
                            f"{getattr(cfg.gan, key)!r}; warm starts need the same architecture")
    check_adversarial(saved, cfg, f"gan.init: {path}")
    if "discriminator" not in ckpt:
        raise UserError(f"gan.init: {path} holds no discriminator (an exported generator); use the run's "
                        f"-last.pt or -best.pt checkpoint")
    try:
        tr.g.load_state_dict(ckpt["generator"])
        tr.d.load_state_dict(ckpt["discriminator"])
    except RuntimeError as exc:
        raise UserError(f"gan.init: {path}: weights do not fit ({str(exc).splitlines()[0][:160]})") from None


# ----------------------------------------------------------------------------------------- training
@dataclass
class _Trainer:
    """The networks, optimisers and loss of one run; `step` trains one batch."""

    g: nn.Module  # unwrapped generator
    d: nn.Module  # unwrapped discriminator
    g_run: nn.Module  # what training calls: the module, or its DDP wrapper
    d_run: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    crit: GANLoss
    adv_weight: float
    l1_weight: float
    autocast: Callable[[], AbstractContextManager]

    def step(self, image: Tensor, priors: Tensor, target: Tensor) -> Tensor:
        """One D update then one G update (pix2pix); returns the EPOCH_STATS values of this batch. With the
        adversarial weight 0 (the L1-only twins, the learned baselines) D cannot change G: it is not trained and
        its statistics read NaN."""
        with self.autocast():
            fake = self.g_run(image, priors)
        if self.adv_weight == 0:
            self.opt_g.zero_grad(set_to_none=True)
            l1 = (fake.float() - target).abs().mean()
            (self.l1_weight * l1).backward()
            self.opt_g.step()
            nan = torch.full((), float("nan"), device=l1.device)
            return torch.stack([nan, nan, nan, l1.detach(), nan]).double()
        # D: real and fake pairs in ONE forward, so DDP sees one forward per backward.
        self.opt_d.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.d_run(torch.cat([image, image]), torch.cat([target, fake.detach().to(target.dtype)]))
        real_logits, fake_logits = logits.float().chunk(2)
        loss_d = 0.5 * (self.crit(real_logits, True) + self.crit(fake_logits, False))
        loss_d.backward()
        self.opt_d.step()
        # G: the unwrapped D with frozen weights; DDP would expect D's gradients to be reduced.
        _set_requires_grad(self.d, False)
        self.opt_g.zero_grad(set_to_none=True)
        with self.autocast():
            adv_logits = self.d(image, fake)
        g_adv = self.crit(adv_logits.float(), True)
        l1 = (fake.float() - target).abs().mean()
        (self.adv_weight * g_adv + self.l1_weight * l1).backward()
        self.opt_g.step()
        _set_requires_grad(self.d, True)
        return torch.stack([self.crit.score(real_logits), self.crit.score(fake_logits), g_adv, l1,
                            loss_d]).detach().double()

    @torch.no_grad()
    def validate(self, data: MapData, batch_size: int, device: torch.device, ctx: Dist) -> dict[str, float]:
        """Mean L1, Pearson r and SSIM of G's maps vs the targets (eval mode; ranks share the samples)."""
        self.g.eval()
        mine = torch.arange(len(data))[ctx.rank::ctx.world]
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for s in range(0, len(mine), batch_size):
            image, priors, target = data.batch(mine[s:s + batch_size], device)
            with self.autocast():
                pred = self.g(image, priors)
            f = fidelity(pred.float(), target)
            sums += torch.stack([f["l1"].sum().double(), f["r"].sum().double(), f["ssim"].sum().double(),
                                 torch.tensor(float(len(pred)), dtype=torch.float64, device=device)])
        self.g.train()
        l1, r, ssim, count = all_sum(ctx, sums).tolist()
        return {"l1": l1 / count, "r": r / count, "ssim": ssim / count}


def _build(cfg: Config, n_priors: int, device: torch.device) -> _Trainer:
    gc = cfg.gan
    seed_everything(gc.seed)  # same initial weights on every rank
    g = build_generator(gc.variant, n_priors, gc.width, gc.depth, gc.cond_channels, gc.cond_hidden).to(device)
    d = build_discriminator(gc.disc_width, gc.disc_layers).to(device)
    opt_g = torch.optim.Adam(g.parameters(), lr=gc.lr, betas=(gc.beta1, gc.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=gc.lr, betas=(gc.beta1, gc.beta2))
    use_bf16 = device.type == "cuda" and gc.amp == "bf16"

    def autocast() -> AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # a learned baseline is never trained adversarially, whatever gan.adv_weight says
    adv_weight = gc.adv_weight if generators.VARIANTS[gc.variant].adversarial else 0.0
    return _Trainer(g, d, g, d, opt_g, opt_d, GANLoss(gc.loss), adv_weight, gc.l1_weight, autocast)


def _wrap_ddp(tr: _Trainer, device: torch.device) -> None:
    ids = [device.index] if device.type == "cuda" else None
    tr.g_run, tr.d_run = DDP(tr.g, device_ids=ids), DDP(tr.d, device_ids=ids)


def _restore(tr: _Trainer, ckpt: dict, cfg: Config, device: torch.device) -> None:
    tr.g.load_state_dict(ckpt["generator"])
    tr.d.load_state_dict(ckpt["discriminator"])
    tr.opt_g.load_state_dict(ckpt["optim_g"])
    tr.opt_d.load_state_dict(ckpt["optim_d"])
    for opt in (tr.opt_g, tr.opt_d):  # the config's lr/betas win (e.g. a lower lr for a continued run)
        for group in opt.param_groups:
            group["lr"], group["betas"] = cfg.gan.lr, (cfg.gan.beta1, cfg.gan.beta2)
    runtime.set_rng_state(ckpt["rng"], device)


def _fmt_epoch(epoch: int, epochs: int, h: dict) -> str:
    adv = (f" G adv {h['g_adv']:.3f} | D(real) {h['d_real']:.2f} D(fake) {h['d_fake']:.2f}"
           if not math.isnan(h["d_real"]) else " (L1 only: no discriminator)")
    return (f"epoch {epoch}/{epochs}: L1 {h['l1']:.3f}{adv} | val L1 {h['val_l1']:.3f} r {h['val_r']:.3f} ssim "
            f"{h['val_ssim']:.3f} | {h['seconds']:.1f}s")


def run_gan_stage(cfg: Config, resume: bool = False, overwrite: bool = False, log: Log = print) -> dict:
    """`train.py --stage gan`: train the generator (single process, or one rank of a torchrun job)."""
    ctx, device = init_distributed(cfg.gan.device)
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    try:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)  # cheap on CPU; exact resume relies on it
        else:
            torch.backends.cudnn.benchmark = True  # speed over bit-exactness on GPUs
        return _train(cfg, resume, overwrite, log if ctx.main else (lambda _msg: None), ctx, device)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = benchmark
        if ctx.enabled:
            dist.destroy_process_group()


@dataclass
class _Run:
    """One training run: the networks and what a checkpoint saves besides them (progress, history, last scores)."""

    cfg: Config
    tr: _Trainer
    ctx: Dist
    device: torch.device
    pmeta: dict
    paths: dict[str, Path]
    epoch: int = 0
    step: int = 0
    start_batch: int = 0
    order: Tensor | None = None  # this epoch's sample order (None: not drawn yet)
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # the last validation scores
    sums: Tensor | None = None  # this epoch's EPOCH_STATS sums so far
    best_r: float = -math.inf  # the best validation r so far

    def save(self, path: Path, batch_in_epoch: int, done_epochs: int, data_order: Tensor, epoch_sums: Tensor) -> None:
        """A full-state checkpoint: networks, optimisers, RNG states, progress (exact resume)."""
        gc, tr = self.cfg.gan, self.tr
        atomic_torch_save({
            "format": GAN_FORMAT, "variant": gc.variant, "generator_config": tr.g.config(),
            "generator": _cpu_state(tr.g),
            "discriminator_config": {"width": gc.disc_width, "n_layers": gc.disc_layers},
            "discriminator": _cpu_state(tr.d), "optim_g": tr.opt_g.state_dict(), "optim_d": tr.opt_d.state_dict(),
            "epoch": done_epochs, "step": self.step, "batch_in_epoch": batch_in_epoch,
            "rng": runtime.rng_state(self.device),
            "data_order": data_order.cpu(), "epoch_sums": epoch_sums.cpu(), "world_size": self.ctx.world,
            "config": to_dict(self.cfg), "priors_meta": self.pmeta, "metrics": self.metrics, "history": self.history,
        }, path)

    def train_epoch(self, data: MapData, hooks: TestHooks) -> int:
        """Train the rest of the current epoch (saving `last` every gan.checkpoint_every steps); its batch count."""
        gc, ctx = self.cfg.gan, self.ctx
        if self.order is None:
            self.order = runtime.epoch_order(gc.seed, self.epoch, len(data))
        mine = shard(self.order, ctx.rank, ctx.world)
        batches = math.ceil(len(mine) / gc.batch_size)
        bar = tqdm(total=batches, initial=self.start_batch, desc=f"epoch {self.epoch + 1}/{gc.epochs}",
                   dynamic_ncols=True, leave=False, disable=not ctx.main)
        for b in range(self.start_batch, batches):
            image, priors, target = data.batch(mine[b * gc.batch_size:(b + 1) * gc.batch_size], self.device)
            if gc.image_dropout > 0:  # global RNG: seeded, saved in checkpoints, so resume stays exact
                keep = (torch.rand(len(image)) >= gc.image_dropout).to(image.device, image.dtype)
                image = image * keep.view(-1, 1, 1, 1)
            stats = self.tr.step(image, priors, target)
            self.sums += stats
            self.step += 1
            bar.update(1)
            if ctx.main and b % 10 == 0:
                d_real = stats[0].item()
                bar.set_postfix(l1=f"{stats[3].item():.3f}", **({} if math.isnan(d_real) else {"d_real": f"{d_real:.2f}"}))
            hooks.after_step(self.step)
            if gc.checkpoint_every and self.step % gc.checkpoint_every == 0 and b + 1 < batches:
                # every rank resumes with the ranks' mean partial sums, so the epoch's all-reduced total is right
                partial = all_sum(ctx, self.sums.clone()) / ctx.world
                if ctx.main:
                    self.save(self.paths["last"], b + 1, self.epoch, self.order, partial)
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
                self.save(self.paths["best"], 0, self.epoch, next_order, self.sums)
            self.save(self.paths["last"], 0, self.epoch, next_order, self.sums)
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


def _start(cfg: Config, ckpt: dict | None, pmeta: dict, ctx: Dist, device: torch.device) -> _Run:
    """The networks (seeded), restored from `ckpt` when resuming, and the run's progress."""
    run = _Run(cfg, _build(cfg, pmeta["n"], device), ctx, device, pmeta, gan_paths(cfg),
               sums=torch.zeros(len(EPOCH_STATS), dtype=torch.float64, device=device))
    if ckpt is None and cfg.gan.init:
        load_init(run.tr, cfg)
    if ckpt is not None:
        _restore(run.tr, ckpt, cfg, device)
        run.epoch, run.step, run.start_batch = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["batch_in_epoch"])
        run.order, run.history = ckpt["data_order"], list(ckpt["history"])
        if run.start_batch:
            run.sums = ckpt["epoch_sums"].to(device=device, dtype=torch.float64)
        run.metrics = dict(ckpt["metrics"])
    run.best_r = max((h["val_r"] for h in run.history), default=-math.inf)
    if ctx.enabled:
        _wrap_ddp(run.tr, device)
    return run


def _train(cfg: Config, resume: bool, overwrite: bool, log: Log, ctx: Dist, device: torch.device) -> dict:
    gc, paths = cfg.gan, gan_paths(cfg)
    train_data, val_data, pmeta = everywhere(ctx, lambda: load_gan_data(cfg))
    ckpt = from_main(ctx, lambda: _prepare_outputs(cfg, resume, overwrite, ctx.world))
    if ckpt is not None:
        everywhere(ctx, lambda: _check_resumed_data(ckpt, pmeta, len(train_data), paths["last"]))
    run = _start(cfg, ckpt, pmeta, ctx, device)
    if ctx.main:
        save_config(cfg, paths["yaml"])
    n_params = sum(p.numel() for p in run.tr.g.parameters())
    log(f"gan: {gc.variant} generator ({n_params:,} params) on {len(train_data)} train / {len(val_data)} val samples "
        f"(S={pmeta['size']}, n={pmeta['n']}), batch {gc.batch_size}"
        + (f" x {ctx.world} processes" if ctx.enabled else "") + f", {device}"
        + (f"; resuming at epoch {run.epoch + 1}, batch {run.start_batch}, step {run.step}" if ckpt is not None
           else f"; warm start from {gc.init}" if gc.init else ""))
    if run.epoch >= gc.epochs:
        log(f"gan: nothing to do ({run.epoch} of {gc.epochs} epochs done; raise gan.epochs to train on)")
    hooks = TestHooks()
    run.tr.g.train()
    run.tr.d.train()
    while run.epoch < gc.epochs:
        t0 = time.time()
        batches = run.train_epoch(train_data, hooks)
        entry = run.end_epoch(batches, val_data, len(train_data), t0)
        log(_fmt_epoch(run.epoch, gc.epochs, entry))
    hooks.dump(ctx.rank, lambda: {"generator": state_sha256(_cpu_state(run.tr.g)),
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
            "last": str(paths["last"])}
