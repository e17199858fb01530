"""One line per event while a search runs: trial started, epoch reported, stopped, failed."""

from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback


class ProgressPrinter(Callback):
    def __init__(self, spec: Any, log=print):
        self.metrics = [m.metric for m in spec.objective.as_list()]
        self.max_epochs = spec.budget.max_epochs
        self.budget = spec.budget.trials
        self.log = log
        self.t0 = time.monotonic()
        self.done = 0

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.1f}s]"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cfg = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items()
        )
        self.log(f"{self._stamp()} trial {trial.trial_id} started: {cfg}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        vals = "  ".join(
            f"{m}={result[m]:.3f}" for m in self.metrics if isinstance(result.get(m), (int, float))
        )
        epoch = result.get("training_iteration", "?")
        self.log(f"{self._stamp()} trial {trial.trial_id} epoch {epoch}/{self.max_epochs}  {vals}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        how = (
            "finished"
            if epochs >= self.max_epochs
            else f"stopped early by the scheduler at epoch {epochs}"
        )
        self.log(
            f"{self._stamp()} trial {trial.trial_id} {how} ({self.done}/{self.budget} trials done)"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        from .tracking import trial_error_reason

        self.log(f"{self._stamp()} trial {trial.trial_id} FAILED: {trial_error_reason(trial)}")
