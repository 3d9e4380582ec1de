"""The evaluation config (`python -m cnnprior.evaluate`): its own flat YAML -> a validated `EvalConfig`; section
options (`mprt: {num: 64}`) and `--set` overrides; clear one-line errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnprior.core.errors import UserError
from cnnprior.core.schema import apply_overrides, coerce, fill, opt, read_yaml_mapping, suggest
from cnnprior.evaluate import sections
from cnnprior.evaluate.sections.base import EvalSet
from cnnprior.gan.models.base import L1_SUFFIX, names

__all__ = ["EvalConfig", "EvalSet", "generator_keys", "L1_SUFFIX", "load_eval_config", "parse_eval_sets",
           "parse_explainers", "parse_generators", "parse_sections"]


def generator_keys() -> tuple[str, ...]:
    """The names a generator checkpoint is evaluated under, in report order: the registered GANs, their L1-only
    twins (`<gan>_l1`, trained with gan.adv_weight 0), the learned baselines (registered, not adversarial)."""
    gans = names(adversarial=True)
    return gans + tuple(g + L1_SUFFIX for g in gans) + names(adversarial=False)


def parse_explainers(value: Any, loc: str, where: str) -> dict[str, str]:
    """`explainers:` a mapping {generator key: checkpoint} (see `generator_keys`); blank checkpoints are left out."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{loc}: expected a mapping of generator name to checkpoint, got {value!r}")
    known = generator_keys()
    out = {}
    for key, path in value.items():
        if key not in known:
            raise UserError(f"{loc}: {key!r} is not a registered generator or <gan>{L1_SUFFIX} twin"
                            f"{suggest(str(key), known, listing='known')}")
        if path is not None and not isinstance(path, str):
            raise UserError(f"{loc}: {key!r}: expected a checkpoint path, got {path!r}")
        if path:
            out[key] = path
    return out


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
            raise UserError(f"{loc}: {s!r} is not one of {', '.join(known)}{suggest(s, known, listing=None)}; "
                            f"fidelity always runs")
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
    explainers: dict = field(default_factory=dict, metadata={
        "help": "the generators evaluated, {name: checkpoint}: a registered generator (lsft, gsft, linear, convnet, "
                "...) or <gan>_l1, its twin trained with gan.adv_weight 0; each name is also a top-level key "
                "(lsft: <checkpoint>, --set lsft=...)", "parse": parse_explainers})
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


def _extra_keys(cfg: EvalConfig, where: str, aliases: dict[str, str]) -> Callable[[str, Any], bool]:
    """The `extra` hook of `fill` for an evaluation config: a section's options mapping (`mprt: {num: 64}`), or a
    generator key at the top level (`lsft: <checkpoint>`), collected into `aliases`."""

    def take(key: str, value: Any) -> bool:
        if key in sections.OPTIONS:
            sections.set_options(cfg, key, value, where)
            return True
        if key in generator_keys():
            aliases.update(parse_explainers({key: value}, f"{where}: key '{key}'", where))
            return True
        return False

    return take


def _merge_explainers(cfg: EvalConfig, aliases: dict[str, str], where: str) -> dict[str, str]:
    """`explainers:` and the top-level generator keys in one mapping, in report order; returns each key's config
    location. A generator given both ways with two checkpoints is an error."""
    locs = {k: f"explainers.{k}" for k in cfg.explainers}
    for key, path in aliases.items():
        if cfg.explainers.get(key, path) != path:
            raise UserError(f"{where}: key '{key}' and key 'explainers.{key}' name two checkpoints; keep one")
        locs[key] = key
    merged = {**cfg.explainers, **aliases}
    order = generator_keys()
    cfg.explainers = {k: merged[k] for k in sorted(merged, key=order.index)}
    return locs


def _eval_key_problem(keys: list[str]) -> str | None:
    """`--set` keys are flat (`num=64`) or a section's option (`mprt.num=16`)."""
    if len(keys) == 1 or (len(keys) == 2 and (keys[0] in sections.OPTIONS or keys[0] == "explainers")):
        return None
    return ("evaluation keys are flat (e.g. --set num=64; section options: --set mprt.num=16; generators: "
            "--set lsft=... or --set explainers.lsft=...)")


def _check_eval_files(cfg: EvalConfig, where: str, locs: dict[str, str]) -> None:
    """The prior file is required; every configured file must exist (`locs`: each generator's config key)."""
    if not cfg.priors:
        raise UserError(f"{where}: key 'priors' is required (the held-out prior file, e.g. npys/<name>-test.npy)")
    gans = names(adversarial=True)
    files = (("priors", cfg.priors, "prior file"),
             *((locs[k], path, f"{k.upper() if k in gans else k} checkpoint") for k, path in cfg.explainers.items()),
             ("cnn", cfg.cnn, "CNN checkpoint"))
    for key, value, kind in files:
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
    apply_overrides(raw, overrides, _eval_key_problem)
    cfg = EvalConfig()
    aliases: dict[str, str] = {}
    fill(cfg, raw, where, blank_is_empty=True, extra=_extra_keys(cfg, where, aliases))
    if not cfg.name or any(c in cfg.name for c in "/\\ "):
        raise UserError(f"{where}: key 'name': {cfg.name!r} must be non-empty without spaces or slashes")
    _check_eval_files(cfg, where, _merge_explainers(cfg, aliases, where))
    cfg.source_file = str(p)
    return cfg
