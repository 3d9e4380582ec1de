"""Per-sample scores of an inference run (the GAN map and the trivial baselines vs the target) and metrics.json."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cnnprior.baselines import BaselineChoice, baseline_maps
from cnnprior.baselines import label as baseline_label
from cnnprior.maps import rescale
from cnnprior.metrics import bootstrap_ci

SCORES = ("l1", "r", "ssim")


def fidelity_scores(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """(B, 3) array of L1, Pearson r, SSIM per sample (SSIM NaN on maps under 11 px)."""
    from cnnprior.metrics import l1, pearson, ssim_or_nan

    return torch.stack([l1(pred, target), pearson(pred, target), ssim_or_nan(pred, target)], 1).double().numpy()


@dataclass
class ScoreTable:
    """Per-sample scores of the GAN map and the trivial baselines (under the generator's validation choice)."""

    choice: BaselineChoice | None
    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    priors: list[np.ndarray] = field(default_factory=list)  # (B, n, 3)

    def add(self, image: torch.Tensor, priors: torch.Tensor, target: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
        """Score one batch (all (B, ., S, S) floats in [0, 1]); returns the GAN's (B, 3) scores."""
        t = target[:, 0]
        b, n = priors.shape[:2]
        maps = {"gan": pred}
        if self.choice is not None:
            maps.update(baseline_maps(image, priors, self.choice))
        else:  # no validation choice recorded: only the baselines that need none
            mean = priors.mean(1, keepdim=True)
            maps.update({"mean_prior": mean, "mean_prior_rescaled": rescale(mean)})
        for name, m in maps.items():
            self.rows.setdefault(name, []).append(fidelity_scores(m[:, 0], t))
        per = fidelity_scores(priors.reshape(b * n, *priors.shape[2:]), t.repeat_interleave(n, 0))
        self.priors.append(per.reshape(b, n, 3))
        return self.rows["gan"][-1]

    def resolve(self) -> tuple[dict[str, np.ndarray], dict]:
        """Per-method (N, 3) scores and the validation choice they were made under."""
        prior_means = np.nanmean(np.concatenate(self.priors), 0)  # (n, 3)
        c = self.choice
        chosen = {"best_prior_index": c.best_prior if c else None, "image_inverted": c.image_inverted if c else None,
                  "best_baseline": c.best_baseline if c else "mean_prior", "chosen_on": c.chosen_on if c else None,
                  "val_r": c.val_r if c else None,
                  "priors": [{"index": k, **_score_dict(prior_means[k])} for k in range(len(prior_means))]}
        return {k: np.concatenate(v) for k, v in self.rows.items()}, chosen


def rounded(x: float) -> float | None:
    """A score as metrics.json stores it: 6 decimals, None when not finite."""
    return None if not np.isfinite(x) else round(float(x), 6)


def _score_dict(row: np.ndarray) -> dict:
    return {k: rounded(v) for k, v in zip(SCORES, row, strict=True)}


def _ci(values: np.ndarray) -> list[float | None]:
    return [rounded(v) for v in bootstrap_ci(values)]


def build_metrics(scores: dict[str, np.ndarray], chosen: dict, per_sample: list[dict], header: dict,
                  choice: BaselineChoice | None = None) -> dict:
    """metrics.json: count, mean per method with the 95 % bootstrap CI of r, the GAN's margin over the best
    baseline (chosen on validation), the choice itself, per_image entries."""
    mean = {m: {**_score_dict(np.nanmean(v, 0)), "r_ci95": _ci(v[:, 1])} if len(v) else {} for m, v in scores.items()}
    best = chosen["best_baseline"]
    diff = scores["gan"][:, 1] - scores[best][:, 1] if len(scores["gan"]) else np.zeros(0)
    margin = {"over": best, "r": rounded(diff.mean()) if len(diff) else None, "r_ci95": _ci(diff)}
    per_image = [{**entry, **{m: _score_dict(scores[m][i]) for m in scores}} for i, entry in enumerate(per_sample)]
    note = (f"chosen on the validation file {chosen['chosen_on']}" if chosen["chosen_on"] else
            "this generator checkpoint records no validation choice: best-prior and intensity baselines are left "
            "out (they would be selected on the scored data)")
    return {**header, "count": len(per_sample), "mean": mean, "margin": margin,
            "labels": {m: method_label(m, choice) for m in scores},
            "per_prior_mean": chosen["priors"],
            "baselines": {"choice": note, "best_prior_index": chosen["best_prior_index"],
                          "image_inverted": chosen["image_inverted"], "best_baseline": best, "val_r": chosen["val_r"],
                          "rescaled": "min-max rescaled per map (changes L1 and SSIM, not r)"},
            "per_image": per_image}


def method_label(method: str, choice: BaselineChoice | None) -> str:
    """A display name for a metrics key."""
    if method == "gan":
        return "GAN"
    if choice is not None:
        return baseline_label(method, choice)
    return method.replace("_rescaled", ", rescaled").replace("_", " ")


def format_table(metrics: dict) -> str:
    """The mean scores as a small text table: method | r [95 % CI] | L1 | SSIM, then the GAN's margin."""
    def cell(v: float | None) -> str:
        return f"{v:7.3f}" if v is not None else "      -"

    labels = metrics["labels"]
    lines = [f"{'method':<44} {'r':>7} {'95% CI':>16} {'L1':>7} {'SSIM':>7}"]
    for m, s in metrics["mean"].items():
        lo, hi = s["r_ci95"]
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        lines.append(f"{labels[m]:<44} {cell(s['r'])} {ci:>16} {cell(s['l1'])} {cell(s['ssim'])}")
    mg = metrics["margin"]
    if mg["r"] is not None:
        lo, hi = mg["r_ci95"]
        lines.append(f"GAN r - {labels[mg['over']]} r: {mg['r']:+.3f}, 95% CI [{lo:.3f}, {hi:.3f}]")
    return "\n".join(lines)
