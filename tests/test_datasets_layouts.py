"""imagefolder layouts as the datasets are downloaded (Kaggle Food-11, flat Food-11, Animals-10, ImageNet-style
split folders), display names, and lazy validation; every tree is written here from tiny images."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cnnprior.cli import train_main
from cnnprior.core.config import load_config, save_config
from cnnprior.core.errors import UserError
from cnnprior.data.sources.imagefolder import FOOD11_CLASSES, ImageFolderSource
from cnnprior.data.splits import SplitView, load_split, open_source
from tests.helpers import REPO

ANIMALS10 = {"cane": "dog", "cavallo": "horse", "elefante": "elephant", "farfalla": "butterfly", "gallina": "chicken",
             "gatto": "cat", "mucca": "cow", "pecora": "sheep", "ragno": "spider", "scoiattolo": "squirrel"}


def colour(split: int, label: int, k: int) -> tuple[int, int, int]:
    """The uniform colour of fixture image k of a class in a split: tells every file apart."""
    return (40 * split + 7, 20 * label + 3, 10 * k + 1)


def write_png(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), rgb).save(path, format="PNG")  # PNG bytes whatever the extension: exact colours


def make_split_tree(root: Path, counts: dict[str, int], classes: list[str]) -> Path:
    """root/<split folder>/<class>/<k>.jpg with counts[split folder] images per class."""
    for s, (folder, n) in enumerate(counts.items()):
        for c, name in enumerate(classes):
            for k in range(n):
                write_png(root / folder / name / f"{k}.jpg", colour(s, c, k))
    return root


def make_flat_food11(root: Path, counts: dict[str, int], indices: list[int]) -> Path:
    """Food-11's original release: root/<split>/<class index>_<n>.jpg."""
    for s, (folder, n) in enumerate(counts.items()):
        for c in indices:
            for k in range(n):
                write_png(root / folder / f"{c}_{k}.jpg", colour(s, c, k))
    return root


def make_animals10(base: Path, per_class: int = 2) -> Path:
    """Animals-10 as Kaggle ships it: raw-img/<Italian name>/*.jpeg beside translate.py."""
    for c, name in enumerate(ANIMALS10):
        for k in range(per_class):
            write_png(base / "raw-img" / name / f"OIP-{c}{k}.jpeg", colour(0, c, k))
    (base / "translate.py").write_text("translate = {'cane': 'dog'}\n")
    return base / "raw-img"


def pixel(item: dict) -> tuple[int, ...]:
    return tuple((item["image"][:, 0, 0] * 255).round().to(torch.int64).tolist())


def split_folder_of(src: ImageFolderSource, index: int) -> str:
    return Path(src.files[index]).relative_to(src.root).parts[0]


def quiet_load(cfg, split: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_split(cfg, split)


# ------------------------------------------------------------------------------------------ split folders
def test_kaggle_food11_split_folders_are_the_splits(tmp_path: Path) -> None:
    classes = list(FOOD11_CLASSES[:3])
    root = make_split_tree(tmp_path / "food-11", {"training": 4, "validation": 2, "evaluation": 3}, classes)
    cfg = load_config(REPO / "configs" / "food_resnet.yaml", [f"data.root={root}", "data.image_size=16"])
    views = {s: load_split(cfg.data, s) for s in ("train", "val", "test")}
    src = views["train"].source
    assert src.layout == "splits" and src.split_folders == {"train": "training", "val": "validation",
                                                            "test": "evaluation"}
    assert views["train"].class_names == classes  # not a 3-class classifier of split names
    assert views["train"].sizes == {"train": (12, "training/"), "val": (6, "validation/"), "test": (9, "evaluation/")}
    for s, folder in src.split_folders.items():
        assert {split_folder_of(src, int(i)) for i in views[s].indices} == {folder}
        assert np.bincount(views[s].labels).tolist() == [len(views[s]) // 3] * 3
    item = views["test"][4]  # evaluation/<class>/<k>.jpg, read back exactly
    k = int(Path(src.files[item["index"]]).stem)
    assert pixel(item) == colour(2, item["label"], k)
    assert views["train"].describe() == (f"imagefolder '{root}' (layout splits): 3 classes [Bread, Dairy product, "
                                         f"Dessert]; 12 train (training/) / 6 val (validation/) / 9 test (evaluation/)")
    # data.limit caps each split, stratified
    capped = load_config(REPO / "configs" / "food_resnet.yaml", [f"data.root={root}", "data.limit=3"])
    views = {s: load_split(capped.data, s) for s in ("train", "val", "test")}
    assert [np.bincount(views[s].labels).tolist() for s in ("train", "val", "test")] == [[1, 1, 1]] * 3


def test_imagenet_style_train_and_test_folders_carve_val_from_train(tmp_path: Path) -> None:
    root = make_split_tree(tmp_path / "imagenet", {"TRAIN": 10, "Test": 3}, ["n01440764", "n01443537"])  # any case
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", "data.val_fraction=0.2",
                             "data.test_fraction=0.3"])
    views = {s: load_split(cfg.data, s) for s in ("train", "val", "test")}
    src = views["train"].source
    assert views["val"].sizes == {"train": (16, "TRAIN/"), "val": (4, "from TRAIN/"), "test": (6, "Test/")}
    assert {split_folder_of(src, int(i)) for s in ("train", "val") for i in views[s].indices} == {"TRAIN"}
    assert not set(views["train"].indices) & set(views["val"].indices)
    assert np.bincount(views["val"].labels).tolist() == [2, 2]  # val_fraction of each class; test_fraction unused
    assert {split_folder_of(src, int(i)) for i in views["test"].indices} == {"Test"}
    capped = load_config(None, ["data.source=imagefolder", f"data.root={root}", "data.val_fraction=0.2",
                                "data.limit=10"])
    assert load_split(capped.data, "train").sizes == {"train": (8, "TRAIN/"), "val": (2, "from TRAIN/"),
                                                      "test": (6, "Test/")}
    # train and val folders only: test is carved out of train by test_fraction
    only = make_split_tree(tmp_path / "tv", {"train": 10, "valid": 1}, ["a", "b"])
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={only}", "data.test_fraction=0.2"])
    assert load_split(cfg.data, "test").sizes == {"train": (16, "train/"), "val": (2, "valid/"),
                                                  "test": (4, "from train/")}


def test_a_root_of_split_names_is_never_taken_as_classes(tmp_path: Path) -> None:
    kaggle = make_split_tree(tmp_path / "k", {"training": 1, "evaluation": 1}, ["x", "y"])
    with pytest.raises(UserError, match=r"its folders \(evaluation, training\) are all split names, not classes"):
        ImageFolderSource(str(kaggle), layout="classes")
    no_train = make_split_tree(tmp_path / "nt", {"val": 1, "test": 1}, ["x"])
    with pytest.raises(UserError, match=r"split folders test, val but no train/ \(or training/\) folder"):
        ImageFolderSource(str(no_train))
    twice = make_split_tree(tmp_path / "tw", {"train": 1, "Training": 1}, ["x"])
    with pytest.raises(UserError, match=r"both '.*' and '.*' name the train split; keep one"):
        ImageFolderSource(str(twice))
    classes = make_split_tree(tmp_path / "cl", {"cats": 1, "dogs": 1}, ["x"])
    with pytest.raises(UserError, match=r"data.layout splits needs split folders only .* found cats, dogs"):
        ImageFolderSource(str(classes), layout="splits")
    (tmp_path / "empty" / "train" / "x").mkdir(parents=True)
    with pytest.raises(UserError, match=r"no images found \(expected root/<split>/<class>/<images>"):
        ImageFolderSource(str(tmp_path / "empty"))
    mixed = make_split_tree(tmp_path / "mx", {"train": 1, "extra": 1}, ["x"])
    with pytest.warns(UserWarning, match=r"class folders train look like split names but extra do not"):
        src = ImageFolderSource(str(mixed))
    assert src.layout == "classes" and src.class_names == ["extra", "train"]


# ------------------------------------------------------------------------------------------ flat Food-11
def test_food11_flat_layout_is_detected_named_and_labelled(tmp_path: Path) -> None:
    root = make_flat_food11(tmp_path / "food-11", {"training": 3, "validation": 1, "evaluation": 2}, [0, 3, 10])
    (root / "training" / "readme.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"skipped 1 non-image file\(s\).*readme\.txt"):
        src = ImageFolderSource(str(root))
    assert src.layout == "food11_flat" and src.folder_names == ["0", "3", "10"]  # numeric order, not "10" < "3"
    assert src.class_names == ["Bread", "Egg", "Vegetable/Fruit"]
    for i, f in enumerate(src.files):  # every label is the file's class-index prefix
        assert FOOD11_CLASSES.index(src.class_names[src.labels[i]]) == int(Path(f).name.split("_")[0])
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", "data.layout=food11_flat"])
    view = quiet_load(cfg.data, "test")
    assert view.sizes == {"train": (9, "training/"), "val": (3, "validation/"), "test": (6, "evaluation/")}
    item = view[5]
    name = Path(view.source.files[item["index"]]).stem
    c, k = map(int, name.split("_"))
    assert pixel(item) == colour(2, c, k)
    # a list of names is read by class index in this layout
    names = [f"food {i}" for i in range(11)]
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", f"data.class_names={names}"])
    assert quiet_load(cfg.data, "train").class_names == ["food 0", "food 3", "food 10"]


# ------------------------------------------------------------------------------------------ display names
def test_animals10_folders_get_english_display_names(tmp_path: Path) -> None:
    root = make_animals10(tmp_path / "animals-10")
    cfg = load_config(REPO / "configs" / "animals_vgg16.yaml", [f"data.root={root}"])
    assert cfg.data.class_names == ANIMALS10
    view = load_split(cfg.data, "train")
    assert view.source.folder_names == sorted(ANIMALS10)
    assert view.class_names == [ANIMALS10[f] for f in sorted(ANIMALS10)]
    assert view.class_names[:3] == ["dog", "horse", "elephant"]
    for i in range(len(view)):  # the label still follows the folder
        item = view[i]
        folder = Path(view.source.files[item["index"]]).parent.name
        assert view.class_names[item["label"]] == ANIMALS10[folder]


def test_class_names_as_list_and_its_errors(tmp_path: Path) -> None:
    root = tmp_path / "zoo"
    for c in ("cats", "dogs", "fish"):
        write_png(root / c / "0.png", (1, 2, 3))

    def names(value: str) -> list[str]:
        cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", f"data.class_names={value}"])
        return open_source(cfg.data).class_names

    assert names("[Cat, Dog, Fish]") == ["Cat", "Dog", "Fish"]
    assert names("{dogs: Dog}") == ["cats", "Dog", "fish"]  # a partial mapping keeps the other folder names
    with pytest.raises(UserError, match=r"2 names for the 3 classes of imagefolder .* \(cats, dogs, fish\)"):
        names("[Cat, Dog]")
    with pytest.raises(UserError, match=r"'dgos' is not a class of imagefolder .*did you mean 'dogs'"):
        names("{dgos: Dog}")
    with pytest.raises(UserError, match=r"classes 'cats' and 'dogs' of .* would both be shown as 'pet'"):
        names("{cats: pet, dogs: pet}")
    with pytest.raises(UserError, match=r"key 'data.class_names': expected a mapping of folder name to display"):
        names("{cats: 1}")
    with pytest.raises(UserError, match=r"key 'data.class_names': expected a mapping"):
        names("7")
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", "data.class_names={1: one, x: ex}"])
    assert cfg.data.class_names == {"1": "one", "x": "ex"}  # YAML's int keys become folder names
    back = load_config(save_config(cfg, tmp_path / "c.yaml"))
    assert back.data.class_names == {"1": "one", "x": "ex"} and back.data.layout == "auto"


# ------------------------------------------------------------------------------------------ lazy validation
def test_start_up_opens_no_image_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_split_tree(tmp_path / "d", {"train": 6, "test": 2}, ["a", "b"])
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}"])
    views = [load_split(cfg.data, s) for s in ("train", "val", "test")]
    assert opened == [] and [len(v) for v in views] == [10, 2, 4]
    views[2][0]
    assert len(opened) == 1


def make_with_broken(root: Path) -> Path:
    for k in range(4):
        write_png(root / "a" / f"{k}.png", colour(0, 0, k))
    for k in range(3):
        write_png(root / "b" / f"{k}.png", colour(0, 1, k))
    (root / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))  # a PNG signature, then garbage
    return root


def full_pass(view: SplitView, **loader: object) -> tuple[list[dict], list[str]]:
    """Every batch of one DataLoader pass (batch size 2, no shuffling), and the warnings it raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        items = [{k: v[j] for k, v in b.items()} for b in DataLoader(view, batch_size=2, **loader)
                 for j in range(len(b["label"]))]
    return items, [str(w.message) for w in record]


def test_unreadable_file_is_replaced_by_the_next_readable_of_its_class_and_reported_once_per_pass(
        tmp_path: Path) -> None:
    src = ImageFolderSource(str(make_with_broken(tmp_path / "d")))
    assert len(src) == 7 and src.files[1].endswith("a/1.png")
    view = SplitView(src, np.arange(7), 6, "train")
    items, warned = full_pass(view)
    assert len(items) == 7 and [int(i["label"]) for i in items] == [0, 0, 0, 0, 1, 1, 1]
    assert [int(i["index"]) for i in items] == list(range(7))  # the sample keeps its place, label and index ...
    assert pixel(items[1]) == colour(0, 0, 2)  # ... and shows a/2.png, the next readable image of class a
    assert [pixel(items[i]) for i in (0, 2, 3)] == [colour(0, 0, k) for k in (0, 2, 3)]
    assert len(warned) == 1 and "1 unreadable image file(s) in pass 1 over the train split" in warned[0]
    assert "a/1.png (UnidentifiedImageError)" in warned[0]
    assert src.unreadable.keys() == {1}
    items2, warned2 = full_pass(view)
    assert [pixel(i) for i in items2] == [pixel(i) for i in items]  # deterministic, every pass
    assert len(warned2) == 1 and "in pass 2 over" in warned2[0]
    # a pass that stops early (drop_last, a subset) is reported when the next one begins
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        view[1]
        view[0]
        assert record == []
        view[1]
    assert len(record) == 1 and "in pass 3 over" in str(record[0].message)
    with pytest.warns(UserWarning, match="in pass 4 over"):  # what a view released mid-pass reports
        view.end_pass()
    # the last item ends the wrong-class fallback too: the bad file is last in its class -> wraps to a/0.png
    last = SplitView(src, np.array([0, 1]), 6, "val")
    with pytest.warns(UserWarning, match="pass 1 over the val split"):
        assert pixel(last[1]) == colour(0, 0, 0) and pixel(last[0]) == colour(0, 0, 0)


def test_split_counts_do_not_depend_on_unreadable_files(tmp_path: Path) -> None:
    good, bad = tmp_path / "good", make_with_broken(tmp_path / "bad")
    for k in range(4):
        write_png(good / "a" / f"{k}.png", colour(0, 0, k))
    for k in range(3):
        write_png(good / "b" / f"{k}.png", colour(0, 1, k))
    for split in ("train", "val", "test"):
        a, b = (load_split(load_config(None, ["data.source=imagefolder", f"data.root={r}", "data.val_fraction=0.3",
                                              "data.test_fraction=0.3", "data.seed=3"]).data, split)
                for r in (good, bad))
        assert a.indices.tolist() == b.indices.tolist() and a.sizes == b.sizes


# ------------------------------------------------------------------------------------------ classifier stage
LAYOUTS = {  # config, fixture writer, data.limit, what the classifier stage's first line says after the root
    "kaggle_food11": ("food_resnet", lambda t: make_split_tree(t / "food-11", {"training": 3, "validation": 2,
                                                                                "evaluation": 2},
                                                                list(FOOD11_CLASSES[:4])), 8,
                      "(layout splits): 4 classes [Bread, Dairy product, Dessert, Egg]; 8 train (training/) / "
                      "8 val (validation/) / 8 test (evaluation/)"),
    "flat_food11": ("food_resnet", lambda t: make_flat_food11(t / "food-11", {"training": 10, "evaluation": 2},
                                                              [1, 5, 9]), 24,
                    "(layout food11_flat): 3 classes [Dairy product, Meat, Soup]; 21 train (training/) / "
                    "3 val (from training/) / 6 test (evaluation/)"),
    "animals10": ("animals_vgg16", lambda t: make_animals10(t / "animals-10", per_class=10), 100,
                  "(layout classes): 10 classes [dog, horse, elephant, butterfly, chicken, cat, cow, sheep, spider, "
                  "squirrel]; 80 train / 10 val / 10 test"),
    "imagenet_style": ("food_resnet", lambda t: make_split_tree(t / "in", {"train": 10, "val": 1},
                                                                ["n01440764", "n01443537"]), 20,
                       "(layout splits): 2 classes [n01440764, n01443537]; 18 train (train/) / 2 val (val/) / "
                       "2 test (from train/)"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_classifier_stage_prints_classes_and_split_sizes(layout: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    config, make, limit, expected = LAYOUTS[layout]
    root = make(tmp_path)
    ckpt = tmp_path / "m" / "cnn.pt"
    args = ["--config", str(REPO / "configs" / f"{config}.yaml"), "--stage", "classifier", "--set",
            f"data.root={root}", "--set", "cnn.pretrained=false", "--set", "cnn.arch=mobilenet_v3_small",
            "--set", "data.image_size=32", "--set", "cnn.epochs=0", "--set", "data.num_workers=0",
            "--set", f"data.limit={limit}", "--set", f"cnn.checkpoint={ckpt}", "--set", "cnn.device=cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert train_main(args) == 0
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("classifier: "))
    assert first == f"classifier: mobilenet_v3_small (32px) on cpu; data imagefolder '{root}' {expected}"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    shown = expected.split("[")[1].split("]")[0].split(", ")
    assert saved["class_names"] == shown  # checkpoints store the display names
