"""The journal: every record a search writes (runs, params, metrics, tags, artifacts, models)
goes to an append-only file on disk first; a writer thread applies it to MLflow in order.

An MLflow outage neither stops training nor loses a record: the journal buffers, the console
says MLflow is unreachable and when it caught up, and what is still pending when the driver stops
is replayed by the next command on that search. Records are :class:`Op` values (one kind per
MLflow write); on disk each is one JSON line.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from .. import settings
from ..errors import NotFound
from .store import _code, _why, client, get_experiment_id, is_missing


class Kind(StrEnum):
    """What a record writes to MLflow (its ``"op"`` on disk)."""

    RUN = "run"  # create a run, or find the one a killed driver created (``identity`` tags)
    METRICS = "metrics"  # one step's metrics of a run
    TAGS = "tags"
    ARTIFACTS = "artifacts"  # a file or folder (staged in the spool, or a storage URI)
    MODEL = "model"  # a trial's model folder, logged as a pyfunc model
    END = "end"  # the run's final status
    EXPERIMENT_TAGS = "experiment_tags"


@dataclass(frozen=True)
class Op:
    """One record of the journal. ``key`` names the run ("parent" or a trial id) across drivers
    (the MLflow run id is known only once the writer created it)."""

    kind: Kind
    key: str = ""
    tags: dict[str, Any] = field(default_factory=dict)
    # RUN
    identity: dict[str, str] = field(default_factory=dict)  # tags that find the run again
    parent: str = ""  # key of the parent run
    run_name: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    lookup: bool = True  # search MLflow for a run a previous driver created
    # METRICS: rows of [name, value, timestamp ms]; dedupe drops a step already logged
    step: int = 0
    metrics: list[list[Any]] = field(default_factory=list)
    dedupe: bool = True
    # ARTIFACTS, MODEL
    src: str = ""
    path: str | None = None  # folder in the run's artifacts
    trainable: str = ""
    # END
    status: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))

    def to_json(self) -> dict[str, Any]:
        """The line on disk: ``"op"`` and the fields that differ from their defaults."""
        defaults = Op(self.kind)
        out: dict[str, Any] = {"op": self.kind.value}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "kind" and value != getattr(defaults, f.name):
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Op:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(kind=Kind(data["op"]), **values)


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
        self._ops: list[Op] = self._read_ops()
        self._applied = self._read_int("applied")
        # left by a driver that stopped: it may have created the run without remembering it
        self._ops[self._applied :] = [
            replace(op, lookup=True) for op in self._ops[self._applied :]
        ]
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
    def _read_ops(self) -> list[Op]:
        path = self.dir / "ops.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                out.append(Op.from_json(json.loads(line)))
            except (json.JSONDecodeError, KeyError, ValueError, TypeError):
                break  # a line cut by a crash: the ones before it count
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
        try:
            tmp.write_text(text)
            tmp.replace(self.dir / name)
        except OSError:  # a full disk: the old file stays whole; the records are in memory
            tmp.unlink(missing_ok=True)
            self._memory_only = True

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._ops) - self._applied

    def run_id(self, key: str) -> str | None:
        return (self._runs.get(key) or {}).get("run_id")

    def keys(self) -> list[str]:
        return list(self._runs)

    # -- producers -----------------------------------------------------------------------------
    def append(self, op: Op) -> None:
        line = json.dumps(op.to_json(), default=str)
        with self._lock:
            try:
                with (self.dir / "ops.jsonl").open("a") as fh:
                    fh.write(line + "\n")
            except OSError as e:  # a full disk: kept in memory, and said so once, truthfully
                if not getattr(self, "_memory_only", False):
                    self._memory_only = True
                    self.log(
                        f"[mlflow] cannot write the journal {self.dir / 'ops.jsonl'} "
                        f"({e.strerror}): MLflow records are kept in memory only until the "
                        "search ends"
                    )
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
                    with self._lock:  # the call may have landed before the failure
                        head = self._applied
                        self._ops[head : head + n] = [replace(op, lookup=True) for op in batch]
                    if self._down_since is None:
                        self._down_since = time.monotonic()
                        where = (
                            "in memory only (the journal's disk is full)"
                            if getattr(self, "_memory_only", False)
                            else f"on disk in {self.dir}"
                        )
                        full = "disk is full" in str(e) or "No space left" in str(e)
                        what = "has no space left" if full else f"unreachable ({_why(e)})"
                        self.log(
                            f"[mlflow] {self.uri} {what}; records are kept {where} and training "
                            "goes on"
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

    def _next_batch(self) -> tuple[list[Op], int]:
        """The next record; or every metric record up to the next other record, grouped by run.

        Runs are independent, so interleaved epochs of concurrent trials become one ``log_batch``
        per run (order within a run is kept; a group replayed after a failure is deduplicated by
        step). Under load the backlog grows and so do the batches: writes per trial stay flat.
        """
        first = self._ops[self._applied]
        if first.kind != Kind.METRICS:
            return [first], 1
        window, total = [], 0
        for op in self._ops[self._applied : self._applied + 1000]:
            if op.kind != Kind.METRICS or total + len(op.metrics) > 20 * self.BATCH:
                break
            window.append(op)
            total += len(op.metrics)
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
        try:
            with (self.dir / "runs.jsonl").open("a") as fh:
                fh.write(json.dumps({"key": key, **values}) + "\n")
        except OSError:  # a full disk: kept in memory (the run is found again by its tags)
            self._memory_only = True

    def _apply(self, batch: list[Op]) -> None:
        t0 = time.perf_counter()
        try:
            op = batch[0]
            if op.kind == Kind.METRICS:
                by_run: dict[str, list[Op]] = {}
                for m in batch:
                    by_run.setdefault(m.key, []).append(m)
                for ops in by_run.values():
                    self.calls += 1
                    self._metrics(ops)
            else:
                self.calls += 1
                getattr(self, f"_op_{op.kind.value}")(op)
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

    def _op_run(self, op: Op) -> None:
        """Create a run (or find the one a previous driver created) for record key ``op.key``."""
        from mlflow.entities import Param

        c, key = self.client, op.key
        run_id = self.run_id(key)
        if run_id is None and op.lookup:  # a resumed search: the run may exist
            run_id = self._find_run(op.identity)
        if run_id:
            try:
                c.update_run(run_id, status="RUNNING")
            except Exception as e:
                if not is_missing(e):
                    raise
                run_id = None  # deleted by hand: start a new one
        if not run_id:
            tags = dict(op.tags)
            if op.parent:
                tags["mlflow.parentRunId"] = self.run_id(op.parent) or ""
            run_id = c.create_run(
                self.experiment_id, tags=tags, run_name=op.run_name or None
            ).info.run_id
            params = [Param(str(k), str(v)[:6000]) for k, v in op.params.items()]
            for i in range(0, len(params), 90):
                c.log_batch(run_id, params=params[i : i + 90])
        self._remember(key, run_id=run_id)
        if self.on_run:
            self.on_run(key, run_id)

    def _metrics(self, batch: list[Op]) -> None:
        from mlflow.entities import Metric

        key = batch[0].key
        run_id = self.run_id(key)
        if run_id is None:
            raise RuntimeError(f"journal: no run for {key!r} yet")
        last = (self._runs.get(key) or {}).get("step", -1)
        metrics, top = [], last
        for op in batch:
            step = int(op.step)
            if op.dedupe and step <= top:
                continue  # an epoch logged before (a crash, a restart) and reported again
            top = max(top, step)
            metrics += [Metric(k, v, int(ts), step) for k, v, ts in op.metrics]
        for i in range(0, len(metrics), self.BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + self.BATCH])
        if top != last:
            self._remember(key, step=top)

    def _op_tags(self, op: Op) -> None:
        """Tags; ``{run_id}`` in a value (a note's image links) becomes the run's id."""
        from mlflow.entities import RunTag

        run_id = self.run_id(op.key)
        tags = [RunTag(k, str(v).replace("{run_id}", run_id)) for k, v in op.tags.items()]
        self.client.log_batch(run_id, tags=tags)

    def _local(self, src: str) -> Path:
        """A record's file or folder here: a storage URI is fetched into the spool first."""
        from ..storage import download_dir

        if "://" in src and not src.startswith("file://"):
            return download_dir(src, self.dir / "spool" / uuid.uuid4().hex[:12])
        return Path(src.removeprefix("file://"))

    def _op_artifacts(self, op: Op) -> None:
        run_id, local = self.run_id(op.key), self._local(op.src)
        if not local.exists():
            raise FileNotFoundError(f"{op.src}: gone before it reached MLflow")
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), op.path)
        else:
            self.client.log_artifact(run_id, str(local), op.path)

    def _op_model(self, op: Op) -> None:
        from .models import log_pyfunc_model

        run_id = self.run_id(op.key)
        uri = log_pyfunc_model(run_id, self._local(op.src), op.trainable, self.uri)
        self.client.set_tag(run_id, "sertune.model_uri", uri)

    def _op_end(self, op: Op) -> None:
        self.client.set_terminated(self.run_id(op.key), op.status)

    def _op_experiment_tags(self, op: Op) -> None:
        for k, v in op.tags.items():
            self.client.set_experiment_tag(self.experiment_id, k, v)


def _permanent(e: Exception) -> bool:
    """Errors a retry cannot fix (a bad value, a file gone): skip the record, say so."""
    if isinstance(e, (FileNotFoundError, NotFound)):
        return True
    code = _code(e)
    return code in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST")
