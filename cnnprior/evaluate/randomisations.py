"""Which randomised networks a sanity check builds, and which ones a generator trained on: the randomisation
schemes of `mprt.randomisations`, the networks each step makes (so a step repeated by another scheme is judged
once), and the randomised-copy prior files named in a generator's checkpoint."""

from __future__ import annotations

from cnnprior.cnn.randomise import INITS, ORDERS, randomised_stages
from cnnprior.core.errors import UserError
from cnnprior.priors.random_priors import parse_random_prior_path

__all__ = ["check_networks", "parse_randomisations", "repeated_steps", "training_networks", "training_randomisations",
           "training_seeds"]


def training_seeds(meta: dict) -> list[int]:
    """Seeds of the randomised-copy prior files a generator trained on (gan.randomised_share), from its meta."""
    return sorted({s for t in training_randomisations(meta) for s in t["seeds"]})


def parse_randomisations(text: str) -> list[tuple[str, str, str]]:
    """`mprt.randomisations` -> [(name, order, init)]: order one of ORDERS or "full", init one of INITS."""
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        order, _, init = item.partition(":")
        init = init or "default"
        if order not in (*ORDERS, "full") or init not in INITS:
            raise UserError(f"mprt.randomisations: unknown {item!r}; use {', '.join((*ORDERS, 'full'))}, each "
                            f"optionally with :<init> ({', '.join(INITS)})")
        out.append((item, order, init))
    if not out:
        raise UserError("mprt.randomisations: empty; name at least one (e.g. top_down)")
    return out


def training_randomisations(meta: dict) -> list[dict]:
    """What randomised CNNs a generator trained on: [{order, init, seeds}], from the names of its randomised-copy
    prior files (priors.randomised_order / randomised_init; top_down with PyTorch's default init by default)."""
    files = (((meta.get("priors_meta") or {}).get("randomised") or {}).get("files")) or []
    found: dict[tuple[str, str], set[int]] = {}
    for f in files:
        p = parse_random_prior_path(str(f))
        if p is not None:
            found.setdefault((p["order"], p["init"]), set()).add(p["seed"])
    return [{"order": o, "init": i, "seeds": sorted(s)} for (o, i), s in sorted(found.items())]


def training_networks(meta: dict, stage_names: list[str]) -> set[tuple[frozenset, int, str]]:
    """The randomised networks a generator trained on, as (re-initialised stage indices, seed, init): stage j's
    random weights depend on (seed, j, init) only, so two orders that re-initialise the same stages with the same
    seed and init make the same network (`full` = either cascade's last step; `independent` step 1 = top_down's)."""
    names = [n.replace("+", "_") for n in stage_names]
    k = len(names)
    nets = set()
    for f in ((meta.get("priors_meta") or {}).get("randomised") or {}).get("files") or []:
        p = parse_random_prior_path(str(f))
        if p is None or p["stage"] not in names:
            continue
        i = names.index(p["stage"])
        idx = {"top_down": range(i + 1), "bottom_up": range(i, k), "independent": [i]}[p["order"]]
        nets.add((frozenset(idx), p["seed"], p["init"]))
    return nets


def check_networks(num_stages: int, order: str, init: str, seeds: list[int]) -> set[tuple[frozenset, int, str]]:
    """The networks one randomisation of the check makes, in `training_networks`' terms."""
    if order == "full":
        return {(frozenset(range(num_stages)), s, init) for s in seeds}
    return {(frozenset(randomised_stages(num_stages, order, k)), s, init)
            for k in range(1, num_stages + 1) for s in seeds}


def repeated_steps(specs: list[tuple[str, str, str]], num_stages: int) -> list[dict[int, str]]:
    """Per randomisation, its steps that make the same networks as a step of an earlier randomisation (same stages
    re-initialised, same init; the seeds are shared): {step: "<earlier name> step j"}. Such a step is shown but
    judged once, where it came first (e.g. `independent` step 1 is `top_down` step 1)."""
    seen: dict[tuple[frozenset, str], str] = {}
    out = []
    for name, order, init in specs:
        steps = [(1, range(num_stages))] if order == "full" else [
            (k, randomised_stages(num_stages, order, k)) for k in range(1, num_stages + 1)]
        mine = {}
        for k, stages in steps:
            key = (frozenset(stages), init)
            if key in seen:
                mine[k] = seen[key]
            else:
                seen[key] = f"{name} step {k}"
        out.append(mine)
    return out
