"""One GAN training step and what it runs on: the loss, the `Trainer` (networks, multi-tensor Adam, gan.precision's
autocast, optionally compiled), `train_step`, and the backend settings training runs under. `train.py --stage gan`
(cnnprior.gan.train) and bench/generator.py both use these, so the benchmark times the real loop."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnnprior.core.config import GANConfig
from cnnprior.core.distributed import Dist, all_sum
from cnnprior.core.runtime import Log, seed_everything
from cnnprior.gan.data import MapData
from cnnprior.gan.models import build_discriminator, get
from cnnprior.maps.metrics import fidelity

__all__ = [
    "adam", "AUTOCAST_DTYPES", "build_trainer", "compile_trainer", "compiler_problem", "cpu_flags", "GANLoss",
    "load_optimizer", "native_bf16", "NATIVE_BF16_FLAGS", "pearson_rows", "precision", "sanity_term", "Trainer",
    "train_step", "training_backends"
]

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


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


# CPU flags of native bf16 arithmetic (Linux /proc/cpuinfo names): oneDNN runs bf16 convolutions on them; elsewhere
# it emulates bf16, slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (empty where /proc/cpuinfo is not readable: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return {flag for line in fh if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def native_bf16(device: torch.device) -> bool:
    """Whether gan.precision auto trains this device in bf16: a CPU with native bf16 (measured on one: the shipped
    GSFT recipe keeps its val r at about twice the speed, docs/scaling.md). CUDA: not measured yet, so fp32 (with
    TF32)."""
    return device.type == "cpu" and any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def precision(gc: GANConfig, device: torch.device | None = None) -> str:
    """The run's arithmetic, fp32 or bf16: gan.precision (auto: `native_bf16` on `device`, fp32 without one), or
    bf16 where the deprecated gan.amp says bf16."""
    if gc.amp == "bf16":
        return "bf16"
    if gc.precision == "auto":
        return "bf16" if device is not None and native_bf16(device) else "fp32"
    return gc.precision


def adam(params: object, gc: GANConfig, device: torch.device) -> torch.optim.Adam:
    """Adam with gan.lr and betas: fused (one kernel over all tensors) on CUDA; multi-tensor (foreach) elsewhere.
    On the CPU foreach gives the same bits as the plain per-tensor loop of earlier runs (fused rounds differently)
    and takes 3.6 ms against fused's 1.4 ms and the loop's 6.4 ms per step of the CPU-preset LSFT's G and D: about
    0.1% of the step, not worth new bits."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=gc.lr, betas=(gc.beta1, gc.beta2), **fast)


@dataclass
class Trainer:
    """The networks, optimisers and loss of one run; `train_step` (also `step`) trains one batch."""

    g: nn.Module  # unwrapped generator
    d: nn.Module  # unwrapped discriminator
    g_run: nn.Module  # what training calls: the module, its DDP wrapper, or either compiled
    d_run: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    crit: GANLoss
    adv_weight: float
    l1_weight: float
    autocast: Callable[[], AbstractContextManager]
    precision: str = "fp32"
    d_frozen: nn.Module | None = None  # what G's update calls: the unwrapped D (None), or it compiled
    sanity_weight: float = 0.0  # gan.sanity_weight: the randomisation term's weight (`sanity_term`)

    def step(self, image: Tensor, priors: Tensor, target: Tensor, reference: Tensor | None = None,
             paired: Tensor | None = None) -> Tensor:
        """`train_step(self, ...)`."""
        return train_step(self, image, priors, target, reference, paired)

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


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson r of each sample's map pair, (B,), in fp32; 0 where either map is constant. A loss term:
    `cnnprior.maps.metrics.pearson` (the scoring metric) gives NaN gradients for a constant map."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)


def sanity_term(fake: Tensor, target: Tensor, reference: Tensor, paired: Tensor) -> Tensor:
    """gan.sanity_weight's term: mean over the paired samples (`paired` 1) of max(0, r(fake, reference) -
    r(target, reference)), the reference being the trained CNN's target of the same image: a map of a randomised
    CNN may keep no more of the trained CNN's map than that CNN's own Grad-CAM does. 0 for a batch without pairs."""
    excess = torch.relu(pearson_rows(fake, reference) - pearson_rows(target, reference).detach())
    return (excess * paired).sum() / paired.sum().clamp_min(1.0)


def g_loss(tr: Trainer, fake: Tensor, target: Tensor, reference: Tensor | None,
           paired: Tensor | None) -> tuple[Tensor, Tensor]:
    """The generator's L1 term (weighted), plus the sanity term where gan.sanity_weight and a reference are given;
    returns (weighted loss, unweighted L1)."""
    l1 = (fake.float() - target).abs().mean()
    loss = tr.l1_weight * l1
    if tr.sanity_weight > 0 and reference is not None and paired is not None:
        loss = loss + tr.sanity_weight * sanity_term(fake, target, reference, paired)
    return loss, l1


def train_step(tr: Trainer, image: Tensor, priors: Tensor, target: Tensor, reference: Tensor | None = None,
               paired: Tensor | None = None) -> Tensor:
    """One D update then one G update (pix2pix) on a batch; the EPOCH_STATS values of this batch as a float64
    tensor on the batch's device (no host read: the caller decides when to look). With the adversarial weight 0
    (the L1-only twins, the learned baselines) D cannot change G: it is not trained and its statistics read NaN.
    `reference` / `paired` (MapData.reference) add gan.sanity_weight's `sanity_term` to G's loss.
    The training loop and bench/generator.py both call this."""
    with tr.autocast():
        fake = tr.g_run(image, priors)
    if tr.adv_weight == 0:
        tr.opt_g.zero_grad(set_to_none=True)
        loss, l1 = g_loss(tr, fake, target, reference, paired)
        loss.backward()
        tr.opt_g.step()
        nan = torch.full((), float("nan"), device=l1.device)
        return torch.stack([nan, nan, nan, l1.detach(), nan]).double()
    # D: real and fake pairs in ONE forward, so DDP sees one forward per backward.
    tr.opt_d.zero_grad(set_to_none=True)
    with tr.autocast():
        logits = tr.d_run(torch.cat([image, image]), torch.cat([target, fake.detach().to(target.dtype)]))
    real_logits, fake_logits = logits.float().chunk(2)
    loss_d = 0.5 * (tr.crit(real_logits, True) + tr.crit(fake_logits, False))
    loss_d.backward()
    tr.opt_d.step()
    # G: the unwrapped D with frozen weights; DDP would expect D's gradients to be reduced.
    _set_requires_grad(tr.d, False)
    tr.opt_g.zero_grad(set_to_none=True)
    with tr.autocast():
        adv_logits = (tr.d if tr.d_frozen is None else tr.d_frozen)(image, fake)
    g_adv = tr.crit(adv_logits.float(), True)
    loss, l1 = g_loss(tr, fake, target, reference, paired)
    (tr.adv_weight * g_adv + loss).backward()
    tr.opt_g.step()
    _set_requires_grad(tr.d, True)
    return torch.stack([tr.crit.score(real_logits), tr.crit.score(fake_logits), g_adv, l1,
                        loss_d]).detach().double()


def build_trainer(gc: GANConfig, n_priors: int, device: torch.device) -> Trainer:
    """Seeded generator and discriminator (channels_last, as the models keep their weights), `adam` for each,
    the loss and gan.precision's autocast: what `train_step` needs, as `train.py --stage gan` builds it."""
    seed_everything(gc.seed)  # same initial weights on every rank
    generator = get(gc.variant)
    g = generator.from_config(gc, n_priors).to(device)
    d = build_discriminator(gc.disc_width, gc.disc_layers).to(device)
    opt_g, opt_d = adam(g.parameters(), gc, device), adam(d.parameters(), gc, device)
    prec = precision(gc, device)
    dtype = AUTOCAST_DTYPES[prec]

    def autocast() -> AbstractContextManager:
        return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    # a learned baseline is never trained adversarially, whatever gan.adv_weight says
    adv_weight = gc.adv_weight if generator.adversarial else 0.0
    return Trainer(g, d, g, d, opt_g, opt_d, GANLoss(gc.loss), adv_weight, gc.l1_weight, autocast, prec,
                   sanity_weight=gc.sanity_weight)


def compiler_problem(device: torch.device) -> str:
    """Why torch.compile cannot run here ('' when it can): a tiny function is compiled and run once."""
    try:
        fn = torch.compile(lambda x: torch.sigmoid(x) * 2.0 + 1.0)
        fn(torch.ones(8, device=device))
    except Exception as exc:  # no C++ compiler, no Triton, an unsupported Python: eager mode instead
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"{type(exc).__name__}: {first[:200]}"
    return ""


def compile_trainer(tr: Trainer, device: torch.device, log: Log) -> bool:
    """gan.compile: train through torch.compile'd networks (the unwrapped ones keep the weights); a warning and
    eager mode where no compiler works. Whether it compiled."""
    problem = compiler_problem(device)
    if problem:
        msg = f"gan.compile: torch.compile does not work here ({problem}); training in eager mode"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log(f"gan: {msg}")
        return False
    tr.g_run, tr.d_run, tr.d_frozen = torch.compile(tr.g_run), torch.compile(tr.d_run), torch.compile(tr.d)
    return True


def load_optimizer(opt: torch.optim.Optimizer, state: dict, gc: GANConfig) -> None:
    """Load a saved optimiser state; the config's lr/betas win (e.g. a lower lr for a continued run), and so does
    this build's implementation (fused / foreach): a checkpoint of an older run names none."""
    impl = {key: opt.param_groups[0].get(key) for key in ("fused", "foreach")}
    opt.load_state_dict(state)
    for group in opt.param_groups:
        group.update(impl, lr=gc.lr, betas=(gc.beta1, gc.beta2))
    if impl["fused"]:  # the fused kernel wants float32 step counts on the parameters' device
        for param, slot in opt.state.items():
            if isinstance(slot.get("step"), Tensor):
                slot["step"] = slot["step"].to(device=param.device, dtype=torch.float32)


@contextmanager
def training_backends(device: torch.device) -> Iterator[None]:
    """The backend settings GAN training runs under (put back afterwards): deterministic algorithms on CPU (exact
    resume relies on them), without their NaN fill of every fresh tensor (no op of the step reads memory it has
    not written; steps measured 3-5% faster without it, interleaved); on GPUs speed over bit-exactness: cuDNN
    autotuning and TF32 matmuls (cuDNN convolutions use TF32 by default)."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark, matmul = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.utils.deterministic.fill_uninitialized_memory = False
        else:
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.benchmark = benchmark
        if device.type != "cpu":
            torch.set_float32_matmul_precision(matmul)
