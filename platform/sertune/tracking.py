"""The one place that talks to MLflow.

* :func:`configure` / :func:`ensure_store` / :func:`check_store` - the store, created once under a
  file lock (SQLite: two first searches at once must not both run MLflow's migrations) and in
  WAL mode (one writer per search plus readers such as ``sertune ui``); a server is checked,
  credentials included, before anything starts.
* :class:`Journal` - every record a search writes (runs, params, metrics, tags, artifacts,
  models) goes to an append-only journal on disk first; a writer thread applies it to MLflow in
  order. An MLflow outage neither stops training nor loses a record: the journal buffers, the
  console says MLflow is unreachable and when it caught up, and what is still pending when the
  driver stops is replayed by the next command on that search.

Run hierarchy: one parent run per search, one nested child run per trial (see
``sertune.search_logger``). Only the driver writes, so a SQLite store has a single writer per
search and a remote cluster's workers need no MLflow credentials. Credentials for a server come
from the environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``) and are never logged.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import settings
from .errors import NotFound, ServiceError

EXPERIMENT_ENV = "SERTUNE_EXPERIMENT"
DEFAULT_EXPERIMENT = "sertune"
TAG_SEARCH, TAG_TRIAL, TAG_STATUS, TAG_KIND = (
    "sertune.search",
    "sertune.trial_id",
    "sertune.status",
    "sertune.kind",
)


# -- the store --------------------------------------------------------------------------------------


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "databricks"))


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow (this process) at the store; return its URI."""
    import mlflow

    from .storage import endpoint

    uri = settings.tracking_uri(tracking_uri)
    if endpoint():  # MLflow's S3 artifact store reads its own variable
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint())
    # Fail fast and let the journal retry: MLflow's own backoff would block for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def ensure_store(tracking_uri: str | None = None) -> str:
    """Create or upgrade a local store exactly once, whoever else starts at the same moment."""
    uri = configure(tracking_uri)
    db = sqlite_path(uri)
    if db is None:
        return uri
    import mlflow

    ready = db.with_name(f"{db.name}.ready-{mlflow.__version__}")  # schema of this MLflow: done
    if db.exists() and ready.exists():
        return uri
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds it ready
        from mlflow.store.model_registry.sqlalchemy_store import (
            SqlAlchemyStore as RegistryStore,
        )
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(uri, settings.artifact_root())
        RegistryStore(uri)
        import sqlite3

        with sqlite3.connect(db, timeout=30) as con:  # readers (the UI) never block the writer
            con.execute("PRAGMA journal_mode=WAL")
        ready.touch()
    return uri


def check_store(tracking_uri: str | None = None) -> str:
    """Before a search starts: the store exists (created if local) and answers; a server accepts
    our credentials. Raise :class:`ServiceError` with one line otherwise."""
    uri = ensure_store(tracking_uri)
    if not is_server(uri):
        return uri
    from mlflow import MlflowClient

    old = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        raise ServiceError(f"MLflow tracking server {uri}: {_why(e)}") from None
    finally:
        if old is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = old
    return uri


def _why(e: Exception) -> str:
    text = str(e)
    if "401" in text or "Unauthorized" in text or "403" in text:
        return (
            "credentials refused (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
            "or MLFLOW_TRACKING_TOKEN)"
        )
    if (
        "Connection refused" in text
        or "Max retries exceeded" in text
        or "Failed to establish" in text
    ):
        return "unreachable (connection refused; is the server running?)"
    if "timed out" in text.lower():
        return "unreachable (timed out)"
    return text.splitlines()[0][:200] if text else type(e).__name__


def client(tracking_uri: str | None = None):
    from mlflow import MlflowClient

    uri = ensure_store(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)


def get_experiment_id(c: Any, create: bool = True) -> str:
    """The ``sertune`` experiment (``$SERTUNE_EXPERIMENT``); created with our artifact root."""
    name = experiment_name()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        raise NotFound(f"MLflow experiment {name!r} does not exist in {c.tracking_uri}")
    root = settings.artifact_root()
    if root.startswith("file://"):
        Path(root[len("file://") :]).mkdir(parents=True, exist_ok=True)
    # A server decides its own artifact root; a local store gets ours.
    loc = None if is_server(c.tracking_uri) else f"{root.rstrip('/')}/{name}"
    try:
        return c.create_experiment(name, artifact_location=loc)
    except Exception as e:
        if _code(e) == "RESOURCE_ALREADY_EXISTS":  # another process created it just now
            return c.get_experiment_by_name(name).experiment_id
        raise


def _code(e: Exception) -> str:
    return str(getattr(e, "error_code", "") or "")


def is_missing(e: Exception) -> bool:
    """An MLflow error that means 'no such thing' (and nothing else: a 401 is not missing)."""
    return _code(e) == "RESOURCE_DOES_NOT_EXIST"


def clean_value(v: Any) -> float | None:
    """A metric as MLflow should show it: finite, without float32 noise (0.6000000238 -> 0.6)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(f"{float(v):.6g}")


def finished_trials(c: Any, source: str, with_times: bool = False) -> list[dict[str, Any]]:
    """The finished (or scheduler-stopped) trials of an earlier search, by search name in this
    store's sertune experiment, else every sertune trial of the MLflow experiment ``source``:
    ``[{"search", "trial", "params": {name: str}, "metrics": {name: float}}]``, oldest first.
    Raises :class:`NotFound` when neither exists."""
    trial = f"tags.`{TAG_KIND}` = 'trial'"
    exp_id = get_experiment_id(c)
    runs = _all_runs(c, [exp_id], f"{trial} and tags.`{TAG_SEARCH}` = '{source}'")
    if not runs:
        exp = c.get_experiment_by_name(source)
        if exp is None:
            raise NotFound(f"no search or MLflow experiment named {source!r} in {c.tracking_uri}")
        runs = _all_runs(c, [exp.experiment_id], trial)
    runs = [r for r in runs if r.data.tags.get(TAG_STATUS) in ("finished", "stopped_early")]
    return [
        {
            "search": r.data.tags.get(TAG_SEARCH, ""),
            "trial": r.data.tags.get(TAG_TRIAL, r.info.run_id),
            "params": dict(r.data.params),
            "metrics": dict(r.data.metrics),
            **(
                {"start": r.info.start_time, "end": r.info.end_time or r.info.start_time}
                if with_times
                else {}
            ),
        }
        for r in sorted(runs, key=lambda r: r.info.start_time or 0)
    ]


def log_bench_run(
    c: Any, name: str, params: dict[str, Any], metrics: dict[str, float], files: list[Path]
) -> str:
    """One finished MLflow run for a benchmark's figures and plots; returns its id."""
    run = c.create_run(
        get_experiment_id(c), run_name=name, tags={TAG_KIND: "bench", "mlflow.runName": name}
    )
    rid = run.info.run_id
    for k, v in params.items():
        c.log_param(rid, k, v)
    for k, v in metrics.items():
        if clean_value(v) is not None:
            c.log_metric(rid, k, clean_value(v))
    for f in files:
        c.log_artifact(rid, str(f))
    c.set_terminated(rid, "FINISHED")
    return rid


def _all_runs(c: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    out, token = [], None
    while True:
        page = c.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


# -- the journal -------------------------------------------------------------------------------------


class Journal:
    """Append-only records of one search on disk, applied to MLflow in order by a thread.

    Layout under ``$SERTUNE_HOME/state/journal/<search>/``: ``ops.jsonl`` (one record per line),
    ``applied`` (how many are in MLflow), ``runs.jsonl`` (record key -> MLflow run id and the
    last step logged, appended), ``spool/`` (files staged for upload).
    """

    BATCH = 900  # metrics per log_batch call (MLflow accepts 1000)

    def __init__(self, search: str, tracking_uri: str, log: Callable[[str], None] = print):
        self.search, self.uri, self.log = search, tracking_uri, log
        self.dir = settings.local_state_dir() / "journal" / search
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "spool").mkdir(exist_ok=True)
        self._lock = threading.Condition()
        self._ops: list[dict[str, Any]] = self._read_ops()
        self._applied = self._read_int("applied")
        for op in self._ops[self._applied :]:
            # left by a driver that stopped: it may have created the run without remembering it
            op["lookup"] = True
        self._runs: dict[str, dict[str, Any]] = self._read_runs()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._down_since: float | None = None
        self._replayed = 0
        self._client = None
        self.on_run: Callable[[str, str], None] | None = None  # (key, run_id) once created
        self.write_seconds = 0.0  # time spent in MLflow calls (bench scale)
        self.calls = 0

    # -- persistence ---------------------------------------------------------------------------
    def _read_ops(self) -> list[dict[str, Any]]:
        path = self.dir / "ops.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: the ones before it count
                break
        return out

    def _read_int(self, name: str) -> int:
        try:
            return int((self.dir / name).read_text())
        except (OSError, ValueError):
            return 0

    def _read_runs(self) -> dict[str, dict[str, Any]]:
        """``runs.jsonl``: one line per change (a run created, a step logged); the last wins."""
        runs: dict[str, dict[str, Any]] = {}
        path = self.dir / "runs.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash
                    break
                runs.setdefault(entry.pop("key"), {}).update(entry)
        return runs

    def _write(self, name: str, text: str) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(self.dir / name)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._ops) - self._applied

    def run_id(self, key: str) -> str | None:
        return (self._runs.get(key) or {}).get("run_id")

    def keys(self) -> list[str]:
        return list(self._runs)

    # -- producers -----------------------------------------------------------------------------
    def append(self, op: dict[str, Any]) -> None:
        line = json.dumps(op, default=str)
        with self._lock:
            with (self.dir / "ops.jsonl").open("a") as fh:
                fh.write(line + "\n")
            self._ops.append(op)
            self._lock.notify_all()

    def stage(self, src: str | Path) -> str:
        """Copy a folder into the spool (it may vanish before the writer uploads it)."""
        dest = self.dir / "spool" / uuid.uuid4().hex[:12]
        shutil.copytree(src, dest)
        return str(dest)

    # -- the writer thread ------------------------------------------------------------------------
    def start(self) -> Journal:
        if self._thread is None or not self._thread.is_alive():
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="sertune-mlflow", daemon=True)
            self._thread.start()
        return self

    def drain(self, timeout_s: float) -> int:
        """Wait until every record is in MLflow or ``timeout_s`` passed; return how many wait."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._applied < len(self._ops) and time.monotonic() < deadline:
                self._lock.wait(timeout=0.2)
            return len(self._ops) - self._applied

    def close(self, timeout_s: float = 120.0) -> int:
        left = self.drain(timeout_s)
        self._stop = True
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if left:
            self.log(
                f"[mlflow] {left} record(s) of {self.search!r} not yet in MLflow; they are kept in "
                f"{self.dir} and sent by the next `sertune search sync|status|resume {self.search}`"
            )
        else:
            self._compact()
        return left

    def _compact(self) -> None:
        with self._lock:
            if self._applied == len(self._ops):
                self._ops, self._applied = [], 0
                (self.dir / "ops.jsonl").write_text("")
                self._write("applied", "0")
                shutil.rmtree(self.dir / "spool", ignore_errors=True)
                (self.dir / "spool").mkdir(exist_ok=True)
                lines = [json.dumps({"key": k, **v}) for k, v in self._runs.items()]
                self._write("runs.jsonl", "".join(line + "\n" for line in lines))

    def _loop(self) -> None:
        backoff = 1.0
        while True:
            with self._lock:
                while self._applied >= len(self._ops) and not self._stop:
                    self._lock.wait(timeout=0.5)
                if self._applied >= len(self._ops) and self._stop:
                    return
                batch, n = self._next_batch()
            try:
                self._apply(batch)
            except Exception as e:  # noqa: BLE001 - classified below: retry or skip
                if _permanent(e):
                    self.log(f"[mlflow] a record could not be written and is skipped: {_why(e)}")
                else:
                    for op in batch:  # the call may have landed before the failure
                        op["lookup"] = True
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        self.log(
                            f"[mlflow] {self.uri} unreachable ({_why(e)}); records are kept and "
                            "training goes on"
                        )
                    time.sleep(backoff)
                    backoff = min(30.0, backoff * 2)
                    continue
            backoff = 1.0
            with self._lock:
                self._applied += n
                self._write("applied", str(self._applied))
                self._lock.notify_all()
            if self._down_since is not None:
                self._replayed += n
                if self.pending == 0:
                    self.log(
                        f"[mlflow] caught up after {time.monotonic() - self._down_since:.0f}s "
                        f"({self._replayed} records sent in order)"
                    )
                    self._down_since, self._replayed = None, 0

    def _next_batch(self) -> tuple[list[dict[str, Any]], int]:
        """The next record; or every metric record up to the next other record, grouped by run.

        Runs are independent, so interleaved epochs of concurrent trials become one ``log_batch``
        per run (order within a run is kept; a group replayed after a failure is deduplicated by
        step). Under load the backlog grows and so do the batches: writes per trial stay flat.
        """
        first = self._ops[self._applied]
        if first["op"] != "metrics":
            return [first], 1
        window, total = [], 0
        for op in self._ops[self._applied : self._applied + 1000]:
            if op["op"] != "metrics" or total + len(op["metrics"]) > 20 * self.BATCH:
                break
            window.append(op)
            total += len(op["metrics"])
        return window, len(window)

    # -- applying records --------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def _remember(self, key: str, **values: Any) -> None:
        """Append, never rewrite: the cost of a record stays flat however many runs exist."""
        self._runs.setdefault(key, {}).update(values)
        with (self.dir / "runs.jsonl").open("a") as fh:
            fh.write(json.dumps({"key": key, **values}) + "\n")

    def _apply(self, batch: list[dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            op = batch[0]
            kind = op["op"]
            if kind == "metrics":
                by_run: dict[str, list[dict[str, Any]]] = {}
                for m in batch:
                    by_run.setdefault(m["key"], []).append(m)
                for ops in by_run.values():
                    self.calls += 1
                    self._metrics(ops)
            else:
                self.calls += 1
                getattr(self, f"_op_{kind}")(op)
        finally:
            self.write_seconds += time.perf_counter() - t0

    @property
    def experiment_id(self) -> str:
        if getattr(self, "_experiment_id", None) is None:
            self._experiment_id = get_experiment_id(self.client)
        return self._experiment_id

    def _find_run(self, tags: dict[str, str]) -> str | None:
        c = self.client
        exp = self.experiment_id
        flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        found = c.search_runs([exp], filter_string=flt, max_results=1)
        return found[0].info.run_id if found else None

    def _op_run(self, op: dict[str, Any]) -> None:
        """Create a run (or find the one a previous driver created) for record key ``op['key']``."""
        from mlflow.entities import Param

        c, key = self.client, op["key"]
        run_id = self.run_id(key)
        if run_id is None and op.get("lookup", True):  # a resumed search: the run may exist
            run_id = self._find_run(op["identity"])
        if run_id:
            try:
                c.update_run(run_id, status="RUNNING")
            except Exception as e:
                if not is_missing(e):
                    raise
                run_id = None  # deleted by hand: start a new one
        if not run_id:
            tags = dict(op["tags"])
            if op.get("parent"):
                tags["mlflow.parentRunId"] = self.run_id(op["parent"]) or ""
            run_id = c.create_run(
                self.experiment_id, tags=tags, run_name=op.get("run_name")
            ).info.run_id
            params = [Param(str(k), str(v)[:6000]) for k, v in op.get("params", {}).items()]
            for i in range(0, len(params), 90):
                c.log_batch(run_id, params=params[i : i + 90])
        self._remember(key, run_id=run_id)
        if self.on_run:
            self.on_run(key, run_id)

    def _metrics(self, batch: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        key = batch[0]["key"]
        run_id = self.run_id(key)
        if run_id is None:
            raise RuntimeError(f"journal: no run for {key!r} yet")
        last = (self._runs.get(key) or {}).get("step", -1)
        metrics, top = [], last
        for op in batch:
            step = int(op.get("step", 0))
            if op.get("dedupe", True) and step <= last:
                continue  # an epoch logged before a crash and reported again on resume
            top = max(top, step)
            metrics += [Metric(k, v, int(ts), step) for k, v, ts in op["metrics"]]
        for i in range(0, len(metrics), self.BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + self.BATCH])
        if top != last:
            self._remember(key, step=top)

    def _op_tags(self, op: dict[str, Any]) -> None:
        """Tags; ``{run_id}`` in a value (a note's image links) becomes the run's id."""
        from mlflow.entities import RunTag

        run_id = self.run_id(op["key"])
        tags = [RunTag(k, str(v).replace("{run_id}", run_id)) for k, v in op["tags"].items()]
        self.client.log_batch(run_id, tags=tags)

    def _op_artifacts(self, op: dict[str, Any]) -> None:
        from .storage import download_dir

        run_id = self.run_id(op["key"])
        src = op["src"]
        if "://" in src and not src.startswith("file://"):
            local = download_dir(src, self.dir / "spool" / uuid.uuid4().hex[:12])
        else:
            local = Path(src.removeprefix("file://"))
        if not local.exists():
            raise FileNotFoundError(f"{src}: gone before it reached MLflow")
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), op.get("path"))
        else:
            self.client.log_artifact(run_id, str(local), op.get("path"))

    def _op_model(self, op: dict[str, Any]) -> None:
        from .serving import log_pyfunc_model
        from .storage import download_dir

        run_id = self.run_id(op["key"])
        src = op["src"]
        if "://" in src and not src.startswith("file://"):
            local = download_dir(src, self.dir / "spool" / uuid.uuid4().hex[:12])
        else:
            local = Path(src.removeprefix("file://"))
        uri = log_pyfunc_model(run_id, local, op["trainable"], self.uri)
        self.client.set_tag(run_id, "sertune.model_uri", uri)

    def _op_end(self, op: dict[str, Any]) -> None:
        self.client.set_terminated(self.run_id(op["key"]), op["status"])

    def _op_experiment_tags(self, op: dict[str, Any]) -> None:
        for k, v in op["tags"].items():
            self.client.set_experiment_tag(self.experiment_id, k, v)


def _permanent(e: Exception) -> bool:
    """Errors a retry cannot fix (a bad value, a file gone): skip the record, say so."""
    if isinstance(e, (FileNotFoundError, NotFound)):
        return True
    code = _code(e)
    return code in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST")
