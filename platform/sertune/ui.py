"""The MLflow UI, opened where a person wants to look: the trials table of the ``sertune``
experiment, with the objective and the key robustness metrics as columns.

MLflow 3.x supports this through experiment tags, no UI patches:

* ``mlflow.experimentKind = custom_model_development`` - the experiment opens in *Model training*
  mode (runs), not GenAI mode (traces);
* ``mlflow.sharedViewState.<key>`` - a saved runs-table view (filter, sort, columns) that the URL
  ``#/experiments/<id>/runs?viewStateShareKey=<key>`` restores: sertune's shows the trials (child
  runs) best first, with the objective, test and robustness figures, the status and the searched
  parameters;
* ``mlflow.experiment.primaryMetric.name`` and the experiment description (``mlflow.note.content``)
  say what to look at.

Each trial's run page carries a note with its robustness summary and plots, one click from the
table. ``sertune ui`` runs one server process that starts in seconds and stops with its children.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import TYPE_CHECKING, Any

from . import settings, tracking

if TYPE_CHECKING:
    from .spec import SearchSpec
    from .trainable import Trainable

VIEW_KEY = "sertune-trials"
KIND_TAG = "mlflow.experimentKind"
SHARED_VIEW = f"mlflow.sharedViewState.{VIEW_KEY}"
PRIMARY_METRIC = "mlflow.experiment.primaryMetric.name"
NOTE = "mlflow.note.content"
ROBUST_COLUMNS = 2  # robustness columns: with the objective and the test figure they fit the
# table's width at 1600 px even beside MLflow's assistant panel
GATES_TAG = "sertune.gates"  # experiment tag: {search: [metrics its last promotion gated on]}


def column_width(name: str) -> int:
    """Pixels for a metric column whose header shows ``name`` whole (MLflow's header font is
    about 6.5 px a character; the sort arrow and padding take the rest)."""
    return max(90, round(6.5 * len(name) + 20))


def _col(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"


def view_state(
    objective: str, params: list[str], robust: list[str], shown: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The runs-table view: trials only, best objective first. The metric columns in this order
    (MLflow would sort them by name): the objective, ``shown`` (the trainable's headline test
    figure), ``robust`` (the gated metrics, then the trainable's robustness figures), each wide
    enough for its whole name, so no two read alike."""
    metrics = list(dict.fromkeys([objective, *shown, *robust]))
    return {
        "searchFilter": f"tags.`{tracking.TAG_KIND}` = 'trial'",
        "orderByKey": _col("metrics", objective),
        "orderByAsc": False,
        "selectedColumns": [_col("metrics", m) for m in metrics]
        + [_col("tags", tracking.TAG_SEARCH), _col("tags", tracking.TAG_STATUS)]
        + [_col("params", p) for p in params],
        "columnOrder": [_col("metrics", m) for m in metrics],
        "columnWidths": {_col("metrics", m): column_width(m) for m in metrics},
        "runListHidden": False,
        "viewMaximized": False,
        "hideEmptyCharts": True,
    }


def experiment_tags(
    objective: str,
    params: list[str],
    robust: list[str],
    searches: str = "",
    shown: tuple[str, ...] = (),
) -> dict[str, str]:
    note = (
        "**sertune** — every search is a parent run, every trial a child run.\n\n"
        f"The runs table opens on the trials, best `{objective}` first, with test and robustness "
        "figures as columns. Click a trial's name for its robustness plots and report "
        "(Artifacts → robustness), a search's parent run for the leaderboard, the optimisation "
        "history, slices and parameter importances (Artifacts → summary).\n"
    )
    if searches:
        note += f"\nSearches: {searches}\n"
    tags = {KIND_TAG: "custom_model_development", NOTE: note}
    if objective:  # no search yet: no view to restore
        tags[SHARED_VIEW] = json.dumps(view_state(objective, params, robust, shown))
        tags[PRIMARY_METRIC] = objective
    return tags


def runs_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def prepare_experiment(tracking_uri: str | None = None) -> str:
    """Create the experiment if needed and set its view from the latest search; return its id."""
    from .records import list_records

    store = tracking.Store(tracking_uri)
    records = list_records()
    latest = max(records, key=lambda r: r.created, default=None)
    names = ", ".join(sorted(r.name for r in records))
    if latest is None:
        tags = experiment_tags("", [], [], names)
    else:
        spec = latest.spec
        plugin = _plugin(spec.trainable)
        gated = json.loads(store.experiment_tags().get(GATES_TAG) or "{}").get(latest.name, [])
        final = [m for m in plugin.display_metrics if m in plugin.final_metrics] if plugin else []
        tags = experiment_tags(
            spec.metrics[0].metric,
            sorted(spec.space),
            list(
                dict.fromkeys(
                    [
                        *gated,
                        *(c.metric for c in spec.objective.conditions()),
                        *_robust_columns(spec, plugin),
                    ]
                )
            )[:ROBUST_COLUMNS],
            names,
            tuple(final[:1]),
        )
    return store.set_experiment_tags(tags)


def remember_gates(tracking_uri: str | None, search: str, metrics: list[str]) -> None:
    """A promotion's gated metrics become columns of the trials view (``sertune ui``)."""
    store = tracking.Store(tracking_uri)
    gates = json.loads(store.experiment_tags().get(GATES_TAG) or "{}")
    gates[search] = list(dict.fromkeys(metrics))
    store.set_experiment_tags({GATES_TAG: json.dumps(gates)})


def _plugin(name: str) -> Trainable | None:
    from .trainable import UnknownTrainable, get_trainable

    try:
        return get_trainable(name)
    except UnknownTrainable:  # a search of a trainable not installed here: no extra columns
        return None


def _robust_columns(spec: SearchSpec, plugin: Trainable | None) -> list[str]:
    """The trainable's robustness figures this search reports, first ones first; else the first
    few ``robust/*`` metrics it reports."""
    if plugin is None or spec.robustness is None:
        return []
    have = {
        m
        for m in plugin.metric_names(spec.robustness_options(), spec.cross_corpus_names())
        if m.startswith("robust/")
    }
    return [m for m in plugin.display_robust if m in have] or sorted(have)


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's own page (a study's: its table as the description, the fold searches below)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def serve_ui(
    host: str,
    port: int,
    tracking_uri: str | None = None,
    workers: int = 1,
    run_id: str | None = None,
) -> int:
    """Run the MLflow UI until Ctrl-C/SIGTERM; its server processes stop with it. ``run_id``:
    also print that run's page (``sertune ui --study NAME``)."""
    uri = tracking.ensure_store(tracking_uri)
    exp = prepare_experiment(uri)
    if tracking.is_server(uri):
        print(f"the tracking server serves its own UI: {runs_url(uri, exp)}")
        if run_id:
            print(f"the study: {run_url(uri, exp, run_id)}")
        return 0
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
           "--default-artifact-root", settings.artifact_root(), "--host", host,
           "--port", str(port), "--workers", str(workers)]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own group: stopped as one

    def stop(*_: Any) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {
        s: signal.signal(s, lambda *a: (stop(), sys.exit(0)))
        for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        while proc.poll() is None:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.3)
        if proc.poll() is not None:
            print(
                f"sertune: error: the MLflow server exited ({proc.returncode}); is port {port} free?",
                file=sys.stderr,
            )
            return 2
        print(
            f"MLflow UI ready in {time.monotonic() - t0:.1f}s: {runs_url(base, exp)}", flush=True
        )
        if run_id:
            print(f"the study: {run_url(base, exp, run_id)}", flush=True)
        print("(the trials table; Ctrl-C stops the UI)", flush=True)
        return proc.wait()
    finally:
        stop()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for s, h in old.items():
            signal.signal(s, h)
