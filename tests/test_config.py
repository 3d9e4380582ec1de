"""Tests for cnnprior.core.config: every bad config is one UserError naming file and key; overrides; round trips; CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cnnprior.core.config import Config, from_dict, load_config, save_config, to_dict
from cnnprior.core.errors import UserError, cli_main
from cnnprior.core.schema import parse_override, suggest
from tests.helpers import REPO

# (YAML text, fragments the one-line message must contain besides the file name)
BAD_CONFIGS = {
    "unknown key": ("cnn:\n  epoch: 3\n", ["'cnn.epoch'", "did you mean 'epochs'"]),
    "unknown top-level key": ("nme: x\n", ["'nme'", "did you mean 'name'"]),
    "unknown key, no close match": ("gan:\n  zzz: 1\n", ["'gan.zzz'", "known keys:", "variant"]),
    "wrong type int": ("cnn:\n  epochs: three\n", ["'cnn.epochs'", "expected an integer", "'three'"]),
    "bool is not an int": ("cnn:\n  epochs: true\n", ["'cnn.epochs'", "expected an integer"]),
    "wrong type bool": ("cnn:\n  pretrained: 1\n", ["'cnn.pretrained'", "expected true/false"]),
    "wrong type float": ("gan:\n  lr: fast\n", ["'gan.lr'", "expected a number", "'fast'"]),
    "below range": ("priors:\n  n: 0\n", ["'priors.n'", "below the minimum 1"]),
    "above range": ("data:\n  image_size: 4096\n", ["'data.image_size'", "above the maximum 1024"]),
    "bad choice": ("cnn:\n  arch: resnet19\n", ["'cnn.arch'", "'resnet19' is not one of", "did you mean 'resnet18'"]),
    "section not a mapping": ("cnn: 5\n", ["'cnn'", "expected a mapping"]),
    "list of strings": ("priors:\n  splits: [train, 3]\n", ["'priors.splits'", "expected a list of strings"]),
    "bad split": ("priors:\n  splits: [train, dev]\n", ["'priors.splits'", "'dev' is not one of train, val, test"]),
    "fractions too big": ("data:\n  val_fraction: 0.5\n  test_fraction: 0.4\n",
                          ["'data.val_fraction'", "'data.test_fraction'", "10%"]),
    "name with a space": ("name: my run\n", ["'name'", "'my run'"]),
    "invalid YAML": ("cnn:\n  epochs: [1\n", ["not valid YAML at line 3"]),
    "top level not a mapping": ("- data\n- cnn\n", ["top level must be a mapping"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_user_error_naming_file_and_key(tmp_path: Path, case: str) -> None:
    text, fragments = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:"), msg
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


@pytest.mark.parametrize("text", ["", "\n\n", "# every key commented out\n# name: x\n", "null\n", "~\n", "{}\n",
                                  "data:\ncnn: {}\n"],
                         ids=["empty", "blank lines", "comments", "null", "tilde", "empty mapping", "empty sections"])
def test_config_that_sets_nothing_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path, ["cnn.epochs=1"])  # overrides do not rescue a file that sets nothing
    msg = str(info.value)
    assert msg.startswith(f"{path}: the config sets nothing") and "configs/" in msg and "\n" not in msg
    path.write_text(text + "\nname: x\n" if text.strip() not in ("null", "~", "{}") else "name: x\n")
    assert load_config(path).name == "x"  # one key is enough


def test_train_py_empty_config_exits_2_and_trains_nothing(tmp_path: Path, run_py, one_line_error) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    line = one_line_error(run_py(REPO / "train.py", "--config", empty, cwd=tmp_path))
    assert line == (f"error: {empty}: the config sets nothing (empty, only comments, null or empty sections); copy "
                    f"one of configs/*.yaml and set at least name and data.source")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.yaml"]


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match=r"sub: config file not found"):  # a folder is not a config file
        (tmp_path / "sub").mkdir()
        load_config(tmp_path / "sub")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match=r"bin\.yaml: not a UTF-8 text file"):
        load_config(binary)


@pytest.mark.parametrize("override, fragments", [
    ("cnn.epochs", ["--set 'cnn.epochs'", "expected section.key=value"]),
    ("=3", ["--set '=3'", "empty key"]),
    ("data.root.deep=1", ["--set 'data.root.deep=1'", "'root' is not a section"]),
    ("cnn.epochz=3", ["unknown key 'cnn.epochz'", "did you mean 'epochs'"]),
    ("cnn.epochs=2.5", ["key 'cnn.epochs'", "expected an integer, got 2.5"]),
    ("data.test_fraction=0.6", ["key 'data.test_fraction'", "above the maximum 0.5"]),
])
def test_bad_set_override(tmp_path: Path, override: str, fragments: list[str]) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\ndata:\n  root: /x\n")
    with pytest.raises(UserError) as info:
        load_config(path, [override])
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


def test_set_overrides_use_yaml_typing_and_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("name: run1\ncnn:\n  epochs: 3\n  lr: 0.5\ndata:\n  root: /x\n")
    cfg = load_config(path, ["cnn.epochs=7", "cnn.lr=1e-3", "gan.beta1=1", "cnn.pretrained=true", "cnn.augment=no",
                             "priors.splits=[train, val]", "gan.train=a.npy", "data.root=", "data.seed=0x10",
                             "name=run2", "cnn.arch=vgg11"])
    assert cfg.cnn.epochs == 7 and type(cfg.cnn.epochs) is int
    assert cfg.cnn.lr == 1e-3 and type(cfg.cnn.lr) is float  # YAML 1.1 reads `1e-3` as a string
    assert cfg.gan.beta1 == 1.0 and type(cfg.gan.beta1) is float
    assert cfg.cnn.pretrained is True and cfg.cnn.augment is False
    assert cfg.priors.splits == ["train", "val"]
    assert cfg.gan.train == ["a.npy"]  # a single string becomes a one-element list
    assert cfg.data.root == "" and cfg.data.seed == 16
    assert cfg.name == "run2" and cfg.cnn.arch == "vgg11"
    assert cfg.source_file == str(path)
    # untouched keys keep their defaults
    assert cfg.cnn.batch_size == Config().cnn.batch_size == 64
    assert parse_override("a.b=c=d") == (["a", "b"], "c=d")
    assert parse_override("gan.val=[unclosed") == (["gan", "val"], "[unclosed")  # not YAML -> the raw text


def test_scientific_notation_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "sci.yaml"
    path.write_text("cnn:\n  lr: 1e-4\n  weight_decay: 5E-5\ngan:\n  lr: 2.0e-4\n")
    cfg = load_config(path)
    assert (cfg.cnn.lr, cfg.cnn.weight_decay, cfg.gan.lr) == (1e-4, 5e-5, 2e-4)
    path.write_text("cnn:\n  lr: .nan\n")
    with pytest.raises(UserError, match="expected a number"):
        load_config(path)
    for bad in ("nan", "-.inf", "1e999"):
        path.write_text(f"cnn:\n  lr: {bad}\n")
        with pytest.raises(UserError, match="expected a number"):
            load_config(path)


def test_defaults_and_derived_paths() -> None:
    cfg = load_config(None, ["name=abc", "gan.variant=gsft"])
    assert cfg.source_file == ""
    assert cfg.cnn_checkpoint == "models/abc-cnn.pt"
    assert cfg.priors_prefix == "npys/abc"
    assert cfg.gan_prefix == "models/abc-gsft"
    assert cfg.gan_train_files() == ["npys/abc-train.npy"] and cfg.gan_val_file() == "npys/abc-val.npy"


def test_save_config_round_trips_through_load_config(tmp_path: Path) -> None:
    cfg = load_config(None, ["name=rt", "data.source=imagefolder", "data.root=/data/x y", "data.limit=123",
                             "data.val_fraction=0.25", "cnn.arch=mobilenet_v2", "cnn.lr=3e-4", "cnn.augment=false",
                             "priors.n=5", "priors.method=layercam", "priors.splits=[val]", "gan.variant=gsft",
                             "gan.train=[a.npy, b.npy]", "gan.l1_weight=10"])
    out = save_config(cfg, tmp_path / "deep" / "rt.yaml")
    assert out == tmp_path / "deep" / "rt.yaml" and not list(out.parent.glob("*.tmp"))
    assert "source_file" not in out.read_text()
    back = load_config(out)
    assert to_dict(back) == to_dict(cfg)
    assert back.data.root == "/data/x y" and back.cnn.lr == 3e-4 and back.gan.train == ["a.npy", "b.npy"]
    assert to_dict(from_dict(yaml.safe_load(out.read_text()))) == to_dict(cfg)


def test_train_py_bad_config_exits_2_with_one_line(tmp_path: Path, run_py, one_line_error) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncnn:\n  arch: resnet\n  epochs: 1\n")
    line = one_line_error(run_py(REPO / "train.py", "--config", bad, cwd=tmp_path))
    assert line.startswith("error: ") and str(bad) in line and "'cnn.arch'" in line
    assert not (tmp_path / "models").exists()  # nothing written for an invalid config


def test_train_py_food_config_without_dataset_exits_2(tmp_path: Path, run_py, one_line_error) -> None:
    config = REPO / "configs" / "food_resnet.yaml"
    assert config.is_file(), "configs/food_resnet.yaml (imagefolder, root data/food-11) is expected in the repo"
    # run from an empty folder so data/food-11 cannot exist
    line = one_line_error(run_py(REPO / "train.py", "--config", config, "--stage", "classifier", cwd=tmp_path))
    assert "food-11" in line and "imagefolder" in line


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").glob("*.yaml")
                                         if not p.stem.startswith(("eval_", "study_"))),
                         ids=lambda p: p.stem)
def test_every_shipped_run_config_loads(path: Path) -> None:
    """No shipped run config may rot (the eval_* ones are checked in test_evaluate.py, study_* in
    test_study.py); its file-name prefix names its data source (zoo_*: the word after it)."""
    cfg = load_config(path)
    sources = {"fashion": "fashion_mnist", "shapes": "shapes", "cifar10": "cifar10", "food": "imagefolder",
               "animals": "imagefolder"}
    words = path.stem.split("_")
    source = words[1] if words[0] == "zoo" else words[0]  # zoo_<source>: a population of CNNs on <source>
    assert cfg.data.source == sources[source], (path.stem, cfg.data.source)
    assert cfg.name.split("_")[0] == path.stem.split("_")[0], (path.stem, cfg.name)


def test_stage_all_is_refused_under_torchrun(monkeypatch, capsys):
    from cnnprior.cli import train_main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(["--config", "configs/fashion_resnet18.yaml"]) == 2
    assert "--stage all under torchrun" in capsys.readouterr().err


def test_the_library_raises_value_error_and_only_the_cli_exits_2(tmp_path: Path, capsys) -> None:
    """A bad config value through the Python API is a ValueError (the UserError subclass), never SystemExit; the
    CLI turns the same error into one line on stderr and exit code 2."""
    from cnnprior.cli import main, train_main

    path = tmp_path / "run.yaml"
    path.write_text("name: x\ncnn:\n  epochs: 1\n")
    with pytest.raises(ValueError) as info:
        load_config(path, ["cnn.lr=-1"])
    assert type(info.value) is UserError
    assert str(info.value) == f"{path}: key 'cnn.lr': -1.0 is below the minimum 0.0"
    with pytest.raises(ValueError, match=r"key 'cnn\.lr': expected a number"):
        from_dict({"cnn": {"lr": "fast"}})
    capsys.readouterr()
    for run in (lambda: train_main(["--config", str(path), "--set", "cnn.lr=-1"]),
                lambda: main(["train", "--config", str(path), "--stage", "classifier", "--set", "cnn.lr=-1"])):
        assert run() == 2
        captured = capsys.readouterr()
        assert captured.err == f"error: {info.value}\n" and captured.out == ""
    assert not (tmp_path / "models").exists()


def test_cli_main_reports_user_errors_in_one_line_and_lets_bugs_through(capsys) -> None:
    @cli_main
    def user_error(argv: list[str]) -> int:
        raise UserError("first line\nsecond line")

    @cli_main
    def bug(argv: list[str]) -> int:
        raise ValueError("not a user error")

    assert user_error([]) == 2
    assert capsys.readouterr().err == "error: first line second line\n"
    with pytest.raises(ValueError, match="not a user error"):  # a plain ValueError is a bug: its traceback shows
        bug([])


def test_set_fills_a_blank_section_and_suggest_is_one_helper(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ngan:\n")  # a section whose keys are all commented out
    assert load_config(path, ["gan.epochs=2"]).gan.epochs == 2
    assert suggest("epoch", ["lr", "epochs"]) == " (did you mean 'epochs'?)"
    assert suggest("zzz", ["lr", "epochs"]) == " (known keys: epochs, lr)"
    assert suggest("zzz", ["lr"], listing=None) == "" and suggest("nmu", ["num"], prefix="mprt.") == \
        " (did you mean 'mprt.num'?)"
