"""Conditional priors: all-layer CAMs in one pass (one forward+backward per batch), their cumulative averages at
the kept positions, the extractor a prior file's sidecar describes, and `python -m cnnprior.priors
info|import|manifest`. The stage that writes them: stage.py."""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients
from torch import nn

from cnnprior.cnn.layers import cam_layers, conv_layers, final_layer, last_block, named_module, within
from cnnprior.cnn.model import load_cnn
from cnnprior.core import cams
from cnnprior.core.errors import UserError, cli_main
from cnnprior.priors.priorset import PriorSet, write_manifest
from cnnprior.priors.read import read_priors, zero_map_fractions
from cnnprior.priors.released import import_released

__all__ = [
    "extractor_for_checkpoint", "extractor_from", "info_lines", "main", "minmax", "position_indices",
    "PriorExtractor", "PriorSpec", "scale_and_resize", "scale_and_resize_all", "spec_from_config",
    "spec_from_sidecar", "TARGET_ALIASES", "target_module", "TARGETS"
]


# ----------------------------------------------------------------------------------------- per-layer maps
class _ConvRecorder(ActivationsAndGradients):
    """grad-cam's hook holder, made safe for every layer at once.

    - Outputs are keyed by layer (a layer run twice keeps its first call; an unused layer has none), so
      no map can shift onto another layer as grad-cam's execution-order lists would.
    - For the layers in `copy` (all with `copy=True`), the hook hands the rest of the network a *copy* of the
      output: an in-place op downstream (VGG's ReLU(inplace=True), ResNet's `out += identity` after bn2)
      modifies the copy, never the recorded tensor, on every device. For the others, `overwritten()` (version
      counters) tells which recorded outputs such an op changed.
    """

    def __init__(self, model: nn.Module, target_layers: Sequence[nn.Module], copy: bool | frozenset[int] = True):
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
        return output.clone() if self.copy is True or (self.copy and i in self.copy) else None

    def overwritten(self) -> frozenset[int]:
        """The layers whose recorded output an in-place op changed after the layer (only uncopied ones can be)."""
        return frozenset(i for i, t in self.outputs.items() if t._version != self.versions[i])

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


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max to [0, 1] as grad-cam scales a CAM: (m - min) / (1e-7 + max - min)."""
    flat = maps.flatten(1)
    # amin/amax: on CPU ~25x faster than aminmax or min/max (which also find indices) for (32, 4096) rows
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    return ((flat - lo) / (1e-7 + (hi - lo))).view_as(maps)


def scale_and_resize(cams: torch.Tensor, size: int) -> torch.Tensor:
    """ReLU, per-image min-max to [0,1], bilinear resize to size x size, min-max again — batched, one layer.

    The same steps as grad-cam's single-layer output (scale_cam_image, cv2 resize, then the aggregation's
    rescale), which matters: a half-pixel bilinear upsampling never hits the peak pixel, so without the second
    min-max a map's maximum would sit below 1.
    """
    return scale_and_resize_all([cams], size)[0]


def scale_and_resize_all(cams: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """scale_and_resize of every layer's CAMs (each (B,h,w)) -> (L, B, size, size), the same numbers.

    Consecutive layers with maps of one size are scaled and resized together, straight into one buffer, and the
    second min-max runs once over all maps, in place (no clamp: bilinear weights are >= 0, so the resized maps
    of [0, 1] maps are >= 0): a few batched ops instead of a dozen per layer, and no stacking copy.
    """
    b = cams[0].shape[0]
    maps = cams[0].new_empty(len(cams), b, size, size)
    start = 0
    while start < len(cams):
        end = start + 1
        while end < len(cams) and cams[end].shape == cams[start].shape:
            end += 1
        h, w = cams[start].shape[-2:]
        group = minmax(torch.cat(cams[start:end]).clamp_min(0))  # ((end - start) * B, h, w)
        dst = maps[start:end].view(-1, size, size)
        if (h, w) == (size, size):
            dst.copy_(group)
        elif group.is_cuda:
            dst.copy_(F.interpolate(group.unsqueeze(1), size=(size, size), mode="bilinear",
                                    align_corners=False)[:, 0])
        else:  # the same bilinear weights as two small matmuls: ~3x faster than F.interpolate on CPU
            torch.matmul(_bilinear_matrix(h, size) @ group, _bilinear_matrix(w, size).T, out=dst)
        start = end
    flat = maps.view(len(cams) * b, -1)
    lo, hi = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    flat.sub_(lo).div_(hi.sub_(lo).add_(1e-7))
    return maps


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
    `last_conv` / `first` the last / first of `layers`. Without `include_target_layer`, the target's last block
    (`layers.last_block`: ResNet's `layer4[-1]`, VGG's last two convs, MobileNet's last inverted residual and
    final 1x1 conv, ...; for a conv-layer target the conv itself) is left out of the priors, and so is every
    layer inside a module named in `spec.exclude`.
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
        # the layers whose outputs an in-place op downstream overwrites (found by the forward passes): only their
        # outputs are copied (the shipped ResNet-18: the 8 bn2 outputs the residual add overwrites, of 21)
        self._copy_outputs: frozenset[int] = frozenset()
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
        # left out with the target: for `final`, the target's last block (cnn.layers.last_block, one rule for
        # every architecture); for a conv-layer target, the layers inside the target module
        if spec.include_target_layer:
            self.left_out: list[str] = []
        elif spec.target == "final":
            self.left_out = last_block(model, self.target_name)
        else:
            self.left_out = [self.target_name]
        # each CAM layer's conv (its map may be read at a module after it: VGG's ReLU), for the block rule
        convs: list[str | None] = [n for n, _ in conv_layers(model)] if self.left_out and spec.target == "final" \
            else []
        convs = convs if len(convs) == L else [None] * L

        def inside(i: int, prefixes: list[str]) -> bool:
            return any(within(self.layer_names[i], p) or (convs[i] and within(convs[i], p)) for p in prefixes)

        self.excluded = [i for i in range(L) if inside(i, self.left_out + spec.exclude)
                         or (i == self.target_index and not spec.include_target_layer)]
        unmatched = [p for p in spec.exclude if not any(inside(i, [p]) for i in range(L))]
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
                "left_out_blocks": list(self.left_out),
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
                while changed := rec.overwritten() - self._copy_outputs:
                    # an in-place op after a recorded layer (VGG's ReLU, ResNet's residual add): redo the pass
                    # copying those layers' outputs, and copy them from now on; other layers are never copied
                    self._copy_outputs = rec.copy = self._copy_outputs | changed
                    logits = rec(images)
                if rec.overwritten():  # a copied output changed anyway (it aliases a tensor modified later)
                    raise RuntimeError(f"layers {sorted(rec.overwritten())} of {type(self.model).__name__}: an "
                                       f"in-place op changed their outputs even when copied; their maps would be "
                                       f"wrong (please report the model)")
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
            cams = [self._cam(images, layer, act.detach().float(),
                              torch.zeros_like(act, dtype=torch.float32) if grad is None else grad.float())
                    for layer, act, grad in zip(self.layers, outs, grads, strict=True)]
            maps = scale_and_resize_all(cams, self.spec.size)
        finally:
            rec.release()
        return maps.transpose(0, 1).cpu(), cls.cpu(), prob.cpu(), pred.cpu()

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
        # the target cloned: a view would keep the whole (B,L,S,S) buffer alive in callers that hold outputs
        return torch.stack(priors, 1), maps[:, self.target_index].clone()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 classes: torch.Tensor | None = None) -> dict:
        maps, cls, prob, pred = self.layer_maps(images, labels, classes)
        priors, target = self.priors_from_maps(maps)
        return {"priors": priors, "target": target, "explained": cls, "prob": prob, "pred": pred}


# ----------------------------------------------------------------------------------------- extractors
def extractor_for_checkpoint(cfg, device: torch.device):
    """Load the configured CNN checkpoint (checking its arch) and build the extractor."""
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
    return PriorExtractor(model, cam_layers(model, outputs=spec.layer_outputs), spec)


# ----------------------------------------------------------------------------------------- cli
def info_lines(pf, verified: bool) -> list[str]:
    """`info`'s summary of a prior file or set: spec, shards, hash status, all-zero maps."""
    m = pf.meta
    kind = f"prior set of {len(pf.shards)} shards, " if isinstance(pf, PriorSet) else ""
    lines = [f"{pf.path}: {kind}{len(pf)} samples, S={m['size']}, n={m['n']}, method={m['method']}, "
             f"target={m['target']} ({m.get('target_layer')}), order={m['order']}, cnn={m['cnn']['arch']}, "
             f"{pf.parts[0].dtype.itemsize} bytes/sample"]
    if isinstance(pf, PriorSet):
        for shard, entry in zip(pf.shards, pf.manifest["shards"], strict=True):
            first = entry.get("start", 0)
            held = f"records {first}-{first + len(shard) - 1} ({len(shard)})" if len(shard) else "no records"
            lines.append(f"  {entry['file']}: {held}, sha256 {entry['content_sha256'][:16]}...")
    status = ("verified" if verified else "not verified (counts, layouts and sidecars checked; --verify hashes "
              "every shard)")
    lines.append(f"content sha256 {m.get('content_sha256') or '?'}: {status}")
    zeros = zero_map_fractions(pf)
    lines.append("all-zero maps: " + ", ".join(f"C{k} {z:.1%}" for k, z in enumerate(zeros["priors"]))
                 + f", target {zeros['target']:.1%}")
    return lines


@cli_main
def main(argv: list[str] | None = None) -> int:
    """`python -m cnnprior.priors`: inspect or import prior files, or write a prior set's manifest."""
    p = argparse.ArgumentParser(prog="python -m cnnprior.priors",
                                description="Inspect or import prior files, or write a prior set's manifest.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("info", help="validate a prior file or set and print its summary")
    ins.add_argument("file", help="a prior file (.npy), a prior set's manifest (.priorset.json) or its .npy name")
    ins.add_argument("--verify", action="store_true", help="prior sets: hash every shard (a single prior file is "
                                                           "always hashed)")
    imp = sub.add_parser("import", help="convert the paper's released Food_Resnet.npy into a prior file")
    imp.add_argument("file")
    imp.add_argument("--out", required=True, help="output .npy path (a .json sidecar is written beside it)")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow loading the pickled object array (runs code from the file: trusted sources only)")
    imp.add_argument("--overwrite", action="store_true")
    imp.add_argument("--classes", nargs="*", help="class names in label order (default: the file's class-name "
                                                  "labels sorted, or 0..max for integer labels)")
    man = sub.add_parser("manifest", help="write the manifest of shard files gathered in one folder (shards "
                                          "hashed against their sidecars)")
    man.add_argument("out", help="the manifest to write, <prefix>-<split>.priorset.json")
    man.add_argument("shards", nargs="+", help="the shard files in record order")
    man.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "info":
        pf = read_priors(args.file, verify=True if args.verify else None)
        print("\n".join(info_lines(pf, verified=args.verify or not isinstance(pf, PriorSet))))
        return 0
    if args.cmd == "manifest":
        out = write_manifest(args.out, args.shards, overwrite=args.overwrite, verify=True)
        print("\n".join(info_lines(read_priors(out, verify=False), verified=True)))  # hashed just now
        return 0

    out = import_released(args.file, args.out, args.trust_pickle, args.overwrite, class_names=args.classes)
    pf = read_priors(out, verify=False)
    names = pf.meta["class_names"]
    print(f"wrote {out}: {len(pf)} samples, S={pf.size}, n={pf.n}, {len(names)} classes: {', '.join(names[:10])}"
          + (" ..." if len(names) > 10 else ""))
    return 0

