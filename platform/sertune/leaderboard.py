"""A search's trials as a leaderboard, in sertune's words, best first.

Trial states: ``finished`` (all epochs), ``stopped early at epoch k`` (a scheduler's decision),
``failed: <reason>``, ``interrupted`` (Ctrl-C or a crash; ``resume`` continues it), ``running``,
``pending``. Metrics are the trial's last report: for a finished trial that carries the test and
robustness figures of its kept epoch's model. An objective reported every epoch is read at the
kept epoch (the best of the smoothed validation curve, ``sertune.trainable.objective_value``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .failures import error_reason
from .records import experiment_path
from .spec import Condition, MetricSpec, SearchSpec
from .trainable import (
    BEST_EPOCH,
    CHECKPOINT_PATH,
    CV_FOLD,
    EPOCHS_DONE,
    EPOCHS_PARAM,
    KEPT_EPOCH,
    KEPT_PREFIX,
    LOOP_STARTED_AT,
    RAW_BEST_PREFIX,
    get_trainable,
    objective_value,
)


@dataclass(frozen=True)
class Columns:
    """What a search's leaderboard ranks, shows and keeps: its objectives (the first ranks), then
    the trainable's display metrics; a row keeps every metric the trainable names."""

    objectives: tuple[MetricSpec, ...]
    shown: tuple[str, ...]  # ``Trainable.display_metrics`` not already an objective
    kept: frozenset[str]  # the trainable's epoch and final metrics
    robust: tuple[str, ...] = ()  # ``Trainable.display_robust``
    headline: tuple[str, ...] = ()  # beside the objective where room is short: the first
    # display metric known only at the end of a trial, then the first two robustness figures
    constraints: tuple[
        Condition, ...
    ] = ()  # ``objective.constraints``: feasible trials rank first

    @classmethod
    def of(cls, spec: SearchSpec) -> Columns:
        plugin = get_trainable(spec.trainable)
        objectives = tuple(spec.metrics)
        names = {m.metric for m in objectives}
        final = [m for m in plugin.display_metrics if m in plugin.final_metrics][:1]
        return cls(
            objectives=objectives,
            shown=tuple(m for m in plugin.display_metrics if m not in names),
            kept=frozenset((*plugin.epoch_metrics, *plugin.final_metrics)),
            robust=tuple(plugin.display_robust),
            headline=tuple(m for m in (*final, *plugin.display_robust[:2]) if m not in names),
            constraints=tuple(spec.objective.conditions()),
        )

    @property
    def first(self) -> MetricSpec:
        return self.objectives[0]

    def feasible(self, row: dict[str, Any]) -> bool | None:
        """Whether a trial meets every constraint; None while a figure is missing (a trial
        stopped early, before its end-of-trial report is in)."""
        values = [row.get(c.metric) for c in self.constraints]
        if any(
            c.holds(v) is False and v is not None
            for c, v in zip(self.constraints, values, strict=True)
        ):
            return False
        return None if any(v is None for v in values) else True

    def failing(self, row: dict[str, Any]) -> list[str]:
        """The constraints a trial fails, each with its figure."""
        return [
            f"{c.metric} {row[c.metric]:.3f}"
            for c in self.constraints
            if isinstance(row.get(c.metric), (int, float)) and not c.holds(row[c.metric])
        ]

    @property
    def table(self) -> list[str]:
        """The metric columns of a leaderboard, in order."""
        return [m.metric for m in self.objectives] + list(self.shown)

    def summary(self, have: Any) -> list[str]:
        """The objective and the headline figures among ``have`` (a confirmation's stats)."""
        return [self.first.metric] + [m for m in self.headline if m in have]


@dataclass
class SearchResult:
    name: str
    path: str
    rows: list[dict[str, Any]]  # one per trial, best first
    columns: Columns
    errors: int
    parent_run_id: str | None = None
    confirm: list[dict[str, Any]] = field(default_factory=list)  # per configuration, mean ± sd
    stats: dict[str, float] = field(default_factory=dict)  # what the driver spent (bench scale)
    stopped_by: str | None = None  # the stop rule that ended the search early (search.stop)
    reference: dict[str, Any] | None = None  # the reference baseline on the same split

    @property
    def metrics(self) -> list[MetricSpec]:
        """The objectives, first one first."""
        return list(self.columns.objectives)

    @property
    def completed(self) -> int:
        """How many trials have a result (ran to the end, or stopped early by the scheduler)."""
        return sum(r["state"] in ("finished", "stopped") for r in self.rows)


def trial_epochs(result: dict[str, Any]) -> int:
    """Epochs a trial has trained, whatever Tune's own iteration counter says after a resume."""
    if EPOCHS_DONE in result:
        return int(result[EPOCHS_DONE])
    return int(result.get("training_iteration", 0))


def trial_row(
    trial_id: str,
    metrics: dict[str, Any],
    config: dict[str, Any],
    max_epochs: int,
    columns: Columns,
    error: str | None = None,
    tune_status: str | None = None,
) -> dict[str, Any]:
    from .tuner import flat_config

    config = flat_config(config)
    epochs = trial_epochs(metrics)
    # a fixed point may train its own number of epochs (a refit: the search's best epoch)
    max_epochs = int(config.get(EPOCHS_PARAM, max_epochs) or max_epochs)
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
        "checkpoint": metrics.get(CHECKPOINT_PATH),
        "error": error,
        # when it started: creation order for the optimisation history
        "started": float(metrics.get("timestamp", 0) or 0)
        - float(metrics.get("time_total_s", 0) or 0),
        "ended": float(metrics.get("timestamp", 0) or 0),
        LOOP_STARTED_AT: metrics.get(LOOP_STARTED_AT),  # when its training began (benches)
        BEST_EPOCH: metrics.get(BEST_EPOCH),  # 0-based: its model's epoch
        KEPT_EPOCH: metrics.get(KEPT_EPOCH),  # 0-based: its smoothed curve's best (objective)
    }
    for k, v in metrics.items():
        if (
            k in columns.kept
            or k in (BEST_EPOCH, CV_FOLD)
            or k.startswith(("robust/", "val_robust/", "test_"))
            or (k.endswith("_se") and k.removesuffix("_se") in columns.kept)
            or _job_figure(k, columns)  # each job's objective: a resumed stop rule's noise
        ):
            row[k] = v
    for m in columns.objectives:  # the smoothed figure at the kept epoch; raw ones beside it
        row[m.metric] = objective_value(metrics, m.metric)
        if metrics.get(f"{KEPT_PREFIX}{m.metric}") is not None:
            row[f"{m.metric}{RAW_LAST}"] = metrics.get(m.metric)
            row[f"{m.metric}{RAW_BEST}"] = metrics.get(f"{RAW_BEST_PREFIX}{m.metric}")
    return row


RAW_LAST, RAW_BEST = "_raw_last", "_raw_best"  # a row's raw figures beside its kept objective


def kept_note(row: dict[str, Any], metric: str) -> str:
    """`` (epoch 15; raw best 0.910, last 0.860)``: where a trial's objective was read on its
    smoothed curve, and the raw figures it replaces; "" for a figure read raw."""
    epoch, last = row.get(KEPT_EPOCH), row.get(f"{metric}{RAW_LAST}")
    if not isinstance(epoch, (int, float)) or not isinstance(last, (int, float)):
        return ""
    best = row.get(f"{metric}{RAW_BEST}")
    raw = f"raw best {best:.3f}, " if isinstance(best, (int, float)) else "raw "
    return f" (epoch {int(epoch) + 1}; {raw}last {last:.3f})"


_JOB = re.compile(r"^(fold\d+(\.rep\d+)?|rep\d+)/(.+)$")


def _job_figure(key: str, columns: Columns) -> bool:
    """``fold<k>.rep<r>/<objective>``: one job's figure of a replicated trial's objective."""
    m = _JOB.match(key)
    return bool(m) and any(o.metric == m.group(3) for o in columns.objectives)


def rank(rows: list[dict[str, Any]], columns: Columns) -> list[dict[str, Any]]:
    """Best first: trials with a result, feasible before infeasible (``objective.constraints``),
    then by the first objective."""
    objective = columns.first
    key, sign = objective.metric, (-1 if objective.mode == "max" else 1)

    def order(row: dict) -> tuple:
        v = row.get(key)
        good = row["state"] in ("finished", "stopped") and isinstance(v, (int, float))
        return (not good, columns.feasible(row) is False, sign * v if good else 0.0)

    return sorted(rows, key=order)


def summarise(name: str, spec: SearchSpec, grid: Any) -> SearchResult:
    """A Tune ``ResultGrid`` as a leaderboard."""
    columns = Columns.of(spec)
    rows = []
    for r in grid:
        m = r.metrics or {}
        err = None
        if r.error:
            err = error_reason(str(r.error)) if str(r.error).strip() else type(r.error).__name__
        tid = m.get("trial_id") or _trial_id_from_path(r.path)
        rows.append(trial_row(tid, m, r.config, spec.budget.max_epochs, columns, err))
    rows = rank(rows, columns)
    return SearchResult(
        name=name,
        path=experiment_path(name),
        rows=rows,
        columns=columns,
        errors=sum(r["state"] == "failed" for r in rows),
    )


def from_saved_state(name: str, spec: SearchSpec, path: str | None = None) -> SearchResult:
    """A search's leaderboard from its saved Tune state (``path``: its experiment folder, by
    default the search's): every trial's last result, Tune's own status, a failure's reason.
    Raises what Tune raises when nothing was saved yet."""
    from ray.tune import ExperimentAnalysis

    from .failures import trial_error_reason
    from .storage import fs_and_path

    path = path or experiment_path(name)
    fs, local = fs_and_path(path)
    columns = Columns.of(spec)
    rows = [
        trial_row(
            t.trial_id,
            t.last_result or {},
            t.config,
            spec.budget.max_epochs,
            columns,
            error=trial_error_reason(t) if t.status == "ERROR" else None,
            tune_status=t.status,
        )
        for t in ExperimentAnalysis(local, storage_filesystem=fs).trials
    ]
    rows = rank(rows, columns)
    return SearchResult(name, path, rows, columns, sum(r["state"] == "failed" for r in rows))


def _trial_id_from_path(path: str | None) -> str:
    m = re.search(r"_([0-9a-f]{5,})(?:_|$)", path or "")
    return m.group(1) if m else "?"


def format_table(result: SearchResult, top: int = 10) -> str:
    columns = result.columns
    cols = columns.table
    checks = ["constraints"] if columns.constraints else []
    header = ["#", "trial", "status", "epochs", *cols, *checks, "config"]
    lines = []
    for i, row in enumerate(result.rows[:top], start=1):
        cfg = ", ".join(f"{k}={_short(v)}" for k, v in sorted((row["config"] or {}).items()))
        vals = [_figure(row, c) for c in cols]
        vals[0] += kept_note(row, cols[0])
        status = "failed (below)" if row["state"] == "failed" else row["status"][:48]
        if checks:
            ok = columns.feasible(row)
            vals.append(
                "met"
                if ok
                else "unknown"
                if ok is None
                else "fails " + ", ".join(columns.failing(row))
            )
        lines.append([str(i), row["trial"], status, str(row["epochs"]), *vals, cfg])
    ref = result.reference
    if ref and isinstance(ref.get("metrics"), dict):
        vals = [_figure(ref["metrics"], c) for c in cols]
        C = ref.get("C")
        what = ref.get("name") or "reference"
        cfg = f"{what}" + (f", C={_short(float(C))}" if isinstance(C, (int, float)) else "")
        lines.append(
            ["-", "reference", "eGeMAPS + linear", "-", *vals, *(["-"] if checks else []), cfg]
        )
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


def _figure(row: dict[str, Any], metric: str) -> str:
    """``0.612`` or, for a cross-validated trial, ``0.612 ± 0.031`` (mean ± se over its folds)."""
    v = row.get(metric)
    if not isinstance(v, (int, float)):
        return "-"
    se = row.get(f"{metric}_se")
    return f"{v:.3f} ± {se:.3f}" if isinstance(se, (int, float)) else f"{v:.3f}"


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
        *([f"the search ended early, {result.stopped_by}"] if result.stopped_by else []),
    ]
    if result.confirm:
        lines += [
            "",
            "confirmed with fresh seeds (mean ± sd):",
            format_confirmation(
                result.confirm, result.columns.summary(result.confirm[0]["stats"])
            ),
        ]
    lines += [
        "",
        f"trial results and checkpoints: {result.path}",
        f"MLflow: {tracking_uri}  (parent run {result.parent_run_id}; `sertune ui` to browse)",
        f"next: sertune promote {result.name}",
    ]
    return "\n".join(lines)
