"""Where things live. One place reads the environment; everything else asks here.

| what             | default (embedded, zero setup)        | override                                |
|------------------|---------------------------------------|-----------------------------------------|
| home             | ``~/.sertune``                        | ``SERTUNE_HOME``                        |
| searches (Tune)  | ``<home>/searches``                   | ``SERTUNE_STORAGE`` (e.g. ``s3://b/p``) |
| decoded caches   | ``<home>/cache``                      | ``SERTUNE_CACHE``                       |
| MLflow tracking  | ``sqlite:///<home>/mlflow.db``        | ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` |
| MLflow artifacts | ``<home>/mlartifacts``                | ``SERTUNE_ARTIFACT_ROOT``               |
| free-space floor | 256 MB to start; a running search stops (resumable) below half | ``SERTUNE_MIN_FREE_MB``, ``SERTUNE_MIN_FREE_RUNNING_MB`` |
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("SERTUNE_HOME", "~/.sertune")).expanduser().resolve()


def storage_root() -> str:
    """Ray Tune ``storage_path``: a local folder or an ``s3://`` URI."""
    s = os.environ.get("SERTUNE_STORAGE")
    if s:
        return s if "://" in s else str(Path(s).expanduser().resolve())
    return str(home() / "searches")


def cache_root() -> str:
    s = os.environ.get("SERTUNE_CACHE")
    return (
        (s if "://" in (s or "") else str(Path(s).expanduser().resolve()))
        if s
        else str(home() / "cache")
    )


def local_state_dir() -> Path:
    """Driver-side bookkeeping (search records); always local."""
    return home() / "state"


def tracking_uri(override: str | None = None) -> str:
    """The MLflow store, never with credentials in it: ``http://user:password@host`` becomes
    ``http://host`` and the user and password go to ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` (which MLflow reads, and local Ray workers inherit), so no
    printed line, record or Tune pickle ever holds them."""
    if override:
        return without_credentials(override)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        clean = without_credentials(env)
        if clean != env:
            os.environ["MLFLOW_TRACKING_URI"] = clean
        return clean
    return f"sqlite:///{home() / 'mlflow.db'}"


def without_credentials(uri: str) -> str:
    """``uri`` without ``user:password@``, which goes to MLflow's environment variables."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    if user:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit(parts._replace(netloc=host))


def artifact_root() -> str:
    s = os.environ.get("SERTUNE_ARTIFACT_ROOT")
    if s:
        return s
    return (home() / "mlartifacts").as_uri()


def min_free_mb() -> float:
    """The free space a search needs on its local folders to start (it stops, resumable, below
    half of it while it runs): ``SERTUNE_MIN_FREE_MB``, default 256."""
    try:
        return float(os.environ.get("SERTUNE_MIN_FREE_MB", "256"))
    except ValueError:
        return 256.0


def min_free_running_mb() -> float:
    """Below this many MB free a running search stops, resumable: ``SERTUNE_MIN_FREE_RUNNING_MB``,
    default half of :func:`min_free_mb`."""
    try:
        return float(os.environ["SERTUNE_MIN_FREE_RUNNING_MB"])
    except (KeyError, ValueError):
        return min_free_mb() / 2


def local_folders() -> list[Path]:
    """The local folders a search writes to (home, and the search storage when local)."""
    out = [home()]
    root = storage_root()
    if "://" not in root:
        out.append(Path(root))
    return out
