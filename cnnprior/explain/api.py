"""The Python API: `Explainer` turns images into GAN explanation maps in one call, and `GANCAM` wraps it in
pytorch-grad-cam's CAM protocol so grad-cam's utilities (`show_cam_on_image`, `metrics.road`) work on it.

One path from images to maps, used by `--images` inference too: the CNN's all-layer Grad-CAM gives the priors
and the target (one forward + backward per batch), both are stored as the prior file stores them (uint8 at the
generator's map size S, as the generator was trained), the generator maps (image, priors) to its map, and the
map is resized (bilinear) to the input size.

Errors: a bad argument or tensor raises `ValueError` / `TypeError`; a file that cannot serve (a checkpoint of
another kind or version, priors that cannot be computed from images) raises `UserError`, which the command lines
print as one line with exit code 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnprior.cnn.model import TargetCNN, load_cnn
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import resolve_device
from cnnprior.gan.checkpoint import GeneratorMeta, load_generator
from cnnprior.maps.ops import generate
from cnnprior.priors import cams
from cnnprior.priors.extract import PriorExtractor, extractor_from
from cnnprior.priors.priorfile import make_records, record_dtype, records_tensors
from cnnprior.priors.spec import spec_from_sidecar

__all__ = ["Explainer", "Explanation", "GANCAM", "layer_differences"]


@dataclass
class Explanation:
    """Everything `Explainer.explain` computes for a batch, as numpy arrays.

    Attributes:
        maps: the generator's maps (B, H, W) float32 in [0, 1] at the input size.
        gradcam: the Grad-CAM target maps (B, H, W) float32 in [0, 1] at the input size (what the GAN imitates).
        priors: the conditional priors (B, n, H, W) float32 in [0, 1] at the input size.
        classes: the explained class per image (B,) int64.
        predicted: the CNN's predicted class per image (B,) int64.
        probs: the softmax probability of the explained class (B,) float32.
        records: the batch in the prior-file format (structured array at the map size S).

    Example:
        >>> e = ex.explain(images)
        >>> e.maps.shape, e.classes[:2]         # ((B, H, W), array([3, 1]))
    """

    maps: np.ndarray
    gradcam: np.ndarray
    priors: np.ndarray
    classes: np.ndarray
    predicted: np.ndarray
    probs: np.ndarray
    records: np.ndarray


def layer_differences(described: dict, pm: dict, cnn_arch: str) -> list[str]:
    """How a CNN's conv layers differ from those recorded with a generator's training priors.

    Args:
        described: `PriorExtractor.describe()` of the CNN being explained.
        pm: the generator checkpoint's `priors_meta`.
        cnn_arch: the architecture name of the CNN being explained.

    Returns:
        One phrase per difference (empty when the layers match).

    Example:
        >>> diffs = layer_differences(ex.extractor.describe(), ex.priors_meta, "resnet34")
        >>> diffs                               # e.g. ['arch resnet34 vs resnet18', '36 conv layers vs 20']
    """
    diffs = []
    seen = [c.get("arch") for c in pm.get("cnns") or []]
    if len(seen) > 1:  # a generator of several CNNs: only an architecture it never saw is a difference
        return [] if cnn_arch in seen else [f"arch {cnn_arch}, which the generator never saw (it saw "
                                            f"{', '.join(dict.fromkeys(map(str, seen)))})"]
    if pm.get("cnn_arch") and pm["cnn_arch"] != cnn_arch:
        diffs.append(f"arch {cnn_arch} vs {pm['cnn_arch']}")
    if pm.get("layers") and list(pm["layers"]) != described["layers"]:
        diffs.append(f"{len(described['layers'])} conv layers vs {len(pm['layers'])}")
    if pm.get("target_layer") and pm["target_layer"] != described["target_layer"]:
        diffs.append(f"target layer {described['target_layer']} vs {pm['target_layer']}")
    if pm.get("prior_layers") and [list(x) for x in pm["prior_layers"]] != described["prior_layers"]:
        diffs.append("the layers averaged into the priors differ")
    return diffs


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"images: expected a float tensor (B, 3, H, W) of RGB in [0, 1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a float tensor (B, 3, H, W) of RGB in [0, 1], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images: expected a float tensor of RGB in [0, 1], got {images.dtype} (divide uint8 images "
                        f"by 255)")
    if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
        raise ValueError(f"images: values span [{float(images.min()):.3g}, {float(images.max()):.3g}]; expected RGB in "
                        f"[0, 1] (not normalised: the explainer applies the CNN's normalisation itself)")
    return images.float()


def _resize(maps: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B, C, S, S) -> numpy (B, C, H, W) float32, bilinear, clamped to [0, 1]."""
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps.clamp(0, 1).numpy().astype(np.float32, copy=False)


class Explainer:
    """Explain a CNN's decisions with a trained generator (LSFT, GSFT or any registered one).

    Args:
        generator: the generator as `load_generator` returns it (called as G(image, priors)).
        generator_meta: its checkpoint's `GeneratorMeta` (or the checkpoint's metadata dict, parsed into one).
        cnn: the target CNN (`TargetCNN`: RGB in [0, 1] -> logits), or None to only run the generator on priors.
        device: "auto", "cpu", "cuda" or a torch.device.
        batch_size: images per forward / backward pass.

    Example:
        >>> ex = Explainer.from_checkpoints(generator="models/fashion_resnet18-lsft.pt",
        ...                                 cnn="models/fashion_resnet18-cnn.pt", device="cpu")
        >>> maps = ex(images)                   # (B, H, W) float32 in [0, 1]
        >>> maps = ex(images, targets=[3, 1])   # explain given classes
    """

    def __init__(self, generator: nn.Module, generator_meta: GeneratorMeta | dict, cnn: TargetCNN | None = None,
                 device: str | torch.device = "auto", batch_size: int = 32):
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator: expected an nn.Module called as G(image, priors), got "
                            f"{type(generator).__name__}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.generator = generator.to(self.device).eval()
        meta = generator_meta if isinstance(generator_meta, GeneratorMeta) else GeneratorMeta.parse(generator_meta)
        self.meta = meta
        self.priors_meta = dict(meta.priors_meta)
        self.size, self.n = meta.size, meta.n
        self.batch_size = int(batch_size)
        self.cnn = cnn.to(self.device).eval() if cnn is not None else None
        self.notes: list[str] = []
        self._extractor: PriorExtractor | None = None
        if cnn is not None:
            self._extractor = self._make_extractor(cnn)

    @classmethod
    def from_checkpoints(cls, generator: str | Path, cnn: str | Path | None = None,
                         device: str | torch.device = "auto", batch_size: int = 32,
                         variant: str | None = None) -> Explainer:
        """Load a generator checkpoint and a CNN checkpoint.

        Args:
            generator: a generator file (`models/<name>-lsft.pt`, `-gsft.pt`, or a training checkpoint).
            cnn: a CNN checkpoint (`models/<name>-cnn.pt`, or one made by `cnnprior import-cnn`); None runs the
                generator on prior files only (`generate`).
            device: "auto" (CUDA when present), "cpu", "cuda".
            batch_size: images per pass.
            variant: refuse a generator of another registered name ("lsft", "gsft", ...); None accepts any.

        Returns:
            An `Explainer`.

        Example:
            >>> ex = Explainer.from_checkpoints("models/fashion_resnet18-gsft.pt",
            ...                                 cnn="models/fashion_resnet18-cnn.pt", variant="gsft")
        """
        dev = resolve_device(device) if isinstance(device, str) else device
        gen, meta = load_generator(generator, expect_variant=variant, device=dev)
        model = load_cnn(cnn, dev)[0] if cnn is not None else None
        return cls(gen, meta, model, dev, batch_size)

    # --------------------------------------------------------------------------------------- the CNN side
    def _make_extractor(self, cnn: TargetCNN) -> PriorExtractor:
        pm = self.priors_meta
        if pm.get("method") not in cams.METHODS:
            raise UserError(f"the generator was trained on {pm.get('method')!r} priors, which cannot be computed "
                            f"from images (known CAM methods: {', '.join(cams.NAMES)}); use a prior file (--priors)")
        spec = spec_from_sidecar(pm, explain="predicted")
        if spec.target == "final" and pm.get("cnn_arch") and pm["cnn_arch"] != cnn.arch:
            # another architecture: its own final feature map (the rule in cnn.layers.final_layer), not the module
            # name recorded for the generator's CNN (ResNet-18's net.layer4.1 is not ResNet-34's last block)
            spec.target_layer = ""
        extractor = extractor_from(cnn, spec)
        diffs = layer_differences(extractor.describe(), pm, cnn.arch)
        if diffs:
            self.notes.append(f"the CNN's conv layers differ from those of the CNN the generator's priors came from "
                              f"({'; '.join(diffs)}); maps may not match")
        return extractor

    @property
    def extractor(self) -> PriorExtractor:
        """The all-layer Grad-CAM extractor (priors and target) of the CNN.

        Returns:
            The `PriorExtractor`; raises `ValueError` when the explainer has no CNN.

        Example:
            >>> ex.extractor.describe()["target_layer"]   # e.g. 'net.layer4.1'
        """
        if self._extractor is None:
            raise ValueError("this Explainer has no CNN: pass cnn= to Explainer.from_checkpoints to explain images")
        return self._extractor

    @property
    def model(self) -> nn.Module:
        """The CNN as an nn.Module taking `preprocess(images)` (resized, normalised) and returning logits.

        Returns:
            The CNN's inner network (the model pytorch-grad-cam's metrics call).

        Example:
            >>> logits = ex.model(ex.preprocess(images))
        """
        return self.extractor.model.net

    @property
    def class_names(self) -> list[str]:
        """The CNN's class names, index = class.

        Returns:
            A list of class names.

        Example:
            >>> ex.class_names[3]                 # e.g. 'Dress'
        """
        return list(self.extractor.model.class_names)

    def preprocess(self, images: Tensor) -> Tensor:
        """The CNN's own input: images resized to its input size (bilinear, antialiased) and normalised.

        Args:
            images: float tensor (B, 3, H, W), RGB in [0, 1].

        Returns:
            Float tensor (B, 3, s, s) on the explainer's device, the input `model` expects.

        Example:
            >>> x = ex.preprocess(images)         # (B, 3, s, s), normalised
        """
        cnn = self.extractor.model
        x = _check_images(images).to(self.device)
        if x.shape[-2:] != (cnn.image_size, cnn.image_size):
            x = F.interpolate(x, size=(cnn.image_size, cnn.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - cnn.mean) / cnn.std

    def unprocess(self, input_tensor: Tensor) -> Tensor:
        """Undo `preprocess`'s normalisation: RGB at the CNN's input size, values clamped to [0, 1].

        Args:
            input_tensor: float tensor (B, 3, s, s) as `preprocess` returns it.

        Returns:
            Float tensor (B, 3, s, s) on the explainer's device, values clamped to [0, 1] (the resize of
            `preprocess` is not undone).

        Example:
            >>> rgb = ex.unprocess(ex.preprocess(images))
        """
        cnn = self.extractor.model
        return (input_tensor.to(self.device).float() * cnn.std + cnn.mean).clamp(0, 1)

    def records(self, images: Tensor, targets: Sequence[int] | Tensor | None = None, start: int = 0) -> np.ndarray:
        """Priors and Grad-CAM target of images, packed as prior-file records (one pass per `batch_size`).

        Args:
            images: float tensor (B, 3, H, W), RGB in [0, 1].
            targets: the class to explain per image; None explains the CNN's predicted class.
            start: the `index` field of the first record.

        Returns:
            A structured array in the prior-file format (`label` = -1, empty masks).

        Example:
            >>> rec = ex.records(images, targets=[3, 1])
            >>> rec["explained"], rec["pred"]
        """
        images = _check_images(images)
        classes = None
        if targets is not None:
            given = torch.as_tensor(targets)
            if given.numel() and (given.is_floating_point() or given.is_complex() or given.dtype == torch.bool):
                raise TypeError(f"targets: class indices must be integers, got {given.dtype}")
            classes = given.to(torch.int64).view(-1)
        if classes is not None and len(classes) != len(images):
            raise ValueError(f"targets: {len(classes)} classes for {len(images)} images")
        n_classes = len(self.extractor.model.class_names)
        if classes is not None and len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= n_classes):
            raise ValueError(f"targets: classes must be in 0..{n_classes - 1} (the CNN has {n_classes} classes), got "
                            f"{classes.tolist()}")
        out = []
        for s in range(0, len(images), self.batch_size):
            x = images[s:s + self.batch_size]
            res = self.extractor(x, classes=None if classes is None else classes[s:s + self.batch_size])
            b = len(x)
            out.append(make_records(res, x.cpu(), torch.full((b,), -1, dtype=torch.int64),
                                    torch.zeros(b, self.size, self.size), torch.arange(start + s, start + s + b),
                                    self.size, self.n))
        return np.concatenate(out) if out else np.zeros(0, dtype=record_dtype(self.size, self.n))

    # --------------------------------------------------------------------------------------- the GAN side
    @torch.no_grad()
    def generate(self, image: Tensor, priors: Tensor) -> Tensor:
        """The generator's maps for records' floats, one pass per `batch_size`.

        Args:
            image: float tensor (B, 3, S, S), the records' images at the map size S.
            priors: float tensor (B, n, S, S), the records' priors in [0, 1].

        Returns:
            Float tensor (B, 1, S, S) on the CPU, clamped to [0, 1].

        Example:
            >>> t = records_tensors(rec, ex.size)
            >>> maps = ex.generate(t["image"], t["priors"])
        """
        if len(image) == 0:
            return torch.zeros(0, 1, self.size, self.size)
        return generate(self.generator, image, priors, self.batch_size, self.device).clamp(0, 1)

    def explain(self, images: Tensor, targets: Sequence[int] | Tensor | None = None) -> Explanation:
        """Maps, Grad-CAM targets and priors of images, at the input size.

        Args:
            images: float tensor (B, 3, H, W), RGB in [0, 1], any H, W.
            targets: the class to explain per image; None explains the predicted class.

        Returns:
            An `Explanation`.

        Example:
            >>> e = ex.explain(images, targets=[3, 1])
            >>> e.maps, e.gradcam, e.priors       # (B, H, W), (B, H, W), (B, n, H, W)
        """
        images = _check_images(images)
        rec = self.records(images, targets)
        t = records_tensors(rec, self.size)
        pred = self.generate(t["image"], t["priors"])
        size = tuple(images.shape[-2:])
        return Explanation(maps=_resize(pred, size)[:, 0], gradcam=_resize(t["target"], size)[:, 0],
                           priors=_resize(t["priors"], size), classes=rec["explained"].astype(np.int64),
                           predicted=rec["pred"].astype(np.int64), probs=rec["prob"].astype(np.float32), records=rec)

    def __call__(self, images: Tensor, targets: Sequence[int] | Tensor | None = None) -> np.ndarray:
        """The generator's explanation maps (`explain(images, targets).maps`).

        Args:
            images: float tensor (B, 3, H, W), RGB in [0, 1], any H, W.
            targets: the class to explain per image; None explains the predicted class.

        Returns:
            Numpy float32 (B, H, W) in [0, 1] at the input size.

        Example:
            >>> maps = ex(images, targets=[3, 1])
        """
        return self.explain(images, targets).maps


class GANCAM:
    """pytorch-grad-cam's CAM protocol over an `Explainer`: `cam(input_tensor=..., targets=...)` returns
    numpy float32 (B, H, W) in [0, 1] at input_tensor's size, like `GradCAM`.

    Args:
        explainer: an `Explainer` with a CNN.

    Example:
        >>> cam = GANCAM(ex)
        >>> x = ex.preprocess(images)
        >>> targets = [ClassifierOutputTarget(3)] * len(x)
        >>> grayscale = cam(input_tensor=x, targets=targets)
        >>> ROADMostRelevantFirst()(x, grayscale, targets, ex.model)
    """

    def __init__(self, explainer: Explainer):
        self.explainer = explainer
        self.model = explainer.model

    def __call__(self, input_tensor: Tensor, targets: Sequence | None = None, aug_smooth: bool = False,
                 eigen_smooth: bool = False) -> np.ndarray:
        """The GAN's maps of input_tensor, in the shape pytorch-grad-cam's CAMs return.

        Args:
            input_tensor: float tensor (B, 3, s, s) as `Explainer.preprocess` returns it.
            targets: one target per image carrying a class index (`.category`, e.g. `ClassifierOutputTarget(k)`);
                None explains the predicted class.
            aug_smooth: not supported (raises `ValueError` when True).
            eigen_smooth: not supported (raises `ValueError` when True).

        Returns:
            Numpy float32 (B, s, s) in [0, 1] at input_tensor's size.

        Example:
            >>> grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(3)] * len(x))
        """
        if aug_smooth or eigen_smooth:
            raise ValueError("GANCAM: aug_smooth / eigen_smooth are not supported (the GAN map is one map)")
        classes = None
        if targets is not None:
            if not all(hasattr(t, "category") for t in targets):
                raise TypeError("GANCAM: targets must carry a class index (`.category`), e.g. "
                                "ClassifierOutputTarget(k)")
            classes = [int(t.category) for t in targets]
        images = self.explainer.unprocess(input_tensor)
        return self.explainer(images, classes)

    def __enter__(self) -> GANCAM:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
