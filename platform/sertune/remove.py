"""``sertune search rm``: remove a search's trials, checkpoints, record and (optionally) runs."""

from __future__ import annotations

import shutil

from . import settings, tracking
from .errors import UsageError
from .records import delete_record, effective_status, load_record
from .storage import exists, remove_dir


def remove_search(name: str, mlflow_runs: bool = False) -> list[str]:
    record = load_record(name)
    if effective_status(record) == "running":
        d = record.driver
        raise UsageError(
            f"search {name!r} is running (pid {d.get('pid')} on {d.get('host')}); stop it first"
        )
    done = []
    for path in (record.path, f"{record.path}-confirm"):
        if "://" in path or path.startswith("/"):
            if exists(path):
                remove_dir(path)
                done.append(f"removed {path}")
    journal = settings.local_state_dir() / "journal" / name
    if journal.exists():
        shutil.rmtree(journal)
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
