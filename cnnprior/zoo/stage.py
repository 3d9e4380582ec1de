"""The zoo stage (`train.py --stage zoo`, `build_zoo`): draw every member (sample.py), train and extract the ones
not finished yet (member.py), spread over local worker processes (`zoo.jobs`, `--jobs`) and torchrun ranks (member
i on rank i % WORLD_SIZE; the ranks share nothing but the folder), and keep `zoo.json` up to date.

Resumable member by member: a finished member (its record exists with the same descriptor and settings) is
skipped; a member of other settings, or one whose files a stopped run left half-written, is refused in one line
before any work unless `--overwrite` (everything redone) or, for half-written ones, `--resume` (they are redone).
Each member trains with `zoo.threads` torch threads whatever the worker, so its files are the same bit for bit
however the zoo is spread out.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import torch

from cnnprior.core.config import Config, from_dict, to_dict
from cnnprior.core.errors import UserError
from cnnprior.core.provenance import provenance, record_start
from cnnprior.core.runtime import Log, atomic_write_text
from cnnprior.zoo.member import MEMBER_FORMAT, member_dir, member_settings, record_path, run_member
from cnnprior.zoo.sample import sample_members

__all__ = ["build_zoo", "member_plan", "read_records", "ZOO_FORMAT", "zoo_json", "zoo_out", "zoo_report"]

ZOO_FORMAT = "cnnprior-zoo/1"


def zoo_out(cfg: Config) -> Path:
    """The members' folder: zoo.out, or outputs/<name>."""
    return Path(cfg.zoo.out or f"outputs/{cfg.name}")


def zoo_report(cfg: Config) -> Path:
    """Where zoo.json goes: zoo.report/zoo.json, or <zoo.out>/zoo.json."""
    return Path(cfg.zoo.report or zoo_out(cfg)) / "zoo.json"


def _read_record(path: Path) -> dict | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == MEMBER_FORMAT else None


def member_plan(cfg: Config, descriptors: list[dict], resume: bool, overwrite: bool) -> list[dict]:
    """The members to (re)do, of `descriptors`; one-line refusal of finished members of other settings and of
    half-written ones (see the module docstring)."""
    out, settings, todo = zoo_out(cfg), member_settings(cfg), []
    for desc in descriptors:
        folder, rec_path = member_dir(out, desc["id"]), record_path(out, desc["id"])
        if overwrite:
            todo.append(desc)
            continue
        if rec_path.is_file():
            rec = _read_record(rec_path)
            if rec is None:
                raise UserError(f"{rec_path}: not a zoo member record; delete {folder} or use --overwrite")
            for key, now, then in (("descriptor", desc, rec.get("descriptor")),
                                   ("settings", settings, rec.get("settings"))):
                if json.loads(json.dumps(now)) != then:
                    diff = next((k for k in now if then is None or then.get(k) != json.loads(json.dumps(now[k]))),
                                key)
                    raise UserError(f"{rec_path}: member {desc['id']} was made with other {key} ({diff}: "
                                    f"{(then or {}).get(diff)!r}, now {now.get(diff)!r}); use --overwrite to "
                                    f"redo the zoo, or another zoo.out")
            continue
        if folder.exists() and any(folder.iterdir()):
            if not resume:
                raise UserError(f"{folder}: a stopped run left member {desc['id']} unfinished; --resume redoes it "
                                f"(finished members are kept), --overwrite redoes the whole zoo")
        todo.append(desc)
    return todo


def read_records(cfg: Config, descriptors: list[dict]) -> list[dict]:
    """zoo.json's `members`: each finished member's record, and a pending entry for the others."""
    out = zoo_out(cfg)
    members = []
    for desc in descriptors:
        rec = _read_record(record_path(out, desc["id"]))
        if rec is None or rec.get("descriptor") != json.loads(json.dumps(desc)):
            rec = {"id": desc["id"], "index": desc["index"], "family": desc["family"], "descriptor": desc,
                   "val_accuracy": None, "kept": False, "done": False}
        else:
            rec = {k: v for k, v in rec.items() if k not in ("format", "settings")}
            rec["done"] = True
        members.append(rec)
    return members


def zoo_json(cfg: Config, descriptors: list[dict]) -> dict:
    """zoo.json: the zoo's config, the floor, per-family counts and val accuracy ranges, and every member."""
    members = read_records(cfg, descriptors)
    families: dict = {}
    for m in members:
        f = families.setdefault(m["family"], {"members": 0, "done": 0, "kept": 0, "val_accuracy": None})
        f["members"] += 1
        f["done"] += m["done"]
        f["kept"] += m["kept"]
        if m["kept"]:
            lo, hi = f["val_accuracy"] or (1.0, 0.0)
            f["val_accuracy"] = [min(lo, m["val_accuracy"]), max(hi, m["val_accuracy"])]
    done = [m for m in members if m["done"]]
    seconds = sorted(m["seconds"]["total"] for m in done)
    cpu = sorted(m["seconds"].get("cpu", 0.0) for m in done)
    return {"format": ZOO_FORMAT, "name": cfg.name, "config_file": cfg.source_file, "out": str(zoo_out(cfg)),
            "floor": cfg.zoo.floor, "config": to_dict(cfg), "provenance": provenance(cfg.source_file or None),
            "summary": {"members": len(members), "done": len(done), "kept": sum(m["kept"] for m in members),
                        "seconds_per_member": {"median": seconds[len(seconds) // 2], "max": seconds[-1],
                                               "total": round(sum(seconds), 1), "cpu_median": cpu[len(cpu) // 2],
                                               "cpu_total": round(sum(cpu), 1)} if seconds else None,
                        "families": families},
            "members": members}


def _write_json(cfg: Config, descriptors: list[dict]) -> dict:
    """Rewrite zoo.json from the records on disk, under a lock (workers and ranks write it as members finish:
    the last writer has seen every record written before it)."""
    path = zoo_report(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = zoo_json(cfg, descriptors)
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return data


def _worker_run(args: tuple) -> dict:
    """One member in a worker process (spawned: a fresh interpreter with its own loaded splits)."""
    cfg_dict, source, desc = args
    cfg = from_dict(cfg_dict, source or "zoo config")
    cfg.source_file = source
    return run_member(cfg, desc, _say)


def _say(msg: str) -> None:
    print(msg, flush=True)  # a zoo runs for hours, usually with its output in a file


def build_zoo(cfg: Config, resume: bool = False, overwrite: bool = False, jobs: int | None = None,
              log: Log = _say) -> dict:
    """The zoo stage: train and extract every unfinished member of this process's share; returns zoo.json's
    content (also written to `zoo_report(cfg)`). `jobs` (default zoo.jobs) worker processes; under torchrun
    (WORLD_SIZE > 1) this rank's members are those with index % WORLD_SIZE == RANK."""
    record_start()
    jobs = cfg.zoo.jobs if jobs is None else jobs
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: need at least 1 worker process")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    descriptors = sample_members(cfg.zoo, cfg.priors.n, cfg.data.image_size)
    mine = [d for d in descriptors if d["index"] % world == rank]
    todo = member_plan(cfg, mine, resume, overwrite)
    for desc in todo:  # half-written or --overwrite: the member starts from an empty folder
        folder = member_dir(zoo_out(cfg), desc["id"])
        if folder.exists():
            shutil.rmtree(folder)
    log(f"zoo: {len(descriptors)} members ({', '.join(cfg.zoo.families)}), {len(mine) - len(todo)} of this "
        f"process's {len(mine)} finished, {len(todo)} to do"
        + (f" (rank {rank} of {world})" if world > 1 else "") + (f" on {jobs} workers" if jobs > 1 else ""))
    _write_json(cfg, descriptors)
    if jobs == 1 or len(todo) <= 1:
        for desc in todo:
            run_member(cfg, desc, log)
            _write_json(cfg, descriptors)
    else:
        args = [(to_dict(cfg), cfg.source_file, desc) for desc in todo]
        with multiprocessing.get_context("spawn").Pool(min(jobs, len(todo)), initializer=_one_thread) as pool:
            for rec in pool.imap_unordered(_worker_run, args):
                log(f"zoo: {rec['id']} finished ({rec['seconds']['total']:.0f}s)")
                _write_json(cfg, descriptors)
    data = _write_json(cfg, descriptors)
    s = data["summary"]
    log(f"zoo: {s['done']} of {s['members']} members finished, {s['kept']} kept (val accuracy >= "
        f"{cfg.zoo.floor}); {zoo_report(cfg)}")
    return data


def _one_thread() -> None:
    """Worker start: one torch thread per process outside members too (a member's own count, zoo.threads, is set
    around its work)."""
    torch.set_num_threads(1)
