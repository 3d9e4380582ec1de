"""Scores of the sanity checks: does an explainer read the CNN or only the image?

Model-parameter randomisation (cascading, top-down; Adebayo et al. 2018, Quantus' MPRT), prior swaps,
GridPG (Rao et al. 2022), fair chance levels and matched smoothing. Maps are (B, 1, H, W) or (B, H, W)
tensors; scores are per-sample tensors (B,); means come with 95 % bootstrap intervals (`mean_ci`; margins between
two methods on the same samples: `paired_ci`; table rows: `ci_row`, `margin_row`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cnnprior.cnn.randomise import model_stages, randomise, randomised_copy, step_labels
from cnnprior.maps import metrics
from cnnprior.maps.ops import blur, rescale, resize_maps

__all__ = [
    "average_ranks", "cell_masks", "ci_row", "confident_correct", "constant", "emprt_verdict",
    "one_step_scores", "energy_in_cell", "explain_batched",
    "format_ci", "GRID_CHANCE", "grid_images", "margin_row", "mean_ci", "mprt", "MPRT_MARGIN", "mprt_verdict",
    "paired_ci", "pointing_chance", "quantise", "same_size_spearman", "sample_grids", "Samples", "smooth_maps", "SMOOTHING_SIGMAS",
    "spearman_abs", "step_means", "swap_donors", "verdict_sentence"
]

SMOOTHING_SIGMAS = (2, 4, 8)  # matched smoothing: the target blurred by these sigmas (pixels at map size)
MPRT_MARGIN = 0.10  # pass: at every step the mean Spearman similarity lies within this of Grad-CAM's (two-sided)
GRID_CHANCE = 0.25  # GridPG: the energy share of a uniform map in one of four cells

Samples = Tensor | np.ndarray | list[float]  # per-sample values


# ----------------------------------------------------------------------------------------- statistics
def mean_ci(values: Tensor | np.ndarray | list[float], seed: int = 0) -> dict[str, float]:
    """Mean of the finite values with its 95 % percentile-bootstrap interval: {mean, lo, hi, n}."""
    v = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    lo, hi = metrics.bootstrap_ci(v, seed=seed)
    return {"mean": float(v.mean()) if v.size else math.nan, "lo": lo, "hi": hi, "n": int(v.size)}


def paired_ci(a: Samples, b: Samples, seed: int = 0) -> dict[str, float]:
    """Margin a − b of two methods scored on the same samples: `mean_ci` of the per-sample differences (a pair
    with a non-finite side is dropped), so the interval is a paired bootstrap."""
    a, b = (np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64).ravel() for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.size} vs {b.size}")
    return mean_ci(a - b, seed)


def ci_row(per_sample: Mapping[str, Samples], seed: int = 0) -> dict[str, Any]:
    """A table row of means from per-sample scores: {key: mean, key_ci95: [lo, hi]} per key (95 % bootstrap)."""
    row: dict[str, Any] = {}
    for key, values in per_sample.items():
        s = mean_ci(values, seed)
        row[key], row[f"{key}_ci95"] = s["mean"], [s["lo"], s["hi"]]
    return row


def margin_row(a: Mapping[str, Samples], b: Mapping[str, Samples], over: str, seed: int = 0) -> dict[str, Any]:
    """A's margin over B per key of A, paired per sample: {over, key: mean(a − b), key_ci95: [lo, hi]}."""
    row: dict[str, Any] = {"over": over}
    for key in a:
        s = paired_ci(a[key], b[key], seed)
        row[key], row[f"{key}_ci95"] = s["mean"], [s["lo"], s["hi"]]
    return row


def format_ci(stat: dict[str, float], digits: int = 3) -> str:
    """'0.612 [0.550, 0.661]' ('–' when there is no value)."""
    if stat.get("n", 0) == 0 or not math.isfinite(stat["mean"]):
        return "–"
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"


# ----------------------------------------------------------------------------------------- similarity
def _flat(x: Tensor) -> Tensor:
    """(B, P) float64 view of a batch of maps."""
    return x.reshape(x.shape[0], -1).double()


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along dim 1 of (B, P); tied values share the mean of their ranks."""
    x = x.contiguous()
    s = x.sort(dim=1).values
    lo = torch.searchsorted(s, x, right=False)
    hi = torch.searchsorted(s, x, right=True)
    return (lo + hi + 1).double() / 2  # the tied block holds positions lo..hi-1: mean 1-based rank (lo+1+hi)/2


def spearman_abs(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of |a| and |b| per sample, (B,); ties by average rank; 0 if either is constant."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    ra, rb = average_ranks(_flat(a).abs()), average_ranks(_flat(b).abs())
    return metrics.pearson(ra.unsqueeze(1), rb.unsqueeze(1))


def _same_size(maps: Tensor, like: Tensor) -> Tensor:
    """`maps` resized (bilinear) to the spatial size of `like` where they differ (live CAMs are at the CNN's size)."""
    return maps if maps.shape[-2:] == like.shape[-2:] else resize_maps(maps, like.shape[-1])


def same_size_spearman(a: Tensor, b: Tensor) -> Tensor:
    """`spearman_abs(a, b)` with b resized to a's map size first."""
    return spearman_abs(a, _same_size(b, a))


def constant(maps: Tensor) -> Tensor:
    """Whether each map is constant (max == min), (B,) bool."""
    f = _flat(maps)
    return f.amax(1) == f.amin(1)


def quantise(maps: Tensor) -> Tensor:
    """round(255 m) / 255: maps as a prior file stores them (what the generators were trained on)."""
    return torch.round(maps.float().clamp(0, 1) * 255) / 255


def smooth_maps(maps: Tensor, sigma: float) -> Tensor:
    """(B, 1, H, W) maps blurred by a Gaussian of `sigma` pixels (reflect padding), min-max scaled to [0, 1]."""
    return rescale(blur(maps.float(), sigma))


# ----------------------------------------------------------------------------------------- chance, cells
def pointing_chance(masks: Tensor) -> Tensor:
    """Chance level of the pointing game per image: a uniform random point's hit rate = the mask's area
    fraction (also the energy share of a uniform map), (B,)."""
    return (_flat(masks) > 0.5).double().mean(1)


def cell_masks(cells: Tensor, size: int) -> Tensor:
    """(B, 1, size, size) 0/1 masks of one cell of a 2x2 grid per sample: 0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right; the first half is size // 2 pixels."""
    half = size // 2
    rows = torch.arange(size).view(1, size, 1) >= half
    cols = torch.arange(size).view(1, 1, size) >= half
    want_row, want_col = (cells // 2).view(-1, 1, 1).bool(), (cells % 2).view(-1, 1, 1).bool()
    return ((rows == want_row) & (cols == want_col)).unsqueeze(1).double()


def energy_in_cell(maps: Tensor, cells: Tensor) -> Tensor:
    """GridPG score per sample: the share of the map's positive energy inside its cell, (B,); 0 for a map
    without positive values."""
    m = maps.double().clamp_min(0)
    m = m if m.dim() == 4 else m.unsqueeze(1)
    inside = (m * cell_masks(cells.cpu(), m.shape[-1]).to(m.device)).flatten(1).sum(1)
    total = m.flatten(1).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total))


def grid_images(cells: Tensor) -> Tensor:
    """(B, 4, C, S, S) cell images -> (B, C, 2S, 2S) 2x2 grids (cell order as in `cell_masks`)."""
    top = torch.cat([cells[:, 0], cells[:, 1]], dim=-1)
    bottom = torch.cat([cells[:, 2], cells[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


@torch.no_grad()
def confident_correct(model: nn.Module, images: Tensor, labels: Tensor, min_prob: float,
                      batch_size: int) -> tuple[Tensor, Tensor]:
    """(keep, prob): images the model classifies correctly with softmax probability >= min_prob, alone."""
    device = next(model.parameters()).device
    probs = torch.cat([model(images[i:i + batch_size].to(device)).float().softmax(1).cpu()
                       for i in range(0, len(images), batch_size)])
    pred = probs.argmax(1)
    p_true = probs.gather(1, labels.view(-1, 1).long())[:, 0]
    return (pred == labels) & (p_true >= min_prob), p_true


def sample_grids(labels: Tensor, keep: Tensor, num: int, seed: int) -> tuple[Tensor, Tensor]:
    """`num` grids of 4 kept images of 4 different classes, (num, 4) indices, and the explained cell of each
    (grid g explains cell g % 4, so every position is explained equally often). Empty when fewer than 4
    classes have a kept image. Seeded; an image may appear in several grids."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, np.ndarray] = {}
    for c in sorted(set(labels[keep].tolist())):
        by_class[c] = np.flatnonzero((labels == c).numpy() & keep.numpy())
    if len(by_class) < 4 or num <= 0:
        return torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    classes = np.array(sorted(by_class))
    idx = np.zeros((num, 4), dtype=np.int64)
    for g in range(num):
        picked = rng.choice(classes, size=4, replace=False)
        idx[g] = [rng.choice(by_class[int(c)]) for c in picked]
    return torch.from_numpy(idx), torch.arange(num) % 4


def swap_donors(classes: Tensor, same_class: bool, seed: int) -> Tensor:
    """A donor j != i per image i, uniformly at random among the images of the same class (same_class) or
    among all images; -1 where there is none. Seeded."""
    rng = np.random.default_rng(seed)
    c = classes.numpy()
    donors = np.full(len(c), -1, dtype=np.int64)
    for i in range(len(c)):
        pool = np.flatnonzero(c == c[i]) if same_class else np.arange(len(c))
        pool = pool[pool != i]
        if len(pool):
            donors[i] = rng.choice(pool)
    return torch.from_numpy(donors)


# ----------------------------------------------------------------------------------------- extraction
def explain_batched(extractor: Callable[..., dict], images: Tensor, classes: Tensor,
                    batch_size: int) -> dict[str, Tensor]:
    """The extractor's priors, target (both quantised like a prior file, on the CPU) and predicted class for
    a FIXED explained class per image, batch by batch."""
    outs = [extractor(images[i:i + batch_size], classes=classes[i:i + batch_size])
            for i in range(0, len(images), batch_size)]
    return {"priors": quantise(torch.cat([o["priors"] for o in outs]).cpu()),
            "target": quantise(torch.cat([o["target"] for o in outs]).cpu().unsqueeze(1)),
            "pred": torch.cat([o["pred"] for o in outs]).cpu()}


# ----------------------------------------------------------------------------------------- MPRT
def mprt(model: nn.Module, maps_of: Callable[[nn.Module], dict[str, Tensor]], seed: int,
         steps: int = 0, ref: dict[str, Tensor] | None = None, order: str = "top_down", init: str = "default",
         follow: str | None = None) -> dict:
    """Model-parameter randomisation: `maps_of(copy)` for the trained model (step 0) and for copies randomised
    by steps 1..K of `order` (`randomise.randomise`: top_down cascade, bottom_up cascade or independent
    stages; re-initialised by `init`, seeded); per step and method the per-image Spearman (of |maps|) and SSIM
    similarity to the step-0 maps of the same method.

    steps: K (0 = every stage). An image whose step-0 map is constant has no rank order: its Spearman is NaN
    (left out of means); a randomised map that is constant against a non-constant one scores 0. `ref`: the
    step-0 maps when already computed (they do not depend on the seed); the result holds them under "ref".
    `follow`: a method of maps_of (the randomised CNN's own Grad-CAM): each step also holds every method's
    Spearman similarity to that method's map of the same randomised CNN ("follow"), i.e. whether the method
    tracks the new network rather than only leaving the old one.
    """
    stages = [name for name, _ in model_stages(model)]
    labels = step_labels(model, order)
    k = len(stages) if steps <= 0 else min(steps, len(stages))
    ref = maps_of(randomised_copy(model, 0, seed)) if ref is None else ref
    flat = {m: constant(v) for m, v in ref.items()}
    out = []
    for s in range(k + 1):
        maps = ref if s == 0 else maps_of(randomise(model, order, s, seed, init))
        rho = {m: spearman_abs(v, ref[m]) for m, v in maps.items()}
        rho = {m: torch.where(flat[m], torch.full_like(r, math.nan), r) for m, r in rho.items()}
        entry = {"step": s, "randomised": labels[s], "spearman": rho,
                 "constant": {m: constant(v) for m, v in maps.items()},
                 "ssim": {m: metrics.ssim_or_nan(v.double(), ref[m].double()) for m, v in maps.items()}}
        if follow is not None:
            own = constant(maps[follow])
            entry["follow"] = {m: torch.where(own, torch.full_like(rho[m], math.nan), spearman_abs(v, _same_size(maps[follow], v)))
                               for m, v in maps.items()}
        if s == k:
            entry["maps"] = maps  # the last step's maps (eMPRT compares them with step 0's)
        out.append(entry)
    return {"stages": stages, "steps": out, "ref": ref}


def step_means(*results: dict) -> dict[str, dict[str, list[float]]]:
    """The `mprt_verdict` inputs of one or more `mprt` results of the same steps (e.g. one per seed): per step and
    method, each image first averaged over the results, then the mean over images (NaNs left out) of the
    similarity ("spearman"), the follow similarity ("follow", when the runs followed a method) and the share of
    constant maps ("constant_share"), each {method: [value per step, step 0 first]}."""
    steps = results[0]["steps"]
    fields = [("spearman", "spearman"), ("constant_share", "constant")] + (
        [("follow", "follow")] if "follow" in steps[0] else [])
    out: dict[str, dict[str, list[float]]] = {}
    for key, field in fields:
        out[key] = {}
        for m in steps[0]["spearman"]:
            values = []
            for k in range(len(steps)):
                per_image = torch.stack([r["steps"][k][field][m].double() for r in results]).nanmean(0)
                values.append(float(per_image.nanmean()) if bool(torch.isfinite(per_image).any()) else math.nan)
            out[key][m] = values
    return out


def mprt_verdict(spearman: dict[str, list[float]], stages: list[str], method: str, reference: str,
                 margin: float = MPRT_MARGIN, follow: dict[str, list[float]] | None = None,
                 floors: Sequence[str] = (), constant_share: dict[str, list[float]] | None = None,
                 two_sided: bool = True, skip_steps: Sequence[int] = ()) -> dict:
    """Pass/fail of `method` against `reference` (means per step, step 0 first). Three rules, each able to fail:

    - similarity: at every randomisation step (1..K) the method's mean Spearman similarity to its trained-CNN
      maps is within `margin` of the reference's (two-sided: falling far *below* the reference, e.g. a map that
      turns anti-correlated with its old self, fails as well as staying far above it; `two_sided=False` is the
      one-sided rule of earlier reports);
    - degenerate: a method with no finite similarity, or whose maps are constant for more than half of the
      images at a step where the reference's are not (`constant_share`: share of constant maps per step and
      method), explains nothing and fails;
    - follow (when `follow` and `floors` are given: each method's mean Spearman similarity to the randomised
      CNN's own reference map, per step): at every step the method follows the randomised CNN at least as well
      as the best of `floors` (the trivial baselines of its own inputs), less `margin`. A map that ignores the
      network (a constant, the image, a fixed map) or inverts it fails here even when its similarity to the
      trained maps is Grad-CAM-like.

    `skip_steps`: steps not counted (the same randomised network as a step of a randomisation already judged,
    e.g. `independent`'s first step is `top_down`'s); "steps" counts the others.
    """
    skip = set(skip_steps)
    gaps = [spearman[method][s] - spearman[reference][s] for s in range(1, len(spearman[method]))]
    finite = [(g, s + 1) for s, g in enumerate(gaps) if math.isfinite(g) and s + 1 not in skip]
    worst, at = max(finite, key=lambda x: abs(x[0]) if two_sided else x[0]) if finite else (math.nan, 0)
    failed = [s for g, s in finite if (abs(g) if two_sided else g) > margin + 1e-12]
    reasons = ["similarity"] if failed else []
    degenerate = [s for s in range(1, len(spearman[method])) if constant_share is not None and s not in skip
                  and constant_share[method][s] > 0.5 >= constant_share[reference][s]]
    if not finite or degenerate:
        reasons.append("degenerate")
    unfollowed: list[int] = []
    follow_gaps: list[float] = []
    if follow is not None and floors:
        for s in range(1, len(follow[method])):
            best = max((follow[f][s] for f in floors if math.isfinite(follow[f][s])), default=math.nan)
            gap = follow[method][s] - best
            follow_gaps.append(gap)
            if s not in skip and math.isfinite(gap) and gap < -margin - 1e-12:
                unfollowed.append(s)
        if unfollowed:
            reasons.append("follow")
    return {"method": method, "reference": reference, "margin": margin, "passes": not reasons,
            "reasons": reasons, "failed_steps": failed, "degenerate_steps": degenerate, "unfollowed_steps": unfollowed,
            "follow_gaps": follow_gaps, "floors": list(floors), "two_sided": two_sided,
            "worst_gap": worst, "worst_step": at, "worst_stage": stages[at - 1] if at else "", "steps": len(gaps) - len(skip & set(range(1, len(gaps) + 1))),
            "skipped_steps": sorted(skip)}


def one_step_scores(trained: dict[str, Tensor], randomised: list[dict[str, Tensor]], reference: str) -> dict:
    """Scores of a one-step randomisation (data randomisation: the maps of networks trained on permuted labels),
    each image averaged over the networks: per method the Spearman similarity to its trained-network maps, the
    follow similarity to each network's own `reference` map, and the share of constant maps — as
    {"spearman", "follow"} (per-image tensors) and the `mprt_verdict` inputs {"means", "follow_means",
    "constant_share"} (step 0 = the trained network)."""
    nan = torch.full((len(trained[reference]),), math.nan, dtype=torch.float64)

    def pooled(values: list[Tensor]) -> Tensor:
        return torch.stack([v.double() for v in values]).nanmean(0)

    rho = {m: pooled([torch.where(constant(v), nan, spearman_abs(r[m], v)) for r in randomised])
           for m, v in trained.items()}
    follow = {m: pooled([torch.where(constant(r[reference]), nan, same_size_spearman(r[m], r[reference]))
                         for r in randomised]) for m in trained}

    def mean(v: Tensor) -> float:
        return float(v.nanmean()) if bool(torch.isfinite(v).any()) else math.nan

    return {"spearman": rho, "follow": follow,
            "means": {m: [1.0, mean(v)] for m, v in rho.items()},
            "follow_means": {m: [1.0, mean(v)] for m, v in follow.items()},
            "constant_share": {m: [float(constant(v).double().mean()),
                                   float(torch.stack([constant(r[m]).double() for r in randomised]).mean())]
                               for m, v in trained.items()}}


def emprt_verdict(rise: dict[str, float], method: str, reference: str, margin: float = MPRT_MARGIN) -> dict:
    """eMPRT pass/fail: the method's mean relative complexity rise from the trained to the fully randomised CNN
    ((H_random − H_trained) / H_trained, `smprt_emprt.emprt_score`) is finite (a constant trained map has none) and
    within `margin` of the reference's. A map that does not change with the network (the image, a fixed map)
    rises by 0 and fails wherever the reference's own rise is more than `margin` away from 0; entropy does not see
    a sign inversion, which MPRT's follow rule catches."""
    a, b = rise.get(method, math.nan), rise.get(reference, math.nan)
    gap = a - b
    passes = math.isfinite(gap) and abs(gap) <= margin + 1e-12
    return {"method": method, "reference": reference, "margin": margin, "passes": passes, "gap": gap,
            "reasons": [] if passes else (["degenerate"] if not math.isfinite(gap) else ["complexity"])}


def verdict_sentence(v: dict, spearman: dict[str, list[float]]) -> str:
    """The report's one-sentence verdict for one method: which rules of `mprt_verdict` it passes or fails."""
    if v["steps"] == 0 or not math.isfinite(v["worst_gap"]):
        return (f"**{v['method']} fails MPRT (degenerate)**: no randomisation step with a finite similarity "
                f"(its maps are constant).")
    at = v["worst_step"]
    within = "within ±" if v.get("two_sided", False) else "at most "
    detail = (f"largest gap {v['worst_gap']:+.3f} at step {at} (randomised down to `{v['worst_stage']}`: "
              f"{spearman[v['method']][at]:.3f} vs {spearman[v['reference']][at]:.3f})")
    floors = " / ".join(v.get("floors") or [])
    if v["passes"]:
        follows = f"; at every step it follows the randomised CNN at least as well as {floors}" if floors else ""
        return (f"**{v['method']} passes MPRT**: at every one of the {v['steps']} randomisation steps its mean "
                f"Spearman similarity is {within}{v['margin']:.2f} of {v['reference']}'s; {detail}{follows}.")
    parts = []
    if v["failed_steps"]:
        parts.append(f"at {len(v['failed_steps'])} of {v['steps']} randomisation steps its mean Spearman similarity "
                     f"is not {within}{v['margin']:.2f} of {v['reference']}'s; {detail}")
    if v.get("degenerate_steps"):
        parts.append(f"its maps are constant for most images at step(s) {', '.join(map(str, v['degenerate_steps']))}")
    if v.get("unfollowed_steps"):
        parts.append(f"at step(s) {', '.join(map(str, v['unfollowed_steps']))} it follows the randomised CNN's "
                     f"{v['reference']} less than {floors} do (by more than {v['margin']:.2f})")
    return f"**{v['method']} fails MPRT ({', '.join(v['reasons'])})**: " + "; ".join(parts) + "."
