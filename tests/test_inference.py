"""Tests for cnnprior.explain.inference and the lsft/gsft_inference.py scripts: run folders, metrics, --images, errors."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnprior.cnn.layers import conv_layers
from cnnprior.cnn.model import build_cnn, load_cnn, save_cnn
from cnnprior.core.config import load_config
from cnnprior.core.runtime import atomic_torch_save
from cnnprior.data.sources.base import read_image, resize_uint8
from cnnprior.explain import inference, scores
from cnnprior.gan.checkpoint import GAN_FORMAT, load_generator
from cnnprior.gan.data import priors_meta
from cnnprior.gan.models import build_generator
from cnnprior.gan.train import run_gan_stage
from cnnprior.maps.baselines import choose
from cnnprior.maps.metrics import fidelity
from cnnprior.present import viz
from cnnprior.present.viz import colorize
from cnnprior.priors.extract import PriorExtractor, extractor_from
from cnnprior.priors.priorfile import to_u8
from cnnprior.priors.read import read_priors
from cnnprior.priors.spec import PriorSpec
from tests.helpers import REPO, gan_config, subprocess_env, write_priors

COUNT = 12
CLASSES = ["circle", "square"]
STEM = re.compile(r"^\d{4}_(circle|square)\.png$")


def save_generator(path: Path, variant: str, pmeta: dict, seed: int = 0) -> Path:
    """A tiny untrained generator checkpoint with the entries gan/train.py's checkpoints carry for inference."""
    torch.manual_seed(seed)
    g = build_generator(variant, int(pmeta["n"]), 8, 1, 8, 8)
    return atomic_torch_save({"format": GAN_FORMAT, "variant": variant, "generator_config": g.config(),
                              "generator": {k: v.detach().clone() for k, v in g.state_dict().items()},
                              "epoch": 1, "step": 2, "config": {"gan": {"variant": variant}}, "priors_meta": pmeta,
                              "metrics": {"l1": 0.1, "r": 0.5, "ssim": 0.3}, "history": []}, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Tiny prior files (S=16, n=4), lsft/gsft checkpoints, a CNN with a matching generator, an image folder."""
    root = tmp_path_factory.mktemp("inference")
    pri = write_priors(root / "npys" / "tiny-test.npy", COUNT, seed=3, split="test")
    pf = read_priors(pri)
    val = write_priors(root / "npys" / "tiny-val.npy", COUNT, seed=5, split="val")
    vt = read_priors(val).tensors()
    pm = priors_meta(pf, [str(pri)])
    pm["baselines"] = choose(vt["image"], vt["priors"], vt["target"], chosen_on=str(val)).as_dict()
    ckpt = {v: save_generator(root / "models" / f"tiny-{v}.pt", v, pm) for v in ("lsft", "gsft")}
    other_n = write_priors(root / "npys" / "n3.npy", 4, seed=4, n=3)
    other_s = write_priors(root / "npys" / "s12.npy", 4, seed=4, size=12)

    torch.manual_seed(0)
    cnn = build_cnn("resnet18", CLASSES, image_size=32)
    cnn_path = save_cnn(cnn, root / "models" / "tiny-cnn.pt", val_accuracy=0.5, epoch=0, config={}, dataset="shapes")
    spec = PriorSpec(size=16, n=4)
    described = extractor_from(cnn, spec).describe()
    img_pm = {**pm, **spec.as_dict(), "cnn_arch": "resnet18", "layers": described["layers"],
              "target_layer": described["target_layer"], "prior_layers": described["prior_layers"]}
    img_ckpt = save_generator(root / "models" / "img-lsft.pt", "lsft", img_pm)

    imgs = root / "images"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(imgs / "a_rgb.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(imgs / "b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L").save(imgs / "c_gray.png")
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(imgs / "d16.png")  # I;16
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(imgs / "sub" / "e_rgba.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (imgs / "notes.txt").write_text("not an image, and not an image extension")
    empty = root / "no_images"
    empty.mkdir()
    (empty / "bad.jpg").write_bytes(b"garbage")
    return {"root": root, "priors": pri, "val": val, "pf": pf, "ckpt": ckpt, "n3": other_n, "s12": other_s, "cnn": cnn_path,
            "img_ckpt": img_ckpt, "images": imgs, "no_images": empty, "pm": pm}


def run_main(argv: list[str], variant: str = "lsft") -> int:
    return inference.main([str(a) for a in argv], variant=variant)


def run_folders(outputs: Path) -> list[Path]:
    return sorted(p for p in outputs.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def tree_digest(folder: Path) -> dict[str, tuple[float, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- prior-file runs
def test_prior_file_run_writes_folders_and_scores(world, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_main(["--checkpoint", world["ckpt"]["lsft"], "--priors", world["priors"], "--batch-size", 5]) == 0
    (run,) = run_folders(tmp_path / "outputs")
    assert re.fullmatch(r"lsft-shapes-\d{8}-\d{6}", run.name)
    assert not [p for p in (tmp_path / "outputs").iterdir() if p.name.startswith(".")]  # no .partial left
    stems = [sorted(p.name for p in (run / sub).iterdir()) for sub in inference.SUBDIRS]
    assert all(s == stems[0] for s in stems) and len(stems[0]) == COUNT
    assert all(STEM.match(s) for s in stems[0])
    for name in ("sheet.png", "index.html", "metrics.json"):
        assert (run / name).is_file()

    m = json.loads((run / "metrics.json").read_text())
    assert m["count"] == COUNT and len(m["per_image"]) == COUNT and (m["size"], m["n"]) == (16, 4)
    methods = ["gan", *(f"{b}{r}" for b in ("best_prior", "mean_prior", "image") for r in ("", "_rescaled"))]
    assert sorted(m["mean"]) == sorted(methods) and sorted(m["labels"]) == sorted(methods)
    for method in methods:
        assert set(scores.SCORES) <= set(m["mean"][method]) and len(m["mean"][method]["r_ci95"]) == 2
        lo, hi = m["mean"][method]["r_ci95"]
        assert lo <= m["mean"][method]["r"] <= hi
    choice = world["pm"]["baselines"]
    assert m["baselines"]["best_prior_index"] == choice["best_prior"]  # chosen on the val file, not re-chosen here
    assert m["baselines"]["image_inverted"] == choice["image_inverted"] and str(world["val"]) in m["baselines"]["choice"]
    assert m["margin"]["over"] == choice["best_baseline"]
    diff = [e["gan"]["r"] - e[choice["best_baseline"]]["r"] for e in m["per_image"]]
    assert m["margin"]["r"] == pytest.approx(np.mean(diff), abs=1e-5)

    # Numbers against a direct computation.
    pf = world["pf"]
    t = pf.tensors()
    gen, _ = load_generator(world["ckpt"]["lsft"], "lsft")
    with torch.no_grad():
        pred = gen(t["image"], t["priors"])
    direct = fidelity(pred, t["target"])
    gan_r = [e["gan"]["r"] for e in m["per_image"]]
    assert np.allclose(gan_r, direct["r"].numpy(), atol=1e-5)
    assert m["mean"]["gan"]["l1"] == pytest.approx(direct["l1"].mean().item(), abs=1e-5)
    mean_prior = fidelity(t["priors"].mean(1), t["target"][:, 0])
    assert m["mean"]["mean_prior"]["r"] == pytest.approx(mean_prior["r"].mean().item(), abs=1e-5)
    assert m["mean"]["mean_prior"]["r"] > 0.99  # the tiny target IS the mean of the priors (up to uint8 rounding)
    per_prior = [fidelity(t["priors"][:, k], t["target"][:, 0])["r"].mean().item() for k in range(4)]
    assert m["mean"]["best_prior"]["r"] == pytest.approx(per_prior[choice["best_prior"]], abs=1e-5)
    assert [p["r"] for p in m["per_prior_mean"]] == pytest.approx(per_prior, abs=1e-5)

    # Pictures: inputs are the records' images, Grad-CAM the coloured target, GAN the coloured output.
    first = sorted((run / "inputs").iterdir())[0].name
    rec = pf.records[0]
    assert first == f"0000_{CLASSES[int(rec['explained'])]}.png"
    assert np.array_equal(read_png(run / "inputs" / first), rec["image"])
    assert np.array_equal(read_png(run / "gradcam" / first), colorize(rec["target"] / 255.0))
    assert np.array_equal(read_png(run / "gan" / first), colorize(pred[0, 0].numpy()))
    html = (run / "index.html").read_text()
    assert hashlib.sha256(Path(world["ckpt"]["lsft"]).read_bytes()).hexdigest() in html
    assert "lsft_inference.py --checkpoint" in html and str(world["priors"]) in html
    out = capsys.readouterr().out
    assert f"outputs/{run.name}" in out and re.search(r"^GAN\s+-?\d\.\d{3}", out, re.M) and "GAN r - " in out


def test_second_run_makes_a_new_folder_and_leaves_the_first_alone(world, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--checkpoint", world["ckpt"]["gsft"], "--priors", world["priors"], "--num", 3, "--quiet"]
    assert run_main(args, "gsft") == 0
    (first,) = run_folders(tmp_path / "outputs")
    before = tree_digest(first)
    assert run_main(args + ["--cmap", "viridis"], "gsft") == 0
    runs = run_folders(tmp_path / "outputs")
    assert len(runs) == 2 and first in runs
    assert tree_digest(first) == before
    assert json.loads((first / "metrics.json").read_text())["count"] == 3


def test_run_folder_names_get_suffixes_and_partials_vanish(tmp_path) -> None:
    (tmp_path / "run").mkdir()
    a = inference.RunFolder("run", None, False, root=str(tmp_path))
    (a.tmp / "x").write_text("a")
    assert a.commit() == tmp_path / "run-2"
    b = inference.RunFolder("run", None, False, root=str(tmp_path))
    assert b.tmp.name.startswith(".run.") and b.tmp.name.endswith(".partial")
    b.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-2"]


def test_out_dir_rules(world, tmp_path) -> None:
    common = ["--checkpoint", world["ckpt"]["lsft"], "--priors", world["priors"], "--quiet"]
    base = common + ["--num", 2]
    out = tmp_path / "given"
    out.mkdir()  # an existing empty folder is fine
    assert run_main(base + ["--out", out]) == 0
    old = json.loads((out / "metrics.json").read_text())
    assert old["count"] == 2
    assert run_main(base + ["--out", out]) == 2  # not empty, no --overwrite
    assert run_main(common + ["--num", 4, "--out", out, "--overwrite"]) == 0
    assert json.loads((out / "metrics.json").read_text())["count"] == 4
    assert len(list((out / "gan").iterdir())) == 4  # replaced, not merged
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    assert run_main(base + ["--out", other, "--overwrite"]) == 2  # not a run folder: never deleted
    assert (other / "precious.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_mid_run_leaves_nothing(world, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)

    def boom(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cnnprior.explain.inference.make_sheet", boom)
    assert run_main(["--checkpoint", world["ckpt"]["lsft"], "--priors", world["priors"], "--quiet"]) == 2
    assert list((tmp_path / "outputs").iterdir()) == []


def test_real_gan_stage_checkpoint_runs(world, tmp_path, monkeypatch) -> None:
    """A checkpoint written by gan/train.py's own training loop (not a mimic of its schema) is accepted."""
    train = write_priors(tmp_path / "npys" / "t-train.npy", 8, seed=1)
    cfg = load_config(gan_config(tmp_path, train, world["val"], epochs=1, variant="gsft"))
    result = run_gan_stage(cfg, log=lambda _m: None)
    monkeypatch.chdir(tmp_path)
    assert run_main(["--checkpoint", result["best"], "--priors", world["priors"], "--quiet"], "gsft") == 0
    (run,) = run_folders(tmp_path / "outputs")
    assert json.loads((run / "metrics.json").read_text())["count"] == COUNT


def test_default_checkpoint_falls_back_to_best(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(inference.UserError, match="train.py --config configs/fashion_resnet18.yaml"):
        inference.resolve_checkpoint(None, "lsft")
    best = tmp_path / "models" / "fashion_resnet18-gsft-best.pt"
    best.parent.mkdir()
    best.write_bytes(b"x")
    assert inference.resolve_checkpoint(None, "gsft") == Path("models/fashion_resnet18-gsft-best.pt")


def test_help_explains_and_examples(capsys) -> None:
    assert run_main(["--help"], "gsft") == 0
    text = capsys.readouterr().out
    for needle in ("--images", "--cnn", "--overwrite", "examples:", "python gsft_inference.py --images",
                   "models/fashion_resnet18-gsft.pt", "metrics.json", "best_prior"):
        assert needle in text


# ----------------------------------------------------------------------------------------- --images
def test_output_stem_keeps_the_input_stem() -> None:
    assert inference.output_stem(7, 4, "Bag") == "0007_Bag"  # prior-file samples: index and class
    assert inference.output_stem(7, 4, "Bag", "photos/my cat (2).JPG") == "0007_my_cat_2_Bag"
    assert inference.output_stem(12345, 5, "x", "/a/b.c/IMG_0042.tar.png") == "12345_IMG_0042.tar_x"
    long = inference.output_stem(0, 4, "x", "/d/" + "y" * 300 + ".png")
    assert long == "0000_" + "y" * inference.STEM_CHARS + "_x"  # file names stay well under 255 bytes
    assert inference.output_stem(1, 4, "x", "/d/....png") == "0001_image_x"  # nothing usable left: a fallback


def test_images_folder_with_odd_modes_and_a_corrupt_file(world, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    titles: list[str] = []
    real_sheet = viz.make_sheet

    def sheet(*args, **kwargs) -> None:
        titles.extend(kwargs["titles"])
        real_sheet(*args, **kwargs)

    monkeypatch.setattr("cnnprior.explain.inference.make_sheet", sheet)
    assert run_main(["--checkpoint", world["img_ckpt"], "--images", world["images"], "--cnn", world["cnn"]]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "broken.png" in warnings[0] and "skipped 1" in warnings[0]
    (run,) = run_folders(tmp_path / "outputs")
    assert run.name.startswith("lsft-images-")
    m = json.loads((run / "metrics.json").read_text())
    assert m["count"] == 5 and m["input"] == "images"
    sources = [Path(e["source"]).name for e in m["per_image"]]
    assert sources == ["a_rgb.png", "b.jpg", "c_gray.png", "d16.png", "e_rgba.png"]  # sorted, recursive
    stems = [sorted(p.name for p in (run / sub).iterdir()) for sub in inference.SUBDIRS]
    assert all(s == stems[0] for s in stems) and len(stems[0]) == 5
    # each output keeps its input's stem: <NNNN>_<stem>_<class>.png, and metrics.json names it
    assert stems[0] == [f"{i:04d}_{Path(src).stem}_{e['class']}.png"
                        for i, (src, e) in enumerate(zip(sources, m["per_image"], strict=True))]
    assert [e["file"] for e in m["per_image"]] == stems[0]
    assert all(e["label"] is None and e["class"] in CLASSES for e in m["per_image"])
    # index.html shows each row's source file next to its output name
    page = (run / "index.html").read_text()
    assert "<th>source</th>" in page
    for e in m["per_image"]:
        assert f"<td>{e['file']}</td><td>{e['source']}</td>" in page
    # and the sheet titles each row with its source file
    assert [t.split(" r=")[0] for t in titles] == [f"#{i} {name}: {e['class']}"
                                                    for i, (name, e) in enumerate(zip(sources, m["per_image"], strict=True))]
    gray = read_png(run / "inputs" / stems[0][2])
    assert gray.shape == (16, 16, 3) and np.array_equal(gray[..., 0], gray[..., 1])  # grayscale -> equal channels
    # The Grad-CAM picture is the target map the extractor computes for that image (through uint8, as stored).
    cnn, _ = load_cnn(world["cnn"])
    pixels = np.array(resize_uint8(read_image(world["images"] / "a_rgb.png"), 32))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
    out = PriorExtractor(cnn, conv_layers(cnn), PriorSpec(size=16, n=4))(x)
    assert CLASSES[int(out["explained"][0])] in stems[0][0]
    assert np.array_equal(read_png(run / "gradcam" / stems[0][0]), colorize(to_u8(out["target"][0]) / 255.0))


def test_images_with_other_cnn_layers_warn_once(world, tmp_path, monkeypatch, capsys) -> None:
    """The lsft checkpoint's priors_meta names 6 fake layers: one warning line, the run still completes."""
    monkeypatch.chdir(tmp_path)
    img = world["images"] / "a_rgb.png"
    assert run_main(["--checkpoint", world["ckpt"]["lsft"], "--images", img, "--cnn", world["cnn"], "--quiet"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "conv layers" in warnings[0]


# ----------------------------------------------------------------------------------------- CLI errors
def _error_setup(world, tmp_path) -> dict:
    blocker = tmp_path / "a_file"
    blocker.write_text("a regular file where a folder would be needed")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "x.txt").write_text("x")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    lsft, gsft, pri = str(world["ckpt"]["lsft"]), str(world["ckpt"]["gsft"]), str(world["priors"])
    return {  # name: (variant, arguments, text the error line must hold)
        "variant": ("lsft", ["--checkpoint", gsft, "--priors", pri], "use gsft_inference.py"),
        "n": ("lsft", ["--checkpoint", lsft, "--priors", str(world["n3"])], "n=3"),
        "out_exists": ("lsft", ["--checkpoint", lsft, "--priors", pri, "--out", str(existing)], "--overwrite"),
        "unwritable": ("lsft", ["--checkpoint", lsft, "--priors", pri, "--out", str(blocker / "run")],
                       "cannot create"),
        "no_images": ("lsft", ["--checkpoint", str(world["img_ckpt"]), "--images", str(world["no_images"]),
                               "--cnn", str(world["cnn"])], "no usable images"),
        # in-process only (the process-level plumbing is the same)
        "variant_rev": ("gsft", ["--checkpoint", lsft, "--priors", pri], "use lsft_inference.py"),
        "size": ("lsft", ["--checkpoint", lsft, "--priors", str(world["s12"])], "S=12"),
        "missing": ("lsft", ["--checkpoint", str(tmp_path / "nope.pt"), "--priors", pri], "not found"),
        "corrupt": ("lsft", ["--checkpoint", str(corrupt), "--priors", pri], "not a readable GAN checkpoint"),
        "cnn_without_images": ("lsft", ["--checkpoint", lsft, "--cnn", str(world["cnn"])], "--cnn only applies"),
        "bad_cmap": ("lsft", ["--checkpoint", lsft, "--priors", pri, "--cmap", "nope"], "unknown matplotlib"),
    }


def _assert_untouched(tmp_path: Path) -> None:
    assert not (tmp_path / "outputs").exists()
    assert (tmp_path / "a_file").read_text().startswith("a regular file")
    assert [p.name for p in (tmp_path / "existing").iterdir()] == ["x.txt"]
    assert not [p for p in tmp_path.rglob(".*")]  # no .partial folders, no temp files


SUBPROCESS_CASES = ("variant", "n", "out_exists", "unwritable", "no_images")


def test_cli_errors_exit_2_with_one_line_and_write_nothing(world, tmp_path) -> None:
    """Real `python <variant>_inference.py` processes, all started at once (imports are slow on a busy CPU)."""
    cases = _error_setup(world, tmp_path)
    procs = {name: subprocess.Popen([sys.executable, str(REPO / f"{cases[name][0]}_inference.py"), *cases[name][1]],
                                    cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name in SUBPROCESS_CASES}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2, (name, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: "), (name, err)
        assert cases[name][2] in err, (name, err)
    _assert_untouched(tmp_path)


@pytest.mark.parametrize("name", ["variant_rev", "size", "missing", "corrupt", "cnn_without_images", "bad_cmap"])
def test_errors_in_process_are_one_line(world, tmp_path, monkeypatch, capsys, name) -> None:
    monkeypatch.chdir(tmp_path)
    variant, args, text = _error_setup(world, tmp_path)[name]
    assert run_main(args, variant) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and text in err, err
    _assert_untouched(tmp_path)


def test_missing_defaults_say_how_to_make_them(world, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_main([], "gsft") == 2
    err = capsys.readouterr().err
    assert "models/fashion_resnet18-gsft.pt" in err
    assert "python train.py --config configs/fashion_gsft_cpu.yaml --stage gan" in err
    assert run_main(["--checkpoint", world["ckpt"]["lsft"]]) == 2
    err = capsys.readouterr().err
    assert "npys/fashion_resnet18-test.npy" in err and "--stage priors" in err
    assert run_main(["--checkpoint", world["img_ckpt"], "--images", world["images"]]) == 2
    err = capsys.readouterr().err
    assert "models/fashion_resnet18-cnn.pt" in err and "--stage classifier" in err
    assert not (tmp_path / "outputs").exists()
