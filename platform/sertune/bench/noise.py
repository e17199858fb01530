"""``sertune bench noise``: how much of a search's objective is the configuration, how much luck?

N configurations drawn at random from a spec's space are each trained with S seeds (the
search's own seed, then the confirmation seeds ``seed + 1000 k``), every one to its last epoch,
through the same machinery a search uses (one search with ``confirm: {top_k: N, seeds: S-1}``:
the warm slots, MLflow, the robustness report). For every figure the trials report it prints:

* the sd **between** configurations (of their true means: the one-way ANOVA estimate, so the
  seeds' own noise is taken out of it) and the sd **within** a configuration (one seed's noise);
* the objective's **reliability** ``ICC = between² / (between² + within²)``: the share of a
  single run's variance that is the configuration. At 0.5, half of what a sampler, a scheduler
  or a promotion gate compares is luck; averaging K runs per trial lifts it to
  ``K·ICC / (1 + (K-1)·ICC)`` (Spearman-Brown);
* the smallest difference between two configurations that one run each resolves at 95 %
  (``1.96 · √2 · within``): two trials closer than that are not told apart.

The figures and every run's value go to MLflow (run ``bench-noise``, ``bench_noise.json`` and a
plot of each configuration's seeds) and to ``--out``.
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

from .. import ray_compat, settings, tracking
from ..leaderboard import Columns
from ..search import run_search
from ..spec import SearchSpec, load_spec

Z95 = 1.959964


@dataclass(frozen=True)
class Reliability:
    """One figure's noise over configurations x seeds."""

    metric: str
    configs: int
    runs: int  # every run with a value
    between_sd: float  # sd of the configurations' true means (ANOVA estimate, >= 0)
    within_sd: float  # one run's sd around its configuration's mean (pooled)
    icc: float  # between² / (between² + within²), in [0, 1]
    resolvable: float  # smallest difference one run each tells apart at 95 %

    def icc_of_mean(self, k: int) -> float:
        """The reliability of a mean of ``k`` runs per configuration (Spearman-Brown)."""
        return k * self.icc / (1 + (k - 1) * self.icc) if self.icc > 0 else 0.0


def reliability(metric: str, groups: Sequence[Sequence[float]]) -> Reliability | None:
    """One-way random-effects ANOVA of ``groups`` (each a configuration's runs).

    Groups with fewer than two runs add to the between-configuration part only through their
    mean; None when there are fewer than two configurations with two runs or more.
    """
    groups = [[float(v) for v in g if math.isfinite(float(v))] for g in groups]
    groups = [g for g in groups if g]
    multi = [g for g in groups if len(g) > 1]
    if len(groups) < 2 or not multi:
        return None
    n_total = sum(len(g) for g in groups)
    k = len(groups)
    grand = sum(sum(g) for g in groups) / n_total
    means = [sum(g) / len(g) for g in groups]
    ss_within = sum(sum((v - m) ** 2 for v in g) for g, m in zip(groups, means, strict=True))
    df_within = n_total - k
    if df_within <= 0:
        return None
    ms_within = ss_within / df_within
    ms_between = sum(len(g) * (m - grand) ** 2 for g, m in zip(groups, means, strict=True)) / (
        k - 1
    )
    # the mean group size of an unbalanced design (equal to S when every configuration has S)
    n0 = (n_total - sum(len(g) ** 2 for g in groups) / n_total) / (k - 1)
    var_between = max(0.0, (ms_between - ms_within) / n0)
    total = var_between + ms_within
    return Reliability(
        metric=metric,
        configs=k,
        runs=n_total,
        between_sd=math.sqrt(var_between),
        within_sd=math.sqrt(ms_within),
        icc=var_between / total if total > 0 else 0.0,
        resolvable=Z95 * math.sqrt(2 * ms_within),
    )


def format_table(rows: list[Reliability], seeds: int) -> str:
    header = ["metric", "between sd", "within sd", "ICC", f"ICC of {seeds}-run mean", "resolves"]
    cells = [
        [
            r.metric,
            f"{r.between_sd:.3f}",
            f"{r.within_sd:.3f}",
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
    raw["confirm"] = {"top_k": configs, "seeds": seeds - 1}
    raw["baseline"] = None
    return validate_spec(raw, src, check_paths=False)


def runs_by_configuration(result: Any) -> list[dict[str, Any]]:
    """Each configuration's runs: the search's own trial, then its confirmation seeds."""
    groups = {g["configuration_of"]: g for g in result.confirm}
    out = []
    for row in result.rows:
        g = groups.get(row["trial"])
        if row["state"] != "finished" or g is None:
            continue
        values: dict[str, list[float]] = {}
        for metric, seeds in g.get("values", {}).items():
            own = row.get(metric)
            if isinstance(own, (int, float)) and not isinstance(own, bool):
                values[metric] = [float(own), *seeds]
        out.append({"trial": row["trial"], "config": row["config"], "values": values})
    return out


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
    log(
        f"[bench noise] {configs} random configurations of {spec.trainable} x {seeds} seeds "
        f"({configs * seeds} trials, {spec.budget.max_epochs} epochs each, "
        f"{spec.budget.concurrency} at a time) on {spec.data.corpus}, search {name!r}"
    )
    t0 = time.monotonic()
    result = run_search(spec, num_cpus=num_cpus, log=log)
    runs = runs_by_configuration(result)
    names = set().union(*(r["values"] for r in runs)) if runs else set()
    names = {n for n in names if not n.endswith("_se")}  # a cross-validated trial's fold se
    table = []
    for metric in metric_order(spec, names):
        rel = reliability(metric, [r["values"].get(metric, []) for r in runs])
        if rel is not None:
            table.append(rel)
    if not table:
        raise UsageError(
            f"bench noise: fewer than two configurations finished with {seeds} seeds "
            f"(search {name!r}: `sertune search status {name}`)"
        )
    log(
        f"\nnoise over {len(runs)} configurations x {seeds} seeds "
        f"({time.monotonic() - t0:.0f}s): between = sd of the configurations' means, within = "
        "one seed's sd, ICC = between²/(between²+within²), resolves = the smallest difference "
        "between two trials (one run each) told apart at 95 %"
    )
    log(format_table(table, seeds))
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
