"""The run config (data -> cnn -> priors -> gan): YAML -> validated, typed dataclasses
(their field checks: schema.py); `--set` overrides; clear one-line errors."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cnnprior.core.errors import UserError
from cnnprior.core.runtime import atomic_write_text
from cnnprior.core.schema import apply_overrides, fill, opt, read_yaml_mapping

__all__ = [
    "ARCHS", "CNNConfig", "Config", "DataConfig", "from_dict", "GANConfig", "load_config", "parse_milestones",
    "PriorsConfig", "save_config", "sets_nothing", "to_dict"
]

ARCHS = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "densenet121",
         "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "inception_v3")


@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    source: str = opt("shapes", help="image source by name: shapes, fashion_mnist, cifar10, imagefolder, or one registered with cnnprior.data.register_source")
    root: str = opt("", help="dataset folder (imagefolder/cifar10/fashion_mnist); empty = the source's default")
    homepage: str = opt("", help="where to get the dataset (shown when it is missing)")
    download: bool = opt(False, help="cifar10 only: allow torchvision to download the dataset")
    image_size: int = opt(128, lo=16, hi=1024, help="CNN input size in pixels (square)")
    limit: int = opt(0, lo=0, help="cap on the number of images used (0 = all)")
    val_fraction: float = opt(0.1, lo=0.0, hi=0.5, help="fraction held out for validation")
    test_fraction: float = opt(0.1, lo=0.0, hi=0.5, help="fraction held out for test")
    seed: int = opt(0, lo=0, help="seed of the split (and of the synthetic shapes)")
    layout: str = opt("auto", choices=("auto", "classes", "splits", "food11_flat"),
                       help="imagefolder: root/<class>/ (classes), root/<split>/<class>/ (splits), "
                            "root/<split>/<index>_<n>.jpg (food11_flat); auto detects them")
    class_names: dict | list = opt({}, help="display names: {folder name: name} or a list in class order "
                                             "(empty = the folder names); stored in checkpoints and prior files")
    shapes_count: int = opt(6000, lo=8, hi=10_000_000, help="shapes: number of images generated")
    num_workers: int = opt(0, lo=0, hi=64, help="DataLoader worker processes")


@dataclass
class CNNConfig:
    """The target CNN to be explained, and how it is trained."""

    arch: str = opt("resnet18", choices=ARCHS, help="torchvision classification model")
    pretrained: bool = opt(False, help="start from torchvision weights (must already be in the torch cache)")
    checkpoint: str = opt("", help="checkpoint path; empty = models/<name>-cnn.pt")
    epochs: int = opt(3, lo=0, hi=10_000)
    batch_size: int = opt(64, lo=1, hi=65_536)
    lr: float = opt(1e-3, lo=0.0, hi=10.0)
    weight_decay: float = opt(1e-4, lo=0.0, hi=1.0)
    optimizer: str = opt("adamw", choices=("adamw", "sgd"))
    augment: bool = opt(True, help="random flips/crops while training")
    save_half: bool = opt(False, help="store conv/linear weights as float16 in the checkpoint (half the size)")
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    checkpoint_every: int = opt(0, lo=0, help="also save the full-state `-last.pt` every N steps (0 = end of "
                                               "epoch only); --resume continues from it")
    bn_momentum: float = opt(-1.0, lo=-1.0, hi=1.0, help="batch-norm running-statistics momentum while training "
                                                         "(-1 = the architecture's own; MobileNet-V3's 0.01 is too slow "
                                                         "for a few hundred steps from scratch: 0.1 then)")
    seed: int = opt(-1, lo=-1, help="seed of the initial weights, the augmentation and the batch order (-1 = "
                                     "data.seed); two runs of one architecture on the same split differ by it")
    random_labels: float = opt(0.0, lo=0.0, hi=1.0, help="share of the train images whose labels are permuted "
                                                          "among themselves (seeded by the CNN's seed): 1.0 trains "
                                                          "the data-randomisation CNN of Adebayo et al. 2018. The "
                                                          "checkpoint is then the last epoch (validation cannot "
                                                          "choose one) and the history records train accuracy on the "
                                                          "permuted labels")


@dataclass
class PriorsConfig:
    """How the conditional priors are computed and stored."""

    size: int = opt(64, lo=8, hi=1024, help="prior/map size S in pixels")
    n: int = opt(8, lo=1, hi=64, help="number of cumulative priors kept")
    method: str = opt("gradcam", help="CAM method for the per-layer maps, by its name in cnnprior.priors.cams")
    order: str = opt("output_to_input", choices=("output_to_input", "input_to_output"),
                      help="order in which per-layer maps are cumulatively averaged")
    target: str = opt("final", choices=("final", "last_conv", "first", "last"),
                       help="the map the GAN learns: final = Grad-CAM at the CNN's final feature map (the layer "
                            "pytorch-grad-cam recommends); last_conv (alias last) / first = that conv layer's map")
    target_layer: str = opt("", help="target: final only: a module name instead of the per-architecture choice")
    include_target_layer: bool = opt(False, help="keep the target's last block (cnn.layers.last_block: ResNet's "
                                                   "layer4[-1], VGG's last two convs, MobileNet's last inverted "
                                                   "residual + 1x1 conv) in the priors (reproduces the released "
                                                   "code; makes the task a copy)")
    exclude: list = opt([], help="module names whose CAM layers are left out of the priors (e.g. net.layer4.1)")
    layer_outputs: str = opt("activated", choices=("activated", "raw"),
                              help="read each conv after its batch norm/activation (activated) or raw (old files)")
    explain: str = opt("predicted", choices=("predicted", "label"), help="class explained")
    batch_size: int = opt(32, lo=1, hi=65_536)
    splits: list = opt(["test", "val", "train"], help="splits to write, of train/val/test (val: GAN model "
                                                        "and baseline selection)")
    train_limit: int = opt(0, lo=0, help="cap on train-split samples (0 = all)")
    randomised_stages: list = opt([], help="also write train prior files from copies of the CNN re-initialised "
                                            "from the head down to each of these stages (e.g. [fc, layer4], or "
                                            "[all]); see gan.randomised_share")
    randomised_seeds: int = opt(1, lo=1, hi=1000, help="random copies per randomised stage")
    randomised_order: str = opt("top_down", choices=("top_down", "bottom_up", "independent"),
                                help="how a randomised copy is made: top_down = the cascade from the classifier "
                                     "down to the stage, bottom_up = from the stem up to it, independent = that "
                                     "stage alone")
    randomised_init: str = opt("default", choices=("default", "kaiming_normal", "xavier_uniform", "normal"),
                               help="re-initialisation of the randomised stages (default = PyTorch's "
                                    "reset_parameters); keep it apart from the evaluation's randomisations")
    randomised_limit: int = opt(1000, lo=0, help="train images per randomised-copy file (0 = all)")
    test_limit: int = opt(0, lo=0, help="cap on val/test-split samples (0 = all)")
    out: str = opt("", help="prior file prefix; empty = npys/<name>")
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))


def parse_milestones(value: object, loc: str, where: str = "") -> list[int]:
    """gan.milestones: a list of distinct sample counts > 0 (sorted); blank = none."""
    if value is None or value == "":
        return []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                              for v in value) or len(set(value)) != len(value):
        raise UserError(f"{loc}: expected a list of distinct sample counts > 0, got {value!r}")
    return sorted(value)


@dataclass
class GANConfig:
    """The conditional GAN: generator variant, sizes and training."""

    variant: str = opt("lsft", help="generator, by its registered name (lsft, gsft, linear, convnet, ...)")
    width: int = opt(64, lo=4, hi=1024, help="trunk channels")
    depth: int = opt(7, lo=0, hi=256, help="the generator's depth: each generator's from_config says what it sets "
                                           "(cnnprior/gan/models/)")
    cond_channels: int = opt(32, lo=1, hi=1024)
    cond_hidden: int = opt(128, lo=1, hi=4096)
    disc_width: int = opt(64, lo=4, hi=1024)
    disc_layers: int = opt(3, lo=1, hi=8)
    loss: str = opt("bce", choices=("bce", "lsgan"))
    adv_weight: float = opt(1.0, lo=0.0, hi=1e6, help="0 = the L1-only twin (D is not trained); the learned "
                                                       "baselines (linear, convnet) always train with 0")
    l1_weight: float = opt(100.0, lo=0.0, hi=1e6)
    lr: float = opt(2e-4, lo=0.0, hi=1.0)
    beta1: float = opt(0.5, lo=0.0, hi=1.0)
    beta2: float = opt(0.999, lo=0.0, hi=1.0)
    epochs: int = opt(10, lo=0, hi=100_000)
    batch_size: int = opt(16, lo=1, hi=65_536)
    train: list = opt([], help="training prior files; empty = <priors.out>-train.npy")
    randomised_share: float = opt(0.0, lo=0.0, hi=0.9, help="fraction of the training samples taken from "
                                   "randomised-copy prior files (priors.randomised_stages): they force the "
                                   "generator to read its priors")
    randomised: list = opt([], help="randomised-copy prior files; empty = the <priors.out>-train-random-*.npy files "
                                    "of this config's priors.randomised_order, _init, _stages and _seeds")
    sanity_weight: float = opt(0.0, lo=0.0, hi=1e6, help="weight of the randomisation term on randomised-copy "
                                "samples: max(0, r(map, T) - r(target, T)), T the trained CNN's target of the same "
                                "image (the train file's record with that dataset index), r Pearson's: the map may "
                                "keep no more of the trained CNN's map than the randomised CNN's Grad-CAM does "
                                "(0 = off; needs gan.randomised_share > 0)")
    val: str = opt("", help="validation prior file (checkpoint and baseline selection); empty = "
                             "<priors.out>-val.npy")
    val_more: list = opt([], help="further validation prior files (e.g. other CNNs' -val.npy for a generator of "
                                   "several CNNs): checkpoints are chosen on all of them together")
    val_limit: int = opt(256, lo=0, help="cap on validation samples per epoch and validation file (0 = all)")
    leave_out: list = opt([], help="CNNs whose gan.train / val files are dropped, by architecture or CNN checkpoint "
                                    "path (a leave-one-architecture-out generator: its checkpoint records what it saw)")
    only: list = opt([], help="CNNs whose gan.train / val files are kept (by architecture or checkpoint; empty = all)")
    train_per_file: int = opt(0, lo=0, help="records taken from each gan.train file (0 = all): with files from "
                                            "several CNNs, the same number gives each CNN the same weight")
    out: str = opt("", help="checkpoint prefix; empty = models/<name>-<variant>")
    seed: int = opt(0, lo=0)
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    precision: str = opt("fp32", choices=("fp32", "bf16", "auto"), help="training and validation arithmetic: "
                          "fp32, or bf16 autocast (CPU and CUDA; weights, optimiser and checkpoints stay fp32), or "
                          "auto: bf16 on a CPU with native bf16 (AVX512-BF16 or AMX), fp32 elsewhere. Exact resume "
                          "is bit-identical in fp32 on CPU; see docs/scaling.md#training-speed for bf16")
    amp: str = opt("none", choices=("none", "bf16"), help="deprecated alias of gan.precision: bf16 = precision bf16 "
                                                        "(it wins over precision), none = precision decides")
    compile: bool = opt(False, help="train through torch.compile'd networks (about a minute of compiling first; "
                                     "eager mode with a warning where no compiler works)")
    checkpoint_every: int = opt(0, lo=0, help="also save `last` every N steps (0 = end of epoch only)")
    milestones: list = field(default_factory=list, metadata={"parse": parse_milestones, "help": "samples seen at "
                             "which the generator is also saved as <gan.out>-s<samples>.pt, with its budget (at the "
                             "step that reaches each; the study runner scores them; docs/study.md)"})
    priors: str = opt("cnn", choices=("cnn", "none"), help="none: the priors are zeroed in training, validation "
                                                            "and inference (the image-only control generator)")
    image: str = opt("use", choices=("use", "none"), help="none: the image is zeroed in training, validation and "
                                                          "inference (a priors-only generator: it can only read "
                                                          "the CNN)")
    image_dropout: float = opt(0.0, lo=0.0, hi=1.0, help="probability that a training sample's image is zeroed "
                                                         "(generator and discriminator); inference keeps the image")
    init: str = opt("", help="warm start from this GAN checkpoint's generator and discriminator weights (same "
                             "architecture; optimisers, epochs and history start fresh; an exported generator "
                             "such as a shipped model has no discriminator: D then starts fresh)")


ZOO_FAMILIES = ("plain", "residual", "dense", "mobile")
ZOO_NORMS = ("batch", "group", "none")
ZOO_ACTIVATIONS = ("relu", "gelu", "silu", "elu", "leaky_relu", "hardswish", "mish")
ZOO_INITS = ("default", "kaiming_normal", "xavier_uniform", "normal")
ZOO_OPTIMIZERS = ("adamw", "adam", "sgd")


def _numbers(integer: bool, lo: float, hi: float, pair: bool = False):
    """A `parse` for a list of numbers in [lo, hi] (`pair`: exactly two, the first <= the second)."""

    def parse(value, loc: str, where: str) -> list:
        items = value if isinstance(value, list) else [value]
        out = []
        for v in items:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise UserError(f"{loc}: expected a list of numbers, got {value!r}")
            try:
                num = float(v)
            except ValueError:
                raise UserError(f"{loc}: expected a list of numbers, got {value!r}") from None
            if integer and num != int(num) or not lo <= num <= hi:
                raise UserError(f"{loc}: {v!r} is not {'an integer' if integer else 'a number'} in [{lo}, {hi}]")
            out.append(int(num) if integer else num)
        if not out or pair and (len(out) != 2 or out[0] > out[1]):
            raise UserError(f"{loc}: expected {'[low, high] with low <= high' if pair else 'a non-empty list'}, "
                            f"got {value!r}")
        return out

    return parse


def _numbers_opt(default: list, parse, help: str):
    return field(default_factory=lambda: list(default), metadata={"help": help, "parse": parse})


@dataclass
class ZooConfig:
    """A population of small CNNs (`--stage zoo`, docs/zoo.md): how its members are drawn, trained and kept."""

    members: int = opt(120, lo=1, hi=100_000, help="number of members (m000, m001, ...)")
    seed: int = opt(0, lo=0, help="seed of the draws: member i draws from numpy's generator seeded with [seed, i]")
    families: list = opt(list(ZOO_FAMILIES), help="architecture families (of plain, residual, dense, mobile), taking "
                                                  "turns: member i is of families[i % len(families)]")
    depth: list = _numbers_opt([1, 4], _numbers(True, 1, 32, pair=True), "[low, high] blocks per stage (3 stages; "
                               "redrawn until the prior rule leaves priors.n + 1 layers)")
    width: list = _numbers_opt([16, 24, 32], _numbers(True, 4, 512), "first-stage channels (stages: w, 2w, 4w)")
    growth: list = _numbers_opt([8, 12, 16], _numbers(True, 2, 256), "dense family: growth rates")
    expand: list = _numbers_opt([2, 4], _numbers(True, 1, 16), "mobile family: expansion ratios")
    kernel: list = _numbers_opt([3, 5], _numbers(True, 1, 11), "kernel sizes (odd)")
    norms: list = opt(list(ZOO_NORMS), help="normalisations, of batch, group, none")
    activations: list = opt(["relu", "gelu", "silu", "elu"], help="activations, of " + ", ".join(ZOO_ACTIVATIONS))
    inits: list = opt(["default", "kaiming_normal", "xavier_uniform"], help="initialisations (cnn.randomise "
                                                                           "schemes), of " + ", ".join(ZOO_INITS))
    optimizers: list = opt(list(ZOO_OPTIMIZERS), help="optimisers, of adamw, adam, sgd (Nesterov, momentum 0.9)")
    lr_adam: list = _numbers_opt([5e-4, 5e-3], _numbers(False, 1e-7, 10.0, pair=True),
                                 "adamw / adam learning rate range (log-uniform)")
    lr_sgd: list = _numbers_opt([0.02, 0.2], _numbers(False, 1e-7, 10.0, pair=True),
                                "sgd learning rate range (log-uniform)")
    weight_decay: list = _numbers_opt([1e-5, 1e-3], _numbers(False, 1e-9, 1.0, pair=True),
                                      "weight decay range (log-uniform)")
    epochs: int = opt(3, lo=1, hi=10_000, help="epochs per member (the best-validation epoch is kept)")
    batch_size: int = opt(64, lo=2, hi=65_536)
    floor: float = opt(0.8, lo=0.0, hi=1.0, help="val accuracy a member needs to be kept; members below it are "
                                                   "recorded (kept: false) and get no priors")
    threads: int = opt(1, lo=1, hi=256, help="torch threads per member (its numbers depend on it)")
    jobs: int = opt(1, lo=1, hi=1024, help="local worker processes (--jobs overrides); under torchrun, per rank")
    out: str = opt("", help="members' folder; empty = outputs/<name>")
    report: str = opt("", help="folder of zoo.json; empty = zoo.out")


@dataclass
class Config:
    """A whole run: data -> cnn -> priors -> gan (and the zoo stage's `zoo`)."""

    name: str = opt("run", help="run name, used in default file names")
    data: DataConfig = field(default_factory=DataConfig)
    cnn: CNNConfig = field(default_factory=CNNConfig)
    priors: PriorsConfig = field(default_factory=PriorsConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    source_file: str = field(default="", metadata={"internal": True})

    # Derived default paths
    @property
    def cnn_checkpoint(self) -> str:
        return self.cnn.checkpoint or f"models/{self.name}-cnn.pt"

    @property
    def priors_prefix(self) -> str:
        return self.priors.out or f"npys/{self.name}"

    @property
    def gan_prefix(self) -> str:
        return self.gan.out or f"models/{self.name}-{self.gan.variant}"

    def gan_train_files(self) -> list[str]:
        return list(self.gan.train) or [f"{self.priors_prefix}-train.npy"]

    def gan_val_file(self) -> str:
        return self.gan.val or f"{self.priors_prefix}-val.npy"

    def gan_val_files(self) -> list[str]:
        return [self.gan_val_file(), *self.gan.val_more]


_SECTIONS = {"data": DataConfig, "cnn": CNNConfig, "priors": PriorsConfig, "gan": GANConfig, "zoo": ZooConfig}

def _validate(cfg: Config, where: str) -> None:
    """Cross-field checks that a single key's range cannot express."""
    if cfg.data.val_fraction + cfg.data.test_fraction >= 0.9:
        raise UserError(f"{where}: key 'data.val_fraction' + 'data.test_fraction' must leave >= 10% for training")
    for s in cfg.priors.splits:
        if s not in ("train", "val", "test"):
            raise UserError(f"{where}: key 'priors.splits': {s!r} is not one of train, val, test")
    if not cfg.name or any(c in cfg.name for c in "/\\ "):
        raise UserError(f"{where}: key 'name': {cfg.name!r} must be non-empty without spaces or slashes")
    if cfg.gan.sanity_weight > 0 and cfg.gan.randomised_share == 0:
        raise UserError(f"{where}: key 'gan.sanity_weight' acts on randomised-copy samples only; set "
                        f"gan.randomised_share > 0 (or gan.sanity_weight: 0)")
    z = cfg.zoo
    for key, allowed in (("families", ZOO_FAMILIES), ("norms", ZOO_NORMS), ("activations", ZOO_ACTIVATIONS),
                         ("inits", ZOO_INITS), ("optimizers", ZOO_OPTIMIZERS)):
        values = getattr(z, key)
        bad = [v for v in values if v not in allowed]
        if bad or not values or len(set(values)) != len(values):
            raise UserError(f"{where}: key 'zoo.{key}': {bad[0] if bad else values!r} is not a list of distinct "
                            f"names of {', '.join(allowed)}")
    if any(k % 2 == 0 for k in z.kernel):
        raise UserError(f"{where}: key 'zoo.kernel': kernel sizes must be odd, got {z.kernel}")
    if cfg.gan.variant == "convnet" and cfg.gan.depth < 1:
        raise UserError(f"{where}: key 'gan.depth': the convnet baseline needs >= 1 hidden convolution, got "
                        f"{cfg.gan.depth}")

def sets_nothing(raw: dict) -> bool:
    """Whether a parsed config sets no key: an empty mapping, or only sections that are null or empty."""
    return all(key in _SECTIONS and value in (None, {}) for key, value in raw.items())


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None), apply `--set` overrides and validate."""
    raw: dict = {}
    where = "defaults"
    if path is not None:
        where = str(Path(path))
        raw = read_yaml_mapping(path, "configs/", "sections (data, cnn, priors, gan)")
        if sets_nothing(raw):
            raise UserError(f"{where}: the config sets nothing (empty, only comments, null or empty sections); "
                            f"copy one of configs/*.yaml and set at least name and data.source")
    apply_overrides(raw, overrides)
    cfg = Config()
    fill(cfg, raw, where)
    _validate(cfg, where)
    cfg.source_file = "" if path is None else str(path)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (what `save_config` writes)."""
    d = dataclasses.asdict(cfg)
    d.pop("source_file", None)
    return d


def from_dict(d: dict, where: str = "saved config") -> Config:
    """Rebuild a Config from `to_dict` output (e.g. one stored in a checkpoint)."""
    cfg = Config()
    fill(cfg, d, where)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML next to a run's outputs (atomically)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
