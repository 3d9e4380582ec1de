"""The learned baselines beside an inference run: the `linear` / `convnet` regressors trained for the same priors
(`models/<name>-convnet.pt` next to `models/<name>-lsft.pt`), run on the same inputs and scored like the GAN, so
every metrics.json says what a small L1 regressor reaches on the same samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cnnprior.core.errors import UserError
from cnnprior.gan.checkpoint import GeneratorMeta, load_generator
from cnnprior.gan.models.base import names

__all__ = ["KEY_PREFIX", "Learned", "load_learned", "sibling_paths"]

KEY_PREFIX = "learned_"  # metrics.json keys: learned_convnet, learned_linear


@dataclass
class Learned:
    """A loaded learned baseline: metrics key, checkpoint path, model (G(image, priors)), validation r."""

    key: str
    path: str
    model: nn.Module
    val_r: float | None

    @property
    def label(self) -> str:
        r = f", val r {self.val_r:.3f}" if self.val_r is not None else ""
        return f"learned {self.key.removeprefix(KEY_PREFIX)} (L1-trained regressor{r})"


def sibling_paths(checkpoint: Path) -> list[Path]:
    """The learned-baseline files trained beside a generator: `<prefix>-<baseline>.pt` for `<prefix>-<gan>[-x].pt`
    (every registered generator that is not adversarial is a learned baseline)."""
    stem = checkpoint.stem
    for gan in names(adversarial=True):
        if f"-{gan}" in stem:
            prefix = stem[:stem.rindex(f"-{gan}")]
            return [p for b in names(adversarial=False) if (p := checkpoint.with_name(f"{prefix}-{b}.pt")).is_file()]
    return []


def load_learned(paths: list[str] | None, checkpoint: Path, gmeta: GeneratorMeta,
                 device) -> tuple[list[Learned], list[str]]:
    """The learned baselines to score beside the generator, and notes on the ones left out.

    Args:
        paths: explicit checkpoint files; None = the generator's siblings (`sibling_paths`); [] = none.
        checkpoint: the generator's checkpoint path.
        gmeta: the generator's checkpoint metadata.
        device: where to run them.

    Returns:
        (loaded baselines, notes). A baseline trained on other prior sizes or other inputs than the generator
        (compared at equal information only) is left out with a note; an explicit file that is no learned baseline
        is an error.
    """
    explicit = paths is not None
    files = [Path(p) for p in paths] if explicit else sibling_paths(checkpoint)
    out, notes = [], []
    for f in files:
        if explicit and not f.is_file():
            raise UserError(f"--learned: {f}: no such file")
        model, meta = load_generator(f, device=device)
        if meta.variant not in names(adversarial=False):
            raise UserError(f"--learned: {f} is a {meta.variant} checkpoint, not a learned baseline "
                            f"({', '.join(names(adversarial=False))})")
        if (meta.size, meta.n) != (gmeta.size, gmeta.n) or meta.inputs != gmeta.inputs:
            notes.append(f"learned baseline {f} left out: trained on other priors or inputs than the generator "
                         f"(S, n, gan.image, gan.priors {meta.size}, {meta.n}, {meta.inputs} vs "
                         f"{gmeta.size}, {gmeta.n}, {gmeta.inputs})")
            continue
        r = meta.metrics.get("r")
        out.append(Learned(KEY_PREFIX + meta.variant, str(f), model, None if r is None else float(r)))
    return out, notes
