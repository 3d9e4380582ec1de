"""Section `control`: image-only control generators (trained with `gan.priors: none`), one per generator name
(`control: {lsft: <checkpoint>, gsft: ..., <any registered generator>: ...}`), and every evaluated generator's
margin over each."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from cnnprior.core.config import Config, to_dict
from cnnprior.core.errors import UserError
from cnnprior.evaluate.sanity import format_ci, mean_ci
from cnnprior.evaluate.sections.base import EvalContext, Section, option
from cnnprior.gan.checkpoint import GeneratorMeta, load_generator
from cnnprior.gan.models.base import get, names
from cnnprior.maps import metrics
from cnnprior.maps.ops import generate, resize_maps
from cnnprior.present.report import Report, Table
from cnnprior.priors import cams
from cnnprior.priors.cams import live_cams

__all__ = ["ControlOptions", "ControlSection", "images_per_second", "load_control", "recipe_differences"]

_DEFAULTS = to_dict(Config())["gan"]  # today's defaults: what a checkpoint written before a key existed ran with
# gan keys that may differ between a GAN and its image-only control without changing the training recipe
_SAME_RECIPE_FREE = frozenset({"priors", "image", "out", "device", "checkpoint_every", "val", "val_limit"})


@dataclass
class ControlOptions:
    """Options of the `control` section: `speed_num`, and one key per registered generator naming its image-only
    control checkpoint (`control.lsft`, `control.gsft`, ...; blank = none), kept in `checkpoints`."""

    speed_num: int = option(64, lo=1, help="images timed for the speed figures")
    checkpoints: dict = field(default_factory=dict, metadata={"internal": True})  # generator name -> checkpoint

    keyed_help: ClassVar[str] = ("<generator> = ''  (image-only control checkpoint of that registered generator, "
                                 "trained with gan.priors: none: control.lsft, control.gsft, ...)")

    @staticmethod
    def take_key(opts: ControlOptions, key: str, value: Any, loc: str) -> bool:
        """A key naming a registered generator: its control checkpoint (must exist; blank = none)."""
        if key not in names():
            return False
        value = "" if value is None else value
        if not isinstance(value, str):
            raise UserError(f"{loc}: expected a checkpoint path, got {value!r}")
        if value and not Path(value).is_file():
            raise UserError(f"{loc}: {value}: file not found")
        if value:
            opts.checkpoints[key] = value
        else:
            opts.checkpoints.pop(key, None)
        return True


def load_control(path: str, variant: str, ctx: EvalContext) -> tuple[Any, GeneratorMeta]:
    """An image-only generator; a checkpoint trained with priors, for other S/n, or of another generator than
    `variant` is a one-line error."""
    model, meta = load_generator(path, device=ctx.device)
    trained = meta.inputs[1]
    if trained != "none":
        raise UserError(f"control.{variant}: {path} was trained with gan.priors: {trained}, not an image-only "
                        f"control (train one with --set gan.priors=none)")
    if meta.variant != variant:
        raise UserError(f"control.{variant}: {path} is a {meta.variant} checkpoint (name it control.{meta.variant})")
    if (meta.size, meta.n) != (ctx.pf.size, ctx.pf.n):
        raise UserError(f"control.{variant}: {path} was trained on S={meta.size}, n={meta.n} but "
                        f"{ctx.pf.path} has S={ctx.pf.size}, n={ctx.pf.n}")
    return model, meta


def recipe_differences(gan_meta: GeneratorMeta, control_meta: GeneratorMeta) -> list[str]:
    """How an image-only control's training differs from a GAN's, besides `gan.priors: none`: differing gan.*
    keys (architecture, budget, files, warm start, randomised share), samples seen, and the train files."""
    a, b = gan_meta.gan, control_meta.gan
    # a key only one side has is a difference unless the other side predates it and the one has its default
    out = [f"gan.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b))
           if k not in _SAME_RECIPE_FREE and a.get(k) != b.get(k)
           and not (k not in a and b.get(k) == _DEFAULTS.get(k, object()))
           and not (k not in b and a.get(k) == _DEFAULTS.get(k, object()))]
    steps = [m.step * int(m.gan.get("batch_size") or 0) for m in (gan_meta, control_meta)]
    if steps[0] != steps[1]:
        out.append(f"samples seen by the kept checkpoint: {steps[0]:,} vs {steps[1]:,}")
    for key, what in (("train_files", "train prior files"), ("randomised", "randomised-CNN prior files")):
        a_files, b_files = (m.priors_meta.get(key) for m in (gan_meta, control_meta))
        if a_files != b_files:
            out.append(f"{what}: {a_files!r} vs {b_files!r}")
    return out


def images_per_second(fn: Callable[[slice], Any], count: int, batch_size: int) -> float:
    """Throughput of fn(batch slice) over `count` items, after one untimed warm-up batch."""
    fn(slice(0, batch_size))
    t = time.perf_counter()
    for i in range(0, count, batch_size):
        fn(slice(i, i + batch_size))
    return count / max(time.perf_counter() - t, 1e-9)


def _speeds(ctx: EvalContext, controls: dict[str, Any], num: int) -> dict[str, float]:
    """Images/s: each generator alone (no CNN call), and Grad-CAM (a CNN forward + backward) for context."""
    d, bs, dev = ctx.data, ctx.cfg.batch_size, ctx.device
    images, zeros = d["image"][:num].to(dev), torch.zeros_like(d["priors"][:num]).to(dev)
    speeds: dict[str, float] = {}
    with torch.no_grad():
        for label, model in [*controls.items(), *((g.label, g.model) for g in ctx.gans)]:
            speeds[f"{label} generator"] = images_per_second(lambda sl, m=model: m(images[sl], zeros[sl]), num, bs)
    name = ctx.pf.meta.get("target_layer") or ""
    try:
        layer = ctx.cnn.get_submodule(name) if name else None
    except AttributeError:
        layer = None
    if layer is None:
        return speeds
    images_r, classes = resize_maps(images, ctx.image_size), d["explained"][:num].to(dev)
    speeds[f"{cams.title(cams.DEFAULT)} (CNN forward + backward)"] = images_per_second(
        lambda sl: live_cams(ctx.cnn, layer, images_r[sl], classes[sl], cams.DEFAULT, bs), num, bs)
    return speeds


class ControlSection(Section, name="control", title="Control: image-only generator", options=ControlOptions, order=30):
    """Fidelity of the image-only control, and each GAN's r minus the control's r (paired per image)."""

    def run(self, ctx: EvalContext) -> dict:
        opts = ctx.options(self.name)
        order = names()
        paths = {v: opts.checkpoints[v] for v in sorted(opts.checkpoints, key=order.index)}
        if not paths:
            ctx.notes.append("control: no image-only generator configured (control.lsft / control.gsft)")
            return {"images": ctx.count, "controls": {}, "margins": {}, "speed": {}}
        d = ctx.data
        controls, fid, r_of = {}, {}, {}
        for variant, path in paths.items():
            model, cmeta = load_control(path, variant, ctx)
            label = f"{variant.upper() if get(variant).adversarial else variant} control"
            controls[label] = model
            maps = generate(model, d["image"], torch.zeros_like(d["priors"]), ctx.cfg.batch_size, ctx.device)
            r_of[label] = metrics.pearson(maps, d["target"])
            diffs = {g.label: recipe_differences(g.meta, cmeta) for g in ctx.gans if g.variant == variant}
            fid[label] = {"path": path, "r": mean_ci(r_of[label]), "l1": mean_ci(metrics.l1(maps, d["target"])),
                          "differences": diffs,
                          "ssim": mean_ci(metrics.ssim_or_nan(maps.double(), d["target"].double()))}
        margins = {}
        for g in ctx.gans:
            r_gan = metrics.pearson(g.maps, d["target"])
            for label, r_c in r_of.items():
                margins[f"{g.label} − {label}"] = {"gan_r": mean_ci(r_gan), "control_r": mean_ci(r_c),
                                                  "margin": mean_ci(r_gan - r_c)}
        return {"images": ctx.count, "controls": fid, "margins": margins,
                "speed": _speeds(ctx, controls, min(opts.speed_num, ctx.count)), "device": str(ctx.device)}

    def render(self, report: Report, results: Any, folder: Path, ctx: EvalContext) -> None:
        if not results["controls"]:
            report.p("No image-only control generator configured (`control: {lsft: …, gsft: …}`, trained with "
                     "`--set gan.priors=none`).")
            return
        report.p(f"An image-only control: a generator trained with the priors zeroed in training, validation and "
                 f"here (`gan.priors: none`): its r is the part of the score the image alone explains. **N = "
                 f"{results['images']} images**; mean [95 % bootstrap interval]; margins are paired per image.")
        for label, s in results["controls"].items():
            for gan, diffs in (s.get("differences") or {}).items():
                report.p(f"{label} vs {gan}: " + ("same recipe, budget and files (only the priors zeroed)."
                                                  if not diffs else "**trained differently**: " + "; ".join(diffs)
                                                  + "."))
        rows = [[label, format_ci(s["r"]), format_ci(s["l1"]), format_ci(s["ssim"])]
                for label, s in results["controls"].items()]
        report.table(Table.plain(["control", "r ↑", "L1 ↓", "SSIM ↑"], rows))
        if results["margins"]:
            rows = [[name, format_ci(s["gan_r"]), format_ci(s["control_r"]), format_ci(s["margin"])]
                    for name, s in results["margins"].items()]
            report.table(Table.plain(["GAN − control", "GAN r", "control r", "margin r"], rows))
        report.p(f"Speed on {results['device']}, images/s (context only: the control never queries the CNN, so "
                 f"its map is **not an explanation of the CNN**; the number only sizes a future one-pass "
                 f"explainer): " + "; ".join(f"{k} {v:,.0f}" for k, v in results["speed"].items()) + ".")
