"""Recording layers' outputs and the gradients of a score with respect to them: `with record(layers) as rec:`.

    with record([model.layer1, model.layer2]) as rec:
        logits = model(images)
        rec.backward(logits[:, 3].sum())
        act, grad = rec.activations[0], rec.gradients[0]   # layer1's output and d score / d output

The forward hooks are removed and the records dropped when the block ends, also on an error. What is recorded:

- each layer's first output of a pass, keyed by the layer's index (a layer run twice keeps its first call; an
  unused layer has none), so no map can shift onto another layer as execution-order lists would;
- only while gradients are enabled (a `torch.no_grad()` forward records nothing);
- for the layers in `copy` (all with `copy=True`), the hook hands the rest of the network a copy of the output, so
  an in-place op downstream (VGG's ReLU(inplace=True), ResNet's `out += identity` after bn2) modifies the copy,
  never the recorded tensor; for the others `overwritten()` (version counters) tells which recorded outputs such
  an op changed.

Gradients come from `torch.autograd.grad`, so parameters' `.grad` stay untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

__all__ = ["record", "Recording"]


class Recording:
    """What `record` holds: `activations` / `gradients` by layer index, `copy`, `clear`, `overwritten`, `backward`."""

    def __init__(self, count: int, copy: bool | frozenset[int] = True):
        self.count, self.copy = count, copy
        self.activations: dict[int, torch.Tensor] = {}
        self.gradients: dict[int, torch.Tensor | None] = {}
        self.versions: dict[int, int] = {}

    def keep(self, i: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """The forward hook of layer `i`: record its first output of the pass; hand on a copy where asked."""
        if i in self.activations or not torch.is_grad_enabled():
            return None
        self.activations[i], self.versions[i] = output, output._version
        return output.clone() if self.copy is True or (self.copy and i in self.copy) else None

    def clear(self) -> None:
        """Forget the last pass (call before each forward)."""
        self.activations, self.gradients, self.versions = {}, {}, {}

    def overwritten(self) -> frozenset[int]:
        """The layers whose recorded output an in-place op changed after the layer (only uncopied ones can be)."""
        return frozenset(i for i, t in self.activations.items() if t._version != self.versions[i])

    def missing(self) -> list[int]:
        """The layers the last pass did not run."""
        return [i for i in range(self.count) if i not in self.activations]

    def backward(self, score: torch.Tensor) -> None:
        """`gradients[i]` = d score / d activations[i] for every recorded layer (None where the score does not depend
        on it); the graph is freed."""
        recorded = sorted(self.activations)
        grads = torch.autograd.grad(score, [self.activations[i] for i in recorded], allow_unused=True)
        self.gradients = dict(zip(recorded, grads, strict=True))


@contextmanager
def record(layers: Sequence[nn.Module], copy: bool | frozenset[int] = True) -> Iterator[Recording]:
    """Hook `layers` for the block; the hooks are removed and the recorded tensors dropped when it ends."""
    rec = Recording(len(layers), copy)
    handles = [layer.register_forward_hook(partial(rec.keep, i)) for i, layer in enumerate(layers)]
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()
        rec.clear()
