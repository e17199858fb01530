"""The one place that builds a Ray Tune ``Tuner`` from a validated spec.

* Optuna proposes configurations: TPE for one objective, multi-objective (NSGA-style Pareto
  ranking inside TPE) for several; the spec's ``space`` plus an optional define-by-run function.
* ASHA stops weak single-objective trials early, on the trial's real epoch (``epochs_done``, not
  Tune's iteration counter, which restarts when a crashed search resumes). Multi-objective and
  confirmation runs go FIFO (every trial runs all epochs).
* ``max_concurrent_trials`` bounds concurrency; the trials themselves are thin (``sertune.slots``
  in warm mode, ``sertune.trials`` per trial) and hold no CPUs: the Train workers do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import settings
from .records import experiment_path
from .spec import SearchSpec, load_define_by_run
from .storage import fs_and_path
from .trainable import get_trainable

TIME_ATTR = "epochs_done"


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

    def __init__(self, space: dict[str, dict[str, Any]], define_by_run: str | None, base: str):
        self.space, self.define_by_run, self.base = space, define_by_run, base

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        for name, p in self.space.items():
            if p["type"] == "choice":
                trial.suggest_categorical(name, p["values"])
            elif p["type"] == "int":
                step = int(p.get("step") or 1)
                trial.suggest_int(
                    name, int(p["low"]), int(p["high"]), step=step, log=bool(p.get("log"))
                )
            else:
                trial.suggest_float(
                    name,
                    float(p["low"]),
                    float(p["high"]),
                    step=p.get("step"),
                    log=bool(p.get("log")),
                )
        if self.define_by_run:
            fn = load_define_by_run(self.define_by_run, Path(self.base))
            return fn(trial)
        return None


def trial_fixed(spec: SearchSpec, name: str, data: dict[str, Any]) -> dict[str, Any]:
    """What every trial of a search shares (passed once through ``tune.with_parameters``)."""
    trainable = get_trainable(spec.trainable)
    return {
        "trainable": spec.trainable,
        "params": {**spec.params, "optim.epochs": spec.budget.max_epochs, "seed": spec.seed},
        "data": {k: v for k, v in data.items() if k != "report"},
        "run": {
            "device": spec.device,
            "threads": max(1, int(spec.resources.cpus_per_worker)),
            "max_steps_per_epoch": spec.budget.max_steps_per_epoch,
            "robustness": spec.robustness.model_dump() if spec.robustness else None,
            "select": spec.select_metric(trainable.epoch_metrics).model_dump(),
        },
        "resources": spec.resources.model_dump(),
        "max_epochs": spec.budget.max_epochs,
        "train_storage": f"{experiment_path(name)}/_train",
        "max_failures": spec.budget.trial_max_failures,
    }


POINT = "__point"  # a fixed configuration (confirmation runs): Tune grid-searches over these


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's configuration, whether Optuna proposed it or it is a fixed point."""
    if POINT not in (config or {}):
        return dict(config or {})
    return {**config[POINT], **{k: v for k, v in config.items() if k != POINT}}


def loop_config(fixed: dict[str, Any], config: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The trainable's ``train(config, session)`` config for one trial."""
    config = flat_config(config)
    params = {**fixed["params"], **{k: v for k, v in config.items() if not k.startswith("__")}}
    return {
        "params": params,
        "data": fixed["data"],
        "run": {**fixed["run"], "title": f"trial {trial_id}"},
    }


def build_tuner(
    spec: SearchSpec,
    name: str,
    trainable_fn: Any,
    callbacks: list[Any] | None = None,
    restore: bool = False,
    points: list[dict[str, Any]] | None = None,
    reuse_actors: bool = False,
):
    """A fresh or restored Tuner for ``spec``.

    ``points`` replaces the search with a fixed list of configurations, run FIFO to the last
    epoch (confirmation of the best configurations with fresh seeds).
    """
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

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
        space = SpaceFunction(
            {k: v.model_dump() for k, v in spec.space.items()},
            spec.define_by_run,
            str(Path(spec.source).parent),
        )
        sampler = optuna.samplers.TPESampler(
            seed=spec.seed, n_startup_trials=min(10, max(2, spec.budget.trials // 3))
        )
        searcher = OptunaSearch(
            space=space,
            metric=[m.metric for m in metrics] if spec.objective.multi else metrics[0].metric,
            mode=[m.mode for m in metrics] if spec.objective.multi else metrics[0].mode,
            sampler=sampler,
        )
        samples = spec.budget.trials
        if spec.objective.multi:
            scheduler = (
                FIFOScheduler()
            )  # ASHA ranks on one metric; a Pareto search runs trials out
        else:
            scheduler = ASHAScheduler(
                metric=metrics[0].metric,
                mode=metrics[0].mode,
                time_attr=TIME_ATTR,
                max_t=spec.budget.max_epochs,
                grace_period=spec.budget.grace_epochs,
                reduction_factor=spec.budget.reduction_factor,
            )
    fs, root = fs_and_path(settings.storage_root())
    return tune.Tuner(
        trainable_fn,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=samples,
            max_concurrent_trials=spec.budget.concurrency,
            reuse_actors=reuse_actors,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            callbacks=tune_callbacks(callbacks or []),
            verbose=0,
            # Tune defaults checkpoint_at_end to True for class trainables (the warm proxy): with
            # num_to_keep=1 every trial's end then forces a save of the whole search's state, a
            # cost that grows with the search (x1.7 driver time per trial at 1,000 trials). The
            # trials' checkpoints live with the trainable; Tune keeps none of its own.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1, checkpoint_at_end=False),
        ),
    )
