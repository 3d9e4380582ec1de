"""The all-layer extractor: one forward + one backward per batch gives every CAM layer's map (`hooks.record`, the
method's `raw` hook of `cams`, `resize.scale_and_resize_all`), the cumulative priors at the spec's positions and the
target map; and the extractor a config or a prior file's sidecar describes. The stage that writes them: stage.py;
`python -m cnnprior.priors` (inspect, import, manifest): cli.py."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cnnprior.cnn.layers import cam_layers, conv_layers, final_layer, last_block, named_module, within
from cnnprior.cnn.model import load_cnn
from cnnprior.core.errors import UserError
from cnnprior.priors import cams
from cnnprior.priors.hooks import record
from cnnprior.priors.resize import scale_and_resize_all
from cnnprior.priors.spec import PriorSpec, position_indices, spec_from_config, spec_from_sidecar

__all__ = ["extractor_for_checkpoint", "extractor_from", "PriorExtractor", "target_module"]


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
        self.method = cams.get(spec.method, one_pass=True)
        if len(layers) < 2:
            raise UserError("the CNN has fewer than 2 conv layers; priors need several")
        self.model, self.spec = model, spec
        self.layer_names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
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
        with record(self.layers, copy=self._copy_outputs) as rec:
            with torch.enable_grad():
                logits = self.model(images)
                while changed := rec.overwritten() - self._copy_outputs:
                    # an in-place op after a recorded layer (VGG's ReLU, ResNet's residual add): redo the pass
                    # copying those layers' outputs, and copy them from now on; other layers are never copied
                    self._copy_outputs = rec.copy = self._copy_outputs | changed
                    rec.clear()
                    logits = self.model(images)
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
                missing = [self.layer_names[i] for i in rec.missing()]
                if missing:
                    raise UserError(f"layer(s) not run by the forward pass: {', '.join(missing[:3])}")
                if self.method.needs_gradients:  # one target per image
                    rec.backward(logits.gather(1, cls.view(-1, 1)).sum())
            prob = torch.softmax(logits.detach().float(), 1).gather(1, cls.view(-1, 1))[:, 0]
            maps = scale_and_resize_all([self._cam(rec.activations[i].detach().float(), rec.gradients.get(i))
                                         for i in range(len(self.layers))], self.spec.size)
        return maps.transpose(0, 1).cpu(), cls.cpu(), prob.cpu(), pred.cpu()

    def _cam(self, act: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        """One layer's raw CAM (B,h,w) by the method's hook; a layer the score does not depend on has zero
        gradients."""
        if not self.method.needs_gradients:
            return self.method.raw(act, None)
        return self.method.raw(act, torch.zeros_like(act) if grad is None else grad.float())

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
    cams.get(cfg.priors.method, "priors.method", one_pass=True)  # before the checkpoint is read
    ckpt_path = cfg.cnn_checkpoint
    if not Path(ckpt_path).is_file():
        raise UserError(f"{ckpt_path}: CNN checkpoint not found; run `python train.py --config "
                        f"{cfg.source_file or '<config>'} --stage classifier` first (or set cnn.checkpoint)")
    model, meta = load_cnn(ckpt_path, device)
    if meta["arch"] != cfg.cnn.arch:
        raise UserError(f"{ckpt_path}: checkpoint holds a {meta['arch']} but the config says cnn.arch: "
                        f"{cfg.cnn.arch}")
    return extractor_from(model, spec_from_config(cfg.priors)), model, meta


def target_module(model: nn.Module, pm: dict) -> tuple[str, nn.Module]:
    """The module whose map is a prior file's target (by its sidecar), for live CAMs of the same layer."""
    ex = extractor_from(model, spec_from_sidecar(pm))
    return ex.target_name, ex.layers[ex.target_index]


def extractor_from(model: nn.Module, spec: PriorSpec) -> PriorExtractor:
    """The extractor for `model` with the CAM layers `spec.layer_outputs` selects (the method is checked first:
    finding the layers runs the model)."""
    cams.get(spec.method, one_pass=True)
    return PriorExtractor(model, cam_layers(model, outputs=spec.layer_outputs), spec)
