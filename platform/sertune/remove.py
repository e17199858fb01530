"""``sertune search rm``: remove a search's trials, checkpoints, record and (optionally) runs."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import settings, tracking
from .errors import UsageError
from .records import (
    check_name,
    delete_record,
    effective_status,
    experiment_path,
    load_record,
    lock_held,
)
from .storage import exists, remove_dir


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` lies under ``root`` (both resolved; a URI by its prefix)."""
    if "://" in path or "://" in root:
        return path.rstrip("/").startswith(root.rstrip("/") + "/")
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
    except ValueError:
        return False
    return Path(path).resolve() != Path(root).resolve()


def remove_search(name: str, mlflow_runs: bool = False, locked: bool = False) -> list[str]:
    """Remove a search's folders, record and journal (and its MLflow runs); ``locked``: the
    caller holds the name (``run --replace``)."""
    check_name(name)
    record = load_record(name)
    if effective_status(record) == "running" or (not locked and lock_held(name)):
        d = record.driver
        raise UsageError(
            f"search {name!r} is running (pid {d.get('pid')} on {d.get('host')}); stop it first"
        )
    done = []
    root = settings.storage_root()
    # only this search's own folders: what the record names must be where this name puts it
    own = {
        experiment_path(name),
        f"{experiment_path(name)}-confirm",
        f"{experiment_path(name)}-refit",
    }
    for path in (record.path, f"{record.path}-confirm", f"{record.path}-refit"):
        if path not in own or not _inside(path, root):
            if exists(path):
                done.append(f"left {path}: outside this search's own folder under {root}")
            continue
        if exists(path):
            remove_dir(path)
            done.append(f"removed {path}")
    journal = settings.local_state_dir() / "journal" / name
    if journal.exists() and _inside(str(journal), str(settings.local_state_dir())):
        shutil.rmtree(journal)
        done.append(f"removed {journal} (its MLflow journal)")
    if mlflow_runs and (record.tracking_uri or "").startswith(("sqlite", "http", "file", "/")):
        store = tracking.Store(record.tracking_uri)
        n = store.delete_runs(store.runs_of(name))
        done.append(
            f"deleted {n} MLflow run(s) of {name!r} (restorable from the MLflow UI's trash)"
        )
    delete_record(name)
    done.append(f"removed the record of {name!r}")
    if record.spec.baseline:
        done.append(
            f"its baseline search has its own name: sertune search rm {name}--{record.spec.baseline}"
        )
    return done
