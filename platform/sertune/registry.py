"""Promotion to the MLflow model registry, gated on robustness.

``promote`` picks a search's best configuration that passes every choosing gate and registers one
model of it under alias ``champion`` (the previous champion becomes ``previous``); better
candidates a gate turned down are named. Only selection figures choose: gates on ``val_*`` and
``val_robust/*`` (the validation speakers; the search's own ``objective.constraints`` are such
gates). A gate on a ``robust/*`` or ``test_*`` figure (the test speakers, a cross corpus) is
report-only: it is judged on the champion already chosen, printed as such, and when it fails the
promotion is refused - it never passes over to another candidate, which would select on the test
speakers. When the search was confirmed
(``confirm:`` in the spec, or ``sertune promote --confirm-top K --seeds N``), the configuration
with the best *mean* over its fresh seeds wins, the gates apply to the means, and the registered
model is the seed run closest to that mean (its median), not the luckiest one. Otherwise the best
single trial wins. Every version is tagged with where it came from.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import __version__
from .errors import GateFailed, NotFound, UsageError
from .records import load_record
from .spec import Condition, reported_only
from .tracking import Run, Store
from .trainable import objective_value

# a report-only gate's verdict: it is printed, and refuses registration when it fails, but it
# never chose the champion (no other candidate is tried for it)
REPORTED_NOTE = "reported on the test speakers; it did not choose the champion"


def parse_gate(expr: str) -> tuple[str, str, float]:
    try:
        c = Condition.parse(expr)
    except ValueError as e:
        raise UsageError(f"--gate {e}") from None
    return c.metric, c.op, c.bound


def choosing(gate: tuple[str, str, float]) -> bool:
    """Whether a gate chooses among candidates: a selection figure (``val_*``, ``val_robust/*``).
    A gate on a ``robust/*`` or ``test_*`` figure (the test speakers, a cross corpus) only
    reports pass/fail on the champion the choosing gates and the objective picked."""
    return reported_only(gate[0]) is None


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def _candidates(runs: list[Run], metric: str, mode: str) -> tuple[list[dict[str, Any]], bool]:
    """Candidates best first: confirmed configurations (mean over seeds) if any, else trials."""
    from .stats import summary

    sign = 1 if mode == "max" else -1
    # each trial's objective as its kept epoch has it (the smoothed curve's best), not the raw
    # figure of its last epoch
    runs = [
        replace(r, metrics={k: objective_value(r.metrics, k) for k in r.metrics}) for r in runs
    ]
    usable = [
        r
        for r in runs
        if r.done
        and metric in r.metrics
        and r.tags.get("sertune.model_uri")
        and r.tags.get("sertune.phase") != "refit"  # its val speakers trained it: not ranked
    ]
    confirmed: dict[str, list[Run]] = {}
    for r in usable:
        if r.tags.get("sertune.phase") == "confirm":
            confirmed.setdefault(r.tags.get("sertune.confirm_of", "?"), []).append(r)
    if confirmed:
        out = []
        for origin, group in confirmed.items():
            keys = set.intersection(*(set(g.metrics) for g in group))
            means = {k: sum(g.metrics[k] for g in group) / len(group) for k in keys}
            sds = {k: summary([g.metrics[k] for g in group]).sd for k in keys}
            median = sorted(group, key=lambda g: g.metrics[metric])[len(group) // 2]
            out.append(
                {
                    "metrics": means,
                    "sd": sds,
                    "values": {k: [g.metrics[k] for g in group] for k in keys},
                    "run": median,
                    "n": len(group),
                    "label": f"configuration of trial {origin}",
                    "origin": origin,
                }
            )
        out.sort(key=lambda c: -sign * c["metrics"][metric])
        return out, True
    out = [_trial_candidate(r) for r in usable]
    out.sort(key=lambda c: -sign * c["metrics"][metric])
    return out, False


def _trial_candidate(r: Run) -> dict[str, Any]:
    """One trial as a candidate; a replicated trial (objective.cv/repeats) carries its jobs'
    figures, so gates show mean ± sd over them and ``--gate-on lower`` can bound the mean."""
    from .comparison import replica_figures
    from .stats import summary, units

    # K folds x R repeats: each fold's repeats averaged first (they share its speakers), so the
    # spread and the gates' intervals are over the K independent fold means
    jobs = {k: units(v) for k, v in replica_figures(r).items()}
    values = {k: list(v.values()) for k, v in jobs.items() if len(v) > 1}
    sds = {k: summary(vs).sd for k, vs in values.items()}
    n = max((len(v) for v in values.values()), default=1)
    return {
        "metrics": dict(r.metrics),
        "sd": sds,
        "values": values,
        "run": r,
        "n": n,
        "label": f"trial {r.trial}" + (f" (mean of {n} fold/repeat runs)" if n > 1 else ""),
        "origin": None,
    }


def _refit_of(runs: list[Run], trial: str) -> Run | None:
    """The refit (``confirm.refit``) of a trial's configuration, when the search made one."""
    for r in runs:
        if (
            r.tags.get("sertune.phase") == "refit"
            and r.tags.get("sertune.refit_of") == trial
            and r.done
            and r.tags.get("sertune.model_uri")
        ):
            return r
    return None


def _servable(store: Store, run: Run, trainable: str) -> str:
    """The model to register: the run's logged model, or - when its trainable keeps part of it
    outside (an ssl model's frozen encoder, named by path and hash: each trial's model stays
    small) - a self-contained copy, logged on the same run once (tag
    ``sertune.packaged_model_uri``) and reused by every later promotion."""
    import tempfile

    from .inference import data_dir, model_dir
    from .tracking import log_pyfunc_model
    from .trainable import UnknownTrainable, get_trainable

    uri = run.tags["sertune.model_uri"]
    if run.tags.get("sertune.packaged_model_uri"):
        return run.tags["sertune.packaged_model_uri"]
    try:
        plugin = get_trainable(trainable)
    except UnknownTrainable:
        return uri
    with tempfile.TemporaryDirectory(prefix="sertune-package-") as tmp:
        out = Path(tmp) / "model"
        if not plugin.package_model(data_dir(model_dir(uri, store.uri)), out):
            return uri
        status = store.run_state(run.run_id)
        packaged = log_pyfunc_model(run.run_id, out, trainable, store.uri)
        store.end_run(run.run_id, status)  # logging reopened the run
    store.set_run_tags(run.run_id, {"sertune.packaged_model_uri": packaged})
    return packaged


def _gate_table(
    best: dict[str, Any], parsed: list[tuple[str, str, float]], gate_on: str = "mean"
) -> tuple[list, bool]:
    """Each gate against the candidate's figure: its mean (a single trial's value), or with
    ``gate_on="lower"`` the cautious end of the mean's 95 % confidence interval over the seeds
    (the lower bound for ``>=``/``>``, the upper for ``<=``/``<``)."""
    from .stats import mean_interval

    if gate_on == "lower" and best["n"] < 2:
        raise UsageError(
            f"--gate-on lower needs seeds to bound the mean; {best['label']} is one run. "
            "Confirm first: sertune promote SEARCH --confirm-top K --seeds 3"
        )
    rows, failed = [], False
    for name, op, value in parsed:
        actual = best["metrics"].get(name)
        shown = "missing" if actual is None else f"{actual:.4f}"
        if actual is not None and name in best["sd"]:
            shown += f" ± {best['sd'][name]:.3f}"
        if gate_on == "lower" and actual is not None and name in best.get("values", {}):
            lo, hi = mean_interval(best["values"][name])
            actual = lo if op in (">=", ">") else hi
            shown += f" (95 % CI {lo:.4f} to {hi:.4f})"
        ok = Condition(name, op, value).holds(actual)
        failed |= not ok
        rows.append((name, f"{op} {value:g}", shown, "pass" if ok else "FAIL"))
    return rows, failed


def version_description(
    search: str,
    best: dict[str, Any],
    metric: str,
    figures: list[str],
    gate_rows: list[tuple[str, str, str, str]],
    model_source: str = "",
) -> str:
    """A registered version's Description: why it won. The objective, the trainable's headline
    figures (test, robustness) - means ± sd over the confirmation seeds when confirmed - the
    gates it passed, and the search it came from."""
    run, n = best["run"], best["n"]

    def value(name: str) -> str:
        v = best["metrics"].get(name)
        if v is None:
            return "-"
        sd = best["sd"].get(name)
        runs = "seeds" if best.get("origin") else "fold/repeat runs"
        return (
            f"{v:.3f} ± {sd:.3f} (mean ± sd, {n} {runs})"
            if n > 1 and sd is not None
            else f"{v:.3f}"
        )

    origin = (
        f"the median seed of {best['label']}, confirmed with {n} fresh seeds"
        if best.get("origin")
        else f"trial {run.trial}, its kept epoch (its smoothed validation curve's best)"
    )
    lines = [
        f"**Promoted by sertune from search `{search}`**: {origin} (MLflow run `{run.run_id}`).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| {metric} (objective) | {value(metric)} |",
    ]
    lines += [f"| {f} | {value(f)} |" for f in dict.fromkeys(figures) if f != metric]
    lines.append("")
    if model_source:
        lines += [f"The model: {model_source}.", ""]
    if gate_rows:
        passed = "; ".join(
            f"`{name} {req}` ({got}"
            + ("" if reported_only(name) is None else f", {REPORTED_NOTE}")
            + ")"
            for name, req, got, _ in gate_rows
        )
        lines.append(f"Gates passed: {passed}.")
    else:
        lines.append("No gates were asked for.")
    return "\n".join(lines)


def _figures(
    record: Any, metric: str, gates: list[tuple[str, str, float]], have: Any
) -> list[str]:
    """What a version's description shows after the objective: the trainable's headline test
    figure, the gated metrics, then its first robustness figures - those the run has."""
    from .trainable import UnknownTrainable, get_trainable

    try:
        plugin = get_trainable(record.spec.trainable)
        final = [m for m in plugin.display_metrics if m in plugin.final_metrics][:1]
        robust = list(plugin.display_robust[:3])
    except UnknownTrainable:
        final, robust = [], []
    wanted = [*final, *(g[0] for g in gates), *robust]
    return [m for m in dict.fromkeys(wanted) if m != metric and m in have]


def promote(
    search: str,
    objective: str | None = None,
    gates: list[str] | None = None,
    model_name: str = "ser-mtl-aug",
    tracking_uri: str | None = None,
    gate_on: str = "mean",
) -> dict[str, Any]:
    """Register the best configuration of ``search`` and point ``champion`` at it. ``gate_on``:
    gates compare the mean (``mean``) or the cautious end of its 95 % interval (``lower``)."""
    record = load_record(search)
    store = Store(tracking_uri or record.tracking_uri)
    first = record.spec.metrics[0]
    metric = objective or first.metric
    mode = first.mode if metric == first.metric else "max"
    if reported_only(metric):
        raise UsageError(f"--objective {reported_only(metric)}")
    # the search's own constraints (objective.constraints, val_* / val_robust/* figures) are
    # floors of its champion too
    constraints = [(c.metric, c.op, c.bound) for c in record.spec.objective.conditions()]
    parsed = list(dict.fromkeys([*(parse_gate(g) for g in gates or []), *constraints]))
    # selection figures choose among the candidates; test-speaker figures only report
    select = [g for g in parsed if choosing(g)]
    report = [g for g in parsed if not choosing(g)]

    trial_runs = store.runs_of(search, kind="trial")
    candidates, confirmed = _candidates(trial_runs, metric, mode)
    if not candidates:
        raise NotFound(
            f"search {search!r}: no finished trial with metric {metric!r} and a logged model"
        )
    unmeasured = [
        name
        for name, _, _ in select
        if name.startswith("val_robust/")
        and all(c["metrics"].get(name) is None for c in candidates)
    ]
    if unmeasured:
        raise UsageError(
            f"search {search!r}: no trial measured {', '.join(unmeasured)} (with "
            "robustness.validation: selection, the default, a trial measures the val_robust/* "
            "twins its objective and constraints read). Gate on a figure the search measured, or "
            "rerun it with robustness.validation: all (--set robustness.validation=all)"
        )
    # The best candidate that passes every choosing gate: such a gate is a floor for the
    # champion, so a better but fragile configuration is passed over (and named), never promoted.
    what = "mean over seeds" if confirmed else "actual"
    passed_over = []
    for best in candidates:
        rows, failed = _gate_table(best, select, gate_on)
        if not failed:
            break
        passed_over.append((best, rows))
    else:
        best, rows = passed_over[0]
        raise GateFailed(
            "\n".join(
                [
                    f"refusing to promote: no {'configuration' if confirmed else 'trial'} of "
                    f"{search!r} passes every gate; the best, {best['label']}:",
                    *_gate_lines(rows, what),
                ]
            )
        )
    # Report-only gates (test speakers): judged on the chosen champion alone. One that fails
    # refuses registration - never a pass to another candidate, which would select on them.
    reported, failed = _gate_table(best, report, gate_on)
    rows = rows + reported
    if failed:
        raise GateFailed(
            "\n".join(
                [
                    f"refusing to promote {best['label']} of {search!r}: it fails a gate on a "
                    "reported figure (measured on the test speakers: it did not choose the "
                    "champion, so no other candidate is tried for it):",
                    *_gate_lines(rows, what),
                ]
            )
        )

    run = best["run"]
    value = best["metrics"][metric]
    refit = _refit_of(trial_runs, best["origin"] or run.trial)
    model_run = refit or run
    tags = {
        "sertune.search": search,
        "sertune.trial_id": run.trial,
        "sertune.data_fingerprint": record.data.get("fingerprint")
        or _parent_tag(store, run, "sertune.data_fingerprint"),
        "sertune.code_version": code_version(),
        "sertune.objective": f"{metric}={value:.6f}",
        "sertune.gates": json.dumps(gates or []),
    }
    if confirmed:
        tags["sertune.confirmed"] = (
            f"{metric} mean {value:.4f} ± {best['sd'].get(metric, 0.0):.4f} over {best['n']} seeds "
            f"(configuration of trial {best['origin']}; this version is its median seed)"
        )
    tags["sertune.model_source"] = (
        f"re-trained on all training speakers (confirm.refit), run {refit.run_id}; the "
        f"figures are {best['label']}'s"
        if refit
        else run.tags.get("sertune.model_fold", "")
        and f"{best['label']}: {run.tags['sertune.model_fold']}"
        or f"{best['label']}"
    )
    previous = store.version_of(model_name, "champion")
    model_uri = _servable(store, model_run, record.spec.trainable)
    tags["sertune.model_uri"] = model_uri
    # promotion is idempotent per model: a model registered before keeps its version
    version = store.version_tagged(model_name, "sertune.model_uri", model_uri)
    reused = version is not None
    if version is None:
        version = store.register(
            model_uri, model_name, tags, description="Speech emotion models promoted by sertune"
        )
    figures = _figures(record, metric, parsed, best["metrics"])
    store.describe_version(
        model_name,
        version,
        version_description(search, best, metric, figures, rows, tags["sertune.model_source"]),
    )
    if previous and previous != version:
        store.set_alias(model_name, "previous", previous)
    store.set_alias(model_name, "champion", version)
    if parsed:  # what the champion had to pass becomes a column of the trials view
        from .ui import remember_gates

        remember_gates(store.uri, search, [g[0] for g in parsed])
    return {
        "name": model_name,
        "version": version,
        "previous": str(previous) if previous and previous != version else None,
        "reused": reused,
        "trial": tags["sertune.trial_id"],
        "objective": metric,
        "value": value,
        "sd": best["sd"].get(metric) if confirmed else None,
        "n": best["n"],
        "confirmed": confirmed,
        "run_id": run.run_id,
        "model_run_id": model_run.run_id,
        "model_source": tags["sertune.model_source"],
        "gates": rows,
        "reported": [
            f"{name} {req}: {got} {verdict.lower()} ({REPORTED_NOTE})"
            for name, req, got, verdict in reported
        ],
        "passed_over": [
            {
                "label": b["label"],
                "value": b["metrics"][metric],
                "failed": [r[0] for r in rs if r[3] == "FAIL"],
            }
            for b, rs in passed_over
        ],
    }


def _gate_lines(rows: list, what: str) -> list[str]:
    """A gate table's lines; a report-only gate (test speakers) says it did not choose."""
    width = max(len(r[0]) for r in rows)
    lines = [f"  {'metric'.ljust(width)}  required   {what:14}  result"]
    for a, b, c_, d in rows:
        note = "" if reported_only(a) is None else f"  ({REPORTED_NOTE})"
        lines.append(f"  {a.ljust(width)}  {b:9}  {c_:14}  {d}{note}")
    return lines


def _parent_tag(store: Store, run: Run, tag: str) -> str:
    parent = run.tags.get("mlflow.parentRunId")
    return store.run(parent).tags.get(tag, "") if parent else ""
