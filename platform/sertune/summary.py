"""The search summary on the parent run: plots that answer "which aux weights and augmentations
matter?", and the leaderboard.

* ``leaderboard.csv`` / ``leaderboard.md`` - every trial, best first, in sertune's words;
* ``optimisation_history.png`` - the objective of each trial in the order they started, labelled
  with the trial ids the console and the MLflow runs show, and the best so far;
* ``slices.png`` - the objective against each searched parameter (one panel each);
* ``param_importances.png``/``.json`` - Optuna's importances, with a caveat below 10 trials;
* ``pareto_front.png``/``.json`` - when several objectives were searched.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import warnings
from pathlib import Path
from typing import Any

from .leaderboard import SearchResult
from .spec import MetricSpec, ParamSpec, SearchSpec

TRUST_IMPORTANCES = 10  # fewer finished trials than this: importances are mostly noise


def pareto_front(points: list[tuple[float, ...]], modes: list[str]) -> list[int]:
    """Indices of the non-dominated points (each objective maximised or minimised)."""
    sign = [1 if m == "max" else -1 for m in modes]
    p = [tuple(s * v for s, v in zip(sign, pt, strict=True)) for pt in points]
    front = []
    for i, a in enumerate(p):
        dominated = any(
            all(bj >= aj for aj, bj in zip(a, b, strict=True))
            and any(bj > aj for aj, bj in zip(a, b, strict=True))
            for j, b in enumerate(p)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_search_summary(
    out: Path, result: SearchResult, spec: SearchSpec
) -> dict[str, Any] | None:
    """Write the summary files into ``out``; return the best trial's row (or None)."""
    metrics = result.metrics
    key, mode = metrics[0].metric, metrics[0].mode
    rows = result.rows
    ok = [r for r in rows if r["state"] in ("finished", "stopped") and _num(r.get(key))]
    _leaderboard(out, rows, result.columns.table)
    _history(out, ok, key, mode, result.name)
    space = spec.space
    _slices(out, ok, key, space, result.name)
    _importances(out, ok, key, mode, space)
    if len(metrics) > 1:
        _pareto(out, rows, metrics)
    if not ok:
        return None
    best = ok[0]  # rows come sorted best first
    return {"trial": best["trial"], **{k: v for k, v in best.items() if _num(v)}}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _leaderboard(out: Path, rows: list[dict], metric_columns: list[str]) -> None:
    cols = ["trial", "status", "epochs", *metric_columns]
    params = sorted({k for r in rows for k in (r["config"] or {})})
    with (out / "leaderboard.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*cols, *params])
        for r in rows:
            w.writerow(
                [r.get(c, "") for c in cols] + [(r["config"] or {}).get(p, "") for p in params]
            )
    md = ["| # | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]

    def cell(r: dict, c: str) -> str:
        if not isinstance(r.get(c), float):
            return str(r.get(c, ""))
        se = r.get(f"{c}_se")
        return f"{r[c]:.3f} ± {se:.3f}" if _num(se) else f"{r[c]:.3f}"

    for i, r in enumerate(rows, 1):
        md.append(f"| {i} | " + " | ".join(cell(r, c) for c in cols) + " |")
    (out / "leaderboard.md").write_text("\n".join(md) + "\n")


def _history(out: Path, ok: list[dict], key: str, mode: str, name: str) -> None:
    if not ok:
        return
    plt = _plt()
    by_start = sorted(ok, key=lambda r: (r.get("started") or 0, r["trial"]))
    vals = [r[key] for r in by_start]
    pick = max if mode == "max" else min
    best_so_far = [pick(vals[: i + 1]) for i in range(len(vals))]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(vals) + 2), 4))
    xs = range(len(vals))
    colors = ["C0" if r["state"] == "finished" else "C1" for r in by_start]
    errs = _errors(by_start, key)
    if errs:  # a replicated objective: each trial's mean ± se over its folds/repeats
        ax.errorbar(xs, vals, yerr=errs, fmt="none", ecolor="0.6", capsize=2, zorder=2)
    ax.scatter(xs, vals, c=colors, zorder=3)
    ax.plot(xs, best_so_far, "-", c="C2", label="best so far")
    ax.scatter([], [], c="C0", label="finished")
    ax.scatter([], [], c="C1", label="stopped early")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["trial"] for r in by_start], rotation=60, ha="right", fontsize=7)
    ax.set_xlabel("trial (in the order it started)")
    ax.set_ylabel(f"{key} (mean ± se)" if errs else key)
    ax.set_title(f"Optimisation history: {name}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "optimisation_history.png", dpi=100)
    plt.close(fig)


def _errors(rows: list[dict], key: str) -> list[float] | None:
    """Each row's ``<key>_se`` (a replicated objective), or None when the rows have none."""
    errs = [r.get(f"{key}_se") for r in rows]
    if not any(_num(e) for e in errs):
        return None
    return [e if _num(e) else 0.0 for e in errs]


def _slices(out: Path, ok: list[dict], key: str, space: dict[str, ParamSpec], name: str) -> None:
    params = [p for p in space if any(p in (r["config"] or {}) for r in ok)]
    if not ok or not params:
        return
    plt = _plt()
    cols = min(4, len(params))
    nrows = math.ceil(len(params) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, p in zip(axes.flat, params, strict=False):
        have = [r for r in ok if p in (r["config"] or {})]
        pts = [(r["config"][p], r[key]) for r in have]
        xs, ys, errs = [x for x, _ in pts], [y for _, y in pts], _errors(have, key)
        if not all(isinstance(x, (int, float)) for x in xs):  # a choice: a column per value
            labels = sorted({str(x) for x in xs})
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, fontsize=7)
        elif space[p].log:
            ax.set_xscale("log")
        if errs:  # mean ± se over each trial's folds/repeats
            ax.errorbar(xs, ys, yerr=errs, fmt="none", ecolor="0.6", capsize=2)
        ax.scatter(xs, ys, s=18, zorder=3)
        ax.set_title(p, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(params) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{key} (± se)" if _errors(ok, key) else key, fontsize=8)
    fig.suptitle(f"{key} against each searched parameter: {name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "slices.png", dpi=100)
    plt.close(fig)


def _importances(
    out: Path, ok: list[dict], key: str, mode: str, space: dict[str, ParamSpec]
) -> None:
    importances: dict[str, Any] = {}
    if len(ok) >= 3 and space:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dists = {name: p.distribution() for name, p in space.items()}
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
        for r in ok:
            p = {k: v for k, v in (r["config"] or {}).items() if k in dists}
            if len(p) == len(dists):
                study.add_trial(
                    optuna.trial.create_trial(params=p, distributions=dists, value=r[key])
                )
        try:
            with warnings.catch_warnings():  # "importances will be equal": the caveat says so
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as e:  # too few or too uniform trials
            importances = {"note": f"importances unavailable: {e}"}
    else:
        importances = {"note": "importances need >= 3 finished trials and a searched space"}
    caveat = (
        f"only {len(ok)} finished trials: treat these importances as a hint, not a finding"
        if len(ok) < TRUST_IMPORTANCES
        else ""
    )
    noise = _noise_caveat(ok, key)
    if noise:
        caveat = f"{caveat}; {noise}" if caveat else noise
    (out / "param_importances.json").write_text(
        json.dumps({**importances, **({"caveat": caveat} if caveat else {})}, indent=2)
    )
    if importances and "note" not in importances:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(importances) + 1.8))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel(f"importance for {key} (Optuna's default evaluator)")
        if caveat:
            ax.set_title(textwrap.fill(caveat, 80), fontsize=8, color="C3")
        fig.tight_layout()
        fig.savefig(out / "param_importances.png", dpi=100)
        plt.close(fig)


def _noise_caveat(ok: list[dict], key: str) -> str:
    """Where the trials' ``<key>_se`` (a replicated objective) is as large as their spread, the
    importances may rank noise: say so, with both figures."""
    ses = sorted(r[f"{key}_se"] for r in ok if _num(r.get(f"{key}_se")))
    vals = [r[key] for r in ok]
    if not ses or len(vals) < 3:
        return ""
    median_se = ses[len(ses) // 2]
    from .stats import summary

    spread = summary(vals).sd
    if spread > 2 * median_se:
        return ""
    return (
        f"the trials' {key} differ by sd {spread:.3f}, within about 2x their median se "
        f"{median_se:.3f}: the importances may rank noise"
    )


def _pareto(out: Path, rows: list[dict], metrics: list[MetricSpec]) -> None:
    names = [m.metric for m in metrics]
    pts = [r for r in rows if all(_num(r.get(n)) for n in names)]
    front = pareto_front([tuple(r[n] for n in names) for r in pts], [m.mode for m in metrics])
    (out / "pareto_front.json").write_text(
        json.dumps(
            [
                {
                    "trial": pts[i]["trial"],
                    **{n: pts[i][n] for n in names},
                    "config": pts[i]["config"],
                }
                for i in front
            ],
            indent=2,
        )
    )
    if not pts:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter(
        [r[names[0]] for r in pts], [r[names[1]] for r in pts], c="lightgray", label="trials"
    )
    ax.scatter(
        [pts[i][names[0]] for i in front],
        [pts[i][names[1]] for i in front],
        c="C3",
        label="Pareto front",
    )
    for i in front:
        ax.annotate(pts[i]["trial"], (pts[i][names[0]], pts[i][names[1]]), fontsize=7)
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto_front.png", dpi=100)
    plt.close(fig)


def write_schedule(out: Path, winner: str, schedules: dict[str, list[list[Any]]]) -> None:
    """Population-based training: the winning trial's weights by epoch (through the checkpoints
    it took from other trials), as ``pbt_schedule.png`` and every trial's in ``pbt_schedules.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "pbt_schedules.json").write_text(
        json.dumps({"winner": winner, "schedules": schedules}, indent=2)
    )
    entries = schedules[winner]
    names = sorted({k for _, values, _ in entries for k in values})
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [e for e, _, _ in entries]
    for name in names:
        ax.step(epochs, [v.get(name) for _, v, _ in entries], where="post", marker="o", label=name)
    for (e, _, owner), prev in zip(entries[1:], entries[:-1], strict=False):
        if owner != prev[2]:
            ax.axvline(e - 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    ax.set_title(
        f"PBT schedule of the best trial {winner} (dotted: took another trial's checkpoint)"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pbt_schedule.png", dpi=110)
    plt.close(fig)
