"""Tests for cnnprior.evaluate.run: a tiny end-to-end report, prior relevance on hand-built generators, config errors."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cnnprior.cnn.layers import conv_layers
from cnnprior.cnn.model import build_cnn, save_cnn
from cnnprior.core.config import load_config
from cnnprior.core.errors import UserError
from cnnprior.core.runtime import file_sha256
from cnnprior.evaluate.config import generator_keys, load_eval_config, parse_sections
from cnnprior.evaluate.run import main
from cnnprior.evaluate.sanity import ci_row, margin_row, mean_ci, paired_ci
from cnnprior.evaluate.sections.faithfulness import drop_and_increase
from cnnprior.evaluate.sections.fidelity import intensity_rows
from cnnprior.evaluate.sections.relevance import prior_labels, prior_relevance
from cnnprior.gan.models import build_generator
from cnnprior.gan.models.sft import SFTResBlock
from cnnprior.gan.train import run_gan_stage
from cnnprior.maps import metrics
from cnnprior.maps.baselines import BaselineChoice
from cnnprior.maps.ops import random_maps
from cnnprior.present.report import Estimate, Report, Table
from cnnprior.priors.extract import PriorExtractor
from cnnprior.priors.priorfile import PRIORS_FORMAT, PriorWriter, make_records
from cnnprior.priors.read import read_priors
from cnnprior.priors.spec import PriorSpec
from tests.helpers import gan_config

SIZE, N, COUNT, CLASSES = 16, 4, 8, ["a", "b", "c", "d", "e"]
PX = 64  # the CNN's input: ResNet-18's final feature map is 2x2 (at 32 px it is 1x1 and every target map is empty)


def _shapes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PX px noise images, each with one bright square; the square is the ground-truth mask."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, PX, PX, generator=g) * 0.3
    masks = torch.zeros(count, PX, PX)
    side = PX * 3 // 8
    for i in range(count):
        y, x = torch.randint(0, PX - side, (2,), generator=g).tolist()
        images[i, :, y:y + side, x:x + side] = 0.9
        masks[i, y:y + side, x:x + side] = 1
    return images, masks


def _write_real_priors(path: Path, cnn_path: Path, model, count: int = COUNT, n: int = N, seed: int = 0,
                       has_masks: bool = True, split: str = "test") -> Path:
    """A prior file made the way the priors stage makes it (real extractor, its sidecar keys)."""
    extractor = PriorExtractor(model, conv_layers(model), PriorSpec(size=SIZE, n=n))
    images, masks = _shapes(count, seed)
    labels = torch.arange(count) % len(CLASSES)
    out = extractor(images, labels)
    meta = {"format": PRIORS_FORMAT, **extractor.spec.as_dict(), **extractor.describe(), "split": split,
            "dataset": "shapes" if has_masks else "noise", "class_names": CLASSES, "has_masks": has_masks,
            "cnn": {"arch": "resnet18", "checkpoint": str(cnn_path), "checkpoint_sha256": file_sha256(cnn_path),
                    "image_size": PX, "val_accuracy": 0.5}, "config": {}}
    writer = PriorWriter(path, count, meta)
    writer.write(make_records(out, images, labels, masks, torch.arange(count), SIZE, n, with_mask=has_masks))
    return writer.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """CNN, prior files (main with masks, a same-shape other one, one with n=3) and tiny LSFT/GSFT checkpoints."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = build_cnn("resnet18", CLASSES, image_size=PX).eval()
    cnn_path = save_cnn(model, root / "models" / "tiny-cnn.pt", val_accuracy=0.5, epoch=0, config={},
                        dataset="shapes")
    main_priors = _write_real_priors(root / "npys" / "tiny-test.npy", cnn_path, model)
    other = _write_real_priors(root / "npys" / "other-test.npy", cnn_path, model, count=6, seed=3, has_masks=False)
    wrong_n = _write_real_priors(root / "npys" / "n3-test.npy", cnn_path, model, count=4, n=3, seed=4)
    val_priors = _write_real_priors(root / "npys" / "tiny-val.npy", cnn_path, model, seed=5, split="val")
    ckpts = {}
    for variant in ("lsft", "gsft"):
        cfg = load_config(gan_config(root, main_priors, val_priors, variant=variant, epochs=2, depth=1))
        ckpts[variant] = run_gan_stage(cfg, log=lambda _m: None)["last"]  # "last" holds both epochs
    config = root / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "priors": str(main_priors), "lsft": ckpts["lsft"], "gsft": ckpts["gsft"], "num": COUNT,
        "batch_size": 4, "device": "cpu", "steps": 4, "road_num": 2,
        "generalisation": [{"name": "other", "priors": str(other)}, {"name": "three", "priors": str(wrong_n)},
                           {"name": "absent", "priors": str(root / "npys" / "absent-test.npy")}]}))
    return {"root": root, "config": config, "priors": main_priors}


@pytest.fixture(scope="module")
def report(tiny) -> dict:
    out = tiny["root"] / "report"
    t0 = time.time()
    assert main(["--config", str(tiny["config"]), "--out", str(out)]) == 0
    return {"out": out, "seconds": time.time() - t0, "metrics": json.loads((out / "metrics.json").read_text())}


def _finite(x) -> bool:
    """Every number in a (nested) table is finite; strings (a margin's `over`) are skipped."""
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    return isinstance(x, str) or (x is not None and math.isfinite(x))


def _intervals(row: dict) -> dict[str, tuple[float, float, float]]:
    """key -> (mean, lo, hi) for every key of a metrics.json row that has its `<key>_ci95`."""
    return {k[:-5]: (row[k[:-5]], *v) for k, v in row.items() if k.endswith("_ci95")}


def _bracketed(mean: float, lo: float, hi: float) -> bool:
    return lo - 1e-9 <= mean <= hi + 1e-9


BRACKET = re.compile(r"^\**-?\d+(\.\d+)?(e-?\d+)?\** \[-?\d+(\.\d+)?(e-?\d+)?, -?\d+(\.\d+)?(e-?\d+)?\]$")


def _section_tables(md: str, heading: str) -> list[list[list[str]]]:
    """The tables (rows of cells, header first, separator left out) of the report section under `heading`."""
    lines = md.split(heading, 1)[1].split("\n## ", 1)[0].splitlines()
    tables: list[list[list[str]]] = []
    previous = False
    for line in lines:
        if line.startswith("|"):
            if not previous:
                tables.append([])
            if not line.startswith("|--") and not line.startswith("|---"):
                tables[-1].append([c.strip() for c in line.strip().strip("|").split(" | ")])
        previous = line.startswith("|")
    return tables


def test_end_to_end_tables_filled(report, tiny):
    m = report["metrics"]
    assert m["images"] == COUNT
    assert list(m["fidelity"]) == ["LSFT", "GSFT", "C0", "C1", "C2", "C3", "mean of priors", m_intensity(m)]
    smoothed = [f"target (stored Grad-CAM) σ={s}px" for s in (2, 4, 8)]  # matched smoothing
    assert list(m["faithfulness"]) == ["LSFT", "GSFT", "Grad-CAM", "Grad-CAM++", "LayerCAM",
                                       "target (stored Grad-CAM)", "random", *smoothed]
    # the blurred-noise map is no chance level for the pointing game: a uniform random point is
    assert list(m["localisation"]) == [k for k in m["faithfulness"] if k != "random"] + [
        "chance (uniform random point)"]
    for section in ("fidelity", "faithfulness", "localisation"):
        assert _finite(m[section]), section
    d = read_priors(tiny["priors"]).tensors()
    assert bool((d["target"].flatten(1).std(1) > 0.05).all())  # real target maps, not empty ones: scores mean something
    # numbers, not just presence: the mean-of-priors row against a direct computation
    chance = float(d["mask"].mean())  # the stored masks' area fraction
    row = m["localisation"]["chance (uniform random point)"]
    assert row["pointing_game"] == pytest.approx(chance) and row["energy_pointing_game"] == pytest.approx(chance)
    assert row["pointing_game_ci95"] == row["energy_pointing_game_ci95"]  # one per-image vector, one seed
    mean = d["priors"].mean(1, keepdim=True)
    assert m["fidelity"]["mean of priors"]["l1"] == pytest.approx(float(metrics.l1(mean, d["target"]).mean()), abs=1e-6)
    assert m["fidelity"]["C0"]["r"] == pytest.approx(float(metrics.pearson(d["priors"][:, :1], d["target"]).mean()),
                                                     abs=1e-6)
    for row in m["faithfulness"].values():
        assert 0 <= row["increase_in_confidence"] <= 100 and row["average_drop"] >= 0
        assert 0 <= row["deletion_auc"] <= 1 and 0 <= row["insertion_auc"] <= 1
    for row in m["localisation"].values():
        assert 0 <= row["pointing_game"] <= 1 and 0 <= row["energy_pointing_game"] <= 1
    assert len(m["road_images"]) == 2
    for variant in ("LSFT", "GSFT"):
        rel = m["relevance"][variant]
        # the target is layer4.1's output, so its block is left out: C0 is the downsample conv of layer4.0
        assert rel["labels"][0] == "C0: 1 layer, …0.downsample.0"
        assert len(rel["labels"]) == N and rel["labels"][1].startswith("C1: ")
        assert all(v >= 0 and math.isfinite(v) for v in rel["zeros"] + rel["mean"])
        assert len(m["gans"][variant]["history"]) == 2
    assert set(m["winners"]) == {"fidelity", "faithfulness", "localisation"}
    assert set(m["runtime_s"]) >= {"load", "fidelity", "faithfulness", "localisation", "interpretation",
                                   "generalisation", "report", "total"}


def m_intensity(m: dict) -> str:
    name = [k for k in m["fidelity"] if k.startswith("intensity")]
    assert len(name) == 1
    return name[0]


def test_end_to_end_generalisation_skips_with_reasons(report):
    sets = {e["name"]: e for e in report["metrics"]["generalisation"]}
    assert sets["other"]["status"] == "ok" and sets["other"]["images"] == 6
    assert set(sets["other"]["results"]) == {"LSFT", "GSFT", "mean of priors"}
    assert _finite(sets["other"]["results"])
    assert sets["three"]["status"] == "skipped" and "n=3" in sets["three"]["reason"]
    assert sets["absent"]["status"] == "skipped" and "not found" in sets["absent"]["reason"]


def test_end_to_end_report_files(report):
    out = report["out"]
    charts = ["relevance-lsft.png", "relevance-gsft.png", "curve-lsft.png", "curve-gsft.png"]
    for name in charts:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = (out / "report.md").read_text()
    for heading in ("## 1. Fidelity", "## 2. Faithfulness", "## 3. Localisation", "## 4. GAN interpretation",
                    "## 5. Generalisation", "## 6. Training curves", "## Winners", "## Runtime", "## Notes",
                    "## Definitions"):
        assert heading in md, heading
    assert "ROAD on a seeded random subset of **2 of 8 images**" in md
    assert "absent (`" in md and "file not found" in md
    # the best L1 of the fidelity table is bold in its row
    m = report["metrics"]
    best = min(m["fidelity"], key=lambda k: m["fidelity"][k]["l1"])
    lo, hi = m["fidelity"][best]["l1_ci95"]
    assert f"**{m['fidelity'][best]['l1']:.3f}** [{lo:.3f}, {hi:.3f}]" in next(line for line in md.splitlines()
                                                                              if line.startswith(f"| {best} |"))
    page = (out / "report.html").read_text()
    assert f'class="num best"><strong>{m["fidelity"][best]["l1"]:.3f}</strong> [{lo:.3f}, {hi:.3f}]</td>' in page
    assert page.count('src="data:image/png;base64,') == len(charts) and "src=\"relevance" not in page
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def _fidelity_row_of(baseline: str, m: dict) -> str:
    """The fidelity row of a baseline label ('best single prior (C1, val)', 'mean of the priors', 'image …')."""
    if baseline.startswith("best single prior"):
        return re.search(r"\((C\d+), val\)", baseline).group(1)
    return "mean of priors" if baseline.startswith("mean of the priors") else m_intensity(m)


def test_end_to_end_every_mean_has_its_interval(report, tiny):
    """metrics.json: every mean of the older sections has `<key>_ci95` = [lo, hi] around it, and each GAN row a
    `margin` whose mean is the difference of the two rows' means."""
    m = report["metrics"]
    keys = {"fidelity": {"l1", "r", "ssim"},
            "faithfulness": {"average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc",
                             "road_combined"},
            "localisation": {"pointing_game", "energy_pointing_game"}}
    for section, want in keys.items():
        for name, row in m[section].items():
            iv = _intervals(row)
            assert set(iv) == want, (section, name)
            assert all(_bracketed(*v) for v in iv.values()), (section, name, iv)
    # the interval of one row, recomputed from its per-image values with the same (default) seed
    d = read_priors(tiny["priors"]).tensors()
    r = metrics.pearson(d["priors"].mean(1, keepdim=True), d["target"])
    assert m["fidelity"]["mean of priors"]["r_ci95"] == pytest.approx(list(metrics.bootstrap_ci(r)), abs=1e-12)

    for gan in ("LSFT", "GSFT"):
        mg = m["fidelity"][gan]["margin"]  # over the baseline chosen on the val file (stored in the checkpoint)
        base = _fidelity_row_of(mg["over"], m)
        for key in keys["fidelity"]:
            assert mg[key] == pytest.approx(m["fidelity"][gan][key] - m["fidelity"][base][key], abs=1e-9)
            assert _bracketed(mg[key], *mg[f"{key}_ci95"])
        for section in ("faithfulness", "localisation"):  # GAN minus the stored target, paired per image
            mg = m[section][gan]["margin"]
            assert mg["over"] == "target (stored Grad-CAM)"
            for key in keys[section]:
                want = m[section][gan][key] - m[section][mg["over"]][key]
                assert mg[key] == pytest.approx(want, rel=1e-9, abs=1e-9), (section, key)
                assert _bracketed(mg[key], *mg[f"{key}_ci95"])
        rel = m["relevance"][gan]
        for neutral in ("zeros", "mean"):
            assert len(rel[f"{neutral}_ci95"]) == N
            assert all(_bracketed(v, lo, hi) for v, (lo, hi) in zip(rel[neutral], rel[f"{neutral}_ci95"], strict=True))
    other = next(e for e in m["generalisation"] if e["name"] == "other")["results"]
    for row in other.values():
        assert set(_intervals(row)) == keys["fidelity"] and all(_bracketed(*v) for v in _intervals(row).values())
    for gan in ("LSFT", "GSFT"):
        mg = other[gan]["margin"]
        assert mg["over"] == "mean of priors"
        assert mg["r"] == pytest.approx(other[gan]["r"] - other["mean of priors"]["r"], abs=1e-9)
    assert "margin" not in other["mean of priors"] and "margin" not in m["fidelity"]["C0"]


def test_end_to_end_tables_show_intervals(report):
    """report.md: every mean and margin cell of the older sections reads 'mean [lo, hi]'; each caption states N."""
    md = (report["out"] / "report.md").read_text()
    # per section: (table index, leading label columns) of each table whose cells are means or margins
    tables = {"## 1. Fidelity": [(0, 1), (1, 2)], "## 2. Faithfulness": [(0, 1), (1, 2)],
              "## 3. Localisation": [(0, 1), (1, 2)], "## 4. GAN interpretation": [(1, 1)],
              "## 5. Generalisation": [(0, 5), (1, 6)]}
    for heading, which in tables.items():
        found = _section_tables(md, heading)
        text = md.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "N = " in text and "95 %" in text, heading
        assert len(found) == max(t for t, _ in which) + 1, heading
        for t, labels in which:
            header, *rows = found[t]
            assert rows, (heading, t)
            for row in rows:
                assert len(row) == len(header) and len(row) > labels, (heading, row)
                for cell in row[labels:]:
                    assert BRACKET.match(cell), (heading, t, cell)
    faith = _section_tables(md, "## 2. Faithfulness")
    assert faith[1][0][:3] == ["GAN", "minus", "Δ Average Drop % ↓"]
    assert [row[:2] for row in faith[1][1:]] == [["LSFT", "target (stored Grad-CAM)"],
                                                 ["GSFT", "target (stored Grad-CAM)"]]


def test_existing_out_is_refused(report, tiny, capsys):
    assert main(["--config", str(tiny["config"]), "--out", str(report["out"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err


def test_paired_margin_interval_hand_checked():
    a = np.random.default_rng(0).normal(0.6, 0.2, 50)
    # a constant per-image difference d has the interval [d, d], however spread the scores themselves are
    s = paired_ci(a, a - 0.25)
    assert s["n"] == 50 and s["mean"] == pytest.approx(0.25) and (s["lo"], s["hi"]) == pytest.approx((0.25, 0.25))
    assert mean_ci(a)["hi"] - mean_ci(a)["lo"] > 0.08  # while the unpaired interval of a alone is wide
    # [0, 1] against zeros: the differences are [0, 1] -> mean 0.5 in [0, 1] (see test_metrics' hand-checked case)
    assert paired_ci([0.0, 1.0], [0.0, 0.0]) == {"mean": 0.5, "lo": 0.0, "hi": 1.0, "n": 2}
    # a pair with a non-finite side is left out; tensors and lists alike; lengths must match
    assert paired_ci(torch.tensor([1.0, math.nan, 3.0]), [0.5, 0.0, math.nan]) == {"mean": 0.5, "lo": 0.5,
                                                                                    "hi": 0.5, "n": 1}
    with pytest.raises(ValueError, match="differ in length"):
        paired_ci([1.0, 2.0], [1.0])


def test_ci_and_margin_rows():
    assert ci_row({"x": [0.0, 1.0], "y": [0.25, 0.25]}) == {"x": 0.5, "x_ci95": [0.0, 1.0], "y": 0.25,
                                                            "y_ci95": [0.25, 0.25]}
    empty = ci_row({"road": torch.zeros(0)})  # ROAD skipped: no value, no interval
    assert math.isnan(empty["road"]) and all(math.isnan(x) for x in empty["road_ci95"])
    row = margin_row({"r": [0.9, 0.8], "l1": [0.1, 0.2]}, {"r": [0.7, 0.6], "l1": [0.3, 0.3], "extra": [1.0, 1.0]},
                     "C1")
    assert row["over"] == "C1" and set(row) == {"over", "r", "r_ci95", "l1", "l1_ci95"}
    assert row["r"] == pytest.approx(0.2) and row["r_ci95"] == pytest.approx([0.2, 0.2])
    assert row["l1"] == pytest.approx(-0.15) and row["l1_ci95"] == pytest.approx([-0.2, -0.1])


def test_table_cells_with_intervals_bold_the_best_mean(tmp_path):
    data = {"a": {"l1": 0.2, "l1_ci95": [0.15, 0.25], "r": 0.5}, "b": {"l1": 0.1, "l1_ci95": [0.05, 0.1499]},
            "c": {"l1": math.nan, "l1_ci95": [math.nan, math.nan]}}
    data["b"]["r"], data["c"]["r"] = 0.7, 0.6
    t = Table.of_metrics("method", data, (("l1", "L1 ↓", "min", ".2f"), ("r", "r ↑", "max", ".3f")))
    assert t.rows[0][1] == Estimate(0.2, 0.15, 0.25) and t.rows[0][2] == 0.5  # no `r_ci95`: a plain value
    assert [t.text(r, 1) for r in range(3)] == ["0.20 [0.15, 0.25]", "0.10 [0.05, 0.15]", "–"]
    assert t.winners() == {"L1 ↓": ["b"], "r ↑": ["b"]}
    rep = Report("x")
    rep.table(t)
    md = rep.markdown()
    assert "| b | **0.10** [0.05, 0.15] | **0.700** |" in md and "| c | – | 0.600 |" in md and "|---|---:|---:|" in md
    assert '<td class="num best"><strong>0.10</strong> [0.05, 0.15]</td>' in rep.html(tmp_path)
    # an interval from metrics.json (None where there was no value) and a mean without one
    assert Estimate.of({"r": 0.5, "r_ci95": [None, None]}, "r").parts(".3f") == ("0.500", "")
    assert Estimate.of({"r": 0.5}, "r") == 0.5


def test_drop_and_increase_per_image_average_to_the_metrics():
    p_orig = torch.tensor([0.8, 0.5, 0.0, 0.4])
    p_expl = torch.tensor([0.6, 0.7, 0.1, 0.4])
    drop, increase = drop_and_increase(p_orig, p_expl)
    # drops 0.2/0.8 = 25 %, none (increase), 0 where p_orig = 0, none (equal); increases: only images 1 and 2
    torch.testing.assert_close(drop, torch.tensor([25.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(increase, torch.tensor([0.0, 100.0, 100.0, 0.0]))
    assert float(drop.mean()) == pytest.approx(metrics.average_drop(p_orig, p_expl))
    assert float(increase.mean()) == pytest.approx(metrics.increase_in_confidence(p_orig, p_expl))


def _stub_ignoring(k_ignored: int, n: int):
    keep = [k for k in range(n) if k != k_ignored]
    return lambda image, priors: priors[:, keep].sum(1, keepdim=True) / n


def test_relevance_of_an_ignored_prior_is_zero():
    g = torch.Generator().manual_seed(0)
    image, priors = torch.rand(5, 3, 12, 12, generator=g), torch.rand(5, 4, 12, 12, generator=g)
    rel = prior_relevance(_stub_ignoring(2, 4), image, priors, batch_size=2, device=torch.device("cpu"))
    assert rel["zeros"][2] == 0 and rel["mean"][2] == 0
    # G = (P0 + P1 + P3) / 4 is linear: replacing P_k by v changes it by |P_k - v| / 4
    assert rel["zeros_ci95"][2] == [0, 0] and rel["mean_ci95"][2] == [0, 0]
    for k in (0, 1, 3):
        assert rel["zeros"][k] == pytest.approx(float(priors[:, k].mean()) / 4, rel=1e-6)
        assert rel["mean"][k] == pytest.approx(float((priors[:, k] - priors[:, k].mean(0)).abs().mean()) / 4, rel=1e-6)
        # the interval is over the images: of each image's mean |change| = its prior's pixel mean / 4
        per_image = priors[:, k].double().flatten(1).mean(1) / 4
        assert rel["zeros_ci95"][k] == pytest.approx(list(metrics.bootstrap_ci(per_image)), rel=1e-6)


def test_relevance_zero_for_lsft_block_cut_off_from_its_prior():
    torch.manual_seed(0)
    g = build_generator("lsft", 4, 8, 1, 8, 8).eval()
    block = next(b for b in g.blocks if isinstance(b, SFTResBlock) and b.cond_index == 1)
    with torch.no_grad():  # scale and shift become their biases: block 1 no longer sees condition 1
        for sft in (block.sft1, block.sft2):
            sft.scale[2].weight.zero_()
            sft.shift[2].weight.zero_()
    image, priors = torch.rand(3, 3, 16, 16), torch.rand(3, 4, 16, 16)
    rel = prior_relevance(g, image, priors, batch_size=2, device=torch.device("cpu"))
    assert rel["zeros"][1] == 0 and rel["mean"][1] == 0
    assert min(rel["zeros"][k] for k in (0, 2, 3)) > 0


def test_random_maps_seeded_smooth_in_range():
    a, b = random_maps(3, 16, seed=5), random_maps(3, 16, seed=5)
    assert torch.equal(a, b) and a.shape == (3, 1, 16, 16)
    assert float(a.amin()) == 0 and float(a.amax()) == pytest.approx(1.0)
    raw = torch.rand(3, 1, 16, 16)
    assert (a.diff(dim=-1).abs().mean() < raw.diff(dim=-1).abs().mean())


def test_prior_labels_shorten_layer_names():
    meta = {"layers": ["net.features.0.0", "net.features.17.conv.0.0", "net.features.17.conv.1.0", "net.features.18.0"],
            "prior_layers": [["net.features.17.conv.1.0"],
                             ["net.features.17.conv.1.0", "net.features.17.conv.0.0", "net.features.0.0"]]}
    assert prior_labels(meta, 3) == ["C0: 1 layer, features.17.conv.1.0",
                                               "C1: 3 layers, features.17.conv.1.0…features.0.0", "C2"]
    assert prior_labels({"prior_layers": [["a.very.long.module.name.conv1"]]}, 1) == [
        "C0: 1 layer, …module.name.conv1"]


def _run_cli(tmp_path: Path, capsys, data: dict, *extra: str) -> tuple[int, str]:
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(data))
    rc = main(["--config", str(path), "--out", str(tmp_path / "never"), *extra])
    return rc, capsys.readouterr().err.strip()


def test_config_errors_are_one_line_exit_2(tiny, tmp_path, capsys):
    good = {"name": "t", "priors": str(tiny["priors"])}
    cases = [
        ({**good, "stepz": 3}, (), "unknown key 'stepz' (did you mean 'steps'?)"),
        ({"name": "t", "priors": str(tmp_path / "missing.npy")}, (), "prior file not found"),
        ({"name": "t"}, (), "key 'priors' is required"),
        ({**good, "lsft": str(tmp_path / "nope.pt")}, (), "LSFT checkpoint not found"),
        ({**good, "gsft": None, "num": "many"}, (), "key 'num': expected an integer"),
        ({**good, "generalisation": [{"name": "x", "prior": "a.npy"}]}, (), "unknown key 'generalisation[0].prior'"),
        (good, ("--set", "steps=0"), "below the minimum 1"),
        (good, ("--set", "a.b=1"), "evaluation keys are flat"),
        ({**good, "sections": ["generalization"]}, (), "'generalization' is not one of faithfulness, localisation"),
        ({**good, "sections": {"a": 1}}, (), "key 'sections': expected a list of strings"),
        (good, ("--set", "sections=faithfulness,relevanse"), "(did you mean 'relevance'?); fidelity always runs"),
    ]
    for data, extra, message in cases:
        rc, err = _run_cli(tmp_path, capsys, data, *extra)
        assert rc == 2 and len(err.splitlines()) == 1 and message in err, (message, err)
    assert not (tmp_path / "never").exists()


def test_gan_that_does_not_fit_the_prior_file_is_a_user_error(tiny, tmp_path, capsys):
    data = yaml.safe_load(tiny["config"].read_text())
    rc, err = _run_cli(tmp_path, capsys, {**data, "priors": str(tiny["root"] / "npys" / "n3-test.npy"),
                                          "generalisation": []})
    assert rc == 2 and "n=4 priors but" in err and len(err.splitlines()) == 1


def test_intensity_baseline_uses_the_validation_sign():
    image = torch.rand(2, 3, 12, 12)
    gray = (0.299 * image[:, 0] + 0.587 * image[:, 1] + 0.114 * image[:, 2]).unsqueeze(1)
    inverted = BaselineChoice(0, True, "image", "val.npy", {})
    ((name, maps),) = intensity_rows(image, inverted).items()
    assert name == "intensity (1 - gray, val)" and torch.allclose(maps, 1 - gray)
    assert np.isclose(float(metrics.pearson(maps, 1 - gray).mean()), 1.0)
    assert list(intensity_rows(image, None)) == ["intensity (gray)", "intensity (1 - gray)"]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("eval_*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path, tiny):
    """Only known keys and valid values; the files they name are swapped for the tiny ones."""
    data = yaml.safe_load(tiny["config"].read_text())
    raw = yaml.safe_load(path.read_text())
    swaps = [f"{key}={data['gsft'] if 'gsft' in key else data['lsft']}" for key in generator_keys() if raw.get(key)]
    if raw.get("generators"):  # labels kept, files swapped (these generators are made by commands, not shipped)
        swaps.append("generators=" + json.dumps({label: data["lsft"] for label in raw["generators"]}))
    cnn = tiny["root"] / "models" / "tiny-cnn.pt"  # data-randomisation CNNs are made by commands, not shipped
    swaps += [f"datarand.{key}={cnn}" for key in ("cnn", "cnns") if (raw.get("datarand") or {}).get(key)]
    cfg = load_eval_config(path, [f"priors={tiny['priors']}", f"lsft={data['lsft']}", f"gsft={data['gsft']}", *swaps])
    assert list(cfg.generators) == list(raw.get("generators") or {})
    assert cfg.num == 256 and cfg.cnn == "" and cfg.steps >= 8 and cfg.road_num >= 8
    assert all(s.name and s.priors.startswith("npys/") for s in cfg.generalisation)


def test_no_masks_no_gans_no_road(tiny, tmp_path):
    """Baselines alone on a maskless file: localisation and ROAD are skipped, and the report says so."""
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"name": "plain", "priors": str(tiny["root"] / "npys" / "other-test.npy"),
                                    "device": "cpu", "steps": 2, "road_num": 0, "batch_size": 8}))
    out = tmp_path / "report"
    assert main(["--config", str(path), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["localisation"] is None and m["relevance"] == {} and m["images"] == 6
    assert all(row["road_combined"] is None for row in m["faithfulness"].values())
    assert list(m["faithfulness"])[:5] == ["Grad-CAM", "Grad-CAM++", "LayerCAM", "target (stored Grad-CAM)", "random"]
    assert len(m["faithfulness"]) == 8 and "insertion_auc_blurred" not in m["faithfulness"]["random"]
    md = (out / "report.md").read_text()
    assert "ROAD skipped (road_num: 0)" in md and "localisation skipped" in md and "no lsft checkpoint" in md


def test_sections_subset_runs_only_what_was_asked(tiny, tmp_path, report):
    """`sections: [generalisation]`: fidelity + the cross-file table, no CAM baselines, ROAD or relevance."""
    data = yaml.safe_load(tiny["config"].read_text())
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump({**data, "sections": ["generalisation"]}))
    out = tmp_path / "report"
    assert main(["--config", str(path), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["faithfulness"] == {} and m["localisation"] is None and m["relevance"] == {}
    assert m["road_images"] == [] and m["sections_run"] == ["fidelity", "generalisation"]
    assert {"fidelity", "generalisation"} <= set(m["runtime_s"])
    assert not {"faithfulness", "interpretation"} & set(m["runtime_s"])
    assert {"LSFT", "GSFT"} <= set(m["fidelity"]) and _finite(m["fidelity"])
    assert m["fidelity"] == report["metrics"]["fidelity"]  # means, intervals and margins: deterministic
    other = next(e for e in m["generalisation"] if e["name"] == "other")
    assert other["status"] == "ok" and {"LSFT", "GSFT", "mean of priors"} <= set(other["results"])
    md = (out / "report.md").read_text()
    assert md.count("Not run (`sections`).") == 3
    assert "sections not run: faithfulness, localisation, relevance" in md
    assert "Faithfulness to the CNN" in md and "| Grad-CAM |" not in md


def test_generalisation_matrix_and_best_single_prior_chosen_on_other_files(tiny, tmp_path, report):
    """`select`: the best single prior of a file is the prior index with the highest mean r on the listed val files
    (by hand here); each generator's margin over it is paired per image; the matrix has one column per file."""
    from cnnprior.evaluate.sections.fidelity import fidelity_per_image
    from cnnprior.evaluate.sections.generalisation import best_single_prior
    from cnnprior.priors.read import read_priors
    val = str(tiny["root"] / "npys" / "tiny-val.npy")
    d = read_priors(val).tensors()
    by_hand = [float(fidelity_per_image(d["priors"][:, k:k + 1], d["target"])["r"].nan_to_num(0.0).mean())
               for k in range(d["priors"].shape[1])]
    best = best_single_prior([val], 0)
    assert best["index"] == int(np.argmax(by_hand)) and np.allclose(best["val_r"], by_hand, atol=1e-6)
    with pytest.raises(UserError, match="is a test-split prior file"):
        best_single_prior([str(tiny["priors"])], 0)
    data = yaml.safe_load(tiny["config"].read_text())
    data["generalisation"] = [{"name": "main", "priors": str(tiny["priors"]), "select": [val]},
                              {"name": "other", "priors": data["generalisation"][0]["priors"], "select": [val],
                               "held_out": "LSFT again", "in_domain": "LSFT", "universal": "GSFT"}]
    data["generators"] = {"LSFT again": data["lsft"]}  # scored in this section only, under its label
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**data, "sections": ["generalisation"]}))
    assert main(["--config", str(path), "--out", str(tmp_path / "r")]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    other = next(e for e in m["generalisation"] if e["name"] == "other")
    assert other["best_prior"]["index"] == best["index"] and other["best_prior"]["chosen_on"] == [val]
    o = read_priors(other["priors"]).tensors()
    single = fidelity_per_image(o["priors"][:, best["index"]:best["index"] + 1], o["target"])["r"]
    assert other["best_prior"]["r"] == pytest.approx(float(single.mean()), abs=1e-5)
    lsft = other["results"]["LSFT"]
    assert lsft["margin_best"]["over"] == f"C{best['index']}"
    assert lsft["margin_best"]["r"] == pytest.approx(lsft["r"] - other["best_prior"]["r"], abs=1e-5)
    assert other["results"]["LSFT again"] == other["results"]["LSFT"]  # the same checkpoint, the same numbers
    checks = {v["check"]: v for v in other["verdicts"]}
    assert checks["held-out − in-domain"]["r"] == 0 and checks["held-out − in-domain"]["pass"]  # same model
    assert checks["held-out − best single prior"]["r"] == pytest.approx(lsft["margin_best"]["r"], abs=1e-6)
    assert checks["held-out − best single prior"]["pass"] == (lsft["margin_best"]["r"] >= 0.05)
    gap = other["results"]["GSFT"]["r"] - other["results"]["LSFT"]["r"]
    assert checks["universal − in-domain"]["r"] == pytest.approx(gap, abs=1e-5)
    assert checks["universal − in-domain"]["pass"] == (gap >= -0.02)
    assert next(e for e in m["generalisation"] if e["name"] == "main")["verdicts"] == []  # no labels, no checks
    assert set(m["fidelity"]) == set(report["metrics"]["fidelity"])  # ... and no other section sees it
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| generator | main | other |" in md and "| LSFT again |" in md
    assert "| other | held-out − in-domain | LSFT again − LSFT |" in md and "best single prior (chosen on select)" in md
    assert f"other: C{best['index']} (on 1 val file(s))" in md


def test_generators_mapping_is_checked(tiny, tmp_path):
    data = yaml.safe_load(tiny["config"].read_text())
    for value, message in (({"x": str(tmp_path / "none.pt")}, r"key 'generators': 'x': .*none.pt: generator "
                                                                 r"checkpoint not found"),
                           (["a.pt"], r"'generators': expected a mapping of label to generator checkpoint")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**data, "generators": value}))
        with pytest.raises(UserError, match=message):
            load_eval_config(path)


def test_sections_parsing():
    # `sections:` left blank = every default section
    assert parse_sections(None, "x") == ["faithfulness", "localisation", "relevance", "generalisation"]
    assert parse_sections("relevance, generalisation", "x") == ["relevance", "generalisation"]
    assert parse_sections("", "x") == [] and parse_sections([], "x") == []  # fidelity only
    assert parse_sections(["relevance", "relevance"], "x") == ["relevance"]


def test_module_entry_point_user_error(run_py, one_line_error, tmp_path):
    """`python -m cnnprior.evaluate` as a user runs it: a missing prior file is one line, exit 2."""
    path = tmp_path / "eval.yaml"
    path.write_text("name: x\npriors: npys/does-not-exist-test.npy\n")
    line = one_line_error(run_py("-m", "cnnprior.evaluate", "--config", path, "--num", "4"))
    assert "key 'priors'" in line and "prior file not found" in line
