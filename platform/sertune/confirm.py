"""Winners that survive a re-run: confirmation with fresh seeds, and fair paired baselines.

On a small corpus the same configuration can land anywhere in a 0.2-wide band of UAR depending
on its seed. So the best ``top_k`` configurations of a search are trained again with ``seeds``
fresh seeds each; the leaderboard, the gates and promotion use each configuration's *mean* and
show its spread. The original (selected) run is not one of the seeds: it won a selection and
would bias the mean upwards.

A baseline is the same spec - data, folds, budget, seeds, every searched dimension - with the
trainable's baseline parameters fixed (``stl_baseline``: both auxiliary weights at 0), so a
difference between the two is the auxiliary tasks' and nothing else's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from .spec import MetricSpec, SearchSpec
from .stats import summary

SEED_STRIDE = 1000  # seed k of a confirmation: spec.seed + SEED_STRIDE * k (k = 1..seeds)


def confirmation_points(
    result: Any, top_k: int, seeds: int, base_seed: int
) -> list[dict[str, Any]]:
    """Configurations for the confirmation runs: the ``top_k`` best trials x ``seeds`` seeds of
    a leaderboard (``sertune.leaderboard.SearchResult``, which imports this module)."""
    objective = result.columns.first.metric
    best = [
        r
        for r in result.rows
        if r["state"] in ("finished", "stopped") and isinstance(r.get(objective), (int, float))
    ][:top_k]
    return [
        {**r["config"], "seed": base_seed + SEED_STRIDE * (k + 1), "__confirm_of": r["trial"]}
        for r in best
        for k in range(seeds)
    ]


def _stats(values: list[float]) -> dict[str, float]:
    """mean, sd, se, n, df, min, max of independent runs (``sertune.stats.summary``)."""
    return summary(values).as_dict()


def aggregate(rows: list[dict[str, Any]], objective: MetricSpec) -> list[dict[str, Any]]:
    """Per confirmed configuration: mean, sd, min, max and n of every figure (and each seed's
    value), best mean first."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        origin = (r.get("origin") or {}).get("confirm_of")
        if origin and r["state"] == "finished":
            groups[str(origin)].append(r)
    out = []
    for origin, members in groups.items():
        keys = {
            k
            for m in members
            for k, v in m.items()
            if isinstance(v, (int, float))
            and not isinstance(v, bool)
            and (k.startswith(("val_", "test_", "robust/")) or k == objective.metric)
        }
        stats, values = {}, {}
        for k in sorted(keys):
            vals = [float(m[k]) for m in members if isinstance(m.get(k), (int, float))]
            if vals:
                stats[k] = _stats(vals)
                values[k] = vals
        out.append(
            {
                "configuration_of": origin,
                "config": {k: v for k, v in members[0]["config"].items() if k != "seed"},
                "trials": [m["trial"] for m in members],
                "seeds": [m["config"].get("seed") for m in members],
                "stats": stats,
                "values": values,  # each seed's figure (the trials' order): paired comparisons
                "by_seed": {  # each figure by the seed that produced it
                    k: {
                        int(m["config"].get("seed", -1)): float(m[k])
                        for m in members
                        if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)
                    }
                    for k in values
                },
            }
        )
    sign = -1 if objective.mode == "max" else 1
    key = objective.metric
    out.sort(key=lambda g: sign * g["stats"].get(key, {}).get("mean", -sign * math.inf))
    return out


def format_confirmation(groups: list[dict[str, Any]], metrics: list[str]) -> str:
    """A table: one line per configuration, mean ± sd (n) of each metric."""
    if not groups:
        return "no confirmed configuration"
    header = ["configuration of", *metrics, "seeds"]
    lines = []
    for g in groups:
        cells = [g["configuration_of"]]
        for m in metrics:
            s = g["stats"].get(m)
            cells.append(f"{s['mean']:.3f} ± {s['sd']:.3f}" if s else "-")
        cells.append(str(len(g["trials"])))
        lines.append(cells)
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(header), *(fmt(r) for r in lines)])


def baseline_spec(spec: SearchSpec) -> SearchSpec:
    """``spec`` with its baseline's parameters fixed and removed from the space."""
    from .spec import validate_spec
    from .trainable import get_trainable

    fixed = get_trainable(spec.trainable).baselines()[spec.baseline]
    raw = spec.model_dump()
    raw.pop("source")
    raw["name"] = f"{spec.name}--{spec.baseline}"
    raw["params"] = {**raw["params"], **fixed}
    raw["space"] = {k: v for k, v in raw["space"].items() if k not in fixed}
    raw["baseline"] = None
    return validate_spec(raw, spec.source, check_paths=False)
