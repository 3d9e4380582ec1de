"""Evaluation sections registered by name (see `base`); importing this package registers them all."""

from cnnprior.sections import control, faithfulness, gridpg, mprt, swap  # noqa: F401  (registration)
from cnnprior.sections.base import (
    OPTIONS,
    SECTIONS,
    EvalContext,
    Section,
    describe_options,
    options_of,
    register,
    render_sections,
    run_sections,
    section_names,
    set_options,
)

__all__ = ["OPTIONS", "SECTIONS", "EvalContext", "Section", "describe_options", "options_of", "register",
           "render_sections", "run_sections", "section_names", "set_options"]
