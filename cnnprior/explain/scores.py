"""Per-sample scores of an inference run (the GAN map and the trivial baselines vs the target) and metrics.json."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cnnprior.maps.baselines import BaselineChoice, baseline_maps
from cnnprior.maps.baselines import label as baseline_label
from cnnprior.maps.metrics import bootstrap_ci, l1, pearson, ssim_or_nan
from cnnprior.maps.ops import rescale

__all__ = ["build_metrics", "fidelity_scores", "format_table", "method_label", "rounded", "SCORES", "ScoreTable"]

SCORES = ("l1", "r", "ssim")


def fidelity_scores(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """(B, 3) array of L1, Pearson r, SSIM per sample (SSIM NaN on maps under 11 px)."""
    return torch.stack([l1(pred, target), pearson(pred, target), ssim_or_nan(pred, target)], 1).double().numpy()


@dataclass
class ScoreTable:
    """Per-sample scores of the GAN map and the trivial baselines (under the generator's validation choice)."""

    choice: BaselineChoice | None
    rows: dict[str, list[np.ndarray]] = field(default_factory=dict)
    priors: list[np.ndarray] = field(default_factory=list)  # (B, n, 3)

    def add(self, image: torch.Tensor, priors: torch.Tensor, target: torch.Tensor, pred: torch.Tensor,
            learned: dict[str, torch.Tensor] | None = None) -> np.ndarray:
        """Score one batch (all (B, ., S, S) floats in [0, 1]) and the learned baselines' maps of it (by metrics
        key); returns the GAN's (B, 3) scores."""
        t = target[:, 0]
        b, n = priors.shape[:2]
        maps = {"gan": pred, **(learned or {})}
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


def _with_cis(values: np.ndarray) -> dict:
    """{score: mean, score_ci95: [lo, hi]} of (N, 3) per-sample scores (NaNs left out; None without a value)."""
    out: dict = {}
    for k, key in enumerate(SCORES):
        v = values[:, k]
        v = v[np.isfinite(v)]
        out[key], out[f"{key}_ci95"] = rounded(v.mean()) if v.size else None, _ci(v)
    return out


def build_metrics(scores: dict[str, np.ndarray], chosen: dict, per_sample: list[dict], header: dict,
                  choice: BaselineChoice | None = None, learned: dict[str, str] | None = None,
                  best_learned: str | None = None) -> dict:
    """metrics.json: count, mean per method with the 95 % bootstrap CI of each score (`<score>_ci95`), the GAN's
    margin over the best trivial baseline (chosen on validation; paired per image) and over the best learned
    baseline (`best_learned`, the one with the higher validation r), the choice itself, per_image entries.
    `learned` labels the learned baselines' keys."""
    mean = {m: _with_cis(v) if len(v) else {} for m, v in scores.items()}
    best = chosen["best_baseline"]

    def paired(other: str) -> dict:
        return {"over": other, **_with_cis(scores["gan"] - scores[other] if len(scores["gan"]) else np.zeros((0, 3)))}

    margin = paired(best)
    extra = {"margin_learned": paired(best_learned)} if best_learned else {}
    per_image = [{**entry, **{m: _score_dict(scores[m][i]) for m in scores}} for i, entry in enumerate(per_sample)]
    note = (f"chosen on the validation file {chosen['chosen_on']}" if chosen["chosen_on"] else
            "this generator checkpoint records no validation choice: best-prior and intensity baselines are left "
            "out (they would be selected on the scored data)")
    return {**header, "count": len(per_sample), "mean": mean, "margin": margin, **extra,
            "labels": {m: (learned or {}).get(m) or method_label(m, choice) for m in scores},
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
    """The mean scores as a small text table: method | r | L1 | SSIM, each 'mean [95 % CI]', then the GAN's margins."""
    def cell(s: dict, key: str) -> str:
        v, (lo, hi) = s.get(key), s.get(f"{key}_ci95") or (None, None)
        if v is None:
            return "-"
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{v:.3f}"

    labels = metrics["labels"]
    w = max([44, *(len(labels[m]) for m in metrics["mean"])])
    lines = [f"{'method':<{w}} {'r [95% CI]':<21} {'L1 [95% CI]':<21} {'SSIM [95% CI]':<21}".rstrip()]
    for m, s in metrics["mean"].items():
        lines.append(" ".join([f"{labels[m]:<{w}}"] + [f"{cell(s, k):<21}" for k in ("r", "l1", "ssim")]).rstrip())
    mg = metrics["margin"]
    if mg["r"] is not None:
        over = labels[mg["over"]]
        lines.append(f"GAN r - {over} r: {mg['r']:+.3f}, 95% CI [{mg['r_ci95'][0]:.3f}, {mg['r_ci95'][1]:.3f}] "
                     f"(paired per image)")
        lines.append(f"GAN L1 - {over} L1: {cell(mg, 'l1')}; GAN SSIM - {over} SSIM: {cell(mg, 'ssim')}")
    ml = metrics.get("margin_learned")
    if ml and ml["r"] is not None:
        lines.append(f"GAN r - {labels[ml['over']]} r: {ml['r']:+.3f}, 95% CI [{ml['r_ci95'][0]:.3f}, "
                     f"{ml['r_ci95'][1]:.3f}] (paired per image)")
    return "\n".join(lines)
