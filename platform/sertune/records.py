"""Search records: what this machine knows about each search it ran, submitted or is running.

One JSON file per search under ``$SERTUNE_HOME/state/searches/``: the validated spec, the data
config, where the trials live, the MLflow store and parent run, the status, and the driver that
runs it (host and pid) so ``search status``/``list`` can tell a live search from a dead one.

Statuses: ``running``, ``finished``, ``failed`` (every trial failed), ``interrupted`` (Ctrl-C or
SIGTERM; resumable), ``crashed`` (the driver died without a word; resumable), ``submitted``
(a Ray Job on a cluster), and the job's own end states.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    model_validator,
)

from . import settings
from .errors import NotFound, UsageError
from .spec import SearchSpec


class Phase(StrEnum):
    """Where a search is (``record.phase``): a resumed search continues there."""

    SEARCH = "search"  # the Tune experiment of the spec's space
    CONFIRM = "confirm"  # the best configurations again with fresh seeds
    BASELINE = "baseline"  # the same search with the trainable's baseline parameters
    CLOSING = "closing"  # every phase ran: the summary on the parent run, the record's end
    DONE = "done"


class SearchRecord(BaseModel):
    """What this machine knows of one search (one JSON file), frozen: a change is a new record
    (:meth:`but`) that its one owner saves - the driver (``sertune.search.Search``) for a search
    run here, ``sertune.submit`` for one submitted to a cluster. The MLflow logger reports the
    parent run id to the driver through a callback. ``status``, ``list``, ``resume``, ``rm``, the
    UI and the registry read it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    spec: SearchSpec  # the validated spec, typed (a JSON object in the file)
    path: str  # where Tune keeps the trials and state (local or s3://)
    source: str | None = None  # the spec file it came from
    data: dict[str, Any] = Field(default_factory=dict)  # the prepared data: cache, fingerprint
    created: str = ""
    ended: str | None = None
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    status: str = "running"  # running, finished, failed, interrupted, submitted, a job's state
    phase: Phase = Phase.SEARCH
    driver: dict[str, Any] = Field(default_factory=dict)  # host, pid, start (``driver_stamp``)
    failure: str | None = None  # why a search stopped failing fast
    stopped_by: str | None = None  # the stop rule that ended it early (search.stop)
    warm_start: dict[str, Any] | None = None  # the earlier trials that seeded the sampler
    confirm: list[dict[str, Any]] | None = None  # the confirmed configurations, mean and spread
    baseline_of: str | None = None  # a baseline's search
    reference: dict[str, Any] | None = None  # the reference baseline on this split (figures)
    submission_id: str | None = None  # a search submitted as a Ray Job
    address: str | None = None  # the cluster it was submitted to

    def but(self, **changes: Any) -> SearchRecord:
        """This record with ``changes`` (validated: an unknown field or a bad value raises)."""
        unknown = set(changes) - set(type(self).model_fields)
        if unknown:
            raise TypeError(f"SearchRecord has no field {', '.join(sorted(unknown))}")
        return type(self).model_validate({**self.model_dump(), **changes})

    @model_validator(mode="before")
    @classmethod
    def _old_dealing(cls, raw: Any) -> Any:
        """A record written before ``data.dealing`` existed dealt its speaker folds sorted: it
        resumes with them (its spec and its prepared data say ``sorted``), keeping its split."""
        spec = raw.get("spec") if isinstance(raw, dict) else None
        data = spec.get("data") if isinstance(spec, dict) else None
        if isinstance(data, dict) and "dealing" not in data:
            raw = {**raw, "spec": {**spec, "data": {**data, "dealing": "sorted"}}}
            if raw.get("data"):
                raw["data"] = {**raw["data"], "dealing": "sorted"}
        return raw

    @field_serializer("spec")
    def _whole_spec(self, spec: SearchSpec) -> dict[str, Any]:
        # the spec keeps its nulls (``robustness: null`` turns robustness off), whatever the
        # record leaves out
        return spec.model_dump(mode="json")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)


# A search name becomes a file name, a folder, an MLflow tag and a URI part: a safe set only.
NAME_MAX = 128
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(name: str) -> str:
    """``name`` if it is a safe search name, else a one-line :class:`UsageError` (exit 2)."""
    shown = name if len(name) <= 40 else f"{name[:40]}... ({len(name)} characters)"
    if not isinstance(name, str) or not name:
        raise UsageError("a search name cannot be empty")
    if len(name) > NAME_MAX or not _NAME.match(name) or ".." in name:
        why = (
            f"at most {NAME_MAX} characters"
            if len(name) > NAME_MAX
            else "only letters, digits, '.', '_' and '-', starting with a letter or digit, no '..'"
        )
        raise UsageError(f"search name {shown!r}: {why}")
    return name


def _record_dir() -> Path:
    d = settings.local_state_dir() / "searches"
    d.mkdir(parents=True, exist_ok=True)
    return d


def record_path(name: str) -> Path:
    return _record_dir() / f"{check_name(name)}.json"


def log_path(name: str) -> Path:
    """The search's log file: Ray Tune's own messages, failed trials' tracebacks among them."""
    return _record_dir() / f"{check_name(name)}.log"


@contextlib.contextmanager
def search_lock(name: str) -> Iterator[None]:
    """Hold the search's name for this process: a second ``run``/``resume`` of the same name,
    here or started at the same instant, is refused in one line (the kernel drops the lock when
    the process dies, so a crashed driver never leaves it held)."""
    path = _record_dir() / f"{check_name(name)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UsageError(f"search {name!r} is running ({holder}); stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_held(name: str) -> bool:
    """Whether a live process holds the search's name (:func:`search_lock`)."""
    path = _record_dir() / f"{check_name(name)}.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def save_record(name: str, record: SearchRecord) -> Path:
    """Write atomically: a reader (``sertune search list``) never sees half a file."""
    path = record_path(name)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(record.to_json())
    tmp.replace(path)
    return path


def load_record(name: str) -> SearchRecord:
    path = record_path(name)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in _record_dir().glob("*.json"))) or "none"
        raise NotFound(f"no search named {name!r} (known: {known}); see `sertune search list`")
    return _read(path)


def _read(path: Path) -> SearchRecord:
    """A record file, typed to the end (the spec inside too). A file written before the spec was
    typed holds the same JSON and reads the same; one that does not fit is refused naming it."""
    try:
        return SearchRecord.model_validate(json.loads(path.read_bytes().decode("utf-8")))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not a search record (not UTF-8 at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not a search record ({e})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror})") from None
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "(the record)"
        raise UsageError(f"{path}: field {field}: {err['msg']}") from None


def list_records(corrupt: list[str] | None = None) -> list[SearchRecord]:
    """Every readable record; a file that is not one is skipped, and named with why in
    ``corrupt`` (``search list`` shows it) - never an error for the others."""
    out = []
    for p in sorted(_record_dir().glob("*.json")):
        try:
            out.append(_read(p))
        except UsageError as e:  # a half-written, damaged or foreign file
            if corrupt is not None:
                corrupt.append(str(e))
    return out


def delete_record(name: str) -> None:
    # the name's lock file stays: unlinking it under a holder would let a second one in
    record_path(name).unlink(missing_ok=True)


def experiment_path(name: str) -> str:
    """Where Ray Tune keeps a search's trials and state (a local folder or an ``s3://`` URI)."""
    return f"{settings.storage_root().rstrip('/')}/{check_name(name)}"


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


def driver_alive(record: SearchRecord) -> bool | None:
    """True/False for a driver on this host; None when it runs elsewhere (cannot tell)."""
    d = record.driver
    if not d or d.get("host") != socket.gethostname():
        return None
    start = _proc_start(int(d["pid"]))
    return start is not None and (d.get("started") is None or start == d["started"])


def effective_status(record: SearchRecord) -> str:
    """The record's status, with a dead driver's ``running`` read as ``crashed``."""
    status = record.status
    if status == "running" and driver_alive(record) is False:
        return "crashed"
    return status


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
