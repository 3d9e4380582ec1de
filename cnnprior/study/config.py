"""The study config (`python -m cnnprior.study --config configs/study_*.yaml`): arms x seeds x milestones, the val
and test prior files; YAML -> a validated `StudyConfig` with one-line errors.

An arm is a name, a run config (a `train.py` YAML) and `--set` overrides of it; every arm is trained once per seed
(gan.seed) and its generator saved at every milestone (samples seen; gan.milestones). Example::

    name: fashion
    val: npys/fashion_resnet18-val.npy
    test: npys/fashion_resnet18-test.npy
    seeds: [101, 102, 103]
    milestones: [6000, 12000, 24000, 48000]
    arms:
      - {name: gsft, config: configs/fashion_gsft_ablation.yaml}
      - {name: gsft_l1, config: configs/fashion_gsft_ablation.yaml, set: [gan.adv_weight=0]}
      - {name: convnet, config: configs/fashion_convnet_cpu.yaml, milestones: [6000, 12000, 24000, 48000, 96000]}
    compare: [[gsft, gsft_l1], [gsft, convnet]]
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnprior.core.errors import UserError
from cnnprior.core.schema import apply_overrides, coerce, fill, opt, read_yaml_mapping

__all__ = ["Arm", "load_study_config", "parse_arms", "parse_compare", "parse_ints", "StudyConfig"]

# the study sets these per run itself (a seed per run, the run's folder, the milestones, the epochs they need)
RUNNER_KEYS = ("gan.seed", "gan.out", "gan.milestones", "gan.epochs")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Arm:
    """One arm: its name, run config (train.py YAML), `--set` overrides and milestones (samples seen)."""

    name: str
    config: str
    set: list[str] = field(default_factory=list)
    milestones: list[int] = field(default_factory=list)


def parse_ints(value: Any, loc: str, where: str = "", positive: bool = True) -> list[int]:
    """A non-empty list of distinct integers (> 0 when `positive`), sorted; a comma-separated string is accepted."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        except ValueError:
            raise UserError(f"{loc}: expected a list of integers, got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                            for v in value):
        raise UserError(f"{loc}: expected a non-empty list of integers, got {value!r}")
    if positive and min(value) <= 0:
        raise UserError(f"{loc}: every value must be > 0, got {min(value)}")
    if min(value) < 0:
        raise UserError(f"{loc}: every value must be >= 0, got {min(value)}")
    if len(set(value)) != len(value):
        raise UserError(f"{loc}: {value!r} repeats a value")
    return sorted(value)


def parse_arms(value: Any, loc: str, where: str = "") -> list[Arm]:
    """`arms:` a list of {name, config, set (optional list of section.key=value), milestones (optional)}."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{loc}: expected a non-empty list of arms ({{name, config, set, milestones}})")
    arms: list[Arm] = []
    for i, raw in enumerate(value):
        at = f"{loc}[{i}]"
        if not isinstance(raw, dict):
            raise UserError(f"{at}: expected a mapping {{name, config, set, milestones}}, got {raw!r}")
        unknown = sorted(set(raw) - {"name", "config", "set", "milestones"})
        if unknown:
            raise UserError(f"{at}: unknown key {unknown[0]!r} (keys: name, config, set, milestones)")
        name, config = raw.get("name"), raw.get("config")
        if not isinstance(name, str) or not _NAME.match(name):
            raise UserError(f"{at}: key 'name': {name!r} must be a non-empty name of letters, digits, _ . -")
        if not isinstance(config, str) or not config:
            raise UserError(f"{at}: key 'config': expected a train.py config path, got {config!r}")
        sets = coerce(raw.get("set") or [], list, f"{at}: key 'set'")
        for s in sets:
            key = s.split("=", 1)[0].strip()
            if "=" not in s:
                raise UserError(f"{at}: key 'set': {s!r} is not section.key=value")
            if key in RUNNER_KEYS:
                raise UserError(f"{at}: key 'set': {key} is set by the study per run (seeds, milestones)")
        ms = parse_ints(raw["milestones"], f"{at}: key 'milestones'") if raw.get("milestones") is not None else []
        if any(a.name == name for a in arms):
            raise UserError(f"{at}: arm name {name!r} repeats")
        arms.append(Arm(name, config, sets, ms))
    return arms


def parse_compare(value: Any, loc: str, where: str = "") -> list[tuple[str, str]]:
    """`compare:` a list of [arm A, arm B] pairs (margins A - B); blank = every pair of arms in their order."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 and all(isinstance(a, str)
                                                                                           for a in p)
                                              for p in value):
        raise UserError(f"{loc}: expected a list of [arm, arm] pairs, got {value!r}")
    return [(a, b) for a, b in value]


def _ints(value: Any, loc: str, where: str) -> list[int]:
    return parse_ints(value, loc, where)


def _seeds(value: Any, loc: str, where: str) -> list[int]:
    return parse_ints(value, loc, where, positive=False)


@dataclass
class StudyConfig:
    """A study: arms x seeds trained to the milestones, scored on val, the val-chosen milestone of each run on test."""

    name: str = opt("study", help="study name (default folder names)")
    val: str = opt("", help="validation prior file: every milestone of every run is scored on it (selection)")
    test: str = opt("", help="test prior file: only each run's val-chosen milestone is scored on it")
    val_limit: int = opt(0, lo=0, help="val records scored (the first N; 0 = all)")
    test_limit: int = opt(0, lo=0, help="test records scored (the first N; 0 = all)")
    seeds: list = field(default_factory=lambda: [0], metadata={
        "parse": _seeds, "help": "gan.seed of each run (weights' init and sample order); keep them apart from the "
                                 "sanity checks' randomisation seeds"})
    milestones: list = field(default_factory=list, metadata={
        "parse": _ints, "help": "samples seen at which each run's generator is saved and scored (an arm may set "
                                "its own)"})
    arms: list = field(default_factory=list, metadata={
        "parse": parse_arms, "help": "list of {name, config: train.py YAML, set: [section.key=value], milestones}"})
    compare: list = field(default_factory=list, metadata={
        "parse": parse_compare, "help": "[A, B] pairs whose margins A - B are tabled (blank: every pair)"})
    runs: str = opt("", help="folder of the runs (<runs>/<arm>/seed<seed>/); empty = outputs/study-<name>/runs")
    out: str = opt("", help="report folder; empty = outputs/study-<name>/report")
    threads: int = opt(1, lo=0, hi=1024, help="torch threads per run (0 = leave torch's default); --jobs runs "
                                              "side by side get 1 each")
    device: str = opt("cpu", choices=("auto", "cpu", "cuda"), help="training and scoring device")
    batch_size: int = opt(64, lo=1, hi=65_536, help="scoring batch size")
    resamples: int = opt(2000, lo=100, hi=1_000_000, help="hierarchical bootstrap resamples")
    bootstrap_seed: int = opt(0, lo=0, help="seed of the bootstrap")
    source_file: str = field(default="", metadata={"internal": True})

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def milestones_of(self, arm: Arm) -> list[int]:
        """The arm's milestones (its own, else the study's)."""
        return list(arm.milestones or self.milestones)

    @property
    def runs_dir(self) -> Path:
        return Path(self.runs or f"outputs/study-{self.name}/runs")

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"outputs/study-{self.name}/report")

    def pairs(self) -> list[tuple[str, str]]:
        """The compared pairs: `compare`, or every pair of arms in their order."""
        if self.compare:
            return list(self.compare)
        names = [a.name for a in self.arms]
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def _validate(cfg: StudyConfig, where: str) -> None:
    if not cfg.arms:
        raise UserError(f"{where}: key 'arms': the study names no arm")
    for key in ("val", "test"):
        if not getattr(cfg, key):
            raise UserError(f"{where}: key '{key}': a prior file is required")
    if not _NAME.match(cfg.name):
        raise UserError(f"{where}: key 'name': {cfg.name!r} must be letters, digits, _ . -")
    for arm in cfg.arms:
        if not cfg.milestones_of(arm):
            raise UserError(f"{where}: arm {arm.name!r}: no milestones (set milestones: for the study or the arm)")
    names = {a.name for a in cfg.arms}
    for a, b in cfg.compare:
        for n in (a, b):
            if n not in names:
                raise UserError(f"{where}: key 'compare': {n!r} is not an arm ({', '.join(sorted(names))})")


def load_study_config(path: str | os.PathLike, overrides: list[str] = ()) -> StudyConfig:
    """Read a study YAML, apply `--set key=value` overrides, validate; relative paths stay relative to the working
    directory (as the run configs')."""
    where = str(path)
    raw = read_yaml_mapping(path, "configs/study_*.yaml", "keys (name, val, test, seeds, milestones, arms)")
    apply_overrides(raw, overrides)
    cfg = StudyConfig()
    fill(cfg, raw, where)
    _validate(cfg, where)
    cfg.source_file = where
    return cfg
