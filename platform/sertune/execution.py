"""Where a driver's trials run, shared by a search's phases (and its baseline): warm slots
(:class:`WarmExecution`, the default) or one Ray Train run per trial (:class:`PerTrialExecution`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .records import experiment_path
from .search_logger import Evaluator
from .spec import SearchSpec
from .tuner import TrialPlan

if TYPE_CHECKING:
    from .warm import SlotPool

Log = Callable[[str], None]


class Execution(ABC):
    """Where a driver's trials run, shared by its phases: :class:`WarmExecution` (the default)
    or :class:`PerTrialExecution`. ``tune_trainable`` is what Ray Tune runs for each trial."""

    @abstractmethod
    def tune_trainable(self, plan: TrialPlan) -> Any:
        """The trainable Ray Tune runs for each trial of a phase."""

    @abstractmethod
    def evaluator(self, plan: TrialPlan) -> Evaluator:
        """What evaluates the best checkpoints of trials a scheduler stopped."""

    @abstractmethod
    def reuse_actors(self, fifo: bool) -> bool:
        """Whether Tune may reuse a trial's actor (``fifo``: nothing stops trials early)."""

    def close(self) -> None:  # noqa: B027 - per-trial runs hold nothing between trials
        """Release what outlives trials (the warm slots)."""

    @staticmethod
    def start(spec: SearchSpec, name: str, n_slots: int, log: Log = print) -> Execution:
        if spec.execution == "warm":
            return WarmExecution(spec, name, n_slots, log)
        return PerTrialExecution()


class WarmExecution(Execution):
    """Warm slots: long-lived Train worker groups that take trial after trial."""

    def __init__(self, spec: SearchSpec, name: str, n_slots: int, log: Log = print):
        from .warm import SlotPool

        self.pool: SlotPool = SlotPool(
            spec.resources.model_dump(),
            spec.device,
            max(1, int(spec.resources.cpus_per_worker)),
            spec.budget.trial_max_failures,
            experiment_path(name),
            n_slots,
            log,
        ).start()

    def tune_trainable(self, plan: TrialPlan) -> Any:
        return self.pool.trainable(plan)

    def evaluator(self, plan: TrialPlan) -> Evaluator:
        from .warm import BoardEvaluator

        return BoardEvaluator(self.pool, plan)

    def reuse_actors(self, fifo: bool) -> bool:
        return True  # warm proxies reset in microseconds

    def close(self) -> None:
        self.pool.close()


class PerTrialExecution(Execution):
    """One Ray Train run per trial (``execution: per_trial``)."""

    def tune_trainable(self, plan: TrialPlan) -> Any:
        from ray import tune

        from .trials import run_trial

        # The trial function only drives a TorchTrainer; the workers hold the CPUs and GPUs (a
        # tiny memory request keeps the bundle non-empty without taking a CPU from them).
        return tune.with_resources(
            tune.with_parameters(run_trial, plan=plan), {"CPU": 0, "memory": 1 << 20}
        )

    def evaluator(self, plan: TrialPlan) -> Evaluator:
        from .trials import TaskEvaluator

        return TaskEvaluator(plan)

    def reuse_actors(self, fifo: bool) -> bool:
        # A per-trial run stopped by ASHA is still inside TorchTrainer.fit() when Tune resets
        # its actor, and Ray 2.60 then fails the *next* trial: reuse only where nothing stops
        # trials early (FIFO).
        return fifo
