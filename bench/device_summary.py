#!/usr/bin/env python
"""Summarise bench/device.sh's results: one line per figure, from the JSON files its steps wrote.

    python bench/device_summary.py DIR      # DIR holds priors.json, generator.json, classifier.json
A missing file is reported as `missing` on its lines (that step failed); the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VARIANTS = ("lsft", "gsft")


def read(folder: Path, name: str) -> dict | None:
    """A step's results, or None when its file is missing or unreadable."""
    try:
        return json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def summary_lines(folder: Path) -> tuple[list[str], bool]:
    """(the summary lines, whether every step's file was there)."""
    priors, gen, clf = read(folder, "priors"), read(folder, "generator"), read(folder, "classifier")
    first = next((r for r in (priors, gen, clf) if r), None)
    lines = [f"summary: device {first['device']} ({first['device_name']})" if first else "summary: no results"]
    if priors:
        rates, ratios = priors["images_per_s"], priors["ratios"]
        for label in rates:
            if label == "stage":
                continue
            r = rates[label]
            lines.append(f"summary: priors extraction ({label}): {r['extraction']:.1f} images/s, bare "
                         f"forward+backward {r['bare']:.1f} images/s, ratio extraction/bare "
                         f"{ratios[f'extraction/bare ({label})']:.2f}")
        lines.append(f"summary: priors stage: {rates['stage']['stage']:.1f} images/s, extraction alone "
                     f"{rates['stage']['extraction']:.1f} images/s, ratio stage/extraction "
                     f"{ratios['stage/extraction']:.2f}")
    else:
        lines.append("summary: priors: missing")
    if gen:
        res = gen["results"]
        for variant in VARIANTS:
            for precision in ("fp32", "bf16"):
                key = f"train {variant} paper {precision}"
                shown = f"{res[key]:.1f} images/s" if key in res else "not run"
                lines.append(f"summary: gan training {variant} paper {precision}: {shown}")
        for preset in ("paper", "cpu", "cpu64"):
            for variant in VARIANTS:
                lines.append(f"summary: generator inference {variant} {preset}: "
                             f"{res[f'infer {variant} {preset} images/s']:.1f} images/s")
    else:
        lines.append("summary: generator: missing")
    if clf:
        for key, rate in clf["results"].items():
            lines.append(f"summary: classifier training {key.removeprefix('train classifier ')}: {rate:.1f} images/s")
    else:
        lines.append("summary: classifier: missing")
    return lines, all(r is not None for r in (priors, gen, clf))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="the folder bench/device.sh wrote its JSON files to")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        p.error(f"{args.folder}: no such folder")
    lines, complete = summary_lines(args.folder)
    print("\n".join(lines))
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
