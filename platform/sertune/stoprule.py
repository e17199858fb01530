"""End a search once its trials can no longer be told apart (``search.stop``).

A search spends its budget telling configurations apart. Once what is left to gain is smaller
than the noise of the objective *as the sampler sees it* (one trial's value: one run, or one
K-fold mean), further trials mostly rank luck. Two rules, checked as each trial ends (never
before ``min_trials`` have ended):

* **terminator** - Optuna's ``Terminator`` criterion: a Gaussian-process regret bound (how much
  better than the best so far the space can still be, ``RegretBoundEvaluator``) against the
  noise; the search stops when the bound falls below it;
* **patience** - ``patience`` trials in a row whose best does not beat the best before them by
  more than equal trials would by luck. Both sides are maxima: the best of ``m`` earlier runs
  overstates their true mean (by ~1.4 sd for m = 8) and so does the best of the ``n`` new ones;
  the threshold is the point that ``max(new) - max(earlier)`` exceeds with probability 0.2 when
  every trial is truly equal (``sertune.stats.max_gain_threshold``, exact for normal noise).
  Stated rates, checked by simulation: with equal trials the rule stops by ``min_trials +
  patience`` in >= 90 % of searches; when the last ``patience`` trials are truly 2 sd better than
  the 8 before them it stops in <= 10 %.

**The noise.** ``search.stop.noise_sd`` when given: what ``sertune bench noise SPEC`` prints as
the objective's "within sd" (with ``--set objective.cv.folds=K`` for a cross-validated search:
the seed-to-seed sd of a K-fold mean). Without it, a search with ``objective.repeats`` R >= 2
estimates it from its own trials: the seed sd between repeats (inside each fold), pooled over
the ended trials, divided by √(K·R) for the mean the sampler sees. Never the folds' standard
error: that spread is mostly which speakers fall in a fold, shared by every trial and cancelled
when two trials are compared on the same folds. Until an estimate exists the rules wait, and say
so once.

The search then ends as ``finished``, one line says which rule stopped it and how many trials it
saved, and the same goes on the parent run (tag ``sertune.stopped_by``, and its note).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback, Stopper

from . import stats
from .spec import ParamSpec, SearchSpec, StopSpec
from .trainable import objective_value

MIN_NOISE_DF = 4  # the search's own seed noise acts once it rests on >= 4 degrees of freedom

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
        folds: int = 1,
        log: Callable[[str], None] = print,
    ):
        self.key, self.rule, self.metric, self.mode = key, rule, metric, mode
        self.space, self.budget = space, budget  # the space: the terminator's model of it
        self.folds = max(1, folds)  # K: a trial's objective is the mean over K folds x R repeats
        self.log = log
        self.ended: list[Ended] = []
        # the seed noise inside the search: per ended replicated trial, (pooled sd, df, jobs)
        self.seed_noise: list[tuple[float, int, int]] = []
        self.tripped: str | None = None
        self.waiting_said = False
        _ACTIVE[key] = self

    @classmethod
    def of(
        cls, spec: SearchSpec, key: str, log: Callable[[str], None] = print
    ) -> NoiseStop | None:
        if spec.search.stop is None:
            return None
        m, cv = spec.metrics[0], spec.objective.cv
        return cls(
            key,
            spec.search.stop,
            m.metric,
            m.mode,
            dict(spec.space),
            spec.budget.trials,
            folds=cv.folds if cv is not None else 1,
            log=log,
        )

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the search state
        return {**self.__dict__, "ended": [], "seed_noise": [], "tripped": None, "log": print}

    def stopper(self) -> NoiseStopper:
        return NoiseStopper(self.key)

    def close(self) -> None:
        _ACTIVE.pop(self.key, None)

    # -- Tune's events ---------------------------------------------------------------------------
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        config = trial.config or {}  # the search's own trials: Optuna's flat configurations
        params = {k: config[k] for k in self.space if k in config}
        self.observe(
            params, objective_value(last, self.metric), len(trials), jobs_of(last, self.metric)
        )

    def seed_from(self, result: Any) -> None:
        """A resumed search: the trials that ended before, in the order they started."""
        rows = sorted(result.rows, key=lambda r: r.get("started") or 0)
        for r in rows:
            if r["state"] in ("finished", "stopped"):
                self.observe(r["config"], r.get(self.metric), jobs=jobs_of(r, self.metric))

    # -- the noise -------------------------------------------------------------------------------
    @property
    def noise(self) -> float | None:
        """The sd of one trial's objective as the sampler sees it: ``noise_sd``, else the search's
        own seed noise (repeats) for the mean of its K x R jobs; None while unknown."""
        if self.rule.noise_sd is not None:
            return float(self.rule.noise_sd)
        if not self.seed_noise:
            return None
        pooled = stats.pooled_sd(
            [s for s, _, _ in self.seed_noise], [d for _, d, _ in self.seed_noise]
        )
        if pooled is None or pooled[1] < MIN_NOISE_DF:  # too few repeats to trust it yet
            return None
        jobs = self.seed_noise[-1][2]
        return pooled[0] / math.sqrt(jobs)

    def _noise_words(self) -> str:
        if self.rule.noise_sd is not None:
            return f"noise_sd {self.noise:.4g}"
        return f"the trials' own seed noise {self.noise:.4g} (from their repeats)"

    # -- the rules -------------------------------------------------------------------------------
    def observe(
        self,
        params: dict[str, Any],
        value: Any,
        started: int | None = None,
        jobs: dict[str, float] | None = None,
    ) -> None:
        """One ended trial (``started``: how many trials the search has begun so far; ``jobs``:
        a replicated trial's objective per job label, ``fold<k>.rep<r>`` / ``rep<r>``)."""
        if self.tripped or not isinstance(value, (int, float)) or not math.isfinite(value):
            return
        self.ended.append(Ended(params, float(value)))
        if jobs:
            seed = repeat_noise(jobs)
            if seed is not None:
                self.seed_noise.append(seed)
        if len(self.ended) < self.rule.min_trials:
            return
        if self.noise is None:
            if not self.waiting_said:
                self.waiting_said = True
                self.log(
                    f"[sertune] the stop rule waits: no estimate of {self.metric}'s noise yet (give "
                    "search.stop.noise_sd from `sertune bench noise`, or objective.repeats >= 2)"
                )
            return
        started = max(started or 0, len(self.ended))
        why = self.patience_exhausted() or self.terminator_says()
        if why:
            saved = max(0, self.budget - started)
            self.tripped = f"{why}; {started} of {self.budget} trials run, {saved} saved"

    def patience_exhausted(self) -> str | None:
        n = self.rule.patience
        if not n or len(self.ended) <= n or self.noise is None:
            return None
        sign = 1 if self.mode == "max" else -1
        before = [sign * e.value for e in self.ended[:-n]]
        after = [sign * e.value for e in self.ended[-n:]]
        threshold = stats.max_gain_threshold(len(before), n) * self.noise
        gain = max(after) - max(before)
        if gain > threshold:
            return None
        best = sign * max(before)
        return (
            f"stopped by patience: the best of the last {n} trials does not beat the best "
            f"{self.metric} before them ({best:.4f}) by more than equal trials would by luck "
            f"({threshold:.4f} = {threshold / self.noise:.2f} x {self._noise_words()})"
        )

    def terminator_says(self) -> str | None:
        if not self.rule.terminator:
            return None
        noise = self.noise
        bound = self.regret_bound()
        if bound is None or noise is None or bound >= noise:
            return None
        return (
            f"stopped by the terminator: the best {self.metric} can still improve by at most "
            f"{bound:.4f} (Optuna's regret bound), below {self._noise_words()}"
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


def jobs_of(result: dict[str, Any], metric: str) -> dict[str, float]:
    """A replicated trial's objective per job (``<label>/<metric>``) from its result."""
    out = {}
    for k, v in result.items():
        label, _, name = str(k).partition("/")
        if name == metric and ("rep" in label) and isinstance(v, (int, float)):
            out[label] = float(v)
    return out


def repeat_noise(jobs: dict[str, float]) -> tuple[float, int, int] | None:
    """One trial's seed noise from its repeats: the sd between repeats inside each fold, pooled
    over folds -> (sd of one job, its df, the number of jobs); None without two repeats."""
    folds: dict[str, list[float]] = {}
    for label, v in jobs.items():
        folds.setdefault(stats.unit_of(label) if label.startswith("fold") else "", []).append(v)
    parts = [stats.summary(v) for v in folds.values() if len(v) > 1]
    pooled = stats.pooled_sd([p.sd for p in parts], [p.df for p in parts])
    if pooled is None:
        return None
    return pooled[0], pooled[1], len(jobs)


class NoiseStopper(Stopper):
    """Tune's handle on :class:`NoiseStop`: ends the experiment once a rule has tripped."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        rule = _ACTIVE.get(self.key)
        return bool(rule and rule.tripped)
