"""Search strategies by name: which Optuna sampler proposes configurations and which Ray Tune
scheduler stops trials early. A spec chooses them under ``search:``::

    search:
      sampler: tpe            # tpe | random | cmaes | gp | nsga2 | grid
      sampler_options: {n_startup_trials: 5}
      scheduler: asha         # asha | hyperband | median | pbt | none (default: asha; none
      scheduler_options: {}   #   when the objective has several metrics)
      warm_start: [demo]      # earlier searches whose finished trials seed the sampler

Adding a sampler or a scheduler is one entry in :data:`SAMPLERS` or :data:`SCHEDULERS`: its
factory, whether it handles several objectives, and its knobs (type, default, range, what it
does). ``sertune.spec`` validates every knob against these entries before anything starts;
``sertune.tuner`` builds from them. Nothing here imports Optuna or Ray until a factory runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .trainable import EPOCHS_DONE


class Param(Protocol):
    """A searched parameter as the factories use it (``sertune.spec.ParamSpec``)."""

    type: str

    def tune_domain(self) -> Any: ...

    def grid_values(self) -> list[Any] | None: ...

    def bounds(self) -> tuple[float, float] | None: ...


@dataclass(frozen=True)
class Context:
    """What a factory may need from the spec."""

    seed: int
    trials: int
    max_epochs: int
    grace_epochs: int
    reduction_factor: float
    metric: str | list[str]
    mode: str | list[str]
    space: dict[str, Param]
    pbt_defaults: tuple[str, ...] = ()  # the trainable's (``Trainable.pbt_defaults``)


@dataclass(frozen=True)
class Knob:
    """One option of a sampler or scheduler. ``default`` is its one default: a value, a function
    of the :class:`Context` (a default that follows the budget), or None for the library's own."""

    type: type
    doc: str
    default: Any = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None

    def check(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable, or None."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (self.type is not bool and isinstance(value, bool)) or not isinstance(value, self.type):
            return f"expected {self.type.__name__}, got {value!r}"
        if self.ge is not None and value < self.ge:
            return f"must be >= {self.ge:g}, got {value!r}"
        if self.gt is not None and value <= self.gt:
            return f"must be > {self.gt:g}, got {value!r}"
        if self.le is not None and value > self.le:
            return f"must be <= {self.le:g}, got {value!r}"
        return None

    def resolve(self, ctx: Context) -> Any:
        return self.default(ctx) if callable(self.default) else self.default


@dataclass(frozen=True)
class Strategy:
    doc: str
    make: Callable[[dict[str, Any], Context], Any]  # (complete options, context) -> the object
    multi_objective: bool
    knobs: dict[str, Knob] = field(default_factory=dict)
    constraints: bool = False  # steered by ``objective.constraints`` (Optuna's trial constraints)

    def build(self, options: dict[str, Any], ctx: Context) -> Any:
        """The sampler or scheduler, its factory handed every knob: the spec's value, else the
        knob's default (applied here, once)."""
        complete = {
            k: options[k] if k in options else knob.resolve(ctx) for k, knob in self.knobs.items()
        }
        return self.make(complete, ctx)


def startup_trials(ctx: Context) -> int:
    """Random trials before a model-based sampler takes over: a third of the budget, 2 to 10."""
    return min(10, max(2, ctx.trials // 3))


# -- samplers (Optuna, through Ray Tune's OptunaSearch) ----------------------------------------------


def _tpe(o: dict[str, Any], ctx: Context):
    import optuna

    return optuna.samplers.TPESampler(
        seed=ctx.seed,
        n_startup_trials=int(o["n_startup_trials"]),
        multivariate=o["multivariate"],
    )


def _random(o: dict[str, Any], ctx: Context):
    import optuna

    return optuna.samplers.RandomSampler(seed=ctx.seed)


def _cmaes(o: dict[str, Any], ctx: Context):
    import optuna

    return optuna.samplers.CmaEsSampler(
        seed=ctx.seed,
        n_startup_trials=int(o["n_startup_trials"]),
        sigma0=o["sigma0"],
        warn_independent_sampling=False,
    )


def _gp(o: dict[str, Any], ctx: Context):
    import optuna

    return optuna.samplers.GPSampler(
        seed=ctx.seed,
        n_startup_trials=int(o["n_startup_trials"]),
    )


def _nsga2(o: dict[str, Any], ctx: Context):
    import optuna

    return optuna.samplers.NSGAIISampler(
        seed=ctx.seed,
        population_size=int(o["population_size"]),
        crossover_prob=float(o["crossover_prob"]),
    )


def _grid(o: dict[str, Any], ctx: Context):
    import optuna

    space = {name: p.grid_values() for name, p in ctx.space.items()}
    return optuna.samplers.GridSampler(space, seed=ctx.seed)


_STARTUP = Knob(int, "random trials first (default: trials/3, 2 to 10)", startup_trials, ge=0)

SAMPLERS: dict[str, Strategy] = {
    "tpe": Strategy(
        "Optuna's TPE (the default): models good and bad configurations, Pareto-aware for "
        "several objectives",
        _tpe,
        multi_objective=True,
        knobs={
            "n_startup_trials": _STARTUP,
            "multivariate": Knob(bool, "model the parameters jointly", False),
        },
        constraints=True,
    ),
    "random": Strategy(
        "uniform random search: the baseline every sampler must beat",
        _random,
        multi_objective=True,
    ),
    "cmaes": Strategy(
        "CMA-ES: a covariance-adapting evolution strategy for continuous parameters",
        _cmaes,
        multi_objective=False,
        knobs={
            "n_startup_trials": _STARTUP,
            "sigma0": Knob(float, "initial step size (default: 1/6 of the range)", gt=0),
        },
    ),
    "gp": Strategy(
        "Gaussian-process Bayesian optimisation: sample-efficient on small budgets",
        _gp,
        multi_objective=True,
        knobs={"n_startup_trials": _STARTUP},
        constraints=True,
    ),
    "nsga2": Strategy(
        "NSGA-II: a genetic algorithm, for one objective or a Pareto front",
        _nsga2,
        multi_objective=True,
        knobs={
            "population_size": Knob(
                int,
                "trials per generation (default: trials/2, 2 to 50)",
                lambda ctx: max(2, min(50, ctx.trials // 2)),
                ge=2,
            ),
            "crossover_prob": Knob(float, "crossover probability", 0.9, ge=0, le=1),
        },
        constraints=True,
    ),
    "grid": Strategy(
        "every combination of the space's values (choices, ints, floats with a step)",
        _grid,
        multi_objective=True,
    ),
}


# -- schedulers (Ray Tune) ----------------------------------------------------------------------------

TIME_ATTR = EPOCHS_DONE  # the trial's real epoch, which survives a resume


def _rungs(o: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """What ASHA and asynchronous Hyperband share: the metric, the epochs, the rungs."""
    return {
        "metric": ctx.metric,
        "mode": ctx.mode,
        "time_attr": TIME_ATTR,
        "max_t": ctx.max_epochs,
        "grace_period": int(o["grace_epochs"]),
        "reduction_factor": float(o["reduction_factor"]),
    }


def _asha(o: dict[str, Any], ctx: Context):
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(**_rungs(o, ctx))


def _hyperband(o: dict[str, Any], ctx: Context):
    from ray.tune.schedulers import AsyncHyperBandScheduler

    return AsyncHyperBandScheduler(**_rungs(o, ctx), brackets=int(o["brackets"]))


def _median(o: dict[str, Any], ctx: Context):
    from ray.tune.schedulers import MedianStoppingRule

    return MedianStoppingRule(
        metric=ctx.metric,
        mode=ctx.mode,
        time_attr=TIME_ATTR,
        grace_period=float(o["grace_epochs"]),
        min_samples_required=int(o["min_samples_required"]),
        hard_stop=True,
    )


def pbt_mutable(space: list[str], defaults: tuple[str, ...], options: dict[str, Any]) -> list[str]:
    """The searched parameters PBT perturbs: ``mutate``, else the trainable's ``pbt_defaults``
    (names, or prefixes ending in ``_``) that are searched."""
    if options.get("mutate"):
        return list(options["mutate"])
    names = {d for d in defaults if not d.endswith("_")}
    prefixes = tuple(d for d in defaults if d.endswith("_"))
    return [k for k in space if k in names or (prefixes and k.startswith(prefixes))]


class Clip:
    """PBT multiplies a value by 0.8 or 1.2: keep it inside the space's bounds (picklable)."""

    def __init__(self, bounds: dict[str, tuple[float, float]]):
        self.bounds = bounds

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for k, (lo, hi) in self.bounds.items():
            if isinstance(config.get(k), (int, float)) and not isinstance(config[k], bool):
                config[k] = type(config[k])(min(max(config[k], lo), hi))
        return config


def _pbt(o: dict[str, Any], ctx: Context):
    from ray.tune.schedulers import PopulationBasedTraining

    mutations, bounds = {}, {}
    for k in pbt_mutable(list(ctx.space), ctx.pbt_defaults, o):
        p = ctx.space[k]
        if p.type == "choice":
            mutations[k] = p.grid_values()
            continue
        mutations[k] = p.tune_domain()
        bounds[k] = p.bounds()
    return PopulationBasedTraining(
        time_attr=TIME_ATTR,
        metric=ctx.metric,
        mode=ctx.mode,
        perturbation_interval=int(o["perturbation_interval"]),
        hyperparam_mutations=mutations,
        quantile_fraction=float(o["quantile_fraction"]),
        resample_probability=float(o["resample_probability"]),
        custom_explore_fn=Clip(bounds),
        log_config=False,
    )


def _fifo(o: dict[str, Any], ctx: Context):
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


_RUNG_KNOBS = {
    "grace_epochs": Knob(
        int,
        "no trial stops before this epoch (default: budget.grace_epochs)",
        lambda ctx: ctx.grace_epochs,
        ge=1,
    ),
    "reduction_factor": Knob(
        float,
        "keep the top 1/rf at each rung (default: budget.reduction_factor)",
        lambda ctx: ctx.reduction_factor,
        gt=1,
    ),
}

SCHEDULERS: dict[str, Strategy] = {
    "asha": Strategy(
        "ASHA: stops the weakest trials at each rung of epochs (the default)",
        _asha,
        multi_objective=False,
        knobs=dict(_RUNG_KNOBS),
    ),
    "hyperband": Strategy(
        "asynchronous Hyperband: ASHA over several brackets of grace periods, so slow starters "
        "get a longer chance in some brackets",
        _hyperband,
        multi_objective=False,
        knobs={**_RUNG_KNOBS, "brackets": Knob(int, "brackets of grace periods", 3, ge=1)},
    ),
    "median": Strategy(
        "median stopping: stops a trial whose best result is below the median of the others at "
        "the same epoch",
        _median,
        multi_objective=False,
        knobs={
            "grace_epochs": _RUNG_KNOBS["grace_epochs"],
            "min_samples_required": Knob(int, "other trials needed to compare with", 3, ge=1),
        },
    ),
    "pbt": Strategy(
        "population-based training: every perturbation_interval epochs the weakest trials take "
        "the best ones' checkpoints and go on with perturbed auxiliary weights and augmentation "
        "mix - schedules that change while the model trains (sampler: random; no confirm)",
        _pbt,
        multi_objective=False,
        knobs={
            "perturbation_interval": Knob(int, "epochs between exploit/explore steps", 1, ge=1),
            "quantile_fraction": Knob(
                float, "share of trials that exploit / are exploited", 0.25, gt=0, le=0.5
            ),
            "resample_probability": Knob(
                float, "chance to resample a value instead of x0.8/x1.2", 0.25, ge=0, le=1
            ),
            "mutate": Knob(
                list,
                "searched parameters to perturb (default: the trainable's pbt_defaults, e.g. "
                "mtl_aug's loss.w_aug, loss.w_rec, every aug.p_*)",
            ),
        },
    ),
    "none": Strategy(
        "no early stopping: every trial runs all its epochs", _fifo, multi_objective=True
    ),
}


def default_scheduler(multi: bool) -> str:
    return "none" if multi else "asha"


def check(kind: str, name: str, options: dict[str, Any], multi: bool) -> list[tuple[str, str]]:
    """Problems with ``search.<kind>`` and ``search.<kind>_options``, as (field, message)."""
    table = SAMPLERS if kind == "sampler" else SCHEDULERS
    entry = table.get(name)
    if entry is None:
        return [(f"search.{kind}", f"unknown {kind} {name!r}; known: {', '.join(table)}")]
    problems = []
    if multi and not entry.multi_objective:
        why = "ranks trials on one metric" if kind == "scheduler" else "optimises one objective"
        problems.append(
            (
                f"search.{kind}",
                f"{name!r} {why}; this objective has several metrics "
                f"(use one of: {', '.join(k for k, v in table.items() if v.multi_objective)})",
            )
        )
    for key, value in options.items():
        knob = entry.knobs.get(key)
        field_ = f"search.{kind}_options.{key}"
        if knob is None:
            known = ", ".join(entry.knobs) or "none"
            problems.append((field_, f"unknown option of {kind} {name!r} (known: {known})"))
        elif (why := knob.check(value)) is not None:
            problems.append((field_, why))
    return problems


def describe() -> str:
    """Every sampler and scheduler with its knobs (``sertune search strategies``)."""
    lines = []
    for title, table in (
        ("samplers (search.sampler)", SAMPLERS),
        ("schedulers (search.scheduler)", SCHEDULERS),
    ):
        lines.append(title + ":")
        for name, s in table.items():
            multi = "" if s.multi_objective else "  [one objective only]"
            lines.append(f"  {name:10} {s.doc}{multi}")
            for k, knob in s.knobs.items():
                plain = knob.default is not None and not callable(knob.default)
                default = f" (default {knob.default})" if plain else ""
                lines.append(f"  {'':10}   {k}: {knob.type.__name__}, {knob.doc}{default}")
    return "\n".join(lines)
