"""One line per event while a search runs: trial started, epoch reported, stopped, failed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from .failures import trial_error_reason
from .leaderboard import trial_epochs
from .spec import SearchSpec
from .trainable import PBT_EXPLOITED_EPOCH, PBT_EXPLOITED_FROM, SCHEDULE_PREFIX, SLOT_NOTE


def short_config(config: dict[str, Any]) -> str:
    from .tuner import flat_config

    config = flat_config(config)
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in config.items()
        if not k.startswith("__")
    )


def _se(result: dict, metric: str, labels: list[str], kind: str = "fold") -> str:
    """`` ± se (folds 0.61 0.55 0.70)`` for a replicated trial's figure (its jobs' values)."""
    se = result.get(f"{metric}_se")
    if not labels or not isinstance(se, (int, float)):
        return ""
    each = " ".join(f"{result.get(f'{lb}/{metric}', float('nan')):.2f}" for lb in labels)
    return f" ± {se:.3f} ({kind}s {each})"


class ProgressPrinter(Callback):
    def __init__(
        self, spec: SearchSpec, log: Callable[[str], None] = print, budget: int | None = None
    ):
        self.metrics = [m.metric for m in spec.metrics]
        self.max_epochs = spec.budget.max_epochs
        self.budget = budget or spec.budget.trials
        self.log = log
        self.labels = [r.label for r in spec.objective.replicas]
        self.kind = spec.objective.replica_kind if self.labels else ""
        self.t0 = time.monotonic()
        self.done = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "log": print}

    def _stamp(self) -> str:
        return f"[{time.monotonic() - self.t0:6.1f}s]"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from .tuner import flat_config

        jobs = f" ({len(self.labels)} {self.kind} jobs)" if self.labels else ""
        if flat_config(trial.config).get("__refit_of"):
            jobs = " (the refit: one job on every fold's training speakers)"
        self.log(
            f"{self._stamp()} trial {trial.trial_id} started{jobs}: {short_config(trial.config)}"
        )

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        from .tuner import epochs_of

        vals = "  ".join(
            f"{m}={result[m]:.3f}"
            + _se(result, m, self.labels, "run" if " x " in self.kind else self.kind)
            for m in self.metrics
            if isinstance(result.get(m), (int, float))
        )
        if result.get(SLOT_NOTE):
            self.log(f"{self._stamp()} trial {trial.trial_id}: {result[SLOT_NOTE]}")
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
            f"{self._stamp()} trial {trial.trial_id} epoch {trial_epochs(result)}/"
            f"{epochs_of(self.max_epochs, trial.config)}  {vals}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from .tuner import epochs_of

        self.done += 1
        epochs = trial_epochs(trial.last_result or {})
        how = (
            "finished"
            if epochs >= epochs_of(self.max_epochs, trial.config)
            else f"stopped early by the scheduler at epoch {epochs}"
        )
        self.log(
            f"{self._stamp()} trial {trial.trial_id} {how} ({self.done}/{self.budget} trials done)"
        )

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.done += 1
        self.log(f"{self._stamp()} trial {trial.trial_id} FAILED: {trial_error_reason(trial)}")
