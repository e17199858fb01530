"""The one place that builds a Ray Tune ``Tuner`` from a validated spec.

* Optuna proposes configurations with the spec's ``search.sampler`` (TPE by default; random,
  CMA-ES, GP, NSGA-II, grid - ``sertune.strategies``) over the spec's ``space`` plus an optional
  define-by-run function, seeded with earlier searches' trials (``search.warm_start``).
* ``search.scheduler`` stops weak trials early (ASHA by default, async Hyperband, median stopping)
  on the trial's real epoch (``sertune.trainable.EPOCHS_DONE``, not Tune's iteration counter,
  which restarts when a crashed search resumes). Multi-objective and confirmation runs go FIFO (every trial runs all
  epochs).
* ``max_concurrent_trials`` bounds concurrency; the trials themselves are thin (``sertune.warm``
  in warm mode, ``sertune.trials`` per trial) and hold no CPUs: the Train workers do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

from . import ray_compat, settings, strategies
from .records import experiment_path
from .spec import (
    REPEAT_SEED_STRIDE,
    Condition,
    ParamSpec,
    Replica,
    SearchSpec,
    load_define_by_run,
)
from .storage import fs_and_path
from .trainable import EPOCHS_DONE, EPOCHS_PARAM, KEPT_PREFIX, get_trainable

TIME_ATTR = strategies.TIME_ATTR


def tune_callbacks(callbacks: list[Any]) -> list[Any]:
    """Ours, plus Tune's JSON and CSV result files (``search status`` and analyses read them).
    Tune's automatic TensorBoard writer is left out: nobody reads it, and at a thousand trials
    it is a few percent of the driver's time."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    return [*callbacks, JsonLoggerCallback(), CSVLoggerCallback()]


class SpaceFunction:
    """Suggest every ``space`` entry, then call the user's define-by-run function if any.

    A picklable object (not a closure) so Tune can checkpoint the searcher and resume it.
    """

    def __init__(self, space: dict[str, ParamSpec], define_by_run: str | None, base: str):
        self.space, self.define_by_run, self.base = space, define_by_run, base

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        for name, p in self.space.items():
            # a searcher saved before the space was typed holds plain dicts
            (p if isinstance(p, ParamSpec) else ParamSpec(**p)).suggest(trial, name)
        if self.define_by_run:
            fn = load_define_by_run(self.define_by_run, Path(self.base))
            return fn(trial)
        return None


class ConstrainedOptunaSearch(OptunaSearch):
    """Ray Tune's ``OptunaSearch`` that sets each ended trial's constraint values
    (``objective.constraints``; Optuna's ``Trial.set_constraint``, <= 0 where one holds) before it
    tells Optuna the trial's objective: TPE, GP and NSGA-II then steer away from infeasible
    regions. A figure the trial did not report (stopped by the scheduler before its end-of-trial
    report) counts as failing by 1; a warm start's trials carry none and count as feasible."""

    def __init__(self, *args: Any, conditions: list[Condition], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.conditions = conditions

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        trial = ray_compat.optuna_trial(self, trial_id)
        if trial is not None and result and trial_id not in getattr(self, "_completed_trials", ()):
            for c in self.conditions:
                trial.set_constraint(str(c), c.violation(result.get(c.metric)))
        super().on_trial_complete(trial_id, result, error)


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a search shares: passed once through ``tune.with_parameters`` to the
    trials' proxies (warm) or trial functions (per trial), and on to the evaluators."""

    trainable: str
    params: dict[str, Any]  # the spec's fixed parameters, epochs and seed included
    data: dict[str, Any]  # the trainable's prepared data (the cache), without its report
    run: dict[str, Any]  # device, threads, step cap, robustness options, the checkpoint metric
    resources: dict[str, Any]
    max_epochs: int
    train_storage: str  # <search>/_train: every trial's epoch checkpoints
    max_failures: int  # worker-group restarts a trial may use
    mutable: tuple[str, ...] = ()  # population-based training: the perturbed parameters
    cv_folds: int = 0  # a cross-validated objective: K speaker folds (0: the plain split)
    # a replicated trial's jobs (objective.cv folds x objective.repeats seeds); (): one job
    replicas: tuple[Replica, ...] = ()
    # (metric, mode) whose per-epoch curves pick the kept epoch (the select metric first) and
    # get ``kept/<metric>`` (:class:`KeptCurves`); (): none (a refit keeps its last epoch)
    kept: tuple[tuple[str, str], ...] = ()


def trial_plan(spec: SearchSpec, name: str, data: dict[str, Any]) -> TrialPlan:
    """The :class:`TrialPlan` of a search."""
    plugin = get_trainable(spec.trainable)
    return TrialPlan(
        trainable=spec.trainable,
        params={**spec.params, EPOCHS_PARAM: spec.budget.max_epochs, "seed": spec.seed},
        data={k: v for k, v in data.items() if k != "report"},
        run={
            "device": spec.device,
            "threads": max(1, int(spec.resources.cpus_per_worker)),
            "max_steps_per_epoch": spec.budget.max_steps_per_epoch,
            "robustness": spec.robustness_options(),
            "select": spec.select_metric(plugin).model_dump(),
            # where each slot keeps the corpus (trainables.common.placement)
            "data_placement": spec.resources.model_dump(
                include={
                    "corpus_on_device",
                    "corpus_budget_mb",
                    "gpus_per_worker",
                    "cpus_per_worker",
                }
            ),
        },
        resources=spec.resources.model_dump(),
        max_epochs=spec.budget.max_epochs,
        train_storage=f"{experiment_path(name)}/_train",
        max_failures=spec.budget.trial_max_failures,
        mutable=tuple(pbt_parameters(spec)),
        cv_folds=spec.objective.cv.folds if spec.objective.cv else 0,
        replicas=spec.objective.replicas,
        kept=kept_metrics(spec, plugin),
    )


def kept_metrics(spec: SearchSpec, plugin: Any) -> tuple[tuple[str, str], ...]:
    """The select metric, then every objective reported each epoch: (metric, mode)."""
    select = spec.select_metric(plugin)
    out = [(select.metric, select.mode)]
    for m in spec.objective.as_list():
        if m.metric in plugin.epoch_metrics and m.metric != select.metric:
            out.append((m.metric, m.mode))
    return tuple(out)


class KeptCurves:
    """A trial's per-epoch curves of :attr:`TrialPlan.kept` as the control plane relays them
    (under cross-validation, the fold means), kept in the search's storage so a resumed driver
    has the epochs relayed before; :meth:`add` returns what each relayed epoch gets
    (``sertune.trainable.kept_figures``)."""

    def __init__(self, plan: TrialPlan, trial_id: str):
        self.kept = dict(plan.kept)
        self.uri = f"{plan.train_storage}/_curves/{trial_id}.json"
        self.curves: dict[str, dict[int, float]] | None = None

    def _load(self) -> dict[str, dict[int, float]]:
        import json

        from .storage import exists, read_text

        curves: dict[str, dict[int, float]] = {m: {} for m in self.kept}
        try:
            if exists(self.uri):
                for m, curve in json.loads(read_text(self.uri)).items():
                    if m in curves:
                        curves[m] = {int(e): float(v) for e, v in curve.items()}
        except (OSError, ValueError):  # unreadable: start the curve again from here
            pass
        return curves

    def add(self, metrics: dict[str, Any]) -> dict[str, Any]:
        import json
        import math

        from .storage import is_remote, write_text
        from .trainable import kept_figures

        if not self.kept or EPOCHS_DONE not in metrics:
            return {}
        if self.curves is None:
            self.curves = self._load()
        epoch = int(metrics[EPOCHS_DONE]) - 1
        for m, curve in self.curves.items():
            v = metrics.get(m)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                curve[epoch] = float(v) if math.isfinite(v) else math.nan
            for later in [e for e in curve if e > epoch]:  # a trial restarted from an earlier
                del curve[later]  # epoch (a population-based exploit) trains those again
        try:
            if not is_remote(self.uri):  # a local store's folders are made, a bucket has none
                Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            write_text(self.uri, json.dumps(self.curves))
        except OSError:  # the figures still stand; only a resumed driver would miss them
            pass
        return kept_figures(self.curves, self.kept)


def refit_plan(plan: TrialPlan) -> TrialPlan:
    """The refit of a cross-validated search (``confirm.refit``): one job, trained on every
    fold's training speakers (``data.cv.refit``), its model the last epoch (the point sets the
    epochs to the search's best epoch count; the validation speakers are trained on)."""
    return replace(
        plan,
        replicas=(),
        data={**plan.data, "cv": {"fold": 0, "folds": plan.cv_folds, "refit": True}},
        run={**plan.run, "select": {"metric": EPOCHS_DONE, "mode": "max"}},
    )


def pbt_parameters(spec: SearchSpec) -> list[str]:
    """The parameters population-based training perturbs, or none for other schedulers."""
    if spec.scheduler != "pbt":
        return []
    defaults = get_trainable(spec.trainable).pbt_defaults
    return strategies.pbt_mutable(list(spec.space), defaults, spec.search.scheduler_options)


POINT = "__point"  # a fixed configuration (confirmation runs): Tune grid-searches over these


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's configuration, whether Optuna proposed it or it is a fixed point."""
    if POINT not in (config or {}):
        return dict(config or {})
    return {**config[POINT], **{k: v for k, v in config.items() if k != POINT}}


def epochs_of(max_epochs: int, config: dict[str, Any]) -> int:
    """The epochs a trial trains: the budget's, or a fixed point's own (a refit)."""
    return int(flat_config(config).get(EPOCHS_PARAM) or max_epochs)


def loop_config(
    plan: TrialPlan, config: dict[str, Any], trial_id: str, replica: Replica | None = None
) -> dict[str, Any]:
    """The trainable's ``train(config, session)`` config for one trial (``replica``: one job of a
    cross-validated or repeated trial: its fold of the training speakers, its seed)."""
    config = flat_config(config)
    params = {**plan.params, **{k: v for k, v in config.items() if not k.startswith("__")}}
    data, title = plan.data, f"trial {trial_id}"
    if replica is not None:
        title = f"trial {trial_id} {replica.words}"
        if replica.fold is not None:
            data = {**plan.data, "cv": {"fold": replica.fold, "folds": plan.cv_folds}}
        if replica.repeat:
            params["seed"] = int(params.get("seed") or 0) + REPEAT_SEED_STRIDE * replica.repeat
    return {"params": params, "data": data, "run": {**plan.run, "title": title}}


def concurrent_trials(spec: SearchSpec) -> int:
    """Trials at once: ``budget.concurrency`` jobs, K x R of them per replicated trial."""
    return max(1, spec.budget.concurrency // max(1, len(spec.objective.replicas)))


def build_tuner(
    spec: SearchSpec,
    name: str,
    trainable_fn: Any,
    callbacks: list[Any] | None = None,
    restore: bool = False,
    points: list[dict[str, Any]] | None = None,
    reuse_actors: bool = False,
    stop: Any = None,
    seeds: dict[str, Any] | None = None,
):
    """A fresh or restored Tuner for ``spec``.

    ``points`` replaces the search with a fixed list of configurations, run FIFO to the last
    epoch (confirmation of the best configurations with fresh seeds).
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    ray_compat.atomic_experiment_state()  # a failed save keeps the last whole state
    ray_compat.atomic_local_uploads()  # ... and so does its copy in the search's folder
    ray_compat.tolerant_trial_errors()  # an empty error.pkl (full disk) is no crash
    if restore:
        fs, path = fs_and_path(experiment_path(name))
        return tune.Tuner.restore(
            path,
            trainable=trainable_fn,
            resume_unfinished=True,
            resume_errored=False,
            storage_filesystem=fs,
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics = spec.objective.as_list()
    param_space = None
    if points is not None:  # one trial per point, as given (no leakage of keys between them)
        searcher: Any = BasicVariantGenerator()
        scheduler: Any = FIFOScheduler()
        samples = 1
        param_space = {POINT: tune.grid_search(points)}
    else:
        space = dict(spec.space)
        multi = spec.objective.multi
        conditions = spec.objective.conditions()
        ctx = strategies.Context(
            seed=spec.seed,
            trials=spec.budget.trials,
            max_epochs=spec.budget.max_epochs,
            grace_epochs=spec.budget.grace_epochs,
            reduction_factor=spec.budget.reduction_factor,
            metric=[m.metric for m in metrics] if multi else metrics[0].metric,
            mode=[m.mode for m in metrics] if multi else metrics[0].mode,
            space=space,
            pbt_defaults=get_trainable(spec.trainable).pbt_defaults,
        )
        s = spec.search
        if pbt_parameters(spec):
            # Tune's PBT refuses a search algorithm (it changes configurations mid-trial): the
            # first population is drawn at random from the space, seeded.
            searcher = BasicVariantGenerator(random_state=spec.seed)
            param_space = {k: p.tune_domain() for k, p in space.items()}
        else:
            sampler = strategies.SAMPLERS[s.sampler].build(s.sampler_options, ctx)
            # Optuna is told each trial's kept figure (the smoothed curve at its kept epoch) of
            # an objective reported every epoch; the scheduler reads the raw per-epoch curve
            epochwise = get_trainable(spec.trainable).epoch_metrics
            told = [KEPT_PREFIX + m.metric if m.metric in epochwise else m.metric for m in metrics]
            searcher = (ConstrainedOptunaSearch if conditions else OptunaSearch)(
                space=SpaceFunction(space, spec.define_by_run, str(Path(spec.source).parent)),
                metric=told if multi else told[0],
                mode=ctx.mode,
                sampler=sampler,
                **({"conditions": conditions} if conditions else {}),
            )
        if seeds and seeds.get("trials"):
            from .warmstart import optuna_trials

            ray_compat.seed_optuna_study(searcher, optuna_trials(seeds, space))
        samples = spec.budget.trials
        scheduler = strategies.SCHEDULERS[spec.scheduler].build(s.scheduler_options, ctx)
    fs, root = fs_and_path(settings.storage_root())
    return tune.Tuner(
        trainable_fn,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=samples,
            # budget.concurrency counts jobs: a replicated trial runs one per fold x repeat
            max_concurrent_trials=concurrent_trials(spec),
            reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            callbacks=tune_callbacks(callbacks or []),
            stop=stop,
            verbose=0,
            # Tune defaults checkpoint_at_end to True for class trainables (the warm proxy): with
            # num_to_keep=1 every trial's end then forces a save of the whole search's state, a
            # cost that grows with the search (x1.7 driver time per trial at 1,000 trials). The
            # trials' checkpoints live with the trainable; Tune keeps none of its own.
            # Population-based training clones a trial's latest checkpoint after the trial may
            # have saved a newer one: keep a few.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=4 if pbt_parameters(spec) and points is None else 1,
                checkpoint_at_end=False,
            ),
        ),
    )
