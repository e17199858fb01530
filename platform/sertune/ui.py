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
    from .records import SearchRecord

VIEW_KEY = "sertune-trials"
KIND_TAG = "mlflow.experimentKind"
SHARED_VIEW = f"mlflow.sharedViewState.{VIEW_KEY}"
PRIMARY_METRIC = "mlflow.experiment.primaryMetric.name"
NOTE = "mlflow.note.content"
ROBUST_COLUMNS = (
    "robust/uar_snr10_white",
    "robust/uar_snr10_babble",
    "robust/uar_snr0_white",
    "robust/uar_pgd0.005",
)


def _col(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"


def view_state(objective: str, params: list[str], robust: list[str]) -> dict[str, Any]:
    """The runs-table view: trials only, best objective first, the figures that matter."""
    metrics = list(dict.fromkeys([objective, "val_uar", "test_uar", "val_uar_noisy", *robust]))
    return {
        "searchFilter": f"tags.`{tracking.TAG_KIND}` = 'trial'",
        "orderByKey": _col("metrics", objective),
        "orderByAsc": False,
        "selectedColumns": [_col("metrics", m) for m in metrics]
        + [_col("tags", tracking.TAG_SEARCH), _col("tags", tracking.TAG_STATUS)]
        + [_col("params", p) for p in params],
        "runListHidden": False,
        "viewMaximized": False,
        "hideEmptyCharts": True,
    }


def experiment_tags(
    objective: str, params: list[str], robust: list[str], searches: str = ""
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
    return {
        KIND_TAG: "custom_model_development",
        SHARED_VIEW: json.dumps(view_state(objective, params, robust)),
        PRIMARY_METRIC: objective,
        NOTE: note,
    }


def runs_url(base: str, experiment_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"


def prepare_experiment(tracking_uri: str | None = None) -> str:
    """Create the experiment if needed and set its view from the latest search; return its id."""
    from .records import list_records, objectives

    records = [r for r in list_records() if r.spec]
    latest = max(records, key=lambda r: r.created, default=None)
    objective = objectives(latest.spec)[0]["metric"] if latest else "val_uar"
    params = sorted(latest.spec["space"]) if latest else []
    robust = _robust_columns(latest)
    names = ", ".join(sorted(r.name for r in records))
    return tracking.Store(tracking_uri).set_experiment_tags(
        experiment_tags(objective, params, robust, names)
    )


def _robust_columns(record: SearchRecord | None) -> list[str]:
    if not record or not record.spec.get("robustness"):
        return []
    r = record.spec["robustness"]
    have = {f"robust/uar_snr{int(s)}_{n}" for s in r["snrs_db"] for n in r["noises"]}
    have |= {f"robust/uar_pgd{e:g}" for e in r["pgd_eps"]} | {
        f"robust/uar_fgsm{e:g}" for e in r["fgsm_eps"]
    }
    picked = [m for m in ROBUST_COLUMNS if m in have]
    return picked or sorted(have)[:4]


def serve_ui(host: str, port: int, tracking_uri: str | None = None, workers: int = 1) -> int:
    """Run the MLflow UI until Ctrl-C/SIGTERM; its server processes stop with it."""
    uri = tracking.ensure_store(tracking_uri)
    exp = prepare_experiment(uri)
    if tracking.is_server(uri):
        print(f"the tracking server serves its own UI: {runs_url(uri, exp)}")
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
