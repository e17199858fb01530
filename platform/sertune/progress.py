"""One line per event while a search runs: trial started, epoch reported, stopped, failed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from .failures import trial_error_reason
from .leaderboard import trial_epochs
from .spec import SearchSpec
from .trainable import PBT_EXPLOITED_EPOCH, PBT_EXPLOITED_FROM, SCHEDULE_PREFIX


def short_config(config: dict[str, Any]) -> str:
    from .tuner import flat_config

    config = flat_config(config)
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in config.items()
        if not k.startswith("__")
    )


def _se(result: dict, metric: str, folds: int) -> str:
    """`` ± se (folds 0.61 0.55 0.70)`` for a cross-validated trial's figure."""
    se = result.get(f"{metric}_se")
    if not folds or not isinstance(se, (int, float)):
        return ""
    each = " ".join(f"{result.get(f'fold{k}/{metric}', float('nan')):.2f}" for k in range(folds))
    return f" ± {se:.3f} (folds {each})"


class ProgressPrinter(Callback):
    def __init__(
        self, spec: SearchSpec, log: Callable[[str], None] = print, budget: int | None = None
    ):
        self.metrics = [m.metric for m in spec.metrics]
        self.max_epochs = spec.budget.max_epochs
        self.budget = budget or spec.budget.trials
        self.log = log
        self.folds = spec.objective.cv.folds if spec.objective.cv else 0
        self.t0 = time.monotonic()
        self.done = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "log": print}

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.1f}s]"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        jobs = f" ({self.folds} fold jobs)" if self.folds else ""
        self.log(
            f"{self._stamp()} trial {trial.trial_id} started{jobs}: {short_config(trial.config)}"
        )

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        vals = "  ".join(
            f"{m}={result[m]:.3f}" + _se(result, m, self.folds)
            for m in self.metrics
            if isinstance(result.get(m), (int, float))
        )
        if result.get(PBT_EXPLOITED_FROM):
            now = ", ".join(
                f"{k.removeprefix(SCHEDULE_PREFIX)}={v:.3g}"
                for k, v in result.items()
                if k.startswith(SCHEDULE_PREFIX)
            )
            self.log(
                f"{self._stamp()} trial {trial.trial_id} took trial "
                f"{result[PBT_EXPLOITED_FROM]}'s checkpoint at epoch "
                f"{result.get(PBT_EXPLOITED_EPOCH)} and goes on with {now}"
            )
        self.log(
            f"{self._stamp()} trial {trial.trial_id} epoch {trial_epochs(result)}/{self.max_epochs}  {vals}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        epochs = trial_epochs(trial.last_result or {})
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
        self.log(f"{self._stamp()} trial {trial.trial_id} FAILED: {trial_error_reason(trial)}")
