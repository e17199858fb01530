"""The search summary on the parent run: leaderboard, optimisation history, parameter
importances, and the Pareto front when several objectives were searched."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def _distributions(space: dict[str, dict]) -> dict[str, Any]:
    import optuna.distributions as d

    out = {}
    for name, p in space.items():
        if p["type"] == "choice":
            out[name] = d.CategoricalDistribution(p["values"])
        elif p["type"] == "int":
            out[name] = d.IntDistribution(
                int(p["low"]), int(p["high"]), log=p["log"], step=int(p["step"] or 1)
            )
        else:
            out[name] = d.FloatDistribution(p["low"], p["high"], log=p["log"], step=p["step"])
    return out


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


def write_search_summary(out: Path, result: Any, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Write the summary files into ``out``; return the best trial's row (or None)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = result.metrics
    key, mode = metrics[0]["metric"], metrics[0]["mode"]
    rows = result.rows
    ok = [r for r in rows if r["status"] == "done" and isinstance(r.get(key), (int, float))]

    # leaderboard
    cols = [
        "trial",
        "status",
        "epochs",
        *dict.fromkeys([m["metric"] for m in metrics] + ["val_uar", "val_uar_noisy", "test_uar"]),
    ]
    params = sorted({k for r in rows for k in (r["config"] or {})})
    with (out / "leaderboard.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*cols, *params, "error"])
        for r in rows:
            w.writerow(
                [r.get(c, "") for c in cols]
                + [(r["config"] or {}).get(p, "") for p in params]
                + [r.get("error") or ""]
            )
    md = ["| # | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for i, r in enumerate(rows, 1):
        md.append(
            f"| {i} | "
            + " | ".join(
                f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols
            )
            + " |"
        )
    (out / "leaderboard.md").write_text("\n".join(md) + "\n")

    # optimisation history (trial order = creation order)
    by_id = sorted(ok, key=lambda r: r["trial"])
    if by_id:
        vals = [r[key] for r in by_id]
        best_so_far = [
            max(vals[: i + 1]) if mode == "max" else min(vals[: i + 1]) for i in range(len(vals))
        ]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, len(vals) + 1), vals, "o", label=key)
        ax.plot(range(1, len(vals) + 1), best_so_far, "-", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(key)
        ax.set_title(f"Optimisation history: {result.name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "optimisation_history.png", dpi=100)
        plt.close(fig)

    # parameter importances (Optuna's default evaluator on the finished trials)
    importances: dict[str, Any] = {}
    space = spec.get("space") or {}
    if len(ok) >= 3 and space:
        try:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            dists = _distributions(space)
            study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
            for r in ok:
                p = {k: v for k, v in (r["config"] or {}).items() if k in dists}
                if len(p) == len(dists):
                    study.add_trial(
                        optuna.trial.create_trial(params=p, distributions=dists, value=r[key])
                    )
            importances = optuna.importance.get_param_importances(study)
        except Exception as e:  # too few or too uniform trials
            importances = {"note": f"importances unavailable: {e}"}
    else:
        importances = {"note": "importances need >= 3 finished trials and a searched space"}
    (out / "param_importances.json").write_text(json.dumps(importances, indent=2))
    if importances and "note" not in importances:
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(importances) + 1.5))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel(f"importance for {key} (Optuna's default evaluator)")
        fig.tight_layout()
        fig.savefig(out / "param_importances.png", dpi=100)
        plt.close(fig)

    # Pareto front
    if len(metrics) > 1:
        names = [m["metric"] for m in metrics]
        pts = [r for r in rows if all(isinstance(r.get(n), (int, float)) for n in names)]
        front = pareto_front(
            [tuple(r[n] for n in names) for r in pts], [m["mode"] for m in metrics]
        )
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
        if pts:
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.scatter(
                [r[names[0]] for r in pts],
                [r[names[1]] for r in pts],
                c="lightgray",
                label="trials",
            )
            ax.scatter(
                [pts[i][names[0]] for i in front],
                [pts[i][names[1]] for i in front],
                c="C3",
                label="Pareto front",
            )
            ax.set_xlabel(names[0])
            ax.set_ylabel(names[1])
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "pareto_front.png", dpi=100)
            plt.close(fig)
    if not ok:
        return None
    best = ok[0]  # rows come sorted best first
    return {
        "trial": best["trial"],
        **{k: v for k, v in best.items() if isinstance(v, (int, float))},
    }
