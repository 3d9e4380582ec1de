"""Evaluation sections as small classes: `run(ctx) -> results`, `render(report, results, folder, ctx)`, a registry.

Every part of the evaluation report is one section class registered by name (`order` places it). The config's
`sections:` list names the selectable ones (blank: the `default` ones); an optional mapping under a section's
name holds its options (a dataclass the class declares), e.g.

    sections: [faithfulness, mprt]
    mprt: {num: 64, seed: 0}        # or --set mprt.num=16

An options class may also take keys that are not its fields (a staticmethod `take_key(opts, key, value, loc)`
returning whether it took the key, and a `keyed_help` line for --help), e.g. `control: {<generator name>: ...}`.

Fidelity and the training curves always run. The default sections have a heading in every report (saying when
they were not run); the others appear only when run. To add a section, write one class in this package and
import its module in `__init__.py`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cnnprior.core.errors import UserError
from cnnprior.core.runtime import Log
from cnnprior.core.schema import opt, suggest
from cnnprior.present.report import Report
from cnnprior.priors.priorfile import PriorFile

__all__ = [
    "default_names", "describe_options", "EvalContext", "EvalSet", "metrics_entries", "not_run_note", "option",
    "OPTIONS", "options_of", "parse_options", "register", "render_sections", "run_sections", "Section",
    "section_names", "SECTIONS", "selectable_names", "set_options"
]


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
    notes: list[str]  # the report's notes, in the order they arise
    log: Log = print
    target_layer: nn.Module | None = None  # the CNN module whose map is the prior file's target
    road_images: list[int] = field(default_factory=list)  # ROAD's image subset (set by the faithfulness section)
    cache: dict[str, Any] = field(default_factory=dict)  # values shared by sections (see `shared`)

    @property
    def image_size(self) -> int:
        """The CNN's input size R."""
        return int(self.cnn_meta["image_size"])

    def options(self, name: str) -> Any:
        """The options of section `name` (its defaults when the config sets none)."""
        return options_of(self.cfg, name)

    def shared(self, key: str, make: Any) -> Any:
        """make(), computed once per evaluation and shared by the sections that ask for `key`."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


class Section:
    """One evaluation section. A subclass is registered by its class keywords, e.g.

        class MySection(Section, name="mine", title="My check", order=50, options=MyOptions): ...

    `name` (its key in `sections:` and metrics.json), `title` (report heading), and optionally the others below.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    options: ClassVar[type | None] = None
    order: ClassVar[int] = 100  # place in the report and in listings (lower first)
    selectable: ClassVar[bool] = True  # named in `sections:`; False: always runs
    default: ClassVar[bool] = False  # runs when `sections:` is left blank; has a heading in every report
    in_metrics: ClassVar[bool] = True  # its results are an entry of metrics.json
    options_in_results: ClassVar[bool] = True  # its options are recorded with its results
    announce: ClassVar[bool] = True  # log "<runtime key> done" after it ran
    runtime_key: ClassVar[str] = ""  # its row in the report's runtime table (default: its name)

    def __init_subclass__(cls, **attributes: Any) -> None:
        super().__init_subclass__()
        for key, value in attributes.items():
            if key not in Section.__annotations__:
                raise TypeError(f"{cls.__name__}: unknown section attribute {key!r}")
            setattr(cls, key, value)
        if cls.name:
            register(cls)

    @classmethod
    def always_reported(cls) -> bool:
        """Whether the report has this section's heading even when it did not run."""
        return cls.default or not cls.selectable

    @classmethod
    def selected(cls, cfg: Any) -> bool:
        """Whether this evaluation runs the section."""
        return not cls.selectable or cls.name in cfg.sections

    def not_run(self, report: Report, ctx: EvalContext) -> bool:
        """Whether the config did not select this section; the report then says so (`not_run_note`)."""
        if self.selected(ctx.cfg):
            return False
        not_run_note(report)
        return True

    def empty(self) -> Any:
        """The results recorded for a default section that was not run."""
        return None

    def run(self, ctx: EvalContext) -> Any:
        """Compute the section's results (plain data: numbers, lists, dicts; tensors become lists); None: nothing
        was computed (no runtime is recorded)."""
        raise NotImplementedError

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        """Add the section's text, tables and charts (written into `folder`) to the report."""
        raise NotImplementedError


SECTIONS: dict[str, type[Section]] = {}
OPTIONS: dict[str, type] = {}  # section name -> its options dataclass


def register(cls: type[Section]) -> type[Section]:
    """Make a section class available under `cls.name` (Section subclasses with a name call this themselves)."""
    if not cls.name or cls.name in SECTIONS:
        raise ValueError(f"section name {cls.name!r} is empty or taken")
    SECTIONS[cls.name] = cls
    if cls.options is not None:
        OPTIONS[cls.name] = cls.options
    return cls


def section_names() -> list[str]:
    """Registered section names in report order."""
    return sorted(SECTIONS, key=lambda n: SECTIONS[n].order)


def selectable_names() -> list[str]:
    """The names `sections:` accepts, in report order."""
    return [n for n in section_names() if SECTIONS[n].selectable]


def default_names() -> list[str]:
    """The sections run when `sections:` is left blank."""
    return [n for n in section_names() if SECTIONS[n].selectable and SECTIONS[n].default]


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
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    if not isinstance(value, dict):
        raise UserError(f"{where}: key '{name}': expected a mapping of {', '.join(fields)}, got {value!r}")
    take = getattr(cls, "take_key", None)  # options keyed by name, e.g. control.<generator>
    for key, v in value.items():
        if key not in fields and take is not None and take(opts, str(key), v, f"{where}: key '{name}.{key}'"):
            continue
        if key not in fields:
            hint = suggest(str(key), fields, listing=None, prefix=f"{name}.") or f" (known: {', '.join(fields)})"
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
    lines = [f"  sections (name them in `sections:`): {', '.join(selectable_names())}; default: "
             f"{', '.join(default_names())}"]
    for name in sorted(OPTIONS, key=lambda n: SECTIONS[n].order):
        cls = OPTIONS[name]
        if getattr(cls, "keyed_help", ""):
            lines.append(f"  {name}.{cls.keyed_help}")
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            extra = f.metadata.get("help", "")
            lines.append(f"  {name}.{f.name} = {f.default!r}" + (f"  ({extra})" if extra else ""))
    return "\n".join(lines)


def run_sections(ctx: EvalContext, runtime: dict[str, float]) -> dict[str, Any]:
    """Run the sections the config selects, in report order; their results by name (a default section that was
    not run: its empty results). Each section's seconds go to runtime[its runtime key]."""
    results: dict[str, Any] = {}
    for name in section_names():
        section = SECTIONS[name]()
        if not section.selected(ctx.cfg):
            if section.default:
                results[name] = section.empty()
            continue
        t = time.time()
        res = results[name] = section.run(ctx)
        if res is None:
            continue
        if section.options is not None and section.options_in_results:
            res["options"] = dataclasses.asdict(ctx.options(name))
        key = section.runtime_key or name
        runtime[key] = time.time() - t
        if section.announce:
            ctx.log(f"evaluate: {key} done ({runtime[key]:.1f}s)")
    return results


def render_sections(report: Report, results: dict[str, Any], folder: Path, ctx: EvalContext) -> dict[str, dict]:
    """Numbered headings and the body of every section that ran or is always reported; returns the winners of
    each section's scored table (one whose columns say which value is best)."""
    winners: dict[str, dict] = {}
    number = 0
    for name in section_names():
        section = SECTIONS[name]()
        if name not in results and not section.always_reported():
            continue
        number += 1
        report.h(f"{number}. {section.title}")
        first = len(report.blocks)
        section.render(report, results.get(name), folder, ctx)
        for block in report.blocks[first:]:
            if block[0] == "table" and any(block[1].better):
                winners[name] = block[1].winners()
    return winners


def metrics_entries(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics.json entries of the sections: (those always reported, the others that ran), each in report order."""
    entries = {n: r for n, r in results.items() if SECTIONS[n].in_metrics}
    always = {n: r for n, r in entries.items() if SECTIONS[n].always_reported()}
    return always, {n: r for n, r in entries.items() if n not in always}


def not_run_note(report: Report) -> None:
    """The body of a default section the config did not select."""
    report.p("Not run (`sections`).")


@dataclass
class EvalSet:
    """An extra held-out prior file (another CNN or dataset) the same GANs are scored on (fidelity only)."""

    name: str = opt("", help="label in the report")
    priors: str = opt("", help="prior file (.npy with its .json sidecar)")
    select: list = opt([], help="generalisation: val prior files on which this file's best single prior is "
                                "chosen (for a CNN the generators never saw: other CNNs' val files, never its own)")
    held_out: str = opt("", help="generalisation: label of the generator that never saw this file's CNN (a "
                                 "leave-one-out generator); scored against in_domain and the best single prior")
    in_domain: str = opt("", help="generalisation: label of the generator trained on this file's CNN alone")
    universal: str = opt("", help="generalisation: label of the generator trained on this CNN among others")
