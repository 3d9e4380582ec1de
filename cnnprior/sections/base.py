"""Evaluation sections as small classes: `run(ctx) -> results`, `render(report, results, folder)`, a registry.

A section is one class registered by name; the evaluation config's `sections:` list names it, and an optional
mapping under the same name holds its options (a dataclass the class declares), e.g.

    sections: [faithfulness, mprt]
    mprt: {num: 64, seed: 0}        # or --set mprt.num=16
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cnnprior.errors import UserError
from cnnprior.priorfile import PriorFile


def option(default: Any, *, lo: float | None = None, hi: float | None = None, choices: tuple | None = None,
           help: str = "", file: bool = False) -> Any:
    """A section-option field with its checks: an inclusive range, choices, or a file that must exist."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "help": help, "file": file})


@dataclass
class EvalContext:
    """What a section's `run` gets: the config, the evaluated records and the loaded models."""

    cfg: Any  # EvalConfig
    pf: PriorFile
    data: dict[str, Tensor]  # PriorFile.tensors of the first `count` records
    count: int
    cnn: nn.Module
    cnn_meta: dict
    gans: list  # the evaluated generators: .label, .variant, .model, .meta, .maps (on `data`)
    device: torch.device
    notes: list[str]
    log: Callable[[str], Any] = print

    @property
    def image_size(self) -> int:
        """The CNN's input size R."""
        return int(self.cnn_meta["image_size"])

    def options(self, name: str) -> Any:
        """The options of section `name` (its defaults when the config sets none)."""
        return options_of(self.cfg, name)


class Section:
    """One evaluation section; subclasses set `name`, `title` (report heading) and optionally `options`."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    options: ClassVar[type | None] = None
    order: ClassVar[int] = 100  # place in the report and in listings (lower first)

    def run(self, ctx: EvalContext) -> dict:
        """Compute the section's results (plain data: numbers, lists, dicts; tensors become lists)."""
        raise NotImplementedError

    def render(self, report: Any, results: dict, folder: Path) -> None:
        """Add the section's text, tables and charts (written into `folder`) to the report."""
        raise NotImplementedError


SECTIONS: dict[str, type[Section]] = {}
OPTIONS: dict[str, type] = {}  # section name -> its options dataclass (also for sections not yet classes)


def register(cls: type[Section]) -> type[Section]:
    """Class decorator: make a section available under `cls.name`."""
    if not cls.name or cls.name in SECTIONS:
        raise ValueError(f"section name {cls.name!r} is empty or taken")
    SECTIONS[cls.name] = cls
    if cls.options is not None:
        OPTIONS[cls.name] = cls.options
    return cls


def section_names() -> list[str]:
    """Registered section names in report order."""
    return sorted(SECTIONS, key=lambda n: SECTIONS[n].order)


def register_options(name: str, cls: type) -> type:
    """Declare the options of a section that is not (yet) a registered class."""
    OPTIONS[name] = cls
    return cls


def _check_option(value: Any, f: dataclasses.Field, loc: str) -> Any:
    """Type, range, choices and file checks of one option value; ints are accepted for floats."""
    kind = type(f.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and value is None:
        value = ""
    if type(value) is not kind:
        raise UserError(f"{loc}: expected {kind.__name__}, got {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise UserError(f"{loc}: {value!r} is not one of {', '.join(meta['choices'])}")
    if meta.get("lo") is not None and value < meta["lo"]:
        raise UserError(f"{loc}: {value!r} is below the minimum {meta['lo']}")
    if meta.get("hi") is not None and value > meta["hi"]:
        raise UserError(f"{loc}: {value!r} is above the maximum {meta['hi']}")
    if meta.get("file") and value and not Path(value).is_file():
        raise UserError(f"{loc}: {value}: file not found")
    return value


def parse_options(name: str, value: Any, where: str) -> Any:
    """The options dataclass of section `name` from its config mapping (None = defaults); one-line errors."""
    cls = OPTIONS[name]
    opts = cls()
    if value is None:
        return opts
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(value, dict):
        raise UserError(f"{where}: key '{name}': expected a mapping of {', '.join(fields)}, got {value!r}")
    for key, v in value.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean '{name}.{close[0]}'?)" if close else f" (known: {', '.join(fields)})"
            raise UserError(f"{where}: unknown key '{name}.{key}'{hint}")
        setattr(opts, key, _check_option(v, fields[key], f"{where}: key '{name}.{key}'"))
    return opts


def set_options(cfg: Any, name: str, value: Any, where: str) -> None:
    """Parse and keep the options of section `name` on the config (its `section_options` mapping)."""
    store = cfg.__dict__.setdefault("section_options", {})
    store[name] = parse_options(name, value, where)


def options_of(cfg: Any, name: str) -> Any:
    """The options of section `name` on a config (defaults when unset)."""
    return cfg.__dict__.get("section_options", {}).get(name) or OPTIONS[name]()


def describe_options() -> str:
    """The registered sections and every section option with its default, for --help."""
    lines = [f"  registered sections (name them in `sections:`): {', '.join(section_names())}"]
    for name in sorted(OPTIONS, key=lambda n: SECTIONS[n].order if n in SECTIONS else 0):
        cls = OPTIONS[name]
        for f in dataclasses.fields(cls):
            extra = f.metadata.get("help", "")
            lines.append(f"  {name}.{f.name} = {f.default!r}" + (f"  ({extra})" if extra else ""))
    return "\n".join(lines)


def run_sections(ctx: EvalContext, names: list[str], runtime: dict[str, float]) -> dict[str, dict]:
    """Run the registered sections among `names`, in report order; their results by name (options included)."""
    results: dict[str, dict] = {}
    for name in section_names():
        if name not in names:
            continue
        t = time.time()
        res = SECTIONS[name]().run(ctx)
        if name in OPTIONS:
            res["options"] = dataclasses.asdict(ctx.options(name))
        results[name] = res
        runtime[name] = time.time() - t
        ctx.log(f"evaluate: {name} done ({runtime[name]:.1f}s)")
    return results


def render_sections(report: Any, results: dict[str, dict], folder: Path, first: int) -> None:
    """Numbered headings (from `first`) and the body of each section that ran."""
    for i, (name, res) in enumerate(results.items()):
        report.h(f"{first + i}. {SECTIONS[name].title}")
        SECTIONS[name]().render(report, res, folder)
