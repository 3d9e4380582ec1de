"""Prior-file metadata: reading a sidecar or a manifest's JSON (`load_json`, one-line errors), and `PriorMeta`, the
typed view of a sidecar — the one place that parses its keys, with their meaning in files of older versions.

A prior file's sidecar (or a prior set's shared metadata) is a JSON object of format `PRIORS_FORMAT`; a file of
another version of the format is refused with one line naming both versions. Keys a sidecar written by an
older version lacks get their old meaning (`spec.spec_from_sidecar`), or an empty value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnprior.core.errors import UserError
from cnnprior.priors.spec import PriorSpec, spec_from_sidecar

__all__ = ["check_format", "CnnInfo", "load_json", "PRIORS_FORMAT", "PriorMeta", "RandomisedInfo", "ShardInfo"]

PRIORS_FORMAT = "cnnprior-priors/1"


def load_json(path: Path, what: str, kind: str, fmt: str) -> dict:
    """The JSON object in `path` whose `format` is `fmt`; one-line errors for a missing file, bad JSON and another
    format or version (`what`: the file's role in messages, `kind`: what a file of `fmt` is)."""
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: {what} is not valid JSON ({exc})") from None
    check_format(data.get("format") if isinstance(data, dict) else None, fmt, path, what, kind)
    return data


def check_format(got: Any, fmt: str, where: object, what: str, kind: str) -> None:
    """One line unless `got` is `fmt`: another version of the same format is named as such."""
    if got == fmt:
        return
    if isinstance(got, str) and got.startswith(fmt.rsplit("/", 1)[0] + "/"):
        raise UserError(f"{where}: {what} of format {got!r}, from another version of cnnprior (this version reads "
                        f"{fmt!r}); rewrite it with this version")
    raise UserError(f"{where}: not a cnnprior {kind} (format {got!r}, expected {fmt!r})")


def _int(value: Any, key: str, where: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise UserError(f"{where}: sidecar key {key!r} is {value!r}, not an integer")
    return int(value)


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in value or ())


@dataclass(frozen=True)
class CnnInfo:
    """The CNN a prior file's maps come from (`cnn` in the sidecar)."""

    arch: str = ""
    checkpoint: str = ""
    checkpoint_sha256: str = ""
    image_size: int | None = None
    val_accuracy: float | None = None


@dataclass(frozen=True)
class RandomisedInfo:
    """The randomised CNN copy a randomised-copy prior file comes from (`randomised`; random_priors.py)."""

    steps: int
    stage: str
    seed: int
    order: str = "top_down"
    init: str = "default"


@dataclass(frozen=True)
class ShardInfo:
    """Which shard of a prior set a prior file is (`shard`; priorset.py)."""

    index: int
    of: int
    start: int
    batch_size: int


@dataclass(frozen=True)
class PriorMeta:
    """A prior file's sidecar, typed. `spec` holds size, n, method, target, ...; `raw` the dict as written."""

    spec: PriorSpec = field(compare=False)
    count: int
    has_masks: bool | None = None  # None: not recorded (the records' layout tells)
    layers: tuple[str, ...] = ()
    positions: tuple[int, ...] = ()
    prior_layers: tuple[tuple[str, ...], ...] = ()
    split: str = ""
    dataset: str = ""
    class_names: tuple[str, ...] = ()
    cnn: CnnInfo = CnnInfo()
    content_sha256: str | None = None
    randomised: RandomisedInfo | None = None
    shard: ShardInfo | None = None
    imported_from: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def size(self) -> int:
        """Map side S in pixels."""
        return self.spec.size

    @property
    def n(self) -> int:
        """Priors per record."""
        return self.spec.n

    @property
    def method(self) -> str:
        """The CAM method's name (`cams`), or the released file's own label."""
        return self.spec.method

    @classmethod
    def parse(cls, meta: Any, where: object = "sidecar") -> PriorMeta:
        """The typed view of a sidecar dict; one-line UserError (naming `where`) for another format or version, or
        for missing or mistyped keys."""
        if not isinstance(meta, dict):
            raise UserError(f"{where}: a prior sidecar is a JSON object, got {type(meta).__name__}")
        check_format(meta.get("format"), PRIORS_FORMAT, where, "sidecar", "prior sidecar")
        if any(meta.get(k) is None for k in ("size", "n", "count")):
            raise UserError(f"{where}: sidecar lacks size/n/count")
        size, n, count = (_int(meta[k], k, where) for k in ("size", "n", "count"))
        cnn = meta.get("cnn") or {}
        rnd, shard = meta.get("randomised"), meta.get("shard")
        try:
            return cls(
                spec=spec_from_sidecar({**meta, "size": size, "n": n}), count=count,
                has_masks=None if meta.get("has_masks") is None else bool(meta["has_masks"]), layers=_strings(meta.get("layers")),
                positions=tuple(_int(p, "positions", where) for p in meta.get("positions") or ()),
                prior_layers=tuple(_strings(p) for p in meta.get("prior_layers") or ()),
                split=str(meta.get("split") or ""), dataset=str(meta.get("dataset") or ""),
                class_names=_strings(meta.get("class_names")),
                cnn=CnnInfo(str(cnn.get("arch") or ""), str(cnn.get("checkpoint") or ""),
                            str(cnn.get("checkpoint_sha256") or ""), cnn.get("image_size"), cnn.get("val_accuracy")),
                content_sha256=meta.get("content_sha256"),
                randomised=None if rnd is None else RandomisedInfo(
                    int(rnd["steps"]), str(rnd["stage"]), int(rnd["seed"]), rnd.get("order", "top_down"),
                    rnd.get("init", "default")),
                shard=None if shard is None else ShardInfo(int(shard["index"]), int(shard["of"]),
                                                           int(shard["start"]), int(shard["batch_size"])),
                imported_from=meta.get("imported_from"), raw=meta)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: malformed sidecar ({type(exc).__name__}: {exc})") from None
