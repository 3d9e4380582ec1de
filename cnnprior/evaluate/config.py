"""The evaluation config (`python -m cnnprior.evaluate`): its own flat YAML -> a validated `EvalConfig`; section
options (`mprt: {num: 64}`) and `--set` overrides; clear one-line errors."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnprior.core import generators
from cnnprior.core.errors import UserError
from cnnprior.core.schema import coerce, fill, opt, parse_override, read_yaml_mapping
from cnnprior.evaluate import sections
from cnnprior.evaluate.sections.base import EvalSet

__all__ = ["EvalConfig", "EvalSet", "GENERATOR_KEYS", "L1_SUFFIX", "load_eval_config", "parse_eval_sets",
           "parse_generators", "parse_sections"]

L1_SUFFIX = "_l1"  # <gan>_l1: the GAN's twin trained with the adversarial term off
# the generator checkpoint keys, in report order: the GANs, their L1-only twins, the learned baselines
GENERATOR_KEYS = generators.NAMES + tuple(v + L1_SUFFIX for v in generators.NAMES) + generators.BASELINES


def parse_sections(value: Any, loc: str, where: str = "") -> list[str]:
    """`sections:` a list, or a comma-separated string (`--set sections=a,b`); blank = the default sections
    (the others, such as the sanity checks, run only when named)."""
    if value is None:
        return sections.default_names()
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    value = coerce(value, list, loc)
    known = sections.selectable_names()
    for s in value:
        if s not in known:
            close = difflib.get_close_matches(s, known, n=1, cutoff=0.6)
            raise UserError(f"{loc}: {s!r} is not one of {', '.join(known)}"
                            + (f" (did you mean '{close[0]}'?)" if close else "") + "; fidelity always runs")
    return list(dict.fromkeys(value))


def parse_generators(value: Any, loc: str, where: str) -> dict[str, str]:
    """`generators:` a mapping {label: generator checkpoint} (scored in the generalisation section only)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                              for k, v in value.items()):
        raise UserError(f"{loc}: expected a mapping of label to generator checkpoint, got {value!r}")
    for label, path in value.items():
        if not Path(path).is_file():
            raise UserError(f"{loc}: {label!r}: {path}: generator checkpoint not found (train it with --stage gan, or "
                            f"remove the entry)")
    return dict(value)


def parse_eval_sets(value: Any, loc: str, where: str) -> list[EvalSet]:
    """`generalisation:` entries, each {name, priors} or just a prior-file path."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{loc}: expected a list of {{name, priors}} entries, got {value!r}")
    sets: list[EvalSet] = []
    for i, item in enumerate(value):
        entry = EvalSet()
        if isinstance(item, str):
            entry.priors = item
        elif isinstance(item, dict):
            fill(entry, item, where, f"generalisation[{i}].", blank_is_empty=True)
        else:
            raise UserError(f"{loc}[{i}]: expected {{name, priors}} or a path, got {item!r}")
        if not entry.priors:
            raise UserError(f"{loc}[{i}]: 'priors' (a prior file) is required")
        entry.name = entry.name or Path(entry.priors).stem
        if entry.name in {s.name for s in sets}:
            raise UserError(f"{loc}[{i}]: name {entry.name!r} is used twice")
        sets.append(entry)
    return sets


@dataclass
class EvalConfig:
    """The evaluation stage (`python -m cnnprior.evaluate`): its own flat YAML (`load_eval_config`)."""

    name: str = opt("eval", help="report name: outputs/eval-<name>-<timestamp>")
    priors: str = opt("", help="held-out prior file the GANs are evaluated on (required)")
    lsft: str = opt("", help="LSFT generator checkpoint (empty = none)")
    gsft: str = opt("", help="GSFT generator checkpoint (empty = none)")
    lsft_l1: str = opt("", help="LSFT trained with gan.adv_weight: 0 (the adversarial ablation; empty = none)")
    gsft_l1: str = opt("", help="GSFT trained with gan.adv_weight: 0 (the adversarial ablation; empty = none)")
    convnet: str = opt("", help="learned baseline `convnet` checkpoint (empty = none)")
    linear: str = opt("", help="learned baseline `linear` checkpoint (empty = none)")
    cnn: str = opt("", help="CNN checkpoint; empty = the prior file's cnn.checkpoint")
    num: int = opt(256, lo=0, help="images evaluated: the first num records (0 = all)")
    batch_size: int = opt(32, lo=1, hi=65_536)
    device: str = opt("auto", choices=("auto", "cpu", "cuda"))
    steps: int = opt(16, lo=1, hi=10_000, help="deletion/insertion steps")
    road_num: int = opt(32, lo=0, help="ROAD on a seeded random subset of this many images (0 = skip ROAD)")
    seed: int = opt(0, lo=0, help="seed of the random-map baseline, the ROAD subset and ROAD's noise")
    generators: dict = field(default_factory=dict, metadata={
        "help": "more generators by label, {label: checkpoint}, scored in the generalisation section only (e.g. "
                "universal and leave-one-out generators)", "parse": parse_generators})
    generalisation: list = field(default_factory=list, metadata={
        "help": "extra prior files, a list of {name, priors} (fidelity only)", "parse": parse_eval_sets})
    sections: list = field(default_factory=lambda: sections.default_names(), metadata={
        "help": "sections run besides fidelity (listed below; blank = the default ones), e.g. [generalisation] for "
                "a quick cross-CNN table", "parse": parse_sections})
    source_file: str = field(default="", metadata={"internal": True})


def _section_options(cfg: EvalConfig, where: str) -> Callable[[str, Any], bool]:
    """The `extra` hook of `fill` for an evaluation config: a section's options mapping (`mprt: {num: 64}`)."""

    def take(key: str, value: Any) -> bool:
        if key not in sections.OPTIONS:
            return False
        sections.set_options(cfg, key, value, where)
        return True

    return take


def _apply_eval_overrides(raw: dict, overrides: Sequence[str]) -> None:
    """`--set key=value` (flat keys) and `--set section.option=value` onto the raw YAML mapping."""
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 2 and keys[0] in sections.OPTIONS:  # a section option: --set mprt.num=16
            node = raw.get(keys[0])
            raw[keys[0]] = {**(node if isinstance(node, dict) else {}), keys[1]: value}
            continue
        if len(keys) != 1:
            raise UserError(f"--set {text!r}: evaluation keys are flat (e.g. --set num=64; section options: "
                            f"--set mprt.num=16)")
        raw[keys[0]] = value


def _check_eval_files(cfg: EvalConfig, where: str) -> None:
    """The prior file is required; every configured file must exist."""
    if not cfg.priors:
        raise UserError(f"{where}: key 'priors' is required (the held-out prior file, e.g. npys/<name>-test.npy)")
    files = (("priors", "prior file"), *((k, f"{k.upper() if k in generators.NAMES else k} checkpoint")
                                           for k in GENERATOR_KEYS),
             ("cnn", "CNN checkpoint"))
    for key, kind in files:
        value = getattr(cfg, key)
        if value and not Path(value).is_file():
            hint = {"priors": "write it with `python train.py --config <run config> --stage priors`",
                    "cnn": "or leave cnn empty to use the prior file's CNN"}.get(key, "train it with --stage gan, or "
                                                                                      "leave the key empty")
            raise UserError(f"{where}: key '{key}': {value}: {kind} not found ({hint})")


def load_eval_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read an evaluation YAML, apply `--set key=value` overrides, validate keys, values and files."""
    p = Path(path)
    where = str(p)
    raw = read_yaml_mapping(p, "configs/eval_*.yaml", "keys (name, priors, lsft, gsft, ...)")
    _apply_eval_overrides(raw, overrides)
    cfg = EvalConfig()
    fill(cfg, raw, where, blank_is_empty=True, extra=_section_options(cfg, where))
    if not cfg.name or any(c in cfg.name for c in "/\\ "):
        raise UserError(f"{where}: key 'name': {cfg.name!r} must be non-empty without spaces or slashes")
    _check_eval_files(cfg, where)
    cfg.source_file = str(p)
    return cfg
