"""Free space on a search's local folders: checked before a search starts, watched while it runs.

A full disk mid-search cuts Tune's state files and MLflow's SQLite store in the middle of a
write. So a search refuses to start below ``settings.min_free_mb()`` (one line, exit 2), and while
it runs a watcher stops it, as ``interrupted`` and resumable, once a folder falls below half of
that floor (``settings.min_free_running_mb()``) - before the disk is full, so everything that
ran is saved whole."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from . import settings
from .errors import UsageError

MB = 1 << 20


def _free_mb(path: Path) -> float:
    p = path
    while not p.exists() and p != p.parent:  # a folder not made yet: the disk it will be on
        p = p.parent
    return shutil.disk_usage(p).free / MB


def lowest() -> tuple[Path, float]:
    """The local search folder with the least free space, and that space in MB."""
    return min(((p, _free_mb(p)) for p in settings.local_folders()), key=lambda t: t[1])


def check_free_space() -> None:
    """Refuse to start when a local folder has less than the floor free (one line, exit 2)."""
    path, free = lowest()
    floor = settings.min_free_mb()
    if free < floor:
        raise UsageError(
            f"{path}: {free:.0f} MB free, below the {floor:.0f} MB a search needs to start "
            "(free some space, or set SERTUNE_MIN_FREE_MB)"
        )


class DiskWatch:
    """While a search runs: below half the floor, say so in one line and stop the search as if
    SIGTERM had come (it ends ``interrupted``; ``sertune search resume`` continues it)."""

    def __init__(self, log: Callable[[str], None], name: str, period_s: float = 2.0):
        self.log, self.name, self.period_s = log, name, period_s
        self.tripped: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sertune-disk-watch", daemon=True)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            path, free = lowest()
            floor = settings.min_free_running_mb()
            if free < floor:
                self.tripped = f"{path}: {free:.0f} MB free (below {floor:.0f} MB)"
                self.log(
                    f"[sertune] disk nearly full: {self.tripped}; stopping the search with its "
                    f"state saved. Free some space, then: sertune search resume {self.name}"
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return
