"""The one way to open priors: `read_priors` opens a prior file or a prior set (both `PriorRecords`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnprior.priors.priorfile import PriorFile, PriorRecords, read_prior_file
from cnnprior.priors.priorset import PriorSet, is_manifest, manifest_path, read_priorset

__all__ = ["PriorRecords", "read_priors", "zero_map_fractions"]


def read_priors(path: str | Path, verify: bool | None = None) -> PriorFile | PriorSet:
    """Open a prior file or a prior set and check it against its sidecar or manifest; one-line errors.

    A prior set is opened by its manifest (`<stem>.priorset.json`) or by the `<stem>.npy` name when that file is
    absent and the manifest exists. `verify`: None hashes a single file's records (as always) but only checks a
    set's counts, layouts and sidecars (a set can be tens of GB); True hashes either; False neither.
    """
    p = Path(path)
    if is_manifest(p):
        return read_priorset(p, verify=bool(verify))
    if not p.exists() and manifest_path(p).is_file():
        return read_priorset(manifest_path(p), verify=bool(verify))
    return read_prior_file(p, verify=verify is not False)


def zero_map_fractions(pf: PriorRecords, chunk: int = 1024) -> dict:
    """Fraction of records whose prior k (and whose target) is all zero: an empty map tells the GAN nothing."""
    n, count = pf.n, len(pf)
    zero_priors, zero_target = np.zeros(n), 0
    for part in pf.parts:
        for s in range(0, len(part), chunk):
            r = part[s:s + chunk]
            zero_priors += (np.asarray(r["priors"]).reshape(len(r), n, -1).max(2) == 0).sum(0)
            zero_target += int((np.asarray(r["target"]).reshape(len(r), -1).max(1) == 0).sum())
    return {"priors": (zero_priors / max(count, 1)).tolist(), "target": zero_target / max(count, 1)}
