"""`python -m cnnprior.priors`: inspect a prior file or set (`info`), import the paper's released file (`import`),
write a prior set's manifest from its shards (`manifest`)."""

from __future__ import annotations

import argparse

from cnnprior.core.errors import cli_main
from cnnprior.priors.priorset import PriorSet, write_manifest
from cnnprior.priors.read import read_priors, zero_map_fractions
from cnnprior.priors.released import import_released

__all__ = ["info_lines", "main"]


def info_lines(pf, verified: bool) -> list[str]:
    """`info`'s summary of a prior file or set: spec, shards, hash status, all-zero maps."""
    m = pf.info
    kind = f"prior set of {len(pf.shards)} shards, " if isinstance(pf, PriorSet) else ""
    lines = [f"{pf.path}: {kind}{len(pf)} samples, S={m.size}, n={m.n}, method={m.method}, "
             f"target={m.spec.target} ({pf.meta.get('target_layer')}), order={m.spec.order}, cnn={m.cnn.arch}, "
             f"{pf.parts[0].dtype.itemsize} bytes/sample"]
    if isinstance(pf, PriorSet):
        for shard, entry in zip(pf.shards, pf.manifest["shards"], strict=True):
            first = entry.get("start", 0)
            held = f"records {first}-{first + len(shard) - 1} ({len(shard)})" if len(shard) else "no records"
            lines.append(f"  {entry['file']}: {held}, sha256 {entry['content_sha256'][:16]}...")
    status = ("verified" if verified else "not verified (counts, layouts and sidecars checked; --verify hashes "
              "every shard)")
    lines.append(f"content sha256 {m.content_sha256 or '?'}: {status}")
    zeros = zero_map_fractions(pf)
    lines.append("all-zero maps: " + ", ".join(f"C{k} {z:.1%}" for k, z in enumerate(zeros["priors"]))
                 + f", target {zeros['target']:.1%}")
    return lines


@cli_main
def main(argv: list[str] | None = None) -> int:
    """`python -m cnnprior.priors`: inspect or import prior files, or write a prior set's manifest."""
    p = argparse.ArgumentParser(prog="python -m cnnprior.priors",
                                description="Inspect or import prior files, or write a prior set's manifest.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("info", help="validate a prior file or set and print its summary")
    ins.add_argument("file", help="a prior file (.npy), a prior set's manifest (.priorset.json) or its .npy name")
    ins.add_argument("--verify", action="store_true", help="prior sets: hash every shard (a single prior file is "
                                                           "always hashed)")
    imp = sub.add_parser("import", help="convert the paper's released Food_Resnet.npy into a prior file")
    imp.add_argument("file")
    imp.add_argument("--out", required=True, help="output .npy path (a .json sidecar is written beside it)")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow loading the pickled object array (runs code from the file: trusted sources only)")
    imp.add_argument("--overwrite", action="store_true")
    imp.add_argument("--classes", nargs="*", help="class names in label order (default: the file's class-name "
                                                  "labels sorted, or 0..max for integer labels)")
    man = sub.add_parser("manifest", help="write the manifest of shard files gathered in one folder (shards "
                                          "hashed against their sidecars)")
    man.add_argument("out", help="the manifest to write, <prefix>-<split>.priorset.json")
    man.add_argument("shards", nargs="+", help="the shard files in record order")
    man.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "info":
        pf = read_priors(args.file, verify=True if args.verify else None)
        print("\n".join(info_lines(pf, verified=args.verify or not isinstance(pf, PriorSet))))
        return 0
    if args.cmd == "manifest":
        out = write_manifest(args.out, args.shards, overwrite=args.overwrite, verify=True)
        print("\n".join(info_lines(read_priors(out, verify=False), verified=True)))  # hashed just now
        return 0

    out = import_released(args.file, args.out, args.trust_pickle, args.overwrite, class_names=args.classes)
    pf = read_priors(out, verify=False)
    names = pf.info.class_names
    print(f"wrote {out}: {len(pf)} samples, S={pf.size}, n={pf.n}, {len(names)} classes: {', '.join(names[:10])}"
          + (" ..." if len(names) > 10 else ""))
    return 0
