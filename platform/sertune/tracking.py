"""The one place that talks to MLflow.

Run hierarchy: one parent run per search (spec artifact, search settings as tags, the data report,
and at the end the leaderboard, optimisation history, parameter importances and, for several
objectives, the Pareto front); one nested child run per trial (params, per-epoch metrics incl. each
loss term, the model as a pyfunc, the robustness report and plots; status tag ``finished``,
``stopped_early`` or ``failed`` with the reason).

Only the driver logs (from a Tune callback), so a SQLite store has a single writer and a remote
cluster's workers need no MLflow credentials. Credentials for a server that asks for them come
from the environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``) and are never logged.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback

from . import settings

EXPERIMENT_ENV = "SERTUNE_EXPERIMENT"
DEFAULT_EXPERIMENT = "sertune"
TAG_SEARCH, TAG_TRIAL, TAG_STATUS, TAG_KIND = (
    "sertune.search",
    "sertune.trial_id",
    "sertune.status",
    "sertune.kind",
)


def error_reason(text: str) -> str:
    """The one line of a traceback that says why a trial failed (e.g. the NaN loss message)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for marker in ("TrainingDiverged:", "Error:", "Exception:"):
        hits = [ln for ln in lines if marker in ln]
        if hits:
            return hits[-1][:500]
    return (lines[-1] if lines else "unknown error")[:500]


def trial_error_reason(trial: Any) -> str:
    text = ""
    try:
        err = trial.get_error()
        text = str(err) if err else ""
    except Exception:
        pass
    if not text and getattr(trial, "error_file", None) and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text()
    return error_reason(text)


def configure(tracking_uri: str | None = None) -> str:
    import mlflow

    uri = settings.tracking_uri(tracking_uri)
    from .storage import endpoint

    if endpoint():  # MLflow's S3 artifact store reads its own variable
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint())
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def get_experiment_id(client: Any) -> str:
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = settings.artifact_root()
    if root.startswith("file://"):
        Path(root[len("file://") :]).mkdir(parents=True, exist_ok=True)
    uri = settings.tracking_uri()
    # A server decides its own artifact root; a local store gets ours.
    loc = None if uri.startswith(("http://", "https://")) else f"{root.rstrip('/')}/{name}"
    return client.create_experiment(name, artifact_location=loc)


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out[k] = float(v)
    return out


REPORTED_SKIP = {
    "timestamp",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "time_since_restore",
    "iterations_since_restore",
    "training_iteration",
    "epoch",
}


class MLflowSearchLogger(Callback):
    """Tune callback: parent + child runs; everything picklable (Tune saves callbacks)."""

    def __init__(self, record: dict[str, Any], spec: Any, log=print):
        self.uri = record["tracking_uri"]
        self.name = record["name"]
        self.record = record
        self.max_epochs = spec.budget.max_epochs
        self.trainable = spec.trainable
        self.parent_run_id: str | None = record.get("parent_run_id")
        self.trial_runs: dict[str, str] = {}
        self.log = log
        self._client = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    # -- plumbing --------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            configure(self.uri)
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            self._ensure_parent()
        return self._client

    def _ensure_parent(self) -> None:
        c = self._client
        if self.parent_run_id:
            try:
                c.get_run(self.parent_run_id)
                c.update_run(self.parent_run_id, status="RUNNING")
                return
            except Exception:
                self.parent_run_id = None
        exp = get_experiment_id(c)
        spec = self.record["spec"]
        tags = {
            TAG_SEARCH: self.name,
            TAG_KIND: "search",
            "sertune.trainable": spec["trainable"],
            "sertune.corpus": spec["data"]["corpus"],
            "sertune.data_fingerprint": self.record["data"].get("fingerprint", ""),
            "sertune.objective": json.dumps([m for m in _objectives(spec)]),
            "sertune.storage": self.record["path"],
            "mlflow.runName": self.name,
        }
        run = c.create_run(exp, tags=tags, run_name=self.name)
        self.parent_run_id = run.info.run_id
        self.record["parent_run_id"] = self.parent_run_id
        from .search import save_record

        save_record(self.name, self.record)
        b, r = spec["budget"], spec["resources"]
        params = {f"budget.{k}": v for k, v in b.items()} | {
            f"resources.{k}": v for k, v in r.items()
        }
        params |= {"seed": spec["seed"], "space": ",".join(sorted(spec["space"]))}
        params |= {f"fixed.{k}": v for k, v in spec["params"].items()}
        c.log_batch(self.parent_run_id, params=_params(params))
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(self.record.get("source", ""))
            if src.is_file():
                shutil.copy(src, Path(tmp) / "spec.yaml")
            (Path(tmp) / "spec.resolved.json").write_text(json.dumps(spec, indent=2))
            (Path(tmp) / "data_report.json").write_text(
                json.dumps(self.record["data"].get("report", {}), indent=2)
            )
            c.log_artifacts(self.parent_run_id, tmp, "search")

    def _child(self, trial: Any) -> str:
        tid = trial.trial_id
        if tid in self.trial_runs:
            return self.trial_runs[tid]
        c = self.client
        found = c.search_runs(
            [c.get_run(self.parent_run_id).info.experiment_id],
            filter_string=f"tags.`{TAG_TRIAL}` = '{tid}' and tags.`{TAG_SEARCH}` = '{self.name}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            c.update_run(run_id, status="RUNNING")
        else:
            run = c.create_run(
                c.get_run(self.parent_run_id).info.experiment_id,
                run_name=f"{self.name}-{tid}",
                tags={
                    "mlflow.parentRunId": self.parent_run_id,
                    TAG_SEARCH: self.name,
                    TAG_TRIAL: tid,
                    TAG_KIND: "trial",
                    TAG_STATUS: "running",
                },
            )
            run_id = run.info.run_id
            c.log_batch(run_id, params=_params(trial.config))
        self.trial_runs[tid] = run_id
        return run_id

    # -- Tune callback hooks -----------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._child(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        from mlflow.entities import Metric

        run_id = self._child(trial)
        step = int(result.get("training_iteration", 0))
        ts = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(k, v, ts, step)
            for k, v in _numeric(result).items()
            if k not in REPORTED_SKIP and not k.startswith("config/")
        ]
        self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._child(trial)
        last = trial.last_result or {}
        epochs = int(last.get("training_iteration", 0))
        status = "finished" if epochs >= self.max_epochs else "stopped_early"
        self.client.set_tag(run_id, TAG_STATUS, status)
        if status == "stopped_early":
            self.client.set_tag(run_id, "sertune.stopped_by", f"scheduler at epoch {epochs}")
        ckpt = last.get("checkpoint_path")
        scheme = self.record["path"].split("://")[0] if "://" in self.record["path"] else ""
        if ckpt and scheme and "://" not in ckpt:  # Ray reports paths without the scheme
            ckpt = f"{scheme}://{ckpt}"
        if ckpt:
            try:
                self.log_trial_model(run_id, ckpt)
            except Exception as e:  # the run stays, with the reason
                self.client.set_tag(run_id, "sertune.model_error", str(e)[:500])
                self.log(f"[mlflow] could not log the model of trial {trial.trial_id}: {e}")
        self.client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._child(trial)
        self.client.set_tag(run_id, TAG_STATUS, "failed")
        self.client.set_tag(run_id, "sertune.failure_reason", trial_error_reason(trial))
        self.client.set_terminated(run_id, "FAILED")

    # -- artifacts ------------------------------------------------------------------------------------
    def log_trial_model(self, run_id: str, checkpoint_path: str) -> None:
        from .serving import log_pyfunc_model
        from .storage import download_dir

        with tempfile.TemporaryDirectory(prefix="sertune-model-") as tmp:
            local = download_dir(checkpoint_path, Path(tmp) / "ckpt")
            report_dir = local / "robustness"
            if report_dir.is_dir():
                self.client.log_artifacts(run_id, str(report_dir), "robustness")
            if (local / "metrics.json").exists():
                self.client.log_artifact(run_id, str(local / "metrics.json"))
            model_uri = log_pyfunc_model(run_id, local, self.trainable, self.uri)
            self.client.set_tag(run_id, "sertune.model_uri", model_uri)
            self.client.set_tag(run_id, "sertune.checkpoint", checkpoint_path)

    def finish(self, result: Any, grid: Any) -> None:
        from .summary import write_search_summary

        c = self.client
        with tempfile.TemporaryDirectory() as tmp:
            best = write_search_summary(Path(tmp), result, self.record["spec"])
            c.log_artifacts(self.parent_run_id, tmp, "summary")
        if best:
            c.set_tag(self.parent_run_id, "sertune.best_trial", best["trial"])
            c.log_batch(self.parent_run_id, metrics=_best_metrics(best))
        c.set_tag(self.parent_run_id, "sertune.trials_failed", str(result.errors))
        c.set_terminated(self.parent_run_id, "FINISHED")


def _objectives(spec: dict) -> list[dict]:
    o = spec["objective"]
    return o["metrics"] if o.get("metrics") else [{"metric": o["metric"], "mode": o["mode"]}]


def _params(d: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(str(k), str(v)[:6000]) for k, v in d.items()]


def _best_metrics(best: dict) -> list:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [
        Metric(f"best/{k}", float(v), ts, 0)
        for k, v in best.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ]
