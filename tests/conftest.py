"""Shared tiny fixtures: a private dataset cache, one-thread torch, tiny configs, shapes images, CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnprior.core.config import Config, load_config
from cnnprior.data.sources.shapes import ShapesSource
from tests.helpers import REPO

# Tiny models on a shared, loaded CPU: one intra-op thread is several times faster than two that spin
# against other processes (measured: resnet18 fwd+bwd at 64 px, 0.1 s vs 0.5-4 s). Override for a quiet box.
THREADS = int(os.environ.get("CNNPRIOR_TEST_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def _hermetic_session(tmp_path_factory: pytest.TempPathFactory):
    """Dataset extraction goes to a private cache (never ~/.cache); torch uses THREADS threads."""
    old_cache, old_threads = os.environ.get("CNNPRIOR_CACHE"), torch.get_num_threads()
    os.environ["CNNPRIOR_CACHE"] = str(tmp_path_factory.mktemp("cnnprior-cache"))
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old_threads)
    if old_cache is None:
        os.environ.pop("CNNPRIOR_CACHE", None)
    else:
        os.environ["CNNPRIOR_CACHE"] = old_cache


# The real datasets' folder as the shell had it; the session points the default at an empty folder instead.
SYSTEM_DATASETS = Path(os.environ.get("CNNPRIOR_DATASETS") or "/usr/share/datasets")


@pytest.fixture(scope="session", autouse=True)
def _no_system_datasets(tmp_path_factory: pytest.TempPathFactory):
    """Default dataset roots resolve under an empty folder: no test reads /usr/share/datasets unless real_data."""
    old = os.environ.get("CNNPRIOR_DATASETS")
    os.environ["CNNPRIOR_DATASETS"] = str(tmp_path_factory.mktemp("no-system-datasets"))
    yield
    if old is None:
        os.environ.pop("CNNPRIOR_DATASETS", None)
    else:
        os.environ["CNNPRIOR_DATASETS"] = old


@pytest.fixture
def real_datasets(monkeypatch: pytest.MonkeyPatch) -> Path:
    """For `real_data` tests: the real datasets folder as the default root again (skips if it is absent)."""
    if not SYSTEM_DATASETS.is_dir():
        pytest.skip(f"{SYSTEM_DATASETS} not present")
    monkeypatch.setenv("CNNPRIOR_DATASETS", str(SYSTEM_DATASETS))
    return SYSTEM_DATASETS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "real_data: needs the real datasets in $CNNPRIOR_DATASETS or "
                                       "/usr/share/datasets; deselected unless -m names real_data")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect `real_data` tests unless the -m expression names them (python -m pytest -m real_data)."""
    if "real_data" in (config.getoption("markexpr", "") or ""):
        return
    chosen = [item for item in items if item.get_closest_marker("real_data") is None]
    if len(chosen) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("real_data")])
        items[:] = chosen


@pytest.fixture
def run_py() -> Callable[..., subprocess.CompletedProcess]:
    """Run `python ARGS...` as the user would (repo importable, one thread); returns the finished process."""

    def run(*args: str, cwd: str | os.PathLike = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS), PYTHONWARNINGS="ignore")
        return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout)

    return run


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture
def one_line_error() -> Callable[[subprocess.CompletedProcess], str]:
    """Assert a CLI failed as a user error: exit 2, exactly one stderr line, no traceback; returns the line."""

    def check(proc: subprocess.CompletedProcess) -> str:
        lines = stderr_lines(proc)
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
        assert len(lines) == 1, lines
        return lines[0]

    return check


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., Config]:
    """A validated shapes config (40 images, 32 px, resnet18) whose outputs all land in tmp_path."""

    def make(*overrides: str, image_size: int = 32) -> Config:
        base = ["name=tiny", "data.source=shapes", "data.shapes_count=40", f"data.image_size={image_size}",
                "data.val_fraction=0.2", "data.test_fraction=0.2", "cnn.arch=resnet18", "cnn.epochs=1",
                "cnn.batch_size=8", "cnn.device=cpu", "priors.device=cpu", "priors.batch_size=8",
                f"cnn.checkpoint={tmp_path / 'models' / 'tiny-cnn.pt'}", f"priors.out={tmp_path / 'npys' / 'tiny'}"]
        return load_config(None, base + list(overrides))

    return make


@pytest.fixture(scope="session")
def shape_batch() -> torch.Tensor:
    """Four synthetic-shapes images (4, 3, 64, 64) in [0, 1], one per class 0..3."""
    src = ShapesSource(8, 64, seed=3)
    imgs = np.stack([src.load(i)[0] for i in range(4)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(255.0)


class Zigzag(nn.Module):
    """Conv attributes defined in another order than they run; `mid` runs twice; `unused` never runs.

    Forward order of the convs: stem, mid, mid, block.1, head. `fail=True` raises inside the forward pass.
    """

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(8, 8, 3, padding=1)
        self.unused = nn.Conv2d(3, 8, 1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        if self.fail:
            raise RuntimeError("failing on purpose")
        x = F.relu(self.mid(x))
        x = F.relu(self.mid(x) - 0.05)
        x = self.block(x)
        x = F.relu(self.head(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def zigzag() -> Zigzag:
    """A seeded Zigzag in eval mode."""
    torch.manual_seed(0)
    return Zigzag().eval()
