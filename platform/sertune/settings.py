"""Where things live. One place reads the environment; everything else asks here.

| what             | default (embedded, zero setup)        | override                                |
|------------------|---------------------------------------|-----------------------------------------|
| home             | ``~/.sertune``                        | ``SERTUNE_HOME``                        |
| searches (Tune)  | ``<home>/searches``                   | ``SERTUNE_STORAGE`` (e.g. ``s3://b/p``) |
| decoded caches   | ``<home>/cache``                      | ``SERTUNE_CACHE``                       |
| MLflow tracking  | ``sqlite:///<home>/mlflow.db``        | ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` |
| MLflow artifacts | ``<home>/mlartifacts``                | ``SERTUNE_ARTIFACT_ROOT``               |
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
    if override:
        return override
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{home() / 'mlflow.db'}"


def artifact_root() -> str:
    s = os.environ.get("SERTUNE_ARTIFACT_ROOT")
    if s:
        return s
    return (home() / "mlartifacts").as_uri()
