"""bench/imagefolder.py on a tiny folder: its eager (old) and lazy (new) start-ups agree; no timing is asserted."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.helpers import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("bench_imagefolder", REPO / "bench" / "imagefolder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eager_and_lazy_start_ups_list_the_same_files_and_labels(tmp_path: Path) -> None:
    bench = _bench()
    root = bench.build_folder(tmp_path / "f", files=23, classes=4)
    assert sorted(p.name for p in root.iterdir()) == ["class_00", "class_01", "class_02", "class_03"]
    files, labels = bench.eager_scan(root)
    assert len(files) == 23 and labels.count(0) == 6 and labels.count(3) == 5
    assert bench.lazy_scan(root) == (files, labels)
    (root / "class_01" / "0000001.png").write_bytes(b"broken")  # the eager start-up drops it, the lazy one keeps it
    assert len(bench.eager_scan(root)[0]) == 22 and len(bench.lazy_scan(root)[0]) == 23


def test_imagefolder_bench_prints_its_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench().main(["--files", "30", "--classes", "3", "--repeats", "2"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("repeat ") for line in out) == 6
    assert re.fullmatch(r"threads 1; load average \(1/5/15 min\) before [\d. ]+, after [\d. ]+", out[-2]), out[-2]
    assert re.fullmatch(r"30 files: eager \d+\.\d\d s, lazy \d+\.\d\d s, lazy \+ split \d+\.\d\d s "
                        r"\(eager/lazy \d+\.\d+x\)", out[-1]), out[-1]
