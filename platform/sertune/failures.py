"""Why a trial failed, in one line a person can act on (``loss became nan at epoch 3 ...``).

Ray wraps a worker's exception in several layers (``TuneError``, ``WorkerGroupError: Training
failed due to worker errors:``, ``RayTaskError``); the reason is the innermost exception line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .trainable import TrialDiverged

# what the line of a trial's own exception looks like
_REASONS = ("Error:", "Exception:", f"{TrialDiverged.__name__}:", "Stopped:")
_WRAPPERS = (
    "Training failed due to worker errors",
    "WorkerGroupError",
    "TuneError",
    "RayTaskError",
    "ray.exceptions.",
    "The above exception",
    "Traceback (most recent call last)",
)


def error_reason(text: str) -> str:
    """The innermost ``SomethingError: message`` line of a (possibly nested) traceback."""
    # "(RayTrainWorker pid=12) RuntimeError: x" -> "RuntimeError: x"
    lines = [re.sub(r"^\([^)]*\)\s*", "", ln.strip()) for ln in text.splitlines() if ln.strip()]
    candidates = [
        ln
        for ln in lines
        if any(m in ln for m in _REASONS)
        and not any(w in ln for w in _WRAPPERS)
        and not ln.startswith(("File ", "^", "~"))
    ]
    if candidates:
        return _unwrap(candidates[-1])[:500]
    rest = [ln for ln in lines if not any(w in ln for w in _WRAPPERS)]
    return ((rest or lines or ["unknown error"])[-1])[:500]


_RELAY = re.compile(r"^(?:[\w.]+\.)?(?:TrialFailed|TuneError|RayTaskError(?:\([^)]*\))?):\s*")


def _unwrap(line: str) -> str:
    """``sertune.warm.board.TrialFailed: OSError: x`` -> ``OSError: x`` (the warm proxy relays the
    slot's reason inside its own exception)."""
    while (m := _RELAY.match(line)) and line[m.end() :]:
        line = line[m.end() :]
    return line


def trial_error_reason(trial: Any) -> str:
    """The reason of a failed Tune trial: its error file (the full worker traceback) first."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        text = Path(path).read_text(errors="replace")
    if not text:
        try:
            err = trial.get_error()
            text = str(err) if err else ""
        except Exception:  # an old trial object without the method: the file was all we had
            text = ""
    return error_reason(text)
