"""Render the README's verdict table and the docs' results tables from the committed report files.

A rendered block sits between two markers in a Markdown file:

    <!-- render: verdicts -->
    | claim | test | ... |          <- written by this script, never by hand
    <!-- /render -->

    python docs/render.py            # rewrite every block of README.md and docs/*.md from the reports they cite
    python docs/render.py --check    # rewrite nothing; list each block that differs from its reports, exit 1

`tests/test_docs.py` runs the check: a number in a block that differs from its report (one digit changed by hand,
or a report regenerated without re-rendering) fails the suite. Each block's function names the report files it
reads; links in a block point at those reports, relative to the file the block is in.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = re.compile(r"(<!-- render: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)


def _rel(path: Path) -> str:
    """`path` relative to the repository where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class Reports:
    """Report files under docs/, read once: `R.json("eval-fashion-after")` is that folder's metrics.json."""

    def __init__(self, docs: Path = DOCS) -> None:
        self.docs, self._cache = docs, {}

    def json(self, folder: str, file: str = "metrics.json") -> dict:
        """The parsed JSON file `docs/<folder>/<file>` (KeyError-free: a missing file is a clear error)."""
        key = f"{folder}/{file}"
        if key not in self._cache:
            path = self.docs / folder / file
            if not path.is_file():
                raise FileNotFoundError(f"docs/render.py: {_rel(path)} is cited but does not exist")
            self._cache[key] = json.loads(path.read_text())
        return self._cache[key]


class Page:
    """Formatting for one Markdown file: links to reports relative to it."""

    def __init__(self, path: Path, docs: Path = DOCS) -> None:
        self.path, self.docs = path, docs

    def link(self, folder: str, text: str | None = None) -> str:
        """A Markdown link to docs/<folder>/report.md from this page."""
        rel = os.path.relpath(self.docs / folder / "report.md", self.path.parent)
        return f"[{text or folder + '/'}]({Path(rel).as_posix()})"


def num(x: float, digits: int = 3) -> str:
    """0.816"""
    return f"{x:.{digits}f}".replace("-", "−")


def signed(x: float, digits: int = 3) -> str:
    """+0.057 / −0.003"""
    return f"{x:+.{digits}f}".replace("-", "−")


def ci(lo_hi: list[float] | tuple[float, float], digits: int = 3, sign: bool = False) -> str:
    """[0.798, 0.832]"""
    f = signed if sign else num
    return f"[{f(lo_hi[0], digits)}, {f(lo_hi[1], digits)}]"


def est(d: dict, key: str = "r", sign: bool = False) -> str:
    """'0.816 [0.798, 0.832]' from {'r': .., 'r_ci95': [..]} or {'mean', 'lo', 'hi'}."""
    if "mean" in d and key not in d:
        mean, lohi = d["mean"], (d["lo"], d["hi"])
    else:
        mean, lohi = d[key], d[f"{key}_ci95"]
    return f"{(signed if sign else num)(mean)} {ci(lohi, sign=sign)}"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A Markdown table; `align` one letter per column (l or r)."""
    align = align or "l" * len(header)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


BLOCKS: dict[str, Callable[[Reports, Page], str]] = {}


def block(name: str) -> Callable:
    """Register a block renderer under its marker name."""
    def wrap(fn: Callable[[Reports, Page], str]) -> Callable[[Reports, Page], str]:
        BLOCKS[name] = fn
        return fn
    return wrap


# --------------------------------------------------------------------------------------------- the blocks

def _worst_gap(randomisation: dict, method: str) -> dict:
    """The similarity gap {mean, lo, hi} at the step a randomisation's verdict names for `method`."""
    return randomisation["steps"][randomisation["verdicts"][method]["worst_step"]]["gap"][method]


def _mprt_summary(m: dict, method: str) -> tuple[bool, str]:
    """(passes every randomisation, 'fails k of n orders; largest gap ... (order, stage)') of an mprt section."""
    worst, failed = None, 0
    for r in m["randomisations"]:
        v = r["verdicts"][method]
        failed += not v["passes"]
        gap = _worst_gap(r, method)
        if worst is None or abs(gap["mean"]) > abs(worst[0]["mean"]):
            worst = (gap, r["name"].replace("_", "-"), v["worst_stage"])
    n = len(m["randomisations"])
    head = f"fails {failed} of {n} orders" if failed else f"passes all {n} orders"
    return not failed, f"{method} {head}, largest gap {est(worst[0], sign=True)} ({worst[1]}, `{worst[2]}`)"


def _direction(lohi: list[float], other: str) -> str:
    """How a margin's 95 % interval places A against `other`."""
    return f"above {other}" if lohi[0] > 0 else f"below {other}" if lohi[1] < 0 else f"level with {other}"


def _verdict_word(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


@block("verdicts")
def verdicts(R: Reports, page: Page) -> str:
    """The paper's three claims, the two ablations and the sanity checks: one row each."""
    after, learned, ablation, zoo = (R.json("eval-fashion-after"), R.json("eval-fashion-learned"),
                                     R.json("eval-fashion-ablation"), R.json("eval-fashion-zoo"))
    rows = []
    f = after["fidelity"]
    best = f["LSFT"]["margin"]["over"]
    ok = all(f[g]["margin"]["r_ci95"][0] > 0 for g in ("LSFT", "GSFT"))
    rows.append(["1. The GAN turns a CNN's conditional priors into its explanation",
                 f"Pearson r with the Grad-CAM target, {after['images']} test images; margin over the {best}",
                 f"LSFT {est(f['LSFT'])}, {est(f['LSFT']['margin'], sign=True)}; "
                 f"GSFT {est(f['GSFT'])}, {est(f['GSFT']['margin'], sign=True)}",
                 _verdict_word(ok) + " (beats every trivial baseline)", page.link("eval-fashion-after")])
    held = [(e["name"], v) for e in zoo["generalisation"] for v in e.get("verdicts", [])
            if v["check"] == "held-out − in-domain" and "without" in v["a"]]
    worst = min(held, key=lambda t: t[1]["r"])
    bestgap = max(held, key=lambda t: t[1]["r"])
    passed = sum(v["pass"] for _, v in held)
    rows.append(["2. One GAN explains CNNs agnostic to architecture",
                 f"GSFT that never saw the architecture − GSFT trained on it (leave one out of {len(held)} "
                 f"Fashion-MNIST CNNs); goal ≥ {signed(held[0][1]['goal'], 2)}",
                 f"from {signed(worst[1]['r'])} {ci(worst[1]['r_ci95'], sign=True)} ({worst[0]}) to "
                 f"{signed(bestgap[1]['r'])} {ci(bestgap[1]['r_ci95'], sign=True)} ({bestgap[0]}); "
                 f"{passed} of {len(held)} meet the goal",
                 _verdict_word(passed == len(held)), page.link("eval-fashion-zoo")])
    rel = after["relevance"]
    parts, ok3 = [], True
    for g in ("LSFT", "GSFT"):
        z, zc = rel[g]["zeros"], rel[g]["zeros_ci95"]
        first, last = len(z) - 1, 0
        parts.append(f"{g}: C0 (final layers) {num(z[last])} {ci(zc[last])}, C{first} (down to the first layer) "
                     f"{num(z[first])} {ci(zc[first])}")
        ok3 &= zc[last][0] <= zc[first][1] and zc[first][0] <= zc[last][1]
    rows.append(["3. Initial and final layers are equally crucial",
                 "drop in r when one prior is zeroed (prior relevance), test images",
                 "; ".join(parts), _verdict_word(ok3), page.link("eval-fashion-after")])
    tw = ablation["fidelity"]["GSFT"]["margin_twin"]
    rows.append(["Ablation: the adversarial term",
                 f"GSFT − its L1-only twin, one run each from scratch, {ablation['images']} test images",
                 est(tw, sign=True), "does not help: " + _direction(tw["r_ci95"], "the twin"),
                 page.link("eval-fashion-ablation")])
    lm = learned["fidelity"]
    rows.append(["Ablation: a GAN against an L1 regressor",
                 f"shipped GAN − `convnet` regressor on the same priors, one run each, {learned['images']} test "
                 "images",
                 f"GSFT {est(lm['GSFT']['margin_learned'], sign=True)}; LSFT "
                 f"{est(lm['LSFT']['margin_learned'], sign=True)}",
                 ("the GAN beats the regressor" if all(lm[g]["margin_learned"]["r_ci95"][0] > 0 for g in ("LSFT", "GSFT"))
                  else "no gain: GSFT " + _direction(lm["GSFT"]["margin_learned"]["r_ci95"], "the regressor")
                  + ", LSFT " + _direction(lm["LSFT"]["margin_learned"]["r_ci95"], "the regressor")),
                 page.link("eval-fashion-learned")])
    d = R.json("eval-fashion-datarand")["datarand"]
    cells = []
    for g in ("LSFT", "GSFT"):
        v = d["verdicts"][g]
        cells.append(f"{g} {'passes' if v['passes'] else 'fails'}: gap {est(d['gap'][g], sign=True)}"
                     + (f" ({', '.join(v['reasons'])})" if v["reasons"] else ""))
    accs = ", ".join(num(f["val_accuracy"]) for f in d["fits"])
    ok = all(d["verdicts"][g]["passes"] for g in ("LSFT", "GSFT"))
    rows.append(["Sanity: data randomisation",
                 f"{len(d['cnns'])} random-label CNNs by the shipped CNN's recipe (true-label val accuracy {accs}; "
                 f"chance {num(d['fits'][0]['chance'], 2)}), {d['images']} test images, each averaged over the CNNs; "
                 "the MPRT rules", "; ".join(cells),
                 ("pass" if ok else "**fail**") + ("" if d["at_chance"] else " (not applicable as run: a random-label CNN is off chance on the true labels)"),
                 page.link("eval-fashion-datarand")])
    for folder, seeds in (("eval-fashion-mprt-rules", "test seed set"), ("eval-fashion-mprt-rules-val",
                                                                         "val seed set")):
        m = R.json(folder)["mprt"]
        cells = []
        all_ok = True
        for g in ("LSFT", "GSFT"):
            ok, cell = _mprt_summary(m, g)
            all_ok &= ok
            cells.append(cell)
        lo, hi = m["seeds"][0], m["seeds"][-1]
        orders = ", ".join(r["name"].replace("_", "-") for r in m["randomisations"])
        rows.append([f"Sanity: model-parameter randomisation ({seeds})",
                     f"MPRT ({orders}), repaired two-sided rules, seeds {lo}–{hi}, {m['images']} test images; gap = "
                     "Spearman similarity to the trained-CNN maps minus Grad-CAM's; pass: within ±0.10 at every step, maps not "
                     "constant, and following the randomised CNN's Grad-CAM within 0.10 of the generator's inputs",
                     "; ".join(cells), "pass" if all_ok else "**fail**", page.link(folder)])
    return table(["claim", "test", "number [95 % interval]", "verdict", "report"], rows)


@block("fidelity")
def fidelity(R: Reports, page: Page) -> str:
    """Fidelity of the shipped generators, the learned baselines and the trivial baselines (test priors)."""
    learned = R.json("eval-fashion-learned")
    f = learned["fidelity"]
    names = [("LSFT", "LSFT GAN (priors only, shipped)"), ("GSFT", "GSFT GAN (priors only, shipped)"),
             ("learned convnet", "`convnet`: L1-only convolutional regressor, same priors (shipped)"),
             ("learned linear", "`linear`: per-pixel affine mix of the priors, L1 only"),
             ("mean of priors", "mean of the 8 priors")]
    best = f["LSFT"]["margin"]["over"]
    cidx = re.search(r"\((C\d+)", best)[1]  # "best single prior (C1, val)"
    names.insert(4, (cidx, f"best single prior ({cidx}, chosen on val)"))
    names.append(("intensity (gray, val)", "image intensity (sign chosen on val)"))
    rows = [[label, est(f[k]), est(f[k], "l1"), est(f[k], "ssim")] for k, label in names]
    return (f"{learned['images']} test images; mean [95 % bootstrap interval]; "
            f"{page.link('eval-fashion-learned')}\n\n"
            + table(["method", "Pearson r ↑", "L1 ↓", "SSIM ↑"], rows, "lrrr"))


@block("mprt-seed-sets")
def mprt_seed_sets(R: Reports, page: Page) -> str:
    """The shipped generators under the repaired MPRT rules on the test and the val seed sets, side by side."""
    rows = []
    reps = [("test", R.json("eval-fashion-mprt-rules")), ("val", R.json("eval-fashion-mprt-rules-val"))]
    orders = [r["name"] for r in reps[0][1]["mprt"]["randomisations"]]
    for g in ("LSFT", "GSFT"):
        for i, order in enumerate(orders):
            row = [g, order.replace("_", "-")]
            for _, rep in reps:
                r = rep["mprt"]["randomisations"][i]
                v = r["verdicts"][g]
                gap = _worst_gap(r, g)
                cell = f"{'pass' if v['passes'] else '**fail**'}: gap {est(gap, sign=True)} at `{v['worst_stage']}`"
                if v["unfollowed_steps"]:
                    k = min(v["unfollowed_steps"], key=lambda i: v["follow_gaps"][i - 1])
                    cell += (f"; follows the randomised CNN's Grad-CAM {num(-v['follow_gaps'][k - 1])} less than its "
                             f"inputs do at `{r['stages'][k - 1]}`")
                row.append(cell + (f" ({', '.join(v['reasons'])})" if v["reasons"] else ""))
            rows.append(row)
    head = [f"{name} seeds {rep['mprt']['seeds'][0]}–{rep['mprt']['seeds'][-1]} "
            f"({page.link('eval-fashion-mprt-rules' + ('' if name == 'test' else '-val'), 'report')})"
            for name, rep in reps]
    return table(["generator", "randomisation", *head], rows)


@block("learned")
def learned(R: Reports, page: Page) -> str:
    """The shipped GANs beside the learned baselines on val and test, and the paired margins."""
    val, test = R.json("eval-fashion-learned-val")["fidelity"], R.json("eval-fashion-learned")["fidelity"]
    names = [("LSFT", "LSFT GAN (shipped)"), ("GSFT", "GSFT GAN (shipped)"),
             ("learned convnet", "learned `convnet` (L1 only)"), ("learned linear", "learned `linear` (L1 only)"),
             ("mean of priors", "mean of the 8 priors"), ("intensity (gray, val)", "image intensity (sign chosen on val)")]
    rows = [[label, est(val[k]), est(test[k]), est(test[k], "l1"), est(test[k], "ssim")] for k, label in names]
    first = table(["method", "val r", "test r", "test L1 ↓", "test SSIM ↑"], rows, "lrrrr")
    margins = []
    for g, key in (("LSFT", "margin_learned"), ("GSFT", "margin_learned"), ("learned convnet", "margin")):
        mv, mt = val[g][key], test[g][key]
        label = f"{g} − `convnet`" if key == "margin_learned" else f"`convnet` − {mt['over']}"
        margins.append([label, est(mv, sign=True), est(mt, sign=True), est(mt, "l1", sign=True),
                        est(mt, "ssim", sign=True)])
    second = table(["margin (paired per image)", "val Δ r", "test Δ r", "test Δ L1", "test Δ SSIM"], margins, "lrrrr")
    return (f"{page.link('eval-fashion-learned-val', 'val')} and {page.link('eval-fashion-learned', 'test')} "
            "reports; 256 images each, mean [95 % bootstrap interval]\n\n" + first + "\n" + second)


@block("ablation")
def ablation(R: Reports, page: Page) -> str:
    """GSFT against its L1-only twin (one run each, from scratch, one epoch)."""
    val, test = R.json("eval-fashion-ablation-val")["fidelity"], R.json("eval-fashion-ablation")["fidelity"]
    rows = [[label, est(val[k]), est(test[k]), est(test[k], "l1"), est(test[k], "ssim")]
            for k, label in (("GSFT", "adversarial + 100·L1 (the paper's loss)"), ("GSFT (L1 only)", "L1 only (twin)"))]
    tv, tt = val["GSFT"]["margin_twin"], test["GSFT"]["margin_twin"]
    rows.append(["**GAN − twin** (paired)", est(tv, sign=True), est(tt, sign=True), est(tt, "l1", sign=True),
                 est(tt, "ssim", sign=True)])
    return (f"{page.link('eval-fashion-ablation-val', 'val')} and {page.link('eval-fashion-ablation', 'test')} "
            "reports\n\n" + table(["GSFT, one epoch from scratch", "val r", "test r", "test L1 ↓", "test SSIM ↑"],
                                   rows, "lrrrr"))


@block("datarand")
def datarand(R: Reports, page: Page) -> str:
    """The data-randomisation test pooled over the random-label CNNs, with each CNN's fit."""
    d = R.json("eval-fashion-datarand")["datarand"]
    fits = [[f"`{p}`", str(f["seed"]), str(f["epochs"]), num(f["train_accuracy"]) if f["train_accuracy"] is not None
             else "–", num(f["val_accuracy"]), num(f["chance"], 2), "yes" if f["at_chance"] else "**no**"]
            for p, f in zip(d["cnns"], d["fits"], strict=True)]
    first = table(["random-label CNN", "seed", "epochs", "train accuracy (permuted labels)",
                   "val accuracy (true labels)", "chance", "at chance"], fits, "lrrrrrl")
    rows = []
    for m in d["methods"]:
        v = d["verdicts"].get(m)
        rows.append([m, est(d["spearman"][m]), est(d["follow"][m]), est(d["gap"][m], sign=True) if m in d["gap"]
                     else "–", "–" if v is None else ("pass" if v["passes"] else "**fail** (" + ", ".join(v["reasons"])
                                                      + ")")])
    second = table(["method", "ρ with its trained-CNN maps", "follow (ρ with the random-label CNN's Grad-CAM)",
                    f"gap over {d['reference']}", "verdict"], rows, "lrrrl")
    return (f"{d['images']} test images, each averaged over the {len(d['cnns'])} CNNs; "
            f"{page.link('eval-fashion-datarand')}\n\n" + first + "\n" + second)


@block("shipped-size")
def shipped_size(R: Reports, page: Page) -> str:
    """The committed files under models/ and npys/, counted from the repository (git ls-files)."""
    import subprocess

    root = R.docs.parent
    out = subprocess.run(["git", "-C", str(root), "ls-files", "models", "npys"], capture_output=True, text=True,
                         check=True).stdout.split()
    total = sum((root / f).stat().st_size for f in out if (root / f).is_file())
    return f"Together: {total / 1e6:.1f} MB ({total:,} bytes, {len(out)} files in `models/` and `npys/`).\n"


@block("zoo-gsft-convnet")
def zoo_gsft_convnet(R: Reports, page: Page) -> str:
    """Leave-one-out transfer of the GSFT against the L1-only convnet trained the same way (single runs each)."""
    m = R.json("eval-fashion-zoo")
    rows = []
    for e in m["generalisation"]:
        r, n = e["results"], e["name"]
        g = next((k for k in r if k.startswith(f"GSFT without {n}")), None)
        c = next((k for k in r if k.startswith(f"convnet without {n}")), None)
        if g and c:
            rows.append([n, est(r[g]), est(r[c]), signed(r[g]["r"] - r[c]["r"])])
    return (f"r on each held-out CNN's {m['images']} test priors, generators trained on the other CNNs only (one run "
            f"each; the difference is of means, unpaired); {page.link('eval-fashion-zoo')}\n\n"
            + table(["held-out CNN", "GSFT", "L1-only `convnet`", "GSFT − convnet"], rows, "lrrr"))


@block("shipped-cnn")
def shipped_cnn(R: Reports, page: Page) -> str:
    """The shipped CNN's training record, read from the committed checkpoint's history."""
    import torch

    path = "models/fashion_resnet18-cnn.pt"
    ck = torch.load(R.docs.parent / path, map_location="cpu", weights_only=True)
    cfg, hist = ck["config"], ck["history"]
    data = cfg["data"]
    train = round(data["limit"] * (1 - data["val_fraction"]))
    accs = ", ".join(f"**{num(h['val_accuracy'])}**" if h["epoch"] == ck["epoch"] else num(h["val_accuracy"])
                     for h in hist)
    row = [f"`{Path(cfg.get('source_file') or 'fashion_resnet18').stem}` ({ck['image_size']} px), the shipped CNN",
           f"{train:,} / {data['limit'] - train:,}", f"{cfg['cnn']['epochs']} × {cfg['cnn']['batch_size']}", accs,
           f"{hist[-1]['seconds'] / 60:.1f} min"]
    return (f"From the history stored in `{path}`:\n\n"
            + table(["config", "images (train / val)", "epochs × batch", "val accuracy per epoch", "wall time"], [row]))


# --------------------------------------------------------------------------------------------- the machinery

def render_text(text: str, page: Page, R: Reports) -> tuple[str, list[str]]:
    """`text` with every block re-rendered, and the names of the blocks whose content changed."""
    changed: list[str] = []

    def sub(m: re.Match) -> str:
        name = m["name"]
        if name not in BLOCKS:
            raise KeyError(f"{_rel(page.path)}: unknown block '{name}' (known: {', '.join(BLOCKS)})")
        body = BLOCKS[name](R, page)
        if body != m["body"]:
            changed.append(name)
        return m.group(1) + body + m.group(4)

    return MARKER.sub(sub, text), changed


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(check: bool = False, root: Path = ROOT) -> dict[str, list[str]]:
    """Re-render every page's blocks; with `check` write nothing. Returns {page: changed block names}."""
    R = Reports(root / "docs")
    out = {}
    for path in pages(root):
        text = path.read_text()
        new, changed = render_text(text, Page(path, root / "docs"), R)
        if changed:
            out[str(path.relative_to(root))] = changed
            if not check:
                path.write_text(new)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Blocks: " + ", ".join(BLOCKS))
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block differs from its reports")
    args = ap.parse_args(argv)
    try:
        changed = render(check=args.check)
    except (FileNotFoundError, KeyError) as exc:
        print(str(exc).strip("'\""), file=sys.stderr)
        return 2
    for page, names in changed.items():
        print(f"{page}: {'differs from its reports' if args.check else 'rewrote'}: {', '.join(names)}")
    return 1 if (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
