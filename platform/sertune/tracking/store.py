"""The MLflow store: set-up, checks and the sertune experiment (its queries: ``runs.Store``).

The store is created once under a file lock (SQLite: two first searches at once must not both
run MLflow's migrations) and in WAL mode (one writer per search plus readers such as
``sertune ui``); a server is checked, credentials included, before anything starts. Credentials
for a server come from the environment (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN``) and
are never logged.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
from pathlib import Path
from typing import Any

from .. import settings
from ..errors import NotFound, ServiceError

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

    from ..storage import endpoint

    uri = settings.tracking_uri(tracking_uri)
    if endpoint():  # MLflow's S3 artifact store reads its own variable
        os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint())
    # Fail fast and let the journal retry: MLflow's own backoff would block for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # a store that fails (a full disk) is the journal's to report, in one line; MLflow's own
    # logger would print each failed commit's whole traceback on the console
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # MLflow also writes the URI into MLFLOW_TRACKING_URI, which sertune reads first: left there,
    # a later search of this process under another SERTUNE_HOME would log into this store
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
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
