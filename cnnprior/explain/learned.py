"""The learned baselines beside an inference run: the `linear` / `convnet` regressors trained for the same priors
(`models/<name>-convnet.pt` next to `models/<name>-lsft.pt`), run on the same inputs and scored like the GAN, so
every metrics.json says what a small L1 regressor reaches on the same samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cnnprior.core import generators
from cnnprior.core.errors import UserError
from cnnprior.gan.checkpoint import load_generator

__all__ = ["inputs_of", "KEY_PREFIX", "Learned", "load_learned", "sibling_paths"]

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
    """The learned-baseline files trained beside a generator: `<prefix>-<baseline>.pt` for `<prefix>-<gan>[-x].pt`."""
    stem = checkpoint.stem
    for gan in generators.NAMES:
        if f"-{gan}" in stem:
            prefix = stem[:stem.rindex(f"-{gan}")]
            return [p for b in generators.BASELINES if (p := checkpoint.with_name(f"{prefix}-{b}.pt")).is_file()]
    return []


def inputs_of(meta: dict) -> tuple:
    """(gan.image, gan.priors) a generator checkpoint was trained with: the information it is given."""
    gan = (meta.get("config") or {}).get("gan") or {}
    return gan.get("image", "use"), gan.get("priors", "cnn")


def load_learned(paths: list[str] | None, checkpoint: Path, gmeta: dict, device) -> tuple[list[Learned], list[str]]:
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
    pm, out, notes = gmeta.get("priors_meta") or {}, [], []
    for f in files:
        if explicit and not f.is_file():
            raise UserError(f"--learned: {f}: no such file")
        model, meta = load_generator(f, device=device)
        if meta.get("variant") not in generators.BASELINES:
            raise UserError(f"--learned: {f} is a {meta.get('variant')} checkpoint, not a learned baseline "
                            f"({', '.join(generators.BASELINES)})")
        lpm = meta.get("priors_meta") or {}
        if (lpm.get("size"), lpm.get("n")) != (pm.get("size"), pm.get("n")) or inputs_of(meta) != inputs_of(gmeta):
            notes.append(f"learned baseline {f} left out: trained on other priors or inputs than the generator "
                         f"(S, n, gan.image, gan.priors {lpm.get('size')}, {lpm.get('n')}, {inputs_of(meta)} vs "
                         f"{pm.get('size')}, {pm.get('n')}, {inputs_of(gmeta)})")
            continue
        r = (meta.get("metrics") or {}).get("r")
        out.append(Learned(KEY_PREFIX + meta["variant"], str(f), model, None if r is None else float(r)))
    return out, notes
