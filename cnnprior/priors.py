"""Conditional priors: all-layer CAMs in one pass, cumulative averages, and safe `.npy` prior files."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
from torch import nn
from tqdm import tqdm

from cnnprior import cams
from cnnprior.errors import UserError, cli_main
from cnnprior.layers import final_layer, named_module, within

PRIORS_FORMAT = "cnnprior-priors/1"
RELEASED_PIXEL_BYTES = 64 * 64 * 3 + 8 * 64 * 64 * 3 + 64 * 64 * 3  # the released Food_Resnet.npy layout


# ----------------------------------------------------------------------------------------- per-layer maps
class _ConvRecorder(ActivationsAndGradients):
    """grad-cam's hook holder, made safe for every layer at once.

    - Outputs are keyed by layer (a layer run twice keeps its first call; an unused layer has none), so
      no map can shift onto another layer as grad-cam's execution-order lists would.
    - With `copy`, the hook hands the rest of the network a *copy* of the conv output: an in-place op
      downstream (VGG's ReLU(inplace=True)) modifies the copy, never the recorded tensor, on every device.
      Without it, `overwritten()` (version counters) tells whether such an op changed a recorded output.
    """

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module], copy: bool = True):
        super().__init__(model, [], None, detach=True)
        self.copy = copy
        self.outputs: dict[int, torch.Tensor] = {}
        self.versions: dict[int, int] = {}
        for i, layer in enumerate(target_layers):
            self.handles.append(layer.register_forward_hook(partial(self._keep, i)))

    def _keep(self, i: int, module: nn.Module, inputs, output: torch.Tensor):
        if i in self.outputs or not torch.is_grad_enabled():
            return None
        self.outputs[i], self.versions[i] = output, output._version
        return output.clone() if self.copy else None

    def overwritten(self) -> bool:
        """Whether an in-place op changed a recorded output after its conv (possible only without `copy`)."""
        return any(t._version != self.versions[i] for i, t in self.outputs.items())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.outputs, self.versions = {}, {}
        return self.model(x)

    def release(self) -> None:
        self.outputs = {}
        super().release()


def position_indices(n: int, last: int) -> list[int]:
    """The paper's picks: ceil(ceil(100/(n-1)·i) · l/100), i = 0..n-1, l = index of the last map (exact math)."""
    if last < 0:
        raise ValueError("no maps to pick from")
    if n == 1:
        return [last]
    return [math.ceil(Fraction(math.ceil(Fraction(100, n - 1) * i)) * last / 100) for i in range(n)]


def _minmax(cams: torch.Tensor) -> torch.Tensor:
    flat = cams.flatten(1)
    # amin/amax: on CPU ~25x faster than aminmax or min/max (which also find indices) for (32, 4096) rows
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    return ((flat - lo) / (1e-7 + (hi - lo))).view_as(cams)


def scale_and_resize(cams: torch.Tensor, size: int) -> torch.Tensor:
    """ReLU, per-image min-max to [0,1], bilinear resize to size x size, min-max again — batched.

    The same steps as grad-cam's single-layer output (scale_cam_image, cv2 resize, then the aggregation's
    rescale), which matters: a half-pixel bilinear upsampling never hits the peak pixel, so without the second
    min-max a map's maximum would sit below 1.
    """
    cams = _minmax(cams.clamp_min(0))
    if cams.shape[-1] != size or cams.shape[-2] != size:
        if cams.is_cuda:
            cams = F.interpolate(cams.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        else:  # the same bilinear weights as two small matmuls: ~3x faster than F.interpolate on CPU
            cams = _bilinear_matrix(cams.shape[-2], size) @ cams @ _bilinear_matrix(cams.shape[-1], size).T
    return _minmax(cams.clamp_min(0))


@functools.lru_cache(maxsize=64)
def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of F.interpolate(mode="bilinear", align_corners=False) along one axis."""
    dst = torch.arange(n_out, dtype=torch.float64)
    src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)  # half-pixel centres, clamped at the border
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m.index_put_((dst.long(), i0), 1 - w1, accumulate=True)
    m.index_put_((dst.long(), i1), w1, accumulate=True)
    return m.float()


TARGETS = ("final", "last_conv", "first")
TARGET_ALIASES = {"last": "last_conv"}  # `last` in files and configs written before `final` existed


@dataclass
class PriorSpec:
    """How priors and the target are formed from per-layer maps (recorded in every sidecar)."""

    size: int = 64
    n: int = 8
    method: str = cams.DEFAULT
    order: str = "output_to_input"
    target: str = "final"
    include_target_layer: bool = False
    explain: str = "predicted"
    exclude: list = field(default_factory=list)
    layer_outputs: str = "activated"
    target_layer: str = ""

    def __post_init__(self) -> None:
        self.target = TARGET_ALIASES.get(self.target, self.target)
        if self.target not in TARGETS:
            raise UserError(f"priors.target: {self.target!r} is not one of {', '.join(TARGETS)}")
        self.exclude = list(self.exclude or [])

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.__dict__.items()}


class PriorExtractor:
    """One forward + one backward per batch -> every conv layer's CAM, cumulative priors and the target map.

    `layers` are the per-layer map modules in forward order (`layers.cam_layers`). The target is, by
    `spec.target`: `final` the CNN's final feature map (`layers.final_layer`, or `spec.target_layer` by name),
    `last_conv` / `first` the last / first of `layers`. Without `include_target_layer`, every layer inside the
    target module (for a ResNet target its whole last block; for a conv target the conv itself) is left out of
    the priors, and so is every layer inside a module named in `spec.exclude`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[tuple[str, nn.Module]], spec: PriorSpec):
        method = cams.get(spec.method)
        if len(layers) < 2:
            raise UserError("the CNN has fewer than 2 conv layers; priors need several")
        self.model, self.spec = model, spec
        self.layer_names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.fast_cam = method.fast  # the method's torch formula, if it has one
        self.cam = method.cam_class()(model, target_layers=[])  # method-specific weighting only
        self._copy_outputs = False  # set once a forward pass shows an in-place op after a recorded output
        L = self.conv_count = len(layers)
        self.target_name, target = self._target(model, spec)
        if spec.target == "first":
            self.target_index = 0
        elif spec.target == "last_conv":
            self.target_index = L - 1
        elif target in self.layers:
            self.target_index = self.layers.index(target)
        else:  # the final feature map is not a conv layer's output: recorded as one extra map
            self.layers.append(target)
            self.layer_names.append(self.target_name)
            self.target_index = L
        inside = [self.target_name] if not spec.include_target_layer else []
        self.excluded = [i for i in range(L) if any(within(self.layer_names[i], p) for p in inside + spec.exclude)
                         or (i == self.target_index and not spec.include_target_layer)]
        unmatched = [p for p in spec.exclude if not any(within(n, p) for n in self.layer_names[:L])]
        if unmatched:
            raise UserError(f"priors.exclude: {unmatched[0]!r} names no CAM layer (layers are like "
                            f"{self.layer_names[0]!r}, {self.layer_names[L - 1]!r})")
        pool = [i for i in range(L) if i not in self.excluded]
        if not pool:
            raise UserError("priors.exclude / the target leave no layer for the priors")
        self.average_order = pool[::-1] if spec.order == "output_to_input" else pool
        self.positions = position_indices(spec.n, len(self.average_order) - 1)

    def _target(self, model: nn.Module, spec: PriorSpec) -> tuple[str, nn.Module | None]:
        if spec.target == "first":
            return self.layer_names[0], self.layers[0]
        if spec.target == "last_conv":
            return self.layer_names[-1], self.layers[-1]
        if spec.target_layer:
            return named_module(model, spec.target_layer)
        return final_layer(model)

    def describe(self) -> dict:
        """Layer bookkeeping for the sidecar: which module each map reads and which layers each prior averages."""
        names = [self.layer_names[i] for i in self.average_order]
        return {"layers": self.layer_names[:self.conv_count], "target_layer": self.target_name,
                "excluded_layers": [self.layer_names[i] for i in self.excluded],
                "average_order": names, "positions": self.positions,
                "prior_layers": [names[:p + 1] for p in self.positions]}

    def layer_maps(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                   classes: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(maps (B,L,S,S) in forward layer order (the target's last if it is no conv layer's), explained class,
        its softmax prob, predicted class). `classes` fixes the explained class (sanity checks), else
        `spec.explain` decides."""
        device = next(self.model.parameters()).device
        images = images.to(device)
        self.model.eval()
        rec = _ConvRecorder(self.model, self.layers, copy=self._copy_outputs)
        try:
            with torch.enable_grad():
                logits = rec(images)
                if rec.overwritten():
                    # an in-place op after a conv (VGG's ReLU): redo the pass with copies, and copy from now
                    # on; networks without such ops skip the copies (ResNet-18, CPU: ~7% faster)
                    self._copy_outputs = rec.copy = True
                    logits = rec(images)
                pred = logits.argmax(1)
                if classes is not None:
                    cls = classes.to(device).long()
                elif self.spec.explain == "label":
                    if labels is None:
                        raise UserError("priors.explain=label needs labels")
                    cls = labels.to(device)
                else:
                    cls = pred
                missing = [self.layer_names[i] for i in range(len(self.layers)) if i not in rec.outputs]
                if missing:
                    raise UserError(f"layer(s) not run by the forward pass: {', '.join(missing[:3])}")
                outs = [rec.outputs[i] for i in range(len(self.layers))]
                # one target per image; autograd.grad leaves parameters' .grad untouched
                score = logits.gather(1, cls.view(-1, 1)).sum()
                grads = torch.autograd.grad(score, outs, allow_unused=True)
            prob = torch.softmax(logits.detach().float(), 1).gather(1, cls.view(-1, 1))[:, 0]
            maps = []
            for layer, act, grad in zip(self.layers, outs, grads, strict=True):
                cam = self._cam(images, layer, act.detach().float(),
                                torch.zeros_like(act, dtype=torch.float32) if grad is None else grad.float())
                maps.append(scale_and_resize(cam, self.spec.size).cpu())
        finally:
            rec.release()
        return torch.stack(maps, 1), cls.cpu(), prob.cpu(), pred.cpu()

    def _cam(self, images: torch.Tensor, layer: nn.Module, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One layer's raw CAM (B,h,w): grad-cam's get_cam_image, or the method's torch formula (on the device)."""
        if self.fast_cam is not None:
            return self.fast_cam(act, grad)
        cam = self.cam.get_cam_image(images, layer, None, act.cpu().numpy(), grad.cpu().numpy(), False)
        return torch.from_numpy(np.ascontiguousarray(cam, dtype=np.float32)).to(act.device)

    def priors_from_maps(self, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(priors (B,n,S,S) = cumulative averages at the paper's positions, target map (B,S,S))."""
        # a running sum in averaging order, divided only at the kept positions (equals a cumsum to ~1e-7,
        # far below the 1/255 quantisation) without reordering, copying or dividing all L maps: ~6x faster
        running, done, priors = torch.zeros_like(maps[:, 0]), 0, []
        for p in self.positions:
            for i in self.average_order[done:p + 1]:
                running += maps[:, i]
            done = max(done, p + 1)
            priors.append(running / (p + 1))
        return torch.stack(priors, 1), maps[:, self.target_index]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 classes: torch.Tensor | None = None) -> dict:
        maps, cls, prob, pred = self.layer_maps(images, labels, classes)
        priors, target = self.priors_from_maps(maps)
        return {"priors": priors, "target": target, "explained": cls, "prob": prob, "pred": pred}


# ----------------------------------------------------------------------------------------- prior files
def record_dtype(size: int, n: int, with_mask: bool = True) -> np.dtype:
    """Structured record: uint8 pixels/maps (maps quantised as round(255·m)), no object fields.

    The ground-truth `mask` field exists only for sources that have masks (shapes).
    """
    fields = [("image", np.uint8, (size, size, 3)), ("priors", np.uint8, (n, size, size)),
              ("target", np.uint8, (size, size))]
    if with_mask:
        fields.append(("mask", np.uint8, (size, size)))
    fields += [("label", np.int16), ("pred", np.int16), ("explained", np.int16), ("prob", np.float32),
               ("index", np.int64)]
    return np.dtype(fields)


def to_u8(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0,1] floats -> uint8 by rounding."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def sidecar_path(npy: str | Path) -> Path:
    return Path(npy).with_suffix(".json")


def _content_hash(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    step = max(1, (64 << 20) // max(1, arr.dtype.itemsize))
    for i in range(0, len(arr), step):
        h.update(np.ascontiguousarray(arr[i:i + step]).tobytes())
    return h.hexdigest()


class PriorWriter:
    """Writes a prior file chunk by chunk into a temp memmap; `close()` renames it into place with its sidecar."""

    def __init__(self, path: str | Path, count: int, meta: dict, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.progress = self.path.with_name(self.path.name + ".progress.json")
        size, n = meta["size"], meta["n"]
        self.meta = dict(meta, count=count)
        if self.path.exists() and not overwrite:
            raise UserError(f"{self.path}: prior file exists; use --overwrite to replace it (or another priors.out)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = 0
        if resume and self.partial.exists() and self.progress.exists():
            state = json.loads(self.progress.read_text())
            if state.get("meta") != json.loads(json.dumps(self.meta)):
                raise UserError(f"{self.partial}: partial file was written with other settings; delete it or drop "
                                f"--resume")
            self.arr = np.lib.format.open_memmap(self.partial, mode="r+")
            self.done = int(state["done"])
        else:
            self.arr = np.lib.format.open_memmap(self.partial, mode="w+",
                                                 dtype=record_dtype(size, n, bool(meta.get("has_masks", True))),
                                                 shape=(count,))
            self._save_progress()

    def _save_progress(self) -> None:
        tmp = self.progress.with_name(self.progress.name + ".tmp")
        tmp.write_text(json.dumps({"done": self.done, "meta": self.meta}))
        os.replace(tmp, self.progress)

    def write(self, records: np.ndarray) -> None:
        self.arr[self.done:self.done + len(records)] = records
        self.done += len(records)
        self.arr.flush()
        self._save_progress()

    def close(self) -> Path:
        if self.done != len(self.arr):
            raise RuntimeError(f"prior file incomplete: {self.done}/{len(self.arr)}")
        self.arr.flush()
        meta = dict(self.meta, content_sha256=_content_hash(self.arr), dtype=str(self.arr.dtype.descr))
        del self.arr
        sc = sidecar_path(self.path)
        tmp = sc.with_name(sc.name + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(self.partial, self.path)
        os.replace(tmp, sc)
        self.progress.unlink(missing_ok=True)
        return self.path


@dataclass
class PriorFile:
    """A validated prior file: `records` (memmapped structured array) and `meta` (its sidecar)."""

    path: Path
    records: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.records)

    @property
    def size(self) -> int:
        return int(self.meta["size"])

    @property
    def n(self) -> int:
        return int(self.meta["n"])

    def tensors(self, idx: Iterable[int] | slice | None = None) -> dict[str, torch.Tensor]:
        """Float tensors in [0,1]: image (B,3,S,S), priors (B,n,S,S), target (B,1,S,S); label, mask."""
        r = self.records if idx is None else self.records[idx]
        img = torch.from_numpy(np.ascontiguousarray(r["image"])).permute(0, 3, 1, 2).float() / 255.0
        return {"image": img, "priors": torch.from_numpy(np.ascontiguousarray(r["priors"])).float() / 255.0,
                "target": torch.from_numpy(np.ascontiguousarray(r["target"])).float().unsqueeze(1) / 255.0,
                "mask": (torch.from_numpy(np.ascontiguousarray(r["mask"])).float() if "mask" in r.dtype.names
                         else torch.zeros(len(r), self.size, self.size)),
                "label": torch.from_numpy(np.asarray(r["label"], dtype=np.int64)),
                "explained": torch.from_numpy(np.asarray(r["explained"], dtype=np.int64))}


def zero_map_fractions(pf: PriorFile, chunk: int = 1024) -> dict:
    """Fraction of records whose prior k (and whose target) is all zero: an empty map tells the GAN nothing."""
    n, count = pf.n, len(pf)
    zero_priors, zero_target = np.zeros(n), 0
    for s in range(0, count, chunk):
        r = pf.records[s:s + chunk]
        zero_priors += (np.asarray(r["priors"]).reshape(len(r), n, -1).max(2) == 0).sum(0)
        zero_target += int((np.asarray(r["target"]).reshape(len(r), -1).max(1) == 0).sum())
    return {"priors": (zero_priors / max(count, 1)).tolist(), "target": zero_target / max(count, 1)}


def _pickled(exc: ValueError) -> bool:
    """Whether np.load(allow_pickle=False) refused an object array (mmap_mode says "Python objects in dtype")."""
    return any(s in str(exc) for s in ("allow_pickle", "Object arrays", "Python objects"))


def read_priors(path: str | Path, verify: bool = True) -> PriorFile:
    """Open a prior file (allow_pickle=False, memmapped) and check it against its sidecar; one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: prior file not found")
    # the .npy is opened first, so a pickled file (the released layout has no sidecar) is named as such
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if _pickled(exc):
            raise UserError(f"{p}: holds pickled Python objects; loading it could run arbitrary code. If you trust "
                            f"its source, convert it with `python -m cnnprior.priors import {p} --out NEW.npy "
                            f"--trust-pickle`") from None
        raise UserError(f"{p}: truncated or corrupt .npy ({exc})") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{p}: unreadable .npy ({exc})") from None
    sc = sidecar_path(p)
    if not sc.is_file():
        raise UserError(f"{p}: sidecar {sc.name} missing (a prior file needs its .json; re-run --stage priors)")
    try:
        meta = json.loads(sc.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{sc}: sidecar is not valid JSON ({exc})") from None
    if meta.get("format") != PRIORS_FORMAT:
        raise UserError(f"{sc}: not a cnnprior prior sidecar (format {meta.get('format')!r}, "
                        f"expected {PRIORS_FORMAT!r})")
    try:
        size, n, count = int(meta["size"]), int(meta["n"]), int(meta["count"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{sc}: sidecar lacks size/n/count") from None
    has_mask = "mask" in (arr.dtype.names or ())
    if bool(meta.get("has_masks", has_mask)) != has_mask:
        raise UserError(f"{p}: sidecar says has_masks={meta.get('has_masks')} but the records "
                        f"{'have' if has_mask else 'lack'} a mask field")
    expected = record_dtype(size, n, has_mask)
    if arr.dtype != expected:
        raise UserError(f"{p}: record layout {arr.dtype.descr} does not match the sidecar (S={size}, n={n})")
    if arr.ndim != 1 or len(arr) != count:
        raise UserError(f"{p}: holds {arr.shape[0] if arr.ndim else 0} records but the sidecar says {count}")
    if verify and meta.get("content_sha256") and _content_hash(arr) != meta["content_sha256"]:
        raise UserError(f"{p}: content hash differs from the sidecar (file modified or corrupt)")
    return PriorFile(p, arr, meta)


# ----------------------------------------------------------------------------------------- stage
def _resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def make_records(out: dict, images: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, indices: torch.Tensor,
                 size: int, n: int, with_mask: bool = True) -> np.ndarray:
    """Pack one batch of extractor output into prior-file records."""
    rec = np.zeros(len(images), dtype=record_dtype(size, n, with_mask))
    rec["image"] = to_u8(_resize_images(images, size).permute(0, 2, 3, 1))
    rec["priors"] = to_u8(out["priors"])
    rec["target"] = to_u8(out["target"])
    if with_mask:
        if masks.shape[-1] != size:
            masks = F.interpolate(masks.unsqueeze(1).float(), size=(size, size), mode="area")[:, 0]
        rec["mask"] = (masks > 0.5).cpu().numpy().astype(np.uint8)
    rec["label"], rec["pred"], rec["explained"] = labels.numpy(), out["pred"].numpy(), out["explained"].numpy()
    rec["prob"], rec["index"] = out["prob"].numpy(), indices.numpy()
    return rec


def extractor_for_checkpoint(cfg, device: torch.device):
    """Load the configured CNN checkpoint (checking its arch) and build the extractor."""
    from cnnprior.cnn import load_cnn

    ckpt_path = cfg.cnn_checkpoint
    if not Path(ckpt_path).is_file():
        raise UserError(f"{ckpt_path}: CNN checkpoint not found; run `python train.py --config "
                        f"{cfg.source_file or '<config>'} --stage classifier` first (or set cnn.checkpoint)")
    model, meta = load_cnn(ckpt_path, device)
    if meta["arch"] != cfg.cnn.arch:
        raise UserError(f"{ckpt_path}: checkpoint holds a {meta['arch']} but the config says cnn.arch: "
                        f"{cfg.cnn.arch}")
    return extractor_from(model, spec_from_config(cfg.priors)), model, meta


def spec_from_config(pc) -> PriorSpec:
    """PriorSpec from a `priors:` config section."""
    return PriorSpec(pc.size, pc.n, pc.method, pc.order, pc.target, pc.include_target_layer, pc.explain,
                     list(pc.exclude), pc.layer_outputs, pc.target_layer)


def spec_from_sidecar(pm: dict, **changes) -> PriorSpec:
    """The PriorSpec a prior file was written with (files without the newer keys: their old meaning)."""
    keys = {f: pm[f] for f in ("size", "n", "method", "order", "target", "include_target_layer", "explain",
                               "exclude", "target_layer") if f in pm}
    keys.setdefault("target", "last_conv")
    keys["layer_outputs"] = pm.get("layer_outputs", "raw")  # files from before activated outputs
    if TARGET_ALIASES.get(keys["target"], keys["target"]) != "final":
        keys["target_layer"] = ""
    return PriorSpec(**{**keys, **changes})


def target_module(model: nn.Module, pm: dict) -> tuple[str, nn.Module]:
    """The module whose map is a prior file's target (by its sidecar), for live CAMs of the same layer."""
    ex = extractor_from(model, spec_from_sidecar(pm))
    return ex.target_name, ex.layers[ex.target_index]


def extractor_from(model: nn.Module, spec: PriorSpec) -> PriorExtractor:
    """The extractor for `model` with the CAM layers `spec.layer_outputs` selects."""
    from cnnprior.layers import cam_layers

    return PriorExtractor(model, cam_layers(model, outputs=spec.layer_outputs), spec)


def write_prior_file(extractor: PriorExtractor, dataset, path: Path, meta: dict, batch_size: int,
                     resume: bool, overwrite: bool, num_workers: int = 0) -> Path:
    """Extract priors for every item of `dataset` and write them (chunked, atomic, resumable)."""
    from torch.utils.data import DataLoader, Subset

    spec = extractor.spec
    writer = PriorWriter(path, len(dataset), meta, resume=resume, overwrite=overwrite)
    todo = Subset(dataset, range(writer.done, len(dataset)))
    loader = DataLoader(todo, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in tqdm(loader, desc=f"priors {path.name}", initial=writer.done // batch_size,
                      total=math.ceil(len(dataset) / batch_size), dynamic_ncols=True):
        out = extractor(batch["image"], batch["label"])
        writer.write(make_records(out, batch["image"], batch["label"], batch["mask"], batch["index"],
                                  spec.size, spec.n, bool(meta.get("has_masks", True))))
    return writer.close()


def split_dataset(cfg, split: str):
    """The images of one split, capped by priors.train_limit / test_limit (stratified, seeded)."""
    from torch.utils.data import Subset

    from cnnprior.data import load_split, stratified_take

    ds = load_split(cfg.data, split)
    cap = cfg.priors.train_limit if split == "train" else cfg.priors.test_limit
    if cap and cap < len(ds):
        keep = stratified_take(ds.labels, cap, cfg.data.seed)
        class_names, has_masks = ds.class_names, ds.has_masks
        ds = Subset(ds, keep.tolist())
        ds.class_names, ds.has_masks = class_names, has_masks
    return ds


def file_meta(cfg, extractor: PriorExtractor, cnn_meta: dict, ds, split: str, **extra) -> dict:
    """The sidecar of a prior file the priors stage writes (spec, layer bookkeeping, data, CNN, config)."""
    from cnnprior.config import to_dict
    from cnnprior.runtime import file_sha256

    return {"format": PRIORS_FORMAT, **extractor.spec.as_dict(), **extractor.describe(),
            "split": split, "dataset": cfg.data.source, "class_names": list(ds.class_names),
            "has_masks": bool(ds.has_masks),
            "cnn": {"arch": cnn_meta["arch"], "checkpoint": str(cfg.cnn_checkpoint),
                    "checkpoint_sha256": file_sha256(cfg.cnn_checkpoint), "image_size": cnn_meta["image_size"],
                    "val_accuracy": cnn_meta.get("val_accuracy")},
            "config": to_dict(cfg), **extra}


def run_priors_stage(cfg, resume: bool = False, overwrite: bool = False, log=print) -> list[Path]:
    """`train.py --stage priors`: write <priors.out>-<split>.npy + .json for each configured split."""
    from cnnprior.config import save_config
    from cnnprior.runtime import resolve_device

    device = resolve_device(cfg.priors.device)
    extractor, model, cnn_meta = extractor_for_checkpoint(cfg, device)
    if cnn_meta["image_size"] != cfg.data.image_size:
        raise UserError(f"{cfg.cnn_checkpoint}: CNN input size {cnn_meta['image_size']} != data.image_size "
                        f"{cfg.data.image_size}")
    written = []
    for split in cfg.priors.splits:
        path = Path(f"{cfg.priors_prefix}-{split}.npy")
        if path.exists() and not overwrite:
            raise UserError(f"{path}: prior file exists; use --overwrite to replace it")
        ds = split_dataset(cfg, split)
        meta = file_meta(cfg, extractor, cnn_meta, ds, split)
        log(f"priors: {split}: {len(ds)} images, {extractor.conv_count} conv layers, target "
            f"{meta['target_layer']}, positions {extractor.positions}")
        written.append(write_prior_file(extractor, ds, path, meta, cfg.priors.batch_size, resume, overwrite,
                                        cfg.data.num_workers))
        log(f"priors: wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if written:
        save_config(cfg, Path(f"{cfg.priors_prefix}.yaml"))
    return written


# ----------------------------------------------------------------------------------------- import
RELEASED_ROW = "[input image, n colour maps, colour target, label]"  # one row of the released layout


def _released_rows(src: Path) -> np.ndarray:
    """The pickled rows of a released file as an (N, 4) object array (loaded only after --trust-pickle)."""
    try:
        rows = np.load(src, allow_pickle=True)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign pickle is reported as one line
        raise UserError(f"{src}: could not load ({type(exc).__name__}: {str(exc)[:160]})") from None
    if rows.ndim != 2 or rows.shape[1] != 4 or len(rows) == 0:
        raise UserError(f"{src}: expected rows of {RELEASED_ROW}, got an array of shape {rows.shape}")
    return rows


def _released_label(value: object, row: int, src: Path) -> str | int:
    """One row's label: a class name (the released npy_generation.py writes the class folder name) or an int."""
    if isinstance(value, (list, tuple, np.ndarray)):
        arr = np.asarray(value, dtype=object)
        if arr.size != 1:
            raise UserError(f"{src}: row {row}: label has {arr.size} values; expected one class name or integer")
        value = arr.reshape(-1)[0]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{src}: row {row}: label is an empty class name")
        return str(value).strip()
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        number = int(value)
    elif isinstance(value, (float, np.floating)) and float(value).is_integer():
        number = int(value)
    else:
        raise UserError(f"{src}: row {row}: label {value!r} is neither a class name nor an integer")
    if not 0 <= number <= np.iinfo(np.int16).max:
        raise UserError(f"{src}: row {row}: label {number} is outside 0..{np.iinfo(np.int16).max}")
    return number


def released_labels(values: Sequence, src: Path, class_names: Sequence[str] | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """Label indices and class names: names map to indices in sorted order (or --classes order); ints stay."""
    labels = [_released_label(v, i, src) for i, v in enumerate(values)]
    named = [i for i, v in enumerate(labels) if isinstance(v, str)]
    if named and len(named) != len(labels):
        number = next(i for i, v in enumerate(labels) if not isinstance(v, str))
        raise UserError(f"{src}: row {number}: label {labels[number]!r} is a number but row {named[0]} has the class "
                        f"name {labels[named[0]]!r}; labels must be all names or all integers")
    if class_names is not None and len(set(class_names)) != len(class_names):
        raise UserError(f"--classes: names repeat ({', '.join(class_names)})")
    if named:
        names = list(class_names) if class_names else sorted(set(labels))
        lookup = {name: i for i, name in enumerate(names)}
        missing = next((i for i, v in enumerate(labels) if v not in lookup), None)
        if missing is not None:
            raise UserError(f"{src}: row {missing}: class name {labels[missing]!r} is not among --classes")
        return np.array([lookup[v] for v in labels], dtype=np.int64), names
    top = max(labels)
    if class_names and top >= len(class_names):
        raise UserError(f"{src}: row {labels.index(top)}: label {top} but --classes names only {len(class_names)} "
                        f"classes")
    return np.array(labels, dtype=np.int64), list(class_names) if class_names else [str(i) for i in range(top + 1)]


def _released_pixels(values: Sequence, first_row: int, shape: tuple[int, ...], what: str, src: Path) -> np.ndarray:
    """Stack one column of rows as uint8, checking each row's shape and whole values in 0..255."""
    out = np.empty((len(values), *shape), dtype=np.uint8)
    for k, value in enumerate(values):
        where = f"{src}: row {first_row + k}: {what}"
        try:
            arr = np.asarray(value)
        except ValueError:  # a ragged nested list
            raise UserError(f"{where} is not a regular array") from None
        if arr.shape != shape:
            raise UserError(f"{where} has shape {arr.shape}, expected {shape} (as in row 0)")
        if arr.dtype.kind not in "uif":
            raise UserError(f"{where} is not numeric (dtype {arr.dtype})")
        if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and np.array_equal(arr, np.rint(arr))):
            raise UserError(f"{where} holds non-integer values; the released layout stores uint8 colour images")
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise UserError(f"{where} has values outside 0..255")
        out[k] = arr
    return out


def import_released(src: str | Path, out: str | Path, trust_pickle: bool = False, overwrite: bool = False,
                    cmap: str = "jet", class_names: Sequence[str] | None = None, chunk: int = 256) -> Path:
    """Convert the paper's released `Food_Resnet.npy` (pickled rows of jet-coloured maps) into a prior file."""
    from cnnprior.viz import invert_colormap

    src = Path(src)
    if not src.is_file():
        raise UserError(f"{src}: file not found")
    if not trust_pickle:
        try:
            np.load(src, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            if not _pickled(exc):
                raise UserError(f"{src}: truncated or corrupt .npy ({exc})") from None
            raise UserError(f"{src}: holds pickled Python objects; loading it can execute arbitrary code. Only if "
                            f"you trust its source, re-run with --trust-pickle") from None
        raise UserError(f"{src}: not in the released object layout (it loads without pickle: already numeric?)")
    rows = _released_rows(src)
    first = np.asarray(rows[0, 1]) if isinstance(rows[0, 1], (list, tuple, np.ndarray)) else np.empty(0)
    if first.ndim != 4 or first.shape[-1] != 3 or first.shape[1] != first.shape[2]:
        raise UserError(f"{src}: row 0: maps must be (n, S, S, 3) colour images, got shape {first.shape}")
    n, size = first.shape[0], first.shape[1]
    labels, names = released_labels(rows[:, 3], src, class_names)
    meta = {"format": PRIORS_FORMAT, "size": size, "n": n, "method": "released-guided-gradcam",
            "order": "output_to_input", "target": "first", "include_target_layer": True, "explain": "class0",
            "layers": [], "target_layer": "", "average_order": [], "positions": [], "prior_layers": [],
            "split": "imported", "dataset": src.stem, "class_names": names, "has_masks": False,
            "cnn": {"arch": "released", "checkpoint": str(src), "checkpoint_sha256": "", "image_size": size},
            "imported_from": str(src), "colormap": cmap}
    taken = [p for p in (Path(out), sidecar_path(out)) if p.exists()]  # the sidecar is an output too
    if taken and not overwrite:
        raise UserError(f"{taken[0]}: prior file exists; use --overwrite to replace it (or another --out)")
    writer = PriorWriter(Path(out), len(rows), meta, overwrite=overwrite)
    try:
        for s in tqdm(range(0, len(rows), chunk), desc="import", dynamic_ncols=True):
            part = rows[s:s + chunk]
            rec = np.zeros(len(part), dtype=record_dtype(size, n, with_mask=False))
            rec["image"] = _released_pixels(part[:, 0], s, (size, size, 3), "input image", src)
            maps = _released_pixels(part[:, 1], s, (n, size, size, 3), "maps", src)
            rec["priors"] = to_u8(invert_colormap(maps, cmap))
            rec["target"] = to_u8(invert_colormap(_released_pixels(part[:, 2], s, (size, size, 3), "target", src),
                                                  cmap))
            rec["label"] = rec["pred"] = rec["explained"] = labels[s:s + chunk]
            rec["index"] = np.arange(s, s + len(part))
            writer.write(rec)
    except UserError:  # a malformed row: leave nothing half-written (an import is redone, never resumed)
        writer.partial.unlink(missing_ok=True)
        writer.progress.unlink(missing_ok=True)
        raise
    return writer.close()


@cli_main
def main(argv: list[str] | None = None) -> int:
    """`python -m cnnprior.priors`: inspect or import prior files."""
    p = argparse.ArgumentParser(prog="python -m cnnprior.priors", description="Inspect or import prior files.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("info", help="validate a prior file and print its sidecar summary")
    ins.add_argument("file")
    imp = sub.add_parser("import", help="convert the paper's released Food_Resnet.npy into a prior file")
    imp.add_argument("file")
    imp.add_argument("--out", required=True, help="output .npy path (a .json sidecar is written beside it)")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow loading the pickled object array (runs code from the file: trusted sources only)")
    imp.add_argument("--overwrite", action="store_true")
    imp.add_argument("--classes", nargs="*", help="class names in label order (default: the file's class-name "
                                                  "labels sorted, or 0..max for integer labels)")
    args = p.parse_args(argv)
    if args.cmd == "info":
        pf = read_priors(args.file)
        m = pf.meta
        print(f"{pf.path}: {len(pf)} samples, S={m['size']}, n={m['n']}, method={m['method']}, target={m['target']}"
              f" ({m.get('target_layer')}), order={m['order']}, cnn={m['cnn']['arch']}, "
              f"{pf.records.dtype.itemsize} bytes/sample")
        zeros = zero_map_fractions(pf)
        print("all-zero maps: " + ", ".join(f"C{k} {z:.1%}" for k, z in enumerate(zeros["priors"]))
              + f", target {zeros['target']:.1%}")
        return 0
    out = import_released(args.file, args.out, args.trust_pickle, args.overwrite, class_names=args.classes)
    pf = read_priors(out, verify=False)
    names = pf.meta["class_names"]
    print(f"wrote {out}: {len(pf)} samples, S={pf.size}, n={pf.n}, {len(names)} classes: {', '.join(names[:10])}"
          + (" ..." if len(names) > 10 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
