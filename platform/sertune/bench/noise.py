"""``sertune bench noise``: how much of a search's objective is the configuration, how much luck?

N configurations drawn at random from a spec's space are each trained with S seeds (the
search's own seed, then the confirmation seeds ``seed + 1000 k``), every one to its last epoch,
through the same machinery a search uses (one search with ``confirm: {top_k: N, seeds: S-1}``:
the warm slots, MLflow, the robustness report). The spec's constraints and stop rule are left
out of that search (a random sampler cannot use constraints, and a stop rule would measure
fewer configurations than asked); the bench says so. For every figure the trials report it
prints (``sertune.stats``):

* the seeds are **crossed** (every configuration runs the same S seeds), so the analysis is a
  two-way ANOVA without replication: the sd **between** configurations (of their true means),
  the sd **within** (one run's noise around its configuration: the residual, what separates two
  trials of one search, which share the search's seed), and a **seed** main effect (a seed that
  helps every configuration alike, reported apart: it cancels between trials of one search);
  configurations that lack a seed's run fall back to the one-way analysis;
* the objective's **reliability** ``ICC = between² / (between² + within²)``: the share of a
  single run's variance that is the configuration; averaging K runs per trial lifts it to
  ``K·ICC / (1 + (K-1)·ICC)`` (Spearman-Brown);
* the smallest difference between two configurations that one run each resolves at 95 %
  (``t(df) · √2 · within``, df the residual's).

A cross-validated spec (``--set objective.cv.folds=K``) measures the noise of a K-fold mean: the
``noise_sd`` its stop rules take. The figures and every run's value go to MLflow (run
``bench-noise``, ``bench_noise.json`` and a plot of each configuration's seeds) and to ``--out``.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import ray_compat, settings, stats, tracking
from ..leaderboard import Columns
from ..search import run_search
from ..spec import SearchSpec, load_spec


@dataclass(frozen=True)
class Reliability:
    """One figure's noise over configurations x seeds."""

    metric: str
    configs: int
    runs: int  # every run with a value
    between_sd: float  # sd of the configurations' true means (ANOVA estimate, >= 0)
    within_sd: float  # one run's sd around its configuration's mean (residual)
    icc: float  # between² / (between² + within²), in [0, 1]
    resolvable: float  # smallest difference one run each tells apart at 95 %
    seed_sd: float | None = None  # the seeds' main effect (crossed design), None if one-way
    design: str = "one-way"

    def icc_of_mean(self, k: int) -> float:
        """The reliability of a mean of ``k`` runs per configuration (Spearman-Brown)."""
        return stats.spearman_brown(self.icc, k)


def _of(metric: str, v: stats.Variance) -> Reliability:
    return Reliability(
        metric=metric,
        configs=v.configs,
        runs=v.runs,
        between_sd=v.between_sd,
        within_sd=v.within_sd,
        icc=v.icc,
        resolvable=v.resolvable(),
        seed_sd=v.seed_sd,
        design=v.design,
    )


def reliability(metric: str, groups: Sequence[Sequence[float]]) -> Reliability | None:
    """One-way random-effects ANOVA of ``groups`` (each a configuration's runs; seeds not
    matched across configurations). None with fewer than two configurations or no repeats."""
    v = stats.oneway_anova(groups)
    return None if v is None else _of(metric, v)


def crossed_reliability(
    metric: str, table: Sequence[Sequence[float | None]]
) -> Reliability | None:
    """Configurations x crossed seeds (``table[i][j]``: configuration i with the j-th seed, None
    where that run is missing): the crossed analysis over the complete configurations, or the
    one-way one when fewer than two are complete."""
    rows = [list(r) for r in table]
    complete = [
        r for r in rows if r and all(isinstance(x, (int, float)) and math.isfinite(x) for x in r)
    ]
    width = max((len(r) for r in rows), default=0)
    complete = [r for r in complete if len(r) == width]
    if len(complete) >= 2 and width >= 2:
        v = stats.crossed_anova(complete)
        if v is not None:
            return _of(metric, v)
    return reliability(metric, [[x for x in r if x is not None] for r in rows])


def format_table(rows: list[Reliability], seeds: int) -> str:
    header = [
        "metric",
        "between sd",
        "within sd",
        "seed sd",
        "ICC",
        f"ICC of {seeds}-run mean",
        "resolves",
    ]
    cells = [
        [
            r.metric,
            f"{r.between_sd:.3f}",
            f"{r.within_sd:.3f}",
            "-" if r.seed_sd is None else f"{r.seed_sd:.3f}",
            f"{r.icc:.2f}",
            f"{r.icc_of_mean(seeds):.2f}",
            f"{r.resolvable:.3f}",
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    fmt = lambda c: "  ".join(  # noqa: E731
        (x.ljust(w) if i == 0 else x.rjust(w))
        for i, (x, w) in enumerate(zip(c, widths, strict=True))
    )
    return "\n".join([fmt(header), *(fmt(c) for c in cells)])


def noise_spec(spec: SearchSpec, configs: int, seeds: int, name: str) -> SearchSpec:
    """``spec`` as the bench runs it: ``configs`` random configurations, every one to its last
    epoch (no early stopping, no baseline), then each again with ``seeds - 1`` fresh seeds."""
    from ..spec import validate_spec

    raw = spec.model_dump()
    src = raw.pop("source")
    raw["name"] = name
    raw["budget"] = {**raw["budget"], "trials": configs}
    raw["search"] = {
        **raw["search"],
        "sampler": "random",
        "sampler_options": {},
        "scheduler": "none",
        "scheduler_options": {},
        "warm_start": [],
    }
    raw["search"].pop("stop", None)  # measure every configuration asked for
    raw["objective"] = {**raw["objective"], "constraints": []}  # random cannot use them
    raw["confirm"] = {"top_k": configs, "seeds": seeds - 1}
    raw["baseline"] = None
    return validate_spec(raw, src, check_paths=False)


def left_out(spec: SearchSpec) -> list[str]:
    """What of the user's spec the bench's own search leaves out, for one line."""
    out = []
    if spec.objective.constraints:
        out.append(f"its constraints ({', '.join(spec.objective.constraints)})")
    if spec.search.stop is not None:
        out.append("its stop rule (search.stop)")
    return out


def runs_by_configuration(result: Any, base_seed: int) -> list[dict[str, Any]]:
    """Each configuration's runs keyed by seed (the search's own trial ran ``base_seed``, its
    confirmations ``base_seed + 1000 k``): ``by_seed`` {metric: {seed: value}} and ``values``
    {metric: [value, ...]} in seed order."""
    groups = {g["configuration_of"]: g for g in result.confirm}
    out = []
    for row in result.rows:
        g = groups.get(row["trial"])
        if row["state"] != "finished" or g is None:
            continue
        by_seed: dict[str, dict[int, float]] = {}
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and _figure(k):
                by_seed[k] = {base_seed: float(v)}
        for k, seeds in g.get("by_seed", {}).items():
            if k in by_seed:
                by_seed[k].update({int(s): float(x) for s, x in seeds.items()})
        values = {k: [v[s] for s in sorted(v)] for k, v in by_seed.items()}
        out.append(
            {"trial": row["trial"], "config": row["config"], "values": values, "by_seed": by_seed}
        )
    return out


def _figure(key: str) -> bool:
    return key.startswith(("val_", "test_", "robust/", "kept/")) and not key.endswith("_se")


def crossed_table(runs: list[dict[str, Any]], metric: str) -> list[list[float | None]]:
    """Configurations x seeds (every seed any configuration ran, in order; None where missing)."""
    seeds = sorted({s for r in runs for s in r["by_seed"].get(metric, {})})
    return [[r["by_seed"].get(metric, {}).get(s) for s in seeds] for r in runs]


def metric_order(spec: SearchSpec, names: set[str]) -> list[str]:
    """The objectives, the trainable's display and robustness figures, then the rest by name."""
    cols = Columns.of(spec)
    first = [*(m.metric for m in cols.objectives), *cols.shown, *cols.robust]
    head = [m for m in dict.fromkeys(first) if m in names]
    return head + sorted(names - set(head))


def run_noise_bench(
    spec_path: str,
    configs: int = 6,
    seeds: int = 3,
    sets: list[str] | None = None,
    smoke: bool = False,
    num_cpus: int | None = None,
    out: str | None = None,
    log: Callable[[str], None] = print,
) -> list[Reliability]:
    from ..errors import UsageError

    if configs < 2 or seeds < 2:
        raise UsageError("bench noise needs --configs >= 2 and --seeds >= 2 (between and within)")
    ray_compat.quiet()
    base = load_spec(spec_path, sets=sets, smoke=smoke)
    name = f"bench-noise-{time.strftime('%m%d%H%M%S')}"
    spec = noise_spec(base, configs, seeds, name)
    if left_out(base):
        log(f"[bench noise] leaves out {' and '.join(left_out(base))}: every run is measured")
    log(
        f"[bench noise] {configs} random configurations of {spec.trainable} x {seeds} seeds "
        f"({configs * seeds} trials, {spec.budget.max_epochs} epochs each, "
        f"{spec.budget.concurrency} at a time) on {spec.data.corpus}, search {name!r}"
    )
    t0 = time.monotonic()
    result = run_search(spec, num_cpus=num_cpus, log=log)
    runs = runs_by_configuration(result, spec.seed)
    names = set().union(*(r["values"] for r in runs)) if runs else set()
    table = []
    for metric in metric_order(spec, names):
        rel = crossed_reliability(metric, crossed_table(runs, metric))
        if rel is not None:
            table.append(rel)
    if not table:
        raise UsageError(
            f"bench noise: fewer than two configurations finished with {seeds} seeds "
            f"(search {name!r}: `sertune search status {name}`)"
        )
    log(
        f"\nnoise over {len(runs)} configurations x {seeds} seeds "
        f"({time.monotonic() - t0:.0f}s, seeds crossed): between = sd of the configurations' "
        "means, within = one run's sd around its configuration's (the residual), seed = a "
        "seed's effect shared by every configuration (cancels within a search), ICC = "
        "between²/(between²+within²), resolves = the smallest difference between two trials "
        "(one run each) told apart at 95 % (t on the residual's df)"
    )
    log(format_table(table, seeds))
    by = {r.metric: r for r in table}
    key = spec.metrics[0].metric
    if key in by and f"{key}_raw_last" in by:  # does the kept epoch's smoothing lower the noise?
        raw = [
            f"{by[k].within_sd:.3f} {what}"
            for k, what in (
                (f"{key}_raw_last", "at the last epoch"),
                (f"{key}_raw_best", "at the raw best epoch"),
            )
            if k in by
        ]
        log(
            f"{key}, one run's sd (within): {by[key].within_sd:.3f} at the kept epoch (smoothed "
            f"curve, the trials' objective) vs {' and '.join(raw)}"
        )
    _record(table, runs, spec, name, seeds, out, log)
    return table


def _record(
    table: list[Reliability],
    runs: list[dict[str, Any]],
    spec: SearchSpec,
    name: str,
    seeds: int,
    out: str | None,
    log: Callable[[str], None],
) -> None:
    store = tracking.Store()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bench_noise.json").write_text(
            json.dumps(
                {
                    "search": name,
                    "seeds": seeds,
                    "table": [asdict(r) for r in table],
                    "runs": runs,
                },
                indent=2,
            )
        )
        _plot(table[: min(4, len(table))], runs, folder / "bench_noise.png")
        run_id = store.log_bench_run(
            "bench-noise",
            {"search": name, "configs": len(runs), "seeds": seeds, "spec": spec.source},
            {f"icc/{r.metric}": r.icc for r in table}
            | {f"within_sd/{r.metric}": r.within_sd for r in table},
            [folder / "bench_noise.png", folder / "bench_noise.json"],
        )
    log(
        f"plot: MLflow run {run_id} (bench_noise.png) in {settings.tracking_uri()}"
        + (f" and {folder}" if out else "")
    )


def _plot(table: list[Reliability], runs: list[dict[str, Any]], path: Path) -> None:
    """Per figure: every configuration's seeds as dots around its mean (sorted by the mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(4 * len(table), 3.6), squeeze=False)
    for ax, rel in zip(axes[0], table, strict=False):
        per = sorted(
            (r["values"][rel.metric] for r in runs if rel.metric in r["values"]),
            key=lambda v: sum(v) / len(v),
        )
        for i, vals in enumerate(per):
            ax.scatter([i] * len(vals), vals, s=14, alpha=0.7, color="tab:blue")
            ax.plot([i - 0.3, i + 0.3], [sum(vals) / len(vals)] * 2, color="black")
        ax.set_title(f"{rel.metric}\nICC {rel.icc:.2f}", fontsize=9)
        ax.set_xlabel("configuration (by mean)")
    axes[0][0].set_ylabel("value of each seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
