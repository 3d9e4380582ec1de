"""Bring your own CNN: check a torchvision state_dict against an architecture and write a project CNN checkpoint.

    python -m cnnprior.cnn import --arch resnet18 --weights mine.pth --classes classes.txt --image-size 224 --out ...
"""

from __future__ import annotations

import argparse
import math
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from cnnprior.cnn.model import CNN_FORMAT, IMAGENET_MEAN, IMAGENET_STD, TargetCNN, build_cnn, load_cnn, save_cnn
from cnnprior.core.config import ARCHS
from cnnprior.core.errors import UserError, cli_main
from cnnprior.core.runtime import file_sha256

__all__ = ["check_state_fits", "import_cnn", "main", "read_class_names", "read_foreign_state"]


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one per line in the CNN's output order (blank lines skipped); at least 2, no duplicates."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: class-names file not found (one class name per line, in the CNN's output order)")
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a UTF-8 text file (one class name per line)") from None
    if len(names) < 2:
        raise UserError(f"{p}: lists {len(names)} class name(s); a classifier needs at least 2, one per line")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"{p}: class name {name!r} appears more than once")
        seen.add(name)
    return names


def read_foreign_state(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A torchvision-style state_dict from a file (weights_only unless trusted; a full model only if trusted)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: weights file not found")
    with open(p, "rb") as fh:
        magic = fh.read(2)
    if not zipfile.is_zipfile(p) and magic[:1] != b"\x80":  # torch.save writes a zip (a pickle before 1.6)
        raise UserError(f"{p}: not a PyTorch weights file (save it with torch.save(model.state_dict(), path))")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=not trust_pickle)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt, unsafe or foreign files
        text = str(exc).strip()
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if not trust_pickle and found:
            raise UserError(f"{p}: holds pickled Python objects ({found.group(1)}: a whole model?); loading it can "
                            f"run arbitrary code. Save model.state_dict() instead, or, only if you trust its source, "
                            f"add --trust-pickle") from None
        first = (text.splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{p}: not a readable PyTorch weights file ({first[:160]})") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and obj.get("format") == CNN_FORMAT:
        raise UserError(f"{p}: already a cnnprior CNN checkpoint; pass it to --cnn or cnn.checkpoint as it is")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # {"state_dict": ..., "epoch": ...}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise UserError(f"{p}: not a state_dict (a mapping of parameter names to tensors); found "
                        f"{type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _few(keys: list[str], limit: int = 3) -> str:
    """The first `limit` items, and how many more there are."""
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_fits(state: dict[str, torch.Tensor], model: TargetCNN, path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict to load into `model.net`, after checking its keys and shapes; one-line errors otherwise."""
    arch, expected = model.arch, model.net.state_dict()
    if arch == "inception_v3":  # torchvision's file holds the auxiliary head, which the project does not build
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"]
                                                                      if unexpected else [])
        raise UserError(f"{path}: keys do not fit torchvision {arch}: {'; '.join(parts)} (is it a {arch} "
                        f"state_dict?)")
    convs = [n for n, m in model.net.named_modules() if isinstance(m, nn.Conv2d)]
    heads = [n for n, m in model.net.named_modules() if isinstance(m, nn.Linear)]
    stem, head = f"{convs[0]}.weight", f"{heads[-1]}.weight"
    if state[stem].dim() == 4 and state[stem].shape[1] != 3:
        raise UserError(f"{path}: the {arch} takes {state[stem].shape[1]}-channel input ({stem}); only 3-channel "
                        f"(RGB) CNNs can be imported")
    if state[head].shape[0] != len(model.class_names):
        raise UserError(f"{path}: the classification head ({head}) has {state[head].shape[0]} outputs but "
                        f"--classes lists {len(model.class_names)} names")
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise UserError(f"{path}: tensor shapes do not fit torchvision {arch}: {_few(wrong)}")
    return state


def import_cnn(arch: str, weights: str | Path, classes: str | Path, image_size: int, out: str | Path,
               mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD, trust_pickle: bool = False,
               overwrite: bool = False) -> Path:
    """Turn a torchvision state_dict (or, trusted, a full model) into a project CNN checkpoint at `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: exists; use --overwrite to replace it, or another --out")
    if out.resolve() == Path(weights).resolve():
        raise UserError(f"{out}: --out is the --weights file itself; choose another --out")
    if arch not in ARCHS:
        raise UserError(f"--arch {arch!r}: not importable; the torchvision architectures with 3-channel input "
                        f"that the project supports are {', '.join(ARCHS)}")
    low = 75 if arch == "inception_v3" else 16
    if not low <= image_size <= 1024:
        raise UserError(f"--image-size {image_size}: must be {low}..1024 for {arch}")
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in (*mean, *std)) or min(std) <= 0:
        raise UserError(f"--mean {list(mean)} --std {list(std)}: need 3 finite values each, std > 0")
    names = read_class_names(classes)
    state = read_foreign_state(weights, trust_pickle)
    model = build_cnn(arch, names, image_size)
    model.net.load_state_dict(check_state_fits(state, model, weights), strict=False)
    model.mean.copy_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    model.std.copy_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    model.eval()
    with torch.no_grad():
        try:
            logits = model(torch.zeros(1, 3, image_size, image_size))
        except RuntimeError as exc:
            raise UserError(f"--image-size {image_size}: {arch} cannot run at this size "
                            f"({str(exc).splitlines()[0][:160]})") from None
    if not torch.isfinite(logits).all():
        raise UserError(f"{weights}: the imported {arch} gives non-finite outputs on a blank image (NaN weights?)")
    return save_cnn(model, out, val_accuracy=None, epoch=0, config={}, dataset="imported",
                    extra={"imported_from": str(weights), "imported_sha256": file_sha256(weights)})


@cli_main
def main(argv: list[str] | None = None) -> int:
    """`python -m cnnprior.cnn import`: make a project CNN checkpoint from a torchvision state_dict."""
    p = argparse.ArgumentParser(prog="python -m cnnprior.cnn", description="Bring your own CNN.")
    sub = p.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="torchvision state_dict -> project CNN checkpoint (for --cnn, cnn.checkpoint)",
                         description="Check that a torchvision state_dict fits --arch (3-channel input) and write a "
                                     "project CNN checkpoint with its class names, input size and normalisation.")
    imp.add_argument("--arch", required=True, help=f"torchvision architecture, one of {', '.join(ARCHS)}")
    imp.add_argument("--weights", required=True, help="torch.save(model.state_dict()) file")
    imp.add_argument("--classes", required=True, help="text file, one class name per line in output order")
    imp.add_argument("--image-size", type=int, required=True, help="square input size the CNN was trained at")
    imp.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, metavar="M",
                     help="input normalisation mean, RGB in [0, 1] (default ImageNet's)")
    imp.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, metavar="S",
                     help="input normalisation std (default ImageNet's)")
    imp.add_argument("--out", required=True, help="checkpoint to write, e.g. models/mine-cnn.pt")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="also accept a whole pickled model (torch.save(model)); runs code from the file: "
                          "trusted sources only")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    out = import_cnn(args.arch, args.weights, args.classes, args.image_size, args.out, tuple(args.mean),
                     tuple(args.std), args.trust_pickle, args.overwrite)
    _, meta = load_cnn(out)
    print(f"wrote {out}: {meta['arch']}, {len(meta['class_names'])} classes, {meta['image_size']} px")
    return 0
