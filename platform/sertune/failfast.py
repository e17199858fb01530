"""Stop a search whose trials all fail the same way, instead of burning its whole budget.

Two rules, checked as each trial ends:

* **the environment**: a trial that fails on a library that does not import or load (an
  ``ImportError``, an ``OSError`` about a shared library, ``sertune doctor``'s refusal) stops the
  search at once - every other trial would fail the same way;
* **the same reason**: when the first ``max(2, concurrency)`` trials to end all failed with the
  same reason (numbers aside), the search stops too. A trial that diverged (``loss became nan``)
  says something about its configuration, not the search, and never counts.

The search then ends as ``failed`` with one line naming the cause (exit 1); the confirmation and
the baseline do not start. Ray's tracebacks of the failed trials are in the search's log file.
"""

from __future__ import annotations

import re
from typing import Any

from ray.tune import Callback, Stopper

from .failures import trial_error_reason
from .trainable import TrialDiverged

_ENV_PATTERNS = (
    r"^(ImportError|ModuleNotFoundError)\b",
    r"^EnvironmentProblem\b",
    r"undefined symbol",
    r"cannot open shared object file",
    r"Could not load this library",
    r"DLL load failed",
    r"GLIBC(XX)?_[\d.]+' not found",
)
# a diverged trial is its configuration's fault (the trainable raised TrialDiverged)
_NEVER_COUNTED = f"{TrialDiverged.__name__}:"

# Tune keeps the stopper it pickled when a search resumes: the stopper finds its live watcher here.
_ACTIVE: dict[str, FailFast] = {}


def is_environment_error(reason: str) -> bool:
    return any(re.search(p, reason) for p in _ENV_PATTERNS)


def same_reason_key(reason: str) -> str:
    """Two failures are the same when they differ only in numbers and ids."""
    return re.sub(r"\b[0-9a-f]{5,}\b|\d+(\.\d+)?", "#", reason)


class FailFast(Callback):
    """Watches trials end; ``tripped`` names the cause once the search must stop."""

    def __init__(self, key: str, first: int):
        self.key, self.first = key, max(2, first)
        self.ended: list[str | None] = []  # None: a trial that did not fail
        self.tripped: str | None = None
        _ACTIVE[key] = self

    def __getstate__(self) -> dict:
        return {"key": self.key, "first": self.first, "ended": [], "tripped": None}

    def stopper(self) -> FailFastStopper:
        return FailFastStopper(self.key)

    def close(self) -> None:
        _ACTIVE.pop(self.key, None)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.ended.append(None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.observe(trial_error_reason(trial))

    def observe(self, reason: str) -> None:
        """One failed trial's reason (the innermost exception line)."""
        if self.tripped:
            return
        if _NEVER_COUNTED in reason:
            self.ended.append(None)
            return
        self.ended.append(reason)
        if is_environment_error(reason):
            self.tripped = (
                f"a trial failed on the environment, so every trial would: {reason} "
                "(run `sertune doctor`)"
            )
            return
        head = self.ended[: self.first]
        if len(head) == self.first and all(head) and len({same_reason_key(r) for r in head}) == 1:
            self.tripped = f"the first {self.first} trials all failed the same way: {head[-1]}"


class FailFastStopper(Stopper):
    """Tune's handle on :class:`FailFast`: ends the experiment once it has tripped."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        watcher = _ACTIVE.get(self.key)
        return bool(watcher and watcher.tripped)
