#!/usr/bin/env python
"""Fidelity vs model-randomisation trade-off of several generators, from evaluation reports' metrics.json.

Each point is one generator of one report (`python -m cnnprior.evaluate ... --out DIR`): its fidelity r to the
target on the report's prior file, and its worst MPRT gap (the largest, over the randomisation steps, of its mean
Spearman similarity minus Grad-CAM's; the pass line is 0.10). Writes a PNG and prints a markdown table.

    python docs/tradeoff.py --out docs/tradeoff.png \
        "share 0=docs/eval-fashion-before:LSFT" "share 0.5=docs/eval-fashion-after:LSFT" ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PASS_GAP = 0.10


def point(spec: str) -> dict:
    """'label=DIR:GAN' -> the generator's fidelity r and worst MPRT gap (with its interval) in DIR/metrics.json."""
    try:
        label, rest = spec.split("=", 1)
        folder, gan = rest.rsplit(":", 1)
    except ValueError:
        raise SystemExit(f"tradeoff: {spec!r} is not label=DIR:GAN (e.g. 'share 0.5=docs/eval-x:LSFT')") from None
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"tradeoff: {path} not found; run python -m cnnprior.evaluate ... --out {folder} first")
    m = json.loads(path.read_text(encoding="utf-8"))
    if gan not in (m.get("fidelity") or {}) or not (m.get("mprt") or {}).get("steps"):
        raise SystemExit(f"tradeoff: {path} has no fidelity or MPRT results for {gan!r}")
    steps = [s for s in m["mprt"]["steps"] if s["step"] > 0]
    worst = max(steps, key=lambda s: s["gap"][gan]["mean"])
    fails = sum(s["gap"][gan]["mean"] > PASS_GAP for s in steps)
    return {"label": label, "gan": gan, "folder": folder, "r": m["fidelity"][gan]["r"],
            "split": (m.get("prior_file") or {}).get("split"), "gap": worst["gap"][gan], "at": worst["randomised"],
            "fails": fails, "steps": len(steps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("points", nargs="+", help="label=EVAL_DIR:GAN (GAN as named in the report: LSFT or GSFT)")
    p.add_argument("--out", default="docs/tradeoff.png", help="PNG to write")
    p.add_argument("--title", default="fidelity vs MPRT")
    args = p.parse_args(argv)
    pts = [point(s) for s in args.points]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.axvline(PASS_GAP, color="0.5", ls="--", lw=1)
    ax.text(PASS_GAP, 0.02, " pass ≤ 0.10", transform=ax.get_xaxis_transform(), color="0.4", fontsize=8)
    for i, q in enumerate(pts, 1):  # numbered points, named in the legend (labels would overlap)
        g = q["gap"]
        ax.errorbar(g["mean"], q["r"], xerr=[[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]], fmt="o", capsize=3,
                    color="tab:blue" if q["gan"] == "LSFT" else "tab:orange", label=f"{i}: {q['label']} ({q['gan']})")
        ax.annotate(str(i), (g["mean"], q["r"]), fontsize=8, xytext=(3, 4), textcoords="offset points")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("worst MPRT gap: GAN − Grad-CAM mean Spearman (95 % CI) ←better")
    ax.set_ylabel("fidelity r to the Grad-CAM target ↑")
    ax.set_title(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print("| generator | split | fidelity r | worst MPRT gap [95 % CI] | at | steps failed | report |")
    print("|---|---|---:|---|---|---:|---|")
    for q in pts:
        g = q["gap"]
        print(f"| {q['label']} ({q['gan']}) | {q['split']} | {q['r']:.3f} | {g['mean']:+.3f} [{g['lo']:+.3f}, "
              f"{g['hi']:+.3f}] | `{q['at']}` | {q['fails']} of {q['steps']} | `{q['folder']}` |")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
