"""A search's trials as a leaderboard, in sertune's words, best first.

Trial states: ``finished`` (all epochs), ``stopped early at epoch k`` (a scheduler's decision),
``failed: <reason>``, ``interrupted`` (Ctrl-C or a crash; ``resume`` continues it), ``running``,
``pending``. Metrics are the trial's last report: for a finished trial that carries the test and
robustness figures of its best-validation epoch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .failures import error_reason
from .records import experiment_path

SHOWN = ("val_uar", "val_uar_noisy", "test_uar")


@dataclass
class SearchResult:
    name: str
    path: str
    rows: list[dict[str, Any]]  # one per trial, best first
    metrics: list[dict[str, str]]
    errors: int
    parent_run_id: str | None = None
    confirm: list[dict[str, Any]] = field(default_factory=list)  # per configuration, mean ± sd
    stats: dict[str, float] = field(default_factory=dict)  # what the driver spent (bench scale)

    @property
    def finished(self) -> int:
        return sum(r["state"] in ("finished", "stopped") for r in self.rows)


def trial_epochs(result: dict[str, Any]) -> int:
    """Epochs a trial has trained, whatever Tune's own iteration counter says after a resume."""
    if "epochs_done" in result:
        return int(result["epochs_done"])
    return int(result.get("training_iteration", 0))


def trial_row(
    trial_id: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
    max_epochs: int,
    objectives: list[dict[str, str]],
    error: str | None = None,
    tune_status: str | None = None,
) -> dict[str, Any]:
    from .tuner import flat_config

    config = flat_config(config)
    epochs = trial_epochs(metrics)
    if error:
        state, label = "failed", f"failed: {error}"
    elif tune_status in ("RUNNING", "PENDING", "PAUSED"):
        state, label = "interrupted", tune_status.lower()
    elif epochs >= max_epochs:
        state, label = "finished", "finished"
    elif epochs > 0:
        state, label = "stopped", f"stopped early at epoch {epochs}"
    else:
        state, label = "interrupted", "interrupted"
    row = {
        "trial": trial_id,
        "state": state,
        "status": label,
        "epochs": epochs,
        "config": {k: v for k, v in (config or {}).items() if not k.startswith("__")},
        "origin": {k.strip("_"): v for k, v in (config or {}).items() if k.startswith("__")},
        "checkpoint": metrics.get("checkpoint_path"),
        "error": error,
        # when it started: creation order for the optimisation history
        "started": float(metrics.get("timestamp", 0) or 0)
        - float(metrics.get("time_total_s", 0) or 0),
        "ended": float(metrics.get("timestamp", 0) or 0),
        "loop_started_at": metrics.get("loop_started_at"),  # when its training began (benches)
    }
    for k in (*SHOWN, "val_war", "val_f1", "best_epoch"):
        if k in metrics:
            row[k] = metrics[k]
    for k, v in metrics.items():
        if k.startswith(("robust/", "test_")):
            row[k] = v
    for m in objectives:
        row[m["metric"]] = metrics.get(m["metric"])
    return row


def rank(rows: list[dict[str, Any]], objective: dict[str, str]) -> list[dict[str, Any]]:
    key, sign = objective["metric"], (-1 if objective["mode"] == "max" else 1)

    def order(row: dict) -> tuple:
        v = row.get(key)
        good = row["state"] in ("finished", "stopped") and isinstance(v, (int, float))
        return (not good, sign * v if good else 0.0)

    return sorted(rows, key=order)


def summarise(name: str, spec: Any, grid: Any) -> SearchResult:
    """A Tune ``ResultGrid`` as a leaderboard."""
    objectives = [m.model_dump() for m in spec.objective.as_list()]
    rows = []
    for r in grid:
        m = r.metrics or {}
        err = None
        if r.error:
            err = error_reason(str(r.error)) if str(r.error).strip() else type(r.error).__name__
        tid = m.get("trial_id") or _trial_id_from_path(r.path)
        rows.append(trial_row(tid, m, r.config, spec.budget.max_epochs, objectives, err))
    rows = rank(rows, objectives[0])
    return SearchResult(
        name=name,
        path=experiment_path(name),
        rows=rows,
        metrics=objectives,
        errors=sum(r["state"] == "failed" for r in rows),
    )


def _trial_id_from_path(path: str | None) -> str:
    m = re.search(r"_([0-9a-f]{5,})(?:_|$)", path or "")
    return m.group(1) if m else "?"


def format_table(result: SearchResult, top: int = 10) -> str:
    cols = [m["metric"] for m in result.metrics]
    cols += [c for c in SHOWN if c not in cols]
    header = ["#", "trial", "status", "epochs", *cols, "config"]
    lines = []
    for i, row in enumerate(result.rows[:top], start=1):
        cfg = ", ".join(f"{k}={_short(v)}" for k, v in sorted((row["config"] or {}).items()))
        vals = [f"{row[c]:.3f}" if isinstance(row.get(c), (int, float)) else "-" for c in cols]
        status = "failed (below)" if row["state"] == "failed" else row["status"][:48]
        lines.append([str(i), row["trial"], status, str(row["epochs"]), *vals, cfg])
    widths = [
        max(len(h), *(len(line[j]) for line in lines)) if lines else len(h)
        for j, h in enumerate(header)
    ]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    return "\n".join([fmt(header), *(fmt(line) for line in lines)]).rstrip()


def failure_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each distinct failure reason once, uncut, with the trials that failed that way."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r["state"] == "failed":
            by_reason.setdefault(r["status"].removeprefix("failed: "), []).append(r["trial"])
    return [
        f"failed ({len(trials)}): {', '.join(trials[:8])}{' ...' if len(trials) > 8 else ''}: {why}"
        for why, trials in by_reason.items()
    ]


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def format_result(result: SearchResult, tracking_uri: str) -> str:
    """What a finished search prints: the leaderboard, confirmation, where everything is."""
    from .confirm import format_confirmation

    lines = [
        "",
        f"best trials of {result.name!r} ({len(result.rows)} trials, {result.errors} failed, "
        f"{sum(r['state'] == 'stopped' for r in result.rows)} stopped early):",
        format_table(result),
        *failure_lines(result.rows),
    ]
    if result.confirm:
        key = result.metrics[0]["metric"]
        shown = [key] + [m for m in ("test_uar", "robust/uar_snr10_white") if m != key]
        lines += [
            "",
            "confirmed with fresh seeds (mean ± sd):",
            format_confirmation(result.confirm, shown),
        ]
    lines += [
        "",
        f"trial results and checkpoints: {result.path}",
        f"MLflow: {tracking_uri}  (parent run {result.parent_run_id}; `sertune ui` to browse)",
        f"next: sertune promote {result.name}",
    ]
    return "\n".join(lines)
