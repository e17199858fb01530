"""Warm starts: a search begins from what earlier searches learned (``search.warm_start``).

Each name is an earlier search in the same MLflow store (or an MLflow experiment holding sertune
trials). Their finished trials - on any corpus - become completed trials of the new search's
Optuna study before it proposes anything, so a model-based sampler (TPE, GP, CMA-ES) starts from
them instead of from random configurations. A trial is used when it has the objective's metrics
and a value for every parameter of this search's ``space`` inside this space's bounds; the others
are counted and skipped. Parameters that only a define-by-run function suggests are left out of
the seeds (Optuna accepts trials with fewer parameters).

The seeds are read once, before Ray starts (an unknown name is one line, exit 2), and kept in the
search's record, so a resumed search does not read them again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from . import tracking
from .errors import NotFound, UsageError
from .spec import ParamSpec, SearchSpec


def collect(
    spec: SearchSpec, tracking_uri: str, log: Callable[[str], None] = print
) -> dict[str, Any] | None:
    """The seeds of ``spec.search.warm_start``: ``{"sources": {name: n}, "trials": [{"params",
    "values"}], "skipped": n}``, or None when the spec asks for no warm start."""
    names = spec.search.warm_start
    if not names:
        return None
    space = spec.space
    metrics = [m.metric for m in spec.metrics]
    store = tracking.Store(tracking_uri)
    trials, sources, skipped = [], {}, 0
    for i, name in enumerate(names):
        try:
            found = store.finished_trials(name)
        except NotFound as e:
            raise UsageError(f"{spec.source}: search.warm_start.{i}: {e}") from None
        used = 0
        for t in found:
            values = [t.metrics.get(m) for m in metrics]
            try:
                params = {k: p.parse(t.params[k]) for k, p in space.items()}
            except (KeyError, ValueError):
                skipped += 1
                continue
            if any(v is None or not math.isfinite(v) for v in values):
                skipped += 1
                continue
            trials.append(
                {"params": params, "values": values, "from": f"{name}/{t.trial or t.run_id}"}
            )
            used += 1
        sources[name] = used
    what = ", ".join(f"{n} from {name!r}" for name, n in sources.items())
    log(
        f"[sertune] warm start: {len(trials)} finished trial(s) seed the sampler ({what}"
        + (
            f"; {skipped} skipped: outside this space or without {', '.join(metrics)}"
            if skipped
            else ""
        )
        + ")"
    )
    return {"sources": sources, "trials": trials, "skipped": skipped}


def optuna_trials(seeds: dict[str, Any], space: dict[str, ParamSpec]) -> list[Any]:
    """The seeds as completed Optuna trials over this search's distributions."""
    import optuna

    dists = {k: p.distribution() for k, p in space.items()}
    out = []
    for t in seeds["trials"]:
        params = {k: v for k, v in t["params"].items() if k in dists}
        out.append(
            optuna.trial.create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                values=t["values"],
                user_attrs={"sertune.warm_start": t["from"]},
            )
        )
    return out
