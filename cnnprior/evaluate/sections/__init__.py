"""Evaluation sections registered by name (see `base`): importing this package imports every module in it, and
each `Section` subclass there registers itself, so a new section is one file here (or a class defined anywhere
and imported before the evaluation runs)."""

import importlib
import pkgutil

from cnnprior.evaluate.sections.base import (
    OPTIONS,
    SECTIONS,
    EvalContext,
    Section,
    default_names,
    describe_options,
    metrics_entries,
    options_of,
    render_sections,
    run_sections,
    section_names,
    selectable_names,
    set_options,
)

__all__ = ["OPTIONS", "SECTIONS", "EvalContext", "Section", "default_names", "describe_options", "metrics_entries",
           "options_of", "render_sections", "run_sections", "section_names", "selectable_names",
           "set_options"]

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")
