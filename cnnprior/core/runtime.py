"""Run-time plumbing shared by every stage: devices, seeding and RNG state, epoch orders, the output layer (atomic
files and checkpoints, folders published by rename), hashes, safe checkpoint loading."""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from cnnprior.core.errors import UserError

__all__ = [
    "atomic_path", "atomic_torch_save", "atomic_write", "atomic_write_bytes", "atomic_write_text", "epoch_order",
    "file_sha256", "load_checkpoint", "Log", "publish_folder", "resolve_device", "rng_state", "seed_everything",
    "set_rng_state", "state_sha256", "temp_folder"
]

Log = Callable[[str], Any]  # where a stage reports progress (print by default)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available else cpu; `cuda` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    """The shuffled sample order of one epoch: a function of (seed, epoch) only, never of earlier epochs."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    return torch.randperm(count, generator=torch.Generator().manual_seed(mixed))


def rng_state(device: torch.device) -> dict:
    """Python, numpy and torch RNG states as tensors and primitives (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": {"version": int(version), "state": [int(x) for x in py_state], "gauss_next": gauss_next}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def atomic_path(path: str | os.PathLike) -> tuple[Path, Path]:
    """(final path, a temp path in the same folder) for write-then-rename."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; results are meant to be shared
    return p, Path(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], fsync: bool = False) -> Path:
    """write(file) into a temp file beside `path`, then rename it over `path`: readers never see half a file."""
    p, tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file's bytes atomically."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temp file, fsync, then rename over `path`: a crash never leaves a half-written file."""
    return atomic_write(path, lambda fh: torch.save(obj, fh), fsync=True)


def temp_folder(final: str | os.PathLike) -> Path:
    """A hidden `.<name>.*.partial` folder beside `final`, to be filled and then published by `publish_folder`."""
    p = Path(final)
    p.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".partial", dir=p.parent))


def publish_folder(tmp: str | os.PathLike, final: str | os.PathLike, tries: int = 10_000) -> Path:
    """Rename a finished temp folder to `final`, never over an existing one: then `final`-2, -3, ... is used.

    The name is reserved with mkdir first (atomic), so two runs never publish into the same folder.
    """
    final = Path(final)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; results are meant to be shared
    for i in range(1, tries):
        dest = final if i == 1 else final.with_name(f"{final.name}-{i}")
        try:
            dest.mkdir()
        except FileExistsError:
            continue
        os.rename(tmp, dest)  # replaces our own empty folder
        return dest
    raise UserError(f"{final}: no free folder name")  # pragma: no cover


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    """Hex SHA-256 of a file (first `limit` bytes if given)."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
                if left <= 0:
                    break
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, kind: str) -> dict:
    """Load a cnnprior checkpoint with weights_only=True; every problem is one UserError line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {kind} checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/unsafe files
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{p}: not a readable {kind} checkpoint ({msg[:160]})") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise UserError(f"{p}: not a cnnprior {kind} checkpoint (no 'format' entry)")
    return ckpt


def state_sha256(state: dict[str, Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and exact bytes (bit-identity checks)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        # reshape(-1) gives unit strides even where size-1 dims of a channels_last weight have odd ones
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
