"""``sertune bench sampler``: is the search worth more than trying configurations at random?

The same spec (by default the demo's MTL-AUG search on the synthetic corpus; any spec or preset,
``--set`` edits included, to measure on your own corpus; robustness off) runs with each sampler at
the same budget, once per seed (the seed drives the sampler, the model's
initialisation and the data order, the same seeds for every sampler: paired runs). For each it
reads the trials back from MLflow in the order they were proposed and prints the best objective
so far after each trial and at the wall time that trial ended, as mean ± standard deviation over
the seeds; the plot of both goes to MLflow (run ``bench-sampler``, artifact
``bench_sampler.png``) and to ``--out``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import ray_compat, settings, tracking
from ..search import run_search
from ..spec import load_spec, resolve_spec_path


def _curves(
    store: tracking.Store, name: str, metric: str, mode: str
) -> tuple[list[float], list[float], list[float]]:
    """Best-so-far after each trial in the order they were proposed; and against wall time: the
    time the k-th trial ended (from the first start) with the best of the trials ended by then."""
    trials = store.finished_trials(name)
    t0 = min(t.start_ms for t in trials)
    better = max if mode == "max" else min

    def best_so_far(ordered: list[tracking.Run]) -> list[float]:
        best, out = None, []
        for t in ordered:
            v = t.metrics.get(metric)
            if v is not None:
                best = v if best is None else better(best, v)
            out.append(best if best is not None else float("nan"))
        return out

    by_end = sorted(trials, key=lambda t: t.end_ms)
    return best_so_far(trials), [(t.end_ms - t0) / 1000.0 for t in by_end], best_so_far(by_end)


def _mean_sd(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    n = min(len(r) for r in rows)
    cols = [[r[i] for r in rows] for i in range(n)]
    return (
        [statistics.fmean(c) for c in cols],
        [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols],
    )


def run_sampler_bench(
    samplers: list[str],
    spec: str = "demo",
    sets: list[str] | None = None,
    pbt: bool = False,
    trials: int = 8,
    seeds: int = 3,
    epochs: int = 3,
    concurrency: int = 2,
    num_cpus: int | None = None,
    out: str | None = None,
    log: Callable[[str], None] = print,
) -> int:
    ray_compat.quiet()  # before the store is opened: no MLflow/alembic chatter
    spec_path = str(resolve_spec_path(spec))
    base = load_spec(spec_path, sets=sets)
    metric, mode = base.objective.metric, base.objective.mode
    store = tracking.Store()
    curves: dict[str, dict[str, Any]] = {}
    stamp = time.strftime("%m%d%H%M")
    log(
        f"[bench sampler] {', '.join(samplers + (['pbt'] if pbt else []))} x {seeds} seed(s), {trials} trials each, "
        f"{concurrency} at a time, <= {epochs} epochs, spec {base.name!r} on {base.data.corpus}"
    )
    arms = [(s, {"sampler": s}) for s in samplers]
    if pbt:  # population-based training of the aux weights and the augmentation mix
        arms.append(
            (
                "pbt",
                {
                    "sampler": "random",
                    "scheduler": "pbt",
                    "scheduler_options": {"quantile_fraction": 0.5},
                },
            )
        )
    for sampler, strategy in arms:
        runs, walls, by_end = [], [], []
        for seed in range(seeds):
            name = f"bench-sampler-{stamp}-{sampler}-s{seed}"
            spec = load_spec(
                spec_path,
                sets=sets,
                overrides={
                    "name": name,
                    "seed": seed,
                    "robustness": None,
                    "confirm": None,  # the bench compares searches, not their confirmations
                    "baseline": None,
                    "budget": {
                        **base.budget.model_dump(),
                        "trials": trials,
                        "concurrency": concurrency,
                        "max_epochs": epochs,
                        "grace_epochs": min(base.budget.grace_epochs, epochs),
                    },
                    "search": {**base.search.model_dump(), **strategy},
                },
            )
            t = time.monotonic()
            result = run_search(spec, num_cpus=num_cpus, log=lambda *a: None)
            best, wall, best_at_wall = _curves(store, name, metric, mode)
            runs.append(best)
            walls.append(wall)
            by_end.append(best_at_wall)
            log(
                f"  {sampler:7} seed {seed}: best {metric} {best[-1]:.3f} after {len(best)} trials "
                f"({result.errors} failed), {time.monotonic() - t:.0f}s"
            )
        mean, sd = _mean_sd(runs)
        wmean, _ = _mean_sd(walls)
        emean, esd = _mean_sd(by_end)
        curves[sampler] = {
            "mean": mean,
            "sd": sd,
            "wall": wmean,
            "wall_mean": emean,
            "wall_sd": esd,
            "runs": runs,
        }

    n = min(len(v["mean"]) for v in curves.values())
    header = f"{'trials':>6}  " + "  ".join(
        f"{s:>14} (order)  {'ended at':>9}  {'(time)':>13}" for s in curves
    )
    lines = [
        f"\nbest {metric} so far, mean ± sd over {seeds} seed(s): after k trials in the order "
        "proposed, and when k trials had ended (wall time, mean) with the best of those:",
        header,
    ]
    for k in range(n):
        cells = [
            f"{v['mean'][k]:>14.3f} ± {v['sd'][k]:.3f} {v['wall'][k]:>7.0f}s  "
            f"{v['wall_mean'][k]:.3f} ± {v['wall_sd'][k]:.3f}"
            for v in curves.values()
        ]
        lines.append(f"{k + 1:>6}  " + "  ".join(cells))
    ref = curves.get("random")
    for s, v in curves.items():
        if ref is not None and s != "random":
            gain = v["mean"][n - 1] - ref["mean"][n - 1]
            wins = sum(a[-1] > b[-1] for a, b in zip(v["runs"], ref["runs"], strict=False))
            lines.append(
                f"{s} vs random at {n} trials: {gain:+.3f} {metric} (mean), "
                f"better in {wins}/{seeds} paired seeds"
            )
    log("\n".join(lines))

    with tempfile.TemporaryDirectory() as tmp:
        png = Path(out or tmp) / "bench_sampler.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        _plot(curves, metric, seeds, png)
        (png.parent / "bench_sampler.json").write_text(json.dumps(curves, indent=2))
        run_id = store.log_bench_run(
            "bench-sampler",
            {"samplers": ",".join(curves), "trials": trials, "seeds": seeds},
            {f"best_{metric}_{s}": v["mean"][n - 1] for s, v in curves.items()},
            [png, png.parent / "bench_sampler.json"],
        )
    log(
        f"plot: MLflow run {run_id} (bench_sampler.png) in {settings.tracking_uri()}"
        + (f" and {png}" if out else "")
    )
    return 0


def _plot(curves: dict[str, dict[str, Any]], metric: str, seeds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for s, v in curves.items():
        k = list(range(1, len(v["mean"]) + 1))
        lo = [m - d for m, d in zip(v["mean"], v["sd"], strict=False)]
        hi = [m + d for m, d in zip(v["mean"], v["sd"], strict=False)]
        a.plot(k, v["mean"], marker="o", label=s)
        a.fill_between(k, lo, hi, alpha=0.2)
        wlo = [m - d for m, d in zip(v["wall_mean"], v["wall_sd"], strict=False)]
        whi = [m + d for m, d in zip(v["wall_mean"], v["wall_sd"], strict=False)]
        b.plot(v["wall"], v["wall_mean"], marker="o", label=s)
        b.fill_between(v["wall"], wlo, whi, alpha=0.2)
    a.set_xlabel("trials")
    b.set_xlabel("wall time (s)")
    a.set_ylabel(f"best {metric} so far")
    a.set_title(f"mean ± sd over {seeds} seeds")
    b.set_title("against wall time")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
