"""Search records: what this machine knows about each search it ran, submitted or is running.

One JSON file per search under ``$SERTUNE_HOME/state/searches/``: the validated spec, the data
config, where the trials live, the MLflow store and parent run, the status, and the driver that
runs it (host and pid) so ``search status``/``list`` can tell a live search from a dead one.

Statuses: ``running``, ``finished``, ``failed`` (every trial failed), ``interrupted`` (Ctrl-C or
SIGTERM; resumable), ``crashed`` (the driver died without a word; resumable), ``submitted``
(a Ray Job on a cluster), and the job's own end states.
"""

from __future__ import annotations

import json
import os
import socket
import time
from enum import StrEnum
from pathlib import Path
from typing import Any, TypedDict

from . import settings
from .errors import NotFound


class Phase(StrEnum):
    """Where a search is (``record["phase"]``): a resumed search continues there."""

    SEARCH = "search"  # the Tune experiment of the spec's space
    CONFIRM = "confirm"  # the best configurations again with fresh seeds
    BASELINE = "baseline"  # the same search with the trainable's baseline parameters
    DONE = "done"


class SearchRecord(TypedDict, total=False):
    """The keys of a search's record (one JSON file). A dict on disk and in memory: the driver
    (``sertune.search.Search.save``), the MLflow logger (the parent run id) and ``submit`` write
    it; ``status``, ``list``, ``resume`` and the UI read it."""

    name: str
    spec: dict[str, Any]  # the validated spec (``SearchSpec.model_dump()``)
    source: str  # the spec file it came from
    data: dict[str, Any]  # the trainable's prepared data (cache, fingerprint, data report)
    created: str
    ended: str
    path: str  # where Tune keeps the trials and state (local or s3://)
    tracking_uri: str
    parent_run_id: str
    status: str  # running, finished, failed, interrupted, submitted, a job's end state
    phase: Phase
    driver: dict[str, Any]  # host, pid, start time (``driver_stamp``)
    failure: str  # why a search stopped failing fast
    warm_start: dict[str, Any]  # the earlier trials that seeded the sampler (``warmstart``)
    confirm: list[dict[str, Any]]  # the confirmed configurations, mean and spread
    confirm_done: bool
    baseline_of: str  # a baseline's search
    submission_id: str  # a search submitted as a Ray Job
    address: str


def _record_dir() -> Path:
    d = settings.local_state_dir() / "searches"
    d.mkdir(parents=True, exist_ok=True)
    return d


def record_path(name: str) -> Path:
    return _record_dir() / f"{name}.json"


def log_path(name: str) -> Path:
    """The search's log file: Ray Tune's own messages, failed trials' tracebacks among them."""
    return _record_dir() / f"{name}.log"


def save_record(name: str, record: SearchRecord) -> Path:
    """Write atomically: a reader (``sertune search list``) never sees half a file."""
    path = record_path(name)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)
    return path


def load_record(name: str) -> SearchRecord:
    path = record_path(name)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in _record_dir().glob("*.json"))) or "none"
        raise NotFound(f"no search named {name!r} (known: {known}); see `sertune search list`")
    return json.loads(path.read_text())


def list_records() -> list[SearchRecord]:
    out = []
    for p in sorted(_record_dir().glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except json.JSONDecodeError:
            continue
    return out


def delete_record(name: str) -> None:
    record_path(name).unlink(missing_ok=True)


def experiment_path(name: str) -> str:
    """Where Ray Tune keeps a search's trials and state (a local folder or an ``s3://`` URI)."""
    return f"{settings.storage_root().rstrip('/')}/{name}"


def record_spec(record: dict[str, Any]):
    """The record's spec, validated again (the spec module is the one place that knows specs)."""
    from .spec import validate_spec

    raw = {k: v for k, v in record["spec"].items() if k != "source"}
    return validate_spec(raw, record.get("source") or "<record>", check_paths=False)


def objectives(spec: dict[str, Any]) -> list[dict[str, str]]:
    """The objectives of a spec dict, first one first: ``[{"metric": .., "mode": ..}, ...]``."""
    o = spec["objective"]
    return list(o["metrics"]) if o.get("metrics") else [{"metric": o["metric"], "mode": o["mode"]}]


def first_objective(spec: dict[str, Any]) -> dict[str, str]:
    return objectives(spec)[0]


# -- the driver of a running search ------------------------------------------------------------------


def driver_stamp() -> dict[str, Any]:
    """Who runs this search: enough to tell later whether that process still lives."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _proc_start(os.getpid())}


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a reused pid is not mistaken for ours."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def driver_alive(record: dict[str, Any]) -> bool | None:
    """True/False for a driver on this host; None when it runs elsewhere (cannot tell)."""
    d = record.get("driver")
    if not d or d.get("host") != socket.gethostname():
        return None
    start = _proc_start(int(d["pid"]))
    return start is not None and (d.get("started") is None or start == d["started"])


def effective_status(record: dict[str, Any]) -> str:
    """The record's status, with a dead driver's ``running`` read as ``crashed``."""
    status = record.get("status", "?")
    if status == "running" and driver_alive(record) is False:
        return "crashed"
    return status


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
