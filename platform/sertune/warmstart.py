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
from typing import Any

from . import tracking
from .errors import NotFound, UsageError


def _value(p: dict[str, Any], raw: str) -> Any:
    """A parameter as MLflow stored it (a string), back in the type of this search's space."""
    if p["type"] == "choice":
        for v in p["values"]:
            if str(v) == raw:
                return v
        raise ValueError(f"{raw!r} is not one of {p['values']}")
    v = float(raw)
    if p["type"] == "int":
        if not v.is_integer():
            raise ValueError(f"{raw!r} is not an integer")
        v = int(v)
    if not (float(p["low"]) <= v <= float(p["high"])):
        raise ValueError(f"{raw} outside [{p['low']}, {p['high']}]")
    return v


def collect(spec: Any, tracking_uri: str, log=print) -> dict[str, Any] | None:
    """The seeds of ``spec.search.warm_start``: ``{"sources": {name: n}, "trials": [{"params",
    "values"}], "skipped": n}``, or None when the spec asks for no warm start."""
    names = spec.search.warm_start
    if not names:
        return None
    space = {k: v.model_dump() for k, v in spec.space.items()}
    metrics = [m.metric for m in spec.objective.as_list()]
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
                params = {k: _value(p, t.params[k]) for k, p in space.items()}
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


def optuna_trials(seeds: dict[str, Any], space: dict[str, dict[str, Any]]) -> list[Any]:
    """The seeds as completed Optuna trials over this search's distributions."""
    import optuna
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    def dist(p: dict[str, Any]):
        if p["type"] == "choice":
            return CategoricalDistribution(p["values"])
        if p["type"] == "int":
            return IntDistribution(
                int(p["low"]), int(p["high"]), log=bool(p.get("log")), step=int(p.get("step") or 1)
            )
        return FloatDistribution(
            float(p["low"]), float(p["high"]), log=bool(p.get("log")), step=p.get("step")
        )

    dists = {k: dist(p) for k, p in space.items()}
    out = []
    for t in seeds["trials"]:
        params = {k: v for k, v in t["params"].items() if k in dists}
        values = t["values"]
        out.append(
            optuna.trial.create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                values=values,
                user_attrs={"sertune.warm_start": t["from"]},
            )
        )
    return out
