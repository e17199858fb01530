"""End a search once its trials can no longer be told apart (``search.stop``).

A search spends its budget telling configurations apart. Once what is left to gain is smaller
than one run's noise of the objective (``search.stop.noise_sd``: the "within sd" that
``sertune bench noise`` measures on the corpus), further trials mostly rank luck. Two rules,
checked as each trial ends (never before ``min_trials`` have ended):

* **terminator** - Optuna's ``Terminator`` criterion: a Gaussian-process regret bound (how much
  better than the best so far the space can still be, ``RegretBoundEvaluator``) against the
  noise (``StaticErrorEvaluator(noise_sd)``); the search stops when the bound falls below it;
* **patience** - ``patience`` trials in a row none of which beat the best so far by more than
  the smallest difference two trials resolve at 95 % (``1.96 · √2 · noise``).

The noise is ``noise_sd`` when given; with a cross-validated objective (``objective.cv``) and no
``noise_sd``, it is the median of the ended trials' ``<objective>_se`` (the standard error of
their fold means: Optuna's cross-validation error, measured by the search itself).

The search then ends as ``finished``, one line says which rule stopped it and how many trials it
saved, and the same goes on the parent run (tag ``sertune.stopped_by``, and its note).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback, Stopper

from .spec import ParamSpec, SearchSpec, StopSpec

Z95 = 1.959964

# Tune keeps the stopper it pickled when a search resumes: the stopper finds its live rule here.
_ACTIVE: dict[str, NoiseStop] = {}


@dataclass
class Ended:
    """One ended trial as the rules see it: its searched parameters and its objective."""

    params: dict[str, Any]
    value: float


class NoiseStop(Callback):
    """Watches trials end; ``tripped`` says why the search stops, once it must."""

    def __init__(
        self,
        key: str,
        rule: StopSpec,
        metric: str,
        mode: str,
        space: dict[str, ParamSpec],
        budget: int,
    ):
        self.key, self.rule, self.metric, self.mode = key, rule, metric, mode
        self.space, self.budget = space, budget  # the space: the terminator's model of it
        self.ended: list[Ended] = []
        self.errors: list[float] = []  # the ended trials' <objective>_se (cross-validated)
        self.tripped: str | None = None
        _ACTIVE[key] = self

    @classmethod
    def of(cls, spec: SearchSpec, key: str) -> NoiseStop | None:
        if spec.search.stop is None:
            return None
        m = spec.metrics[0]
        return cls(key, spec.search.stop, m.metric, m.mode, dict(spec.space), spec.budget.trials)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the search state
        return {**self.__dict__, "ended": [], "errors": [], "tripped": None}

    def stopper(self) -> NoiseStopper:
        return NoiseStopper(self.key)

    def close(self) -> None:
        _ACTIVE.pop(self.key, None)

    # -- Tune's events ---------------------------------------------------------------------------
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        config = trial.config or {}  # the search's own trials: Optuna's flat configurations
        params = {k: config[k] for k in self.space if k in config}
        self.observe(params, last.get(self.metric), len(trials), last.get(f"{self.metric}_se"))

    def seed_from(self, result: Any) -> None:
        """A resumed search: the trials that ended before, in the order they started."""
        rows = sorted(result.rows, key=lambda r: r.get("started") or 0)
        for r in rows:
            if r["state"] in ("finished", "stopped"):
                self.observe(r["config"], r.get(self.metric), error=r.get(f"{self.metric}_se"))

    # -- the rules -------------------------------------------------------------------------------
    @property
    def noise(self) -> float:
        """One trial's noise of the objective: ``noise_sd``, else the median fold se so far."""
        if self.rule.noise_sd is not None:
            return float(self.rule.noise_sd)
        errors = sorted(self.errors)
        return errors[len(errors) // 2] if errors else math.inf

    @property
    def resolvable(self) -> float:
        """The smallest difference between two trials told apart at 95 %."""
        return Z95 * math.sqrt(2) * self.noise

    def observe(
        self,
        params: dict[str, Any],
        value: Any,
        started: int | None = None,
        error: Any = None,
    ) -> None:
        """One ended trial (``started``: how many trials the search has begun so far;
        ``error``: its objective's standard error over folds, cross-validated)."""
        if self.tripped or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self.ended.append(Ended(params, float(value)))
        if isinstance(error, (int, float)) and math.isfinite(error):
            self.errors.append(float(error))
        if len(self.ended) < self.rule.min_trials:
            return
        started = max(started or 0, len(self.ended))
        why = self.patience_exhausted() or self.terminator_says()
        if why:
            saved = max(0, self.budget - started)
            self.tripped = f"{why}; {started} of {self.budget} trials run, {saved} saved"

    def _better(self, a: float, b: float) -> bool:
        """``a`` beats ``b`` by more than the noise resolves."""
        gain = a - b if self.mode == "max" else b - a
        return gain > self.resolvable

    def patience_exhausted(self) -> str | None:
        n = self.rule.patience
        if not n or len(self.ended) <= n:
            return None
        pick = max if self.mode == "max" else min
        before = pick(e.value for e in self.ended[:-n])
        if any(self._better(e.value, before) for e in self.ended[-n:]):
            return None
        return (
            f"stopped by patience: {n} trials in a row without beating the best "
            f"{self.metric} ({before:.4f}) by more than the noise resolves "
            f"({self.resolvable:.4f} = 1.96·√2·{self.noise:.4g})"
        )

    def terminator_says(self) -> str | None:
        if not self.rule.terminator:
            return None
        bound = self.regret_bound()
        if bound is None or bound >= self.noise:
            return None
        what = "one run's noise" if self.rule.noise_sd is not None else "the folds' median se"
        return (
            f"stopped by the terminator: the best {self.metric} can still improve by at most "
            f"{bound:.4f} (Optuna's regret bound), below {what} {self.noise:.4g}"
        )

    def regret_bound(self) -> float | None:
        """Optuna's regret bound of the ended trials (None while it cannot be computed)."""
        import warnings

        import optuna
        from optuna.terminator import RegretBoundEvaluator

        distributions = {k: p.distribution() for k, p in self.space.items()}
        trials = [
            optuna.trial.create_trial(
                params={k: e.params[k] for k in distributions},
                distributions=distributions,
                value=e.value,
            )
            for e in self.ended
            if all(k in e.params for k in distributions)
        ]
        if len(trials) < 2:
            return None
        direction = (
            optuna.study.StudyDirection.MAXIMIZE
            if self.mode == "max"
            else optuna.study.StudyDirection.MINIMIZE
        )
        with warnings.catch_warnings():  # "experimental": the interface may change, not the idea
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            evaluator = RegretBoundEvaluator(
                min_n_trials=min(len(trials), self.rule.min_trials), seed=0
            )
            return float(evaluator.evaluate(trials, direction))


class NoiseStopper(Stopper):
    """Tune's handle on :class:`NoiseStop`: ends the experiment once a rule has tripped."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        rule = _ACTIVE.get(self.key)
        return bool(rule and rule.tripped)
