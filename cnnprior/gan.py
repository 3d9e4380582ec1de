"""The GAN stage: pix2pix training of an LSFT/GSFT generator, full-state checkpoints, exact resume, DDP."""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from cnnprior.baselines import choose
from cnnprior.config import Config, save_config, to_dict
from cnnprior.errors import UserError
from cnnprior.metrics import fidelity
from cnnprior.models import GSFTGenerator, LSFTGenerator, build_discriminator, build_generator
from cnnprior.priorfile import PriorFile, read_priors
from cnnprior.runtime import (
    Log,
    atomic_torch_save,
    epoch_order,
    load_checkpoint,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from cnnprior.testhooks import TestHooks

GAN_FORMAT = "cnnprior-gan/1"
GENERATOR_CLASSES = {"lsft": LSFTGenerator, "gsft": GSFTGenerator}
# Prior files trained on together must agree on these sidecar keys.
AGREE_KEYS = ("size", "n", "order", "target", "method")
# Config keys that shape the networks: a resumed run must keep them.
ARCH_KEYS = ("variant", "width", "depth", "cond_channels", "cond_hidden", "disc_width", "disc_layers")
SCHEMA_KEYS = frozenset({"format", "variant", "generator_config", "generator", "discriminator_config",
                         "discriminator", "optim_g", "optim_d", "epoch", "step", "batch_in_epoch", "rng",
                         "data_order", "epoch_sums", "config", "priors_meta", "metrics", "history"})
# Checkpoint entries that are training state, not description (left out of load_generator's meta).
STATE_KEYS = ("generator", "discriminator", "optim_g", "optim_d", "rng", "data_order", "epoch_sums")
EPOCH_STATS = ("d_real", "d_fake", "g_adv", "l1", "d_loss")

T = TypeVar("T")


# ----------------------------------------------------------------------------------------- data
@dataclass
class MapData:
    """Samples as compact uint8 tensors: image (N,3,S,S), priors (N,n,S,S), target (N,1,S,S)."""

    image: Tensor
    priors: Tensor
    target: Tensor

    def __len__(self) -> int:
        return self.image.shape[0]

    @classmethod
    def from_files(cls, files: list[PriorFile], limit: int = 0) -> MapData:
        """Concatenate prior files (the first `limit` records in all when limit > 0)."""
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        left = limit or None
        for pf in files:
            rec = pf.records if left is None else pf.records[:left]
            parts.append((torch.from_numpy(np.ascontiguousarray(rec["image"])).permute(0, 3, 1, 2).contiguous(),
                          torch.from_numpy(np.ascontiguousarray(rec["priors"])),
                          torch.from_numpy(np.ascontiguousarray(rec["target"])).unsqueeze(1)))
            if left is not None:
                left -= len(rec)
                if left <= 0:
                    break
        return cls(*(torch.cat(t) for t in zip(*parts, strict=True)))

    def batch(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Float tensors in [0, 1] (as PriorFile.tensors gives them) for samples `idx`, on `device`."""
        return tuple(t[idx].to(device, non_blocking=True).float() / 255.0  # type: ignore[return-value]
                     for t in (self.image, self.priors, self.target))


def _check_agree(ref: PriorFile, other: PriorFile) -> None:
    for key in AGREE_KEYS:
        if other.meta.get(key) != ref.meta.get(key):
            raise UserError(f"{other.path}: priors {key} is {other.meta.get(key)!r} but {ref.path} has "
                            f"{ref.meta.get(key)!r}; GAN prior files must agree on {', '.join(AGREE_KEYS)}")


def priors_meta(pf: PriorFile, train_files: list[str]) -> dict:
    """What a generator was trained on, from a prior file's sidecar (stored in every GAN checkpoint)."""
    m = pf.meta
    return {"size": int(m["size"]), "n": int(m["n"]), "order": m.get("order"), "target": m.get("target"),
            "method": m.get("method"), "include_target_layer": m.get("include_target_layer"),
            "explain": m.get("explain"), "dataset": m.get("dataset"),
            "class_names": [str(c) for c in m.get("class_names") or []],
            "cnn_arch": (m.get("cnn") or {}).get("arch"), "target_layer": m.get("target_layer"),
            "prior_layers": [[str(x) for x in layers] for layers in m.get("prior_layers") or []],
            "positions": [int(p) for p in m.get("positions") or []], "train_files": list(train_files),
            "exclude": list(m.get("exclude") or []), "layer_outputs": m.get("layer_outputs", "raw"),
            "layers": [str(x) for x in m.get("layers") or []]}


def randomised_files(cfg: Config) -> list[str]:
    """The randomised-copy prior files for gan.randomised_share: gan.randomised, or all the priors stage wrote."""
    if cfg.gan.randomised:
        return list(cfg.gan.randomised)
    prefix = Path(cfg.priors_prefix)
    return sorted(str(p) for p in prefix.parent.glob(f"{prefix.name}-train-random-*.npy"))


def with_randomised(cfg: Config, train: MapData, ref: PriorFile) -> tuple[MapData, dict]:
    """Training data with randomised-copy records added so that they make up gan.randomised_share of it."""
    names = randomised_files(cfg)
    if not names:
        raise UserError(f"gan.randomised_share is {cfg.gan.randomised_share} but no randomised-copy prior files "
                        f"exist ({cfg.priors_prefix}-train-random-*.npy); make them with `python train.py --config "
                        f"{cfg.source_file or '<config>'} --stage priors --set \"priors.splits=[]\" --set "
                        f"\"priors.randomised_stages=[all]\"` or set gan.randomised")
    files = [read_priors(f) for f in names]
    for pf in files:
        _check_agree(ref, pf)
    pool = MapData.from_files(files)
    share = cfg.gan.randomised_share
    want = round(share / (1.0 - share) * len(train))
    if want > len(pool):
        raise UserError(f"gan.randomised_share {share} needs {want} randomised-copy records but "
                        f"{', '.join(names)} hold {len(pool)}; lower the share or raise priors.randomised_limit")
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.gan.seed))[:want]
    mixed = MapData(*(torch.cat([a, b[pick]]) for a, b in zip((train.image, train.priors, train.target),
                                                              (pool.image, pool.priors, pool.target), strict=True)))
    return mixed, {"share": share, "files": names, "count": want}


def load_gan_data(cfg: Config) -> tuple[MapData, MapData, dict]:
    """Training data (all train files, concatenated), validation data (capped) and the priors meta."""
    names = cfg.gan_train_files()
    files = [read_priors(f) for f in names]
    for pf in files[1:]:
        _check_agree(files[0], pf)
    val_name = cfg.gan_val_file()
    if not Path(val_name).is_file():
        raise UserError(f"{val_name}: validation prior file not found; make it with `python train.py --config "
                        f"{cfg.source_file or '<config>'} --stage priors --set \"priors.splits=[val]\"` (or set gan.val; "
                        f"never the test file: val picks the checkpoint and the baselines)")
    val = read_priors(val_name)
    _check_agree(files[0], val)
    if val.meta.get("split") == "test":
        raise UserError(f"{val_name}: gan.val is a test-split prior file; checkpoints and baselines are chosen on "
                        f"validation data only (use the -val.npy file of the priors stage)")
    train_data, val_data = MapData.from_files(files), MapData.from_files([val], cfg.gan.val_limit)
    if len(train_data) == 0:
        raise UserError(f"{', '.join(names)}: no training samples")
    if len(val_data) == 0:
        raise UserError(f"{val_name}: no validation samples")
    meta = priors_meta(files[0], names)
    if cfg.gan.randomised_share > 0:
        train_data, meta["randomised"] = with_randomised(cfg, train_data, files[0])
    if cfg.gan.priors == "none":  # the image-only control: the generator never sees the CNN's priors
        train_data.priors.zero_()
        val_data.priors.zero_()
    t = val.tensors()
    meta["baselines"] = choose(t["image"], t["priors"], t["target"], chosen_on=val_name).as_dict()
    meta["val_file"] = val_name
    return train_data, val_data, meta


def shard(order: Tensor, rank: int, world: int) -> Tensor:
    """DistributedSampler semantics: pad by wrapping to a multiple of `world`, then every world-th from rank."""
    if world == 1:
        return order
    total = math.ceil(len(order) / world) * world
    padded = order.repeat(math.ceil(total / len(order)))[:total]
    return padded[rank::world]


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


def state_sha256(state: dict[str, Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and exact bytes (bit-identity checks)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        # reshape(-1) gives unit strides even where size-1 dims of a channels_last weight have odd ones
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- processes
@dataclass
class _Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(), device
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible; lower "
                            f"--nproc_per_node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return _Dist(rank, world), device


def _agree(ctx: _Dist, error: str | None) -> None:
    """Raise the same UserError on every rank when any rank hit one (so no rank waits forever)."""
    if ctx.enabled:
        import torch.distributed as dist

        errors: list[str | None] = [None] * ctx.world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UserError(error)


def _everywhere(ctx: _Dist, fn: Callable[[], T]) -> T:
    """Run fn on every rank; a UserError on any rank is raised on all."""
    result, error = None, None
    try:
        result = fn()
    except UserError as exc:
        error = str(exc)
    _agree(ctx, error)
    return result  # type: ignore[return-value]


def _from_main(ctx: _Dist, fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and hand its result (or its UserError) to every rank."""
    result, error = None, None
    if ctx.main:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    if ctx.enabled:
        import torch.distributed as dist

        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error:
        raise UserError(error)
    return result  # type: ignore[return-value]


def _all_sum(ctx: _Dist, t: Tensor) -> Tensor:
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------------------- checkpoints
def gan_paths(cfg: Config) -> dict[str, Path]:
    """The stage's outputs: `last` and `best` checkpoints and the resolved YAML."""
    prefix = cfg.gan_prefix
    return {"last": Path(f"{prefix}-last.pt"), "best": Path(f"{prefix}-best.pt"), "yaml": Path(f"{prefix}.yaml"),
            "export": Path(f"{prefix}.pt")}


def export_generator(src: str | Path, dst: str | Path, history: list | None = None) -> Path:
    """Write the generator-only part of a checkpoint (what inference needs; no D, optimisers or RNG states)."""
    ckpt = load_checkpoint(src, "GAN")
    _check_format(ckpt, src)
    out = {k: v for k, v in ckpt.items() if k not in STATE_KEYS or k == "generator"}
    out["exported_from"] = str(src)
    if history is not None:
        out["history"] = history  # the whole run's curve, not only up to the best epoch
    return atomic_torch_save(out, dst)


def _check_format(ckpt: dict, path: Path | str) -> None:
    if ckpt.get("format") != GAN_FORMAT:
        raise UserError(f"{path}: not a GAN checkpoint (format {ckpt.get('format')!r}, expected {GAN_FORMAT!r})")


def _prepare_outputs(cfg: Config, resume: bool, overwrite: bool, world: int) -> dict | None:
    """Refuse to clobber outputs; on resume load `last` and check it fits the config."""
    paths = gan_paths(cfg)
    if resume:
        last = paths["last"]
        if not last.is_file():
            raise UserError(f"{last}: no GAN checkpoint to resume from; drop --resume to start a new run")
        ckpt = load_checkpoint(last, "GAN")
        _check_format(ckpt, last)
        saved = (ckpt.get("config") or {}).get("gan") or {}
        for key in ARCH_KEYS:
            if saved.get(key) != getattr(cfg.gan, key):
                raise UserError(f"{last}: was trained with gan.{key}: {saved.get(key)!r} but the config says "
                                f"{getattr(cfg.gan, key)!r}; keep it, or --overwrite to start over")
        if saved.get("priors", "cnn") != cfg.gan.priors:
            raise UserError(f"{last}: was trained with gan.priors: {saved.get('priors', 'cnn')} but the config says "
                            f"{cfg.gan.priors}; keep it, or --overwrite to start over")
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


def load_generator(path: str | Path, expect_variant: str | None = None,
                   device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a GAN checkpoint's generator -> (model in eval mode, checkpoint meta without state dicts)."""
    ckpt = load_checkpoint(path, "GAN")
    _check_format(ckpt, path)
    variant = ckpt.get("variant")
    if variant not in GENERATOR_CLASSES:
        raise UserError(f"{path}: unknown generator variant {variant!r} (known: {', '.join(GENERATOR_CLASSES)})")
    if expect_variant is not None and variant != expect_variant:
        raise UserError(f"{path} is a {variant} checkpoint; use {variant}_inference.py")
    try:
        model = GENERATOR_CLASSES[variant](**ckpt["generator_config"])
        model.load_state_dict(ckpt["generator"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: generator weights do not fit the {variant} model ({first[:160]})") from None
    meta = {k: v for k, v in ckpt.items() if k not in STATE_KEYS}
    meta["path"] = str(path)
    dev = resolve_device(device) if isinstance(device, str) else device
    if ((ckpt.get("config") or {}).get("gan") or {}).get("priors") == "none":
        model = ImageOnlyGenerator(model)  # trained without priors: never given any
    return model.to(dev).eval(), meta


class ImageOnlyGenerator(nn.Module):
    """A generator trained with `gan.priors: none`: called as G(image, priors), it is given zeros as priors."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, image: Tensor, priors: Tensor) -> Tensor:
        return self.generator(image, torch.zeros_like(priors))


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
        """One D update then one G update (pix2pix); returns the EPOCH_STATS values of this batch."""
        with self.autocast():
            fake = self.g_run(image, priors)
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
    def validate(self, data: MapData, batch_size: int, device: torch.device, ctx: _Dist) -> dict[str, float]:
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
        l1, r, ssim, count = _all_sum(ctx, sums).tolist()
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

    return _Trainer(g, d, g, d, opt_g, opt_d, GANLoss(gc.loss), gc.adv_weight, gc.l1_weight, autocast)


def _wrap_ddp(tr: _Trainer, device: torch.device) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

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
    set_rng_state(ckpt["rng"], device)


def _fmt_epoch(epoch: int, epochs: int, h: dict) -> str:
    return (f"epoch {epoch}/{epochs}: L1 {h['l1']:.3f} G adv {h['g_adv']:.3f} | D(real) {h['d_real']:.2f} "
            f"D(fake) {h['d_fake']:.2f} | val L1 {h['val_l1']:.3f} r {h['val_r']:.3f} ssim {h['val_ssim']:.3f} | "
            f"{h['seconds']:.1f}s")


def run_gan_stage(cfg: Config, resume: bool = False, overwrite: bool = False, log: Log = print) -> dict:
    """`train.py --stage gan`: train the generator (single process, or one rank of a torchrun job)."""
    ctx, device = _init_distributed(cfg.gan.device)
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
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(cfg: Config, resume: bool, overwrite: bool, log: Log, ctx: _Dist, device: torch.device) -> dict:
    gc, paths = cfg.gan, gan_paths(cfg)
    train_data, val_data, pmeta = _everywhere(ctx, lambda: load_gan_data(cfg))
    ckpt = _from_main(ctx, lambda: _prepare_outputs(cfg, resume, overwrite, ctx.world))
    if ckpt is not None:
        def check_data() -> None:
            for key in AGREE_KEYS:
                if ckpt["priors_meta"].get(key) != pmeta[key]:
                    raise UserError(f"{paths['last']}: trained on priors with {key} {ckpt['priors_meta'].get(key)!r},"
                                    f" the prior files now have {pmeta[key]!r}")
            if len(ckpt["data_order"]) != len(train_data):
                raise UserError(f"{paths['last']}: trained on {len(ckpt['data_order'])} samples, the training "
                                f"files now hold {len(train_data)}; resume with the same gan.train files")
        _everywhere(ctx, check_data)

    tr = _build(cfg, pmeta["n"], device)
    history: list[dict] = []
    epoch, step, start_batch, order = 0, 0, 0, None
    sums = torch.zeros(len(EPOCH_STATS), dtype=torch.float64, device=device)
    if ckpt is not None:
        _restore(tr, ckpt, cfg, device)
        epoch, step, start_batch = int(ckpt["epoch"]), int(ckpt["step"]), int(ckpt["batch_in_epoch"])
        order, history = ckpt["data_order"], list(ckpt["history"])
        if start_batch:
            sums = ckpt["epoch_sums"].to(device=device, dtype=torch.float64)
    if ctx.enabled:
        _wrap_ddp(tr, device)
    if ctx.main:
        save_config(cfg, paths["yaml"])
    metrics = dict(ckpt["metrics"]) if ckpt is not None else {}
    best_r = max((h["val_r"] for h in history), default=-math.inf)
    n_params = sum(p.numel() for p in tr.g.parameters())
    log(f"gan: {gc.variant} generator ({n_params:,} params) on {len(train_data)} train / {len(val_data)} val samples "
        f"(S={pmeta['size']}, n={pmeta['n']}), batch {gc.batch_size}"
        + (f" x {ctx.world} processes" if ctx.enabled else "") + f", {device}"
        + (f"; resuming at epoch {epoch + 1}, batch {start_batch}, step {step}" if ckpt is not None else ""))
    if epoch >= gc.epochs:
        log(f"gan: nothing to do ({epoch} of {gc.epochs} epochs done; raise gan.epochs to train on)")

    hooks = TestHooks()

    def save(path: Path, batch_in_epoch: int, done_epochs: int, data_order: Tensor, epoch_sums: Tensor) -> None:
        atomic_torch_save({
            "format": GAN_FORMAT, "variant": gc.variant, "generator_config": tr.g.config(),
            "generator": _cpu_state(tr.g),
            "discriminator_config": {"width": gc.disc_width, "n_layers": gc.disc_layers},
            "discriminator": _cpu_state(tr.d), "optim_g": tr.opt_g.state_dict(), "optim_d": tr.opt_d.state_dict(),
            "epoch": done_epochs, "step": step, "batch_in_epoch": batch_in_epoch, "rng": rng_state(device),
            "data_order": data_order.cpu(), "epoch_sums": epoch_sums.cpu(), "world_size": ctx.world,
            "config": to_dict(cfg), "priors_meta": pmeta, "metrics": metrics, "history": history,
        }, path)

    tr.g.train()
    tr.d.train()
    while epoch < gc.epochs:
        t0 = time.time()
        if order is None:
            order = epoch_order(gc.seed, epoch, len(train_data))
        mine = shard(order, ctx.rank, ctx.world)
        batches = math.ceil(len(mine) / gc.batch_size)
        bar = tqdm(total=batches, initial=start_batch, desc=f"epoch {epoch + 1}/{gc.epochs}", dynamic_ncols=True,
                   leave=False, disable=not ctx.main)
        for b in range(start_batch, batches):
            image, priors, target = train_data.batch(mine[b * gc.batch_size:(b + 1) * gc.batch_size], device)
            stats = tr.step(image, priors, target)
            sums += stats
            step += 1
            bar.update(1)
            if ctx.main and b % 10 == 0:
                bar.set_postfix(l1=f"{stats[3].item():.3f}", d_real=f"{stats[0].item():.2f}")
            hooks.after_step(step)
            if gc.checkpoint_every and step % gc.checkpoint_every == 0 and b + 1 < batches:
                # every rank resumes with the ranks' mean partial sums, so the epoch's all-reduced total is right
                partial = _all_sum(ctx, sums.clone()) / ctx.world
                if ctx.main:
                    save(paths["last"], b + 1, epoch, order, partial)
        bar.close()
        means = (_all_sum(ctx, sums.clone()) / (batches * ctx.world)).tolist()
        metrics = tr.validate(val_data, gc.batch_size, device, ctx)
        epoch += 1
        entry = {"epoch": epoch, "step": step, **dict(zip(EPOCH_STATS, means, strict=True)),
                 **{f"val_{k}": v for k, v in metrics.items()}, "seconds": time.time() - t0}
        history.append(entry)
        start_batch, order = 0, None
        sums.zero_()
        if ctx.main:
            if entry["val_r"] > best_r:
                best_r = entry["val_r"]
                save(paths["best"], 0, epoch, epoch_order(gc.seed, epoch, len(train_data)), sums)
            save(paths["last"], 0, epoch, epoch_order(gc.seed, epoch, len(train_data)), sums)
        log(_fmt_epoch(epoch, gc.epochs, entry))

    hooks.dump(ctx.rank, lambda: {"generator": state_sha256(_cpu_state(tr.g)),
                                  "discriminator": state_sha256(_cpu_state(tr.d)), "step": step, "world_size": ctx.world})
    best = max(history, key=lambda h: h["val_r"], default=None)
    if best is not None and ctx.rank == 0 and paths["best"].is_file():
        export_generator(paths["best"], paths["export"], history=history)
        log(f"gan: best epoch {best['epoch']} (val L1 {best['val_l1']:.3f} r {best['val_r']:.3f} ssim "
            f"{best['val_ssim']:.3f}) -> {paths['best']}; last -> {paths['last']}; generator only -> "
            f"{paths['export']}")
    return {"best_epoch": best["epoch"] if best else None, "best_metrics": best, "metrics": metrics,
            "history": history, "epochs": epoch, "step": step, "best": str(paths["best"]),
            "last": str(paths["last"])}
