"""Search specs: YAML files in ``search_spaces/``, validated once, before anything starts.

Every error names the file, the dotted field and what was expected, one line each, all of them
at once::

    search_spaces/x.yaml: space.loss.w_aug: low (2.0) > high (1.0)
    search_spaces/x.yaml: budget.trails: unknown key (allowed: trials, concurrency, ...)

and the CLI exits with code 2 before Ray is started. A spec is a path or the name of a packaged
preset (``sertune search run mtl_aug``); ``sertune search presets`` lists them. See
``search_spaces/mtl_aug.yaml`` for a commented example of every field.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import operator
import os
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UsageError
from .trainable import ROBUSTNESS_DEFAULTS

if TYPE_CHECKING:
    from .trainable import Trainable

Scalar = bool | int | float | str | None


class SpecError(UsageError):
    """A spec is invalid. ``str()`` is one line per problem: ``FILE: FIELD: message``."""

    def __init__(self, source: str, field: str = "", message: str = "", problems=None):
        self.source = source
        # a message never carries more than ~300 characters of what the file said
        self.problems: list[tuple[str, str]] = [
            (f[:200], m if len(m) <= 300 else f"{m[:300]}... ({len(m)} characters)")
            for f, m in (problems or [(field, message)])
        ]
        self.field, self.message = self.problems[0]
        super().__init__(
            "\n".join(f"{source}: {f}: {m}" if f else f"{source}: {m}" for f, m in self.problems)
        )


def _shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters (a spec's value can be huge)."""
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = limit, limit, 10, 10, 3
    text = r.repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


# Bounds on what a spec file may be, checked before it is parsed (a spec is a page of YAML)
SPEC_MAX_BYTES = 1 << 20
SPEC_MAX_DEPTH = 32


def read_yaml(path: Path, src: str) -> Any:
    """A spec file's YAML, bounded: at most :data:`SPEC_MAX_BYTES`, UTF-8, no anchors or aliases
    (an alias bomb expands without bound), nesting at most :data:`SPEC_MAX_DEPTH` - each refused
    in one line naming the file - then parsed with ``yaml.safe_load``."""
    size = path.stat().st_size
    if size > SPEC_MAX_BYTES:
        raise SpecError(src, "", f"{size} bytes: a spec is at most {SPEC_MAX_BYTES} bytes")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            src, "", f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}"
        ) from None
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                line = event.start_mark.line + 1
                raise SpecError(
                    src,
                    "",
                    f"line {line}: YAML anchors and aliases (&, *) are not allowed in a spec",
                )
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > SPEC_MAX_DEPTH:
                    line = event.start_mark.line + 1
                    raise SpecError(
                        src, "", f"line {line}: nested deeper than {SPEC_MAX_DEPTH} levels"
                    )
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(src, "", _shown(f"not valid YAML: {e}".replace("\n", " "), 300)) from None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CorpusRef(_Strict):
    corpus: str  # adapter name: iemocap, msp_improv, emodb, ravdess, crema_d, manifest, synthetic
    root: str  # where the corpus lies (for `synthetic`: where it is generated)
    name: str | None = None  # label in reports (cross-corpus)


class DataSpec(_Strict):
    corpus: str
    root: str
    fold: int = Field(0, ge=0)  # which speaker group is the test set
    n_folds: int | None = Field(None, ge=3)
    unlabelled: CorpusRef | None = None  # extra speech without labels (auxiliary losses only)
    noise_files: list[str] = []  # wavs for the file_noise augmentation and robustness checks
    cross_corpus: list[CorpusRef] = []  # evaluated at the end of each trial
    synthetic: dict[
        str, int
    ] = {}  # options for the synthetic corpus (n_speakers, per_class, seed)
    label_fraction: float = Field(
        1.0, gt=0.0, le=1.0
    )  # <1: semi-supervised (labels kept per speaker)
    label_seed: int = 0  # which clips keep their labels: the same for every trial and baseline
    allow_absolute_paths: bool = False  # manifests may point outside their own folder
    # how speaker groups are dealt into folds (test/val and CV): seeded and balanced on gender
    # and classes, or sorted round-robin (a search recorded without this key resumes sorted)
    dealing: Literal["balanced", "sorted"] = "balanced"


class MetricSpec(_Strict):
    metric: str
    mode: Literal["max", "min"] = "max"


_OPS = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
_CONDITION = re.compile(r"^\s*([\w./-]+)\s*(>=|<=|==|>|<)\s*(-?[\d.]+(?:e-?\d+)?)\s*$")


@dataclass(frozen=True)
class Condition:
    """``METRIC OP VALUE`` (``val_robust/uar_snr10_white >= 0.5``): an objective's constraint, a
    promotion's gate."""

    metric: str
    op: str
    bound: float

    @classmethod
    def parse(cls, text: str) -> Condition:
        m = _CONDITION.match(text)
        if not m:
            raise ValueError(
                f"{text!r}: expected METRIC OP VALUE, e.g. 'val_robust/uar_snr10_white>=0.5'"
            )
        return cls(m.group(1), m.group(2), float(m.group(3)))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"

    def holds(self, value: float | None) -> bool:
        return value is not None and _OPS[self.op](value, self.bound)

    def violation(self, value: float | None, missing: float = 1.0) -> float:
        """Optuna's constraint value: <= 0 where it holds, else by how much it fails
        (``missing`` when the trial has no such figure, e.g. stopped before its end)."""
        if value is None or not math.isfinite(value):
            return missing
        gap = self.bound - value if self.op in (">=", ">") else value - self.bound
        if gap == 0 and self.op in (">", "<"):  # at the bound a strict condition fails (UAR on
            return 1e-9  # few clips is quantised: ties happen), for Optuna as for holds()
        return gap


REPORTED_PREFIXES = ("test_", "robust/")  # the test speakers (and cross corpora): reported only
SELECTION_ROBUST = "val_robust/"  # robustness on the validation speakers: may select


def reported_only(metric: str) -> str | None:
    """Why ``metric`` must never select (objective, constraint, choosing gate), or None when it
    may. ``test_*`` and ``robust/*`` are measured on the test speakers, ``robust/uar_cross_*`` on
    a target corpus: figures reported of the chosen model. ``val_*`` and ``val_robust/*`` (the
    validation speakers) select."""
    if metric.startswith("robust/uar_cross_"):
        return (
            f"{metric!r} is a cross-corpus figure, reported only: selecting on a target corpus "
            "would need a held-out dev part of it (not supported yet); select on a val_* or "
            "val_robust/* figure"
        )
    if metric.startswith("robust/"):
        twin = SELECTION_ROBUST + metric.removeprefix("robust/")
        return (
            f"{metric!r} is measured on the test speakers: never select on it; "
            f"use its validation twin {twin!r}"
        )
    if metric.startswith("test_"):
        twin = "val_" + metric.removeprefix("test_")
        return (
            f"{metric!r} is measured on the test speakers: never select on the test speakers; "
            f"use a val_* or val_robust/* figure (e.g. {twin!r})"
        )
    return None


class CVSpec(_Strict):
    """A cross-validated objective: each trial trains ``folds`` speaker-independent folds of the
    training speakers (each validating on its own held-out speakers) as parallel jobs, and
    reports their mean (and ``<metric>_se``) at each epoch."""

    folds: int = Field(..., ge=2, le=20)


REPEAT_SEED_STRIDE = 101  # repeat r of a trial trains with seed + REPEAT_SEED_STRIDE * r


@dataclass(frozen=True)
class Replica:
    """One job of a replicated trial (``objective.cv`` and/or ``objective.repeats``): a speaker
    fold of the training speakers and/or a repeat with another seed. Its figures are
    ``<label>/<figure>`` in MLflow; the trial's are their mean (and ``<figure>_se``)."""

    label: str  # fold1, rep2 or fold1.rep2
    fold: int | None  # the cross-validation fold it validates on (None: the plain split)
    repeat: int  # 0: the trial's seed; r: seed + REPEAT_SEED_STRIDE * r

    @property
    def words(self) -> str:
        parts = ([f"fold {self.fold}"] if self.fold is not None else []) + (
            [f"repeat {self.repeat}"] if self.repeat or self.fold is None else []
        )
        return ", ".join(parts)


class ObjectiveSpec(_Strict):
    metric: str | None = None  # a single objective ...
    mode: Literal["max", "min"] = "max"
    metrics: list[MetricSpec] = []  # ... or several (multi-objective, Pareto front)
    # feasibility, e.g. 'val_robust/uar_snr10_white >= 0.5': the sampler steers away from what
    # fails (a selection figure: val_* or val_robust/*, never robust/* or test_*)
    constraints: list[str] = []
    cv: CVSpec | None = None  # {folds: K}: every figure the mean over K speaker folds
    repeats: int = Field(1, ge=1, le=10)  # R: ... and over R seeds (K x R jobs per trial)

    @model_validator(mode="after")
    def _one_form(self) -> ObjectiveSpec:
        if (self.metric is None) == (not self.metrics):
            raise ValueError("give either `metric` (single objective) or `metrics` (several)")
        return self

    def as_list(self) -> list[MetricSpec]:
        return (
            list(self.metrics)
            if self.metrics
            else [MetricSpec(metric=self.metric, mode=self.mode)]
        )

    @property
    def multi(self) -> bool:
        return len(self.as_list()) > 1

    @property
    def replicas(self) -> tuple[Replica, ...]:
        """The jobs of each trial: K folds x R repeats, or () for one job (no cv, one repeat)."""
        folds: list[int | None] = list(range(self.cv.folds)) if self.cv else [None]
        if len(folds) == 1 and self.repeats == 1:
            return ()
        out = []
        for k in folds:
            for r in range(self.repeats):
                label = ".".join(
                    ([f"fold{k}"] if k is not None else [])
                    + ([f"rep{r}"] if self.repeats > 1 else [])
                )
                out.append(Replica(label, k, r))
        return tuple(out)

    @property
    def replica_kind(self) -> str:
        """What a trial's jobs are, in the console's words: fold, repeat or fold x repeat."""
        if self.cv and self.repeats > 1:
            return "fold x repeat"
        return "fold" if self.cv else "repeat"

    def conditions(self) -> list[Condition]:
        """The constraints, parsed (validated when the spec was loaded)."""
        return [Condition.parse(c) for c in self.constraints]


# A budget's documented maxima: a typo of a few zeros is refused, not run for a year
MAX_TRIALS, MAX_EPOCHS, MAX_CONCURRENCY = 10_000, 10_000, 4_096


class BudgetSpec(_Strict):
    trials: int = Field(20, ge=1, le=MAX_TRIALS)
    concurrency: int = Field(2, ge=1, le=MAX_CONCURRENCY)
    max_epochs: int = Field(20, ge=1, le=MAX_EPOCHS)
    grace_epochs: int = Field(2, ge=1)  # ASHA: no trial is stopped before this many epochs
    reduction_factor: float = Field(3.0, gt=1.0)  # ASHA: keep the top 1/rf at each rung
    max_steps_per_epoch: int | None = Field(None, ge=1)  # cap for smoke runs
    trial_max_failures: int = Field(2, ge=0)  # a dead worker resumes from the last checkpoint


class ResourcesSpec(_Strict):
    workers: int = Field(1, ge=1)  # Ray Train workers per trial (DDP when > 1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # fractions pack several trials onto one GPU
    # the decoded corpus on each slot's device when it fits the slot's budget (auto), always, or
    # never (streamed from the host's memory map); the budget in MB, instead of the slot's share
    corpus_on_device: Literal["auto", "always", "never"] = "auto"
    corpus_budget_mb: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _whole_or_fraction(self) -> ResourcesSpec:
        g = self.gpus_per_worker
        if g > 1 and not float(g).is_integer():
            raise ValueError(f"gpus_per_worker: above 1 it must be whole, got {g}")
        return self


class ParamSpec(_Strict):
    """One searched parameter. Its behaviour lives here, in one place: what Optuna suggests, what
    Ray Tune samples (random search, PBT), the values a grid walks, and how a value MLflow stored
    as a string is read back (warm starts)."""

    type: Literal["float", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: list[Scalar] | None = None

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter (``optuna.distributions``)."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.type == "choice":
            return CategoricalDistribution(list(self.values or []))
        if self.type == "int":
            return IntDistribution(
                int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def suggest(self, trial: Any, name: str) -> Scalar:
        """Ask an Optuna trial (define-by-run) for a value of this parameter."""
        if self.type == "choice":
            return trial.suggest_categorical(name, list(self.values or []))
        if self.type == "int":
            return trial.suggest_int(
                name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(
            name, float(self.low), float(self.high), step=self.step, log=self.log
        )

    def tune_domain(self) -> Any:
        """This parameter as a Ray Tune domain (random search, PBT's resampling)."""
        from ray import tune

        if self.type == "choice":
            return tune.choice(list(self.values or []))
        lo, hi = float(self.low), float(self.high)
        if self.type == "int":
            sample = tune.lograndint if self.log else tune.randint
            return sample(int(lo), int(hi) + 1)
        return tune.loguniform(lo, hi) if self.log else tune.uniform(lo, hi)

    def grid_values(self) -> list[Scalar] | None:
        """Every value this parameter can take, or None when it is continuous."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            n = int(round((float(self.high) - float(self.low)) / float(self.step)))
            return [round(float(self.low) + i * float(self.step), 12) for i in range(n + 1)]
        return None

    def bounds(self) -> tuple[float, float] | None:
        """(low, high) of a numeric parameter; None for a choice."""
        return None if self.type == "choice" else (float(self.low), float(self.high))

    def parse(self, raw: str) -> Scalar:
        """A value as MLflow stored it (a string), back in this parameter's type; ValueError
        when it is outside this space."""
        if self.type == "choice":
            for v in self.values or []:
                if str(v) == raw:
                    return v
            raise ValueError(f"{raw!r} is not one of {self.values}")
        v: float | int = float(raw)
        if self.type == "int":
            if not float(v).is_integer():
                raise ValueError(f"{raw!r} is not an integer")
            v = int(v)
        if not (float(self.low) <= v <= float(self.high)):
            raise ValueError(f"{raw} outside [{self.low}, {self.high}]")
        return v


def _robustness_default(key: str) -> Any:
    """A robustness option's default, from the one table every evaluation uses."""
    value = ROBUSTNESS_DEFAULTS[key]
    return Field(default_factory=lambda: list(value)) if isinstance(value, tuple) else value


class RobustnessSpec(_Strict):
    # defaults: sertune.trainable.ROBUSTNESS_DEFAULTS (what each option means is written there)
    snrs_db: list[float] = _robustness_default("snrs_db")
    noises: list[Literal["white", "babble", "file"]] = _robustness_default("noises")
    fgsm_eps: list[float] = _robustness_default("fgsm_eps")
    pgd_eps: list[float] = _robustness_default("pgd_eps")
    pgd_steps: int = _robustness_default("pgd_steps")
    max_utterances: int | None = _robustness_default("max_utterances")
    # which val_robust/* twins (the same conditions on the validation speakers) each trial
    # measures: ``selection`` - those the search reads (objective metrics, constraints); ``all``
    # - every condition (gate a promotion on any of them later). The test speakers' robust/*
    # report is always complete.
    validation: Literal["selection", "all"] = "selection"


class ReferenceSpec(_Strict):
    """The field's reference baseline, computed on the search's own split before its trials (the
    trainable's ``reference`` hook; ``reference: null`` turns it off): ``egemaps_lr`` is eGeMAPS
    functionals (opensmile) + a standardised, class-balanced logistic regression, fitted on the
    training speakers, C chosen on the validation speakers, reported on the test speakers."""

    model: Literal["egemaps_lr"] = "egemaps_lr"


class ConfirmSpec(_Strict):
    top_k: int = Field(3, ge=1)  # configurations re-trained after the search
    seeds: int = Field(3, ge=0)  # fresh seeds each; promotion ranks them by the mean (0: none)
    # a cross-validated search: re-train the best configuration once on all training speakers
    # (every fold's), for its best epoch count; promotion registers that model
    refit: bool = False


class StopSpec(_Strict):
    """End the search early once its trials can no longer be told apart (``sertune.stoprule``).

    Both rules weigh an improvement against one run's noise of the objective, ``noise_sd``: what
    ``sertune bench noise`` prints as the objective's "within sd" on this corpus."""

    terminator: bool = False  # Optuna's Terminator: stop when the regret bound < the noise
    patience: int | None = Field(None, ge=1)  # stop after N trials without a resolved improvement
    noise_sd: float | None = Field(None, gt=0)  # a trial objective's sd (or from its repeats)
    min_trials: int = Field(8, ge=2)  # never stop before this many trials have ended


class StrategySpec(_Strict):
    """How the search proposes and stops trials (``sertune.strategies`` lists every choice)."""

    sampler: str = "tpe"  # tpe | random | cmaes | gp | nsga2 | grid
    sampler_options: dict[str, Any] = {}
    scheduler: str | None = None  # asha | hyperband | median | none (default: asha; none if multi)
    scheduler_options: dict[str, Any] = {}
    warm_start: list[str] = []  # earlier searches (or MLflow experiments) seeding the sampler
    stop: StopSpec | None = None  # end early when trials can no longer be told apart

    def scheduler_name(self, multi: bool) -> str:
        from .strategies import default_scheduler

        return self.scheduler or default_scheduler(multi)


class SearchSpec(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    trainable: str
    seed: int = 0
    data: DataSpec
    objective: ObjectiveSpec
    budget: BudgetSpec = BudgetSpec()
    search: StrategySpec = StrategySpec()
    resources: ResourcesSpec = ResourcesSpec()
    params: dict[str, Any] = {}  # fixed trainable parameters (dotted names)
    space: dict[str, ParamSpec] = {}  # searched parameters (dotted names)
    define_by_run: str | None = None  # "file.py:function" beside the spec: conditional params
    robustness: RobustnessSpec | None = RobustnessSpec()  # null turns it off
    reference: ReferenceSpec | None = ReferenceSpec()  # the eGeMAPS + linear row; null: off
    confirm: ConfirmSpec | None = None  # re-train the top configurations with fresh seeds
    baseline: str | None = None  # e.g. stl_baseline: the same search with the aux tasks off
    execution: Literal["warm", "per_trial"] = (
        "warm"  # warm slots (default) or one Train run per trial
    )
    device: str = "auto"  # auto | cpu | cuda

    # filled by load_spec
    source: str = ""

    def select_metric(self, trainable: Trainable) -> MetricSpec:
        """Which epoch metric picks a trial's best checkpoint: the first objective that is reported
        every epoch, else the trainable's own checkpoint metric."""
        for m in self.objective.as_list():
            if m.metric in trainable.epoch_metrics:
                return m
        metric, mode = trainable.checkpoint_metric
        return MetricSpec(metric=metric, mode=mode)

    @property
    def metrics(self) -> list[MetricSpec]:
        """The objectives, first one first."""
        return self.objective.as_list()

    @property
    def scheduler(self) -> str:
        """The scheduler this search runs (the spec's, or the default for its objectives)."""
        return self.search.scheduler_name(self.objective.multi)

    def robustness_options(self) -> dict[str, Any] | None:
        """The robustness options as the trainable reads them (None: no robustness report).
        With ``validation: selection``, ``validation_metrics`` lists the ``val_robust/*`` twins
        the search reads: what each trial measures on its validation speakers."""
        if not self.robustness:
            return None
        out = self.robustness.model_dump()
        if out.pop("validation") == "selection":
            read = [m.metric or "" for m in self.metrics]
            for c in self.objective.constraints:  # (not validated yet where validation asks)
                m = _CONDITION.match(c)
                read += [m.group(1)] if m else []
            out["validation_metrics"] = sorted({m for m in read if m.startswith("val_robust/")})
        return out

    def cross_corpus_names(self) -> list[str]:
        return [c.name or c.corpus for c in self.data.cross_corpus]


# -- presets ------------------------------------------------------------------------------------------


def presets_dir() -> Path:
    import search_spaces

    return Path(search_spaces.__file__).parent


def presets() -> dict[str, Path]:
    """Packaged presets by name (``mtl_aug`` -> .../search_spaces/mtl_aug.yaml)."""
    return {p.stem: p for p in sorted(presets_dir().glob("*.yaml"))}


def resolve_spec_path(spec: str | Path) -> Path:
    """A path as given, or a packaged preset's name (``mtl_aug``, ``mtl_aug.yaml``)."""
    path = Path(spec)
    if path.is_file():
        return path
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if len(path.parts) <= 2 and name in presets():  # `mtl_aug` or `search_spaces/mtl_aug.yaml`
        return presets()[name]
    return path


# -- editing a raw spec ----------------------------------------------------------------------------------


def apply_sets(raw: dict[str, Any], sets: list[str], source: str) -> dict[str, Any]:
    """``--set data.root=/x --set budget.trials=8 --set space.loss.w_aug.low=0.1``: dotted
    path = YAML value. Parameter names are dotted themselves (``params.loss.w_aug=0`` sets
    ``params["loss.w_aug"]``); a searched parameter's fields follow its name."""
    raw = copy.deepcopy(raw)
    problems = []
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            problems.append(("--set", f"expected KEY=VALUE, got {item!r}"))
            continue
        parts = key.split(".")
        if parts[0] not in SearchSpec.model_fields and len(parts) > 1 and _param(raw, key):
            parts = ["params", *parts]  # a trainable parameter: --set model.encoder=ssl
            key = "params." + key
        if parts[0] in ("params", "space") and len(parts) > 1:
            rest = ".".join(parts[1:])
            section = raw.setdefault(parts[0], {}) or {}
            raw[parts[0]] = section
            owner = next(
                (n for n in sorted(section, key=len, reverse=True) if rest.startswith(n + ".")),
                None,
            )
            if parts[0] == "space" and owner is not None:
                field = rest[len(owner) + 1 :]
                if not isinstance(section[owner], dict):
                    problems.append((key, f"space.{owner} is not a mapping"))
                    continue
                section[owner] = {**section[owner], field: yaml.safe_load(value)}
            else:
                section[rest] = yaml.safe_load(value)
            continue
        node = raw
        bad = False
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append((key, "cannot --set inside a non-mapping value"))
                bad = True
                break
        if not bad:
            node[parts[-1]] = yaml.safe_load(value)
    if problems:
        raise SpecError(source, problems=problems)
    return raw


def _param(raw: dict[str, Any], key: str) -> bool:
    """Whether ``key`` is a parameter of the spec's trainable (``--set`` takes it without the
    ``params.`` prefix where no spec field has that name)."""
    from .trainable import get_trainable

    try:
        return key in get_trainable(str(raw.get("trainable", ""))).param_names()
    except Exception:  # noqa: BLE001 - an unknown trainable is refused later, by name
        return False


def smoke_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """Shrink any spec to a smoke run: 2 trials, 1 epoch, 2 steps, the trainable's tiny model, CPU."""
    from .trainable import get_trainable

    t = get_trainable(raw.get("trainable", ""))
    out = dict(raw)
    out["budget"] = {
        **raw.get("budget", {}),
        "trials": 2,
        "concurrency": 2,
        "max_epochs": 1,
        "grace_epochs": 1,
        "max_steps_per_epoch": 2,
    }
    out["resources"] = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
    out["device"] = "cpu"
    out["params"] = {**raw.get("params", {}), **t.smoke_params()}
    out["space"] = {k: v for k, v in (raw.get("space") or {}).items() if k not in t.smoke_params()}
    if raw.get("confirm") is not None:
        out["confirm"] = {
            "top_k": 1,
            "seeds": 2,
            "refit": isinstance(raw["confirm"], dict) and bool(raw["confirm"].get("refit")),
        }
    if raw.get("robustness") is not None:
        out["robustness"] = {
            "snrs_db": [10],
            "noises": ["white"],
            "fgsm_eps": [0.005],
            "pgd_eps": [],
            "max_utterances": 16,
        }
    data = dict(raw.get("data", {}))
    if data.get("corpus") == "synthetic":
        data["synthetic"] = {"n_speakers": 5, "per_class": 3, "seed": 0}
        data["root"] = f"{data.get('root', '${SERTUNE_HOME}/data/synthetic')}-smoke"
    out["data"] = data
    return out


# -- loading and validating ------------------------------------------------------------------------------


def load_spec(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    smoke: bool = False,
) -> SearchSpec:
    """Read, parse and fully validate a spec (a path or a preset name); raise :class:`SpecError`
    listing every problem.

    ``overrides`` replace top-level fields, ``sets`` are ``KEY=VALUE`` edits (``--set``), and
    ``smoke`` shrinks the search to a CPU smoke run (``--smoke``).
    """
    path = resolve_spec_path(path)
    src = str(path)
    if not path.is_file():
        known = ", ".join(presets())
        raise SpecError(src, "", f"spec file not found (packaged presets: {known})")
    raw = read_yaml(path, src)
    if not isinstance(raw, dict):
        raise SpecError(src, "", "expected a mapping at the top level")
    raw.setdefault("name", path.stem)
    for k, v in (overrides or {}).items():
        raw[k] = v
    if sets:
        raw = apply_sets(raw, sets, src)
    if smoke:
        if raw.get("trainable") is None:
            raise SpecError(src, "trainable", "Field required")
        from .trainable import UnknownTrainable

        try:
            raw = smoke_overrides(raw)
        except UnknownTrainable as e:
            raise SpecError(src, "trainable", str(e)) from None
    return validate_spec(raw, src, set_keys=frozenset(s.partition("=")[0] for s in sets or []))


def _expand_paths(value: Any) -> Any:
    """``${SERTUNE_HOME}``, other environment variables and ``~`` in data paths."""
    from . import settings

    if isinstance(value, str):
        value = value.replace("${SERTUNE_HOME}", str(settings.home()))
        return (
            os.path.expanduser(os.path.expandvars(value))
            if ("$" in value or value.startswith("~"))
            else value
        )
    if isinstance(value, list):
        return [_expand_paths(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand_paths(v) for k, v in value.items()}
    return value


def _follow_the_user(
    raw: dict[str, Any], set_keys: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Defaults yield to what the user wrote: ``grace_epochs`` never exceeds ``max_epochs`` when
    it was not chosen explicitly - left at its default, or written in a file whose
    ``max_epochs`` the user just changed with ``--set`` (``max_epochs: 1`` alone is a valid
    budget; ``--set budget.max_epochs=1`` on a preset with ``grace_epochs: 4`` too)."""
    budget = raw.get("budget")
    if not isinstance(budget, dict):
        return raw
    max_epochs = budget.get("max_epochs", BudgetSpec.model_fields["max_epochs"].default)
    grace = budget.get("grace_epochs", BudgetSpec.model_fields["grace_epochs"].default)
    explicit = "budget.grace_epochs" in set_keys or (
        "grace_epochs" in budget and "budget.max_epochs" not in set_keys
    )
    if (
        isinstance(max_epochs, int)
        and isinstance(grace, int)
        and grace > max_epochs
        and not explicit
    ):
        raw = {**raw, "budget": {**budget, "grace_epochs": max(1, max_epochs)}}
    return raw


def validate_spec(
    raw: dict[str, Any],
    source: str = "<spec>",
    check_paths: bool = True,
    set_keys: frozenset[str] = frozenset(),
) -> SearchSpec:
    """Parse and check a raw spec; raise :class:`SpecError` with every problem found.
    ``set_keys`` are the dotted fields the user gave on the command line (``--set``)."""
    if isinstance(raw.get("data"), dict):
        raw = {**raw, "data": _expand_paths(raw["data"])}
    raw = _follow_the_user(raw, set_keys)
    try:
        spec = SearchSpec(**raw, source=source)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc, msg = ".".join(str(p) for p in err["loc"]), err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown key (allowed: {_allowed(err['loc'])})"
            elif "input" in err and err["type"] not in ("missing",):
                msg = f"{msg} (got {_shown(err['input'])})"
            problems.append((loc, msg.removeprefix("Value error, ")))
        raise SpecError(source, problems=problems) from None
    problems = _check_semantics(spec, check_paths)
    if problems:
        raise SpecError(source, problems=problems)
    return spec


def _allowed(loc: tuple) -> str:
    model: Any = SearchSpec
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None:
            return "?"
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        model = next(
            (a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None:
            return "?"
    return ", ".join(k for k in model.model_fields if k != "source")


def _check_semantics(spec: SearchSpec, check_paths: bool = True) -> list[tuple[str, str]]:
    from .trainable import UnknownTrainable, get_trainable

    src = spec.source
    problems: list[tuple[str, str]] = []
    try:
        trainable = get_trainable(spec.trainable)
    except UnknownTrainable as e:
        return [("trainable", str(e))]

    # data
    if spec.data.corpus not in trainable.corpora():
        problems.append(
            (
                "data.corpus",
                f"unknown corpus {spec.data.corpus!r}; known: {', '.join(trainable.corpora())}",
            )
        )
    refs = [("data", spec.data.corpus, spec.data.root)]
    if spec.data.unlabelled:
        refs.append(("data.unlabelled", spec.data.unlabelled.corpus, spec.data.unlabelled.root))
    refs += [
        (f"data.cross_corpus.{i}", c.corpus, c.root) for i, c in enumerate(spec.data.cross_corpus)
    ]
    for field, corpus, root in refs:
        if corpus not in trainable.corpora():
            if field != "data":  # the main corpus was named above, with the known ones
                problems.append((f"{field}.corpus", f"unknown corpus {corpus!r}"))
            continue
        if check_paths and corpus != "synthetic" and not Path(root).expanduser().exists():
            problems.append((f"{field}.root", f"data root does not exist: {root}"))
    if check_paths:
        for i, f in enumerate(spec.data.noise_files):
            if not Path(f).expanduser().is_file():
                problems.append((f"data.noise_files.{i}", f"noise file not found: {f}"))

    # objective
    known_metrics = trainable.metric_names(spec.robustness_options(), spec.cross_corpus_names())
    for i, m in enumerate(spec.objective.as_list()):
        field = (
            "objective.metric" if not spec.objective.metrics else f"objective.metrics.{i}.metric"
        )
        if m.metric not in known_metrics:
            problems.append(
                (field, f"unknown metric {m.metric!r}; known: {', '.join(sorted(known_metrics))}")
            )
        elif reported_only(m.metric):
            problems.append((field, reported_only(m.metric)))
        elif m.metric not in trainable.epoch_metrics and not spec.objective.multi:
            problems.append(
                (
                    field,
                    f"{m.metric!r} is only known at the end of a trial; ASHA needs an epoch "
                    f"metric (e.g. {trainable.epoch_metrics[0]}), or list several metrics for a "
                    "multi-objective search",
                )
            )
    problems += _check_constraints(spec, known_metrics)
    if spec.objective.cv is not None:
        problems += _check_cv(spec, trainable)
    if spec.objective.repeats > 1:
        problems += _check_repeats(spec)
    if spec.confirm is not None:
        problems += _check_confirm(spec)
    if spec.budget.grace_epochs > spec.budget.max_epochs:
        problems.append(
            (
                "budget.grace_epochs",
                f"({spec.budget.grace_epochs}) > budget.max_epochs ({spec.budget.max_epochs})",
            )
        )
    problems += _check_strategy(spec)
    if spec.baseline is not None and spec.baseline not in trainable.baselines():
        known = ", ".join(trainable.baselines()) or "none"
        problems.append(("baseline", f"unknown baseline {spec.baseline!r} (known: {known})"))

    # space and params
    names = trainable.param_names()
    for name in spec.params:
        if name not in names:
            problems.append((f"params.{name}", f"unknown parameter for {spec.trainable}"))
    for name, p in spec.space.items():
        field = f"space.{name}"
        if name not in names:
            problems.append((field, f"unknown parameter for {spec.trainable}"))
        elif name in spec.params:
            problems.append((field, "is both fixed (params) and searched (space)"))
        problems += _check_param(field, p)
    if spec.define_by_run:
        try:
            load_define_by_run(spec.define_by_run, Path(src).parent, src)
        except SpecError as e:
            problems += e.problems
    if problems:  # the dry runs below only make sense on a well-formed spec
        return problems

    # the fixed params alone, then every corner of the space, must give a trainable config
    try:
        trainable.validate_params(dict(spec.params))
    except ValueError as e:
        named = [k for k in spec.params if k in str(e)]
        return [(f"params.{named[0]}" if named else "params", str(e))]
    for corner, suspects in _corners(spec):
        try:
            trainable.validate_params({**spec.params, **corner})
        except ValueError as e:
            named = [k for k in suspects if k in str(e)] or suspects
            return [(f"space.{named[0]}", f"{e} (at {corner})")]
    return []


def _check_strategy(spec: SearchSpec) -> list[tuple[str, str]]:
    from . import strategies

    s, multi = spec.search, spec.objective.multi
    problems = strategies.check("sampler", s.sampler, s.sampler_options, multi)
    problems += strategies.check("scheduler", s.scheduler_name(multi), s.scheduler_options, multi)
    if s.sampler == "grid":
        if spec.define_by_run:
            problems.append(
                (
                    "search.sampler",
                    "grid needs every parameter in `space`; "
                    "define_by_run parameters are unknown before the search",
                )
            )
        for name, p in spec.space.items():
            if p.grid_values() is None:
                problems.append(
                    (f"space.{name}", "grid needs a step for a float parameter (or type: choice)")
                )
    if s.scheduler_name(multi) == "pbt":
        problems += _check_pbt(spec)
    if s.stop is not None:
        problems += _check_stop(spec)
    for i, name in enumerate(s.warm_start):
        if not name.strip():
            problems.append((f"search.warm_start.{i}", "empty name"))
        elif name == spec.name:
            problems.append((f"search.warm_start.{i}", f"{name!r} is this search"))
    return problems


def _check_cv(spec: SearchSpec, trainable: Trainable) -> list[tuple[str, str]]:
    problems = []
    if not trainable.supports_cv:
        problems.append(
            ("objective.cv", f"trainable {spec.trainable!r} does not train cross-validation folds")
        )
    return problems + _replica_jobs_need(spec, "objective.cv", "fold jobs", "K folds")


def _check_confirm(spec: SearchSpec) -> list[tuple[str, str]]:
    c, problems = spec.confirm, []
    if c.refit and spec.objective.cv is None:
        problems.append(
            (
                "confirm.refit",
                "re-trains on every fold's training speakers: it needs objective.cv (without "
                "folds the trials already train on all of them)",
            )
        )
    if c.seeds == 0 and not c.refit:
        problems.append(("confirm.seeds", "0 re-trains nothing: give seeds >= 1 or refit: true"))
    return problems


def _check_repeats(spec: SearchSpec) -> list[tuple[str, str]]:
    return _replica_jobs_need(spec, "objective.repeats", "repeat jobs", "R repeats")


def _replica_jobs_need(
    spec: SearchSpec, field: str, jobs: str, many: str
) -> list[tuple[str, str]]:
    """What a trial of several jobs (folds, repeats) needs: warm slots, and no PBT."""
    problems = []
    if spec.execution != "warm":
        problems.append((field, f"{jobs} run on warm slots: execution: warm"))
    if spec.search.scheduler_name(spec.objective.multi) == "pbt":
        problems.append((field, f"population-based training hands over one model, not {many}"))
    return problems


def _check_constraints(spec: SearchSpec, known: set[str]) -> list[tuple[str, str]]:
    from . import strategies

    problems = []
    for i, text in enumerate(spec.objective.constraints):
        field = f"objective.constraints.{i}"
        try:
            c = Condition.parse(text)
        except ValueError as e:
            problems.append((field, str(e)))
            continue
        if c.op == "==":
            problems.append((field, "a constraint bounds a figure: use >=, >, <= or <"))
        elif c.metric not in known:
            problems.append(
                (field, f"unknown metric {c.metric!r}; known: {', '.join(sorted(known))}")
            )
        elif reported_only(c.metric):
            problems.append((field, reported_only(c.metric)))
    if spec.objective.constraints:
        s, multi = spec.search, spec.objective.multi
        able = [n for n, st in strategies.SAMPLERS.items() if st.constraints]
        if s.scheduler_name(multi) == "pbt":
            problems.append(
                ("objective.constraints", "population-based training has no sampler to steer")
            )
        elif s.sampler not in able:
            problems.append(
                (
                    "objective.constraints",
                    f"sampler {s.sampler!r} cannot use constraints; these can: {', '.join(able)}",
                )
            )
    return problems


def _check_stop(spec: SearchSpec) -> list[tuple[str, str]]:
    stop, multi = spec.search.stop, spec.objective.multi
    if not (stop.terminator or stop.patience):
        return [("search.stop", "give `terminator: true` and/or `patience: N` (trials)")]
    problems = []
    if multi:
        problems.append(("search.stop", "the stop rules need a single objective"))
    if spec.search.scheduler_name(multi) == "pbt":
        problems.append(
            ("search.stop", "population-based training runs one population; nothing ends early")
        )
    if stop.noise_sd is None and spec.objective.repeats < 2:
        cv = spec.objective.cv
        bench = f"sertune bench noise {Path(spec.source).stem or 'SPEC'}" + (
            f" --set objective.cv.folds={cv.folds}" if cv else ""
        )
        problems.append(
            (
                "search.stop.noise_sd",
                f"the rules weigh gains against a trial objective's noise: give `{bench}`'s "
                "'within sd' here, or objective.repeats >= 2 (the search measures it)"
                + (
                    "; the folds' spread is not that noise (mostly speaker difficulty)"
                    if cv
                    else ""
                ),
            )
        )
    if stop.terminator and not spec.space:
        problems.append(
            ("search.stop.terminator", "needs parameters in `space` (its model of the objective)")
        )
    if stop.min_trials > spec.budget.trials:
        problems.append(
            (
                "search.stop.min_trials",
                f"({stop.min_trials}) > budget.trials ({spec.budget.trials}): it would never stop",
            )
        )
    return problems


def _check_pbt(spec: SearchSpec) -> list[tuple[str, str]]:
    """Population-based training perturbs trials while they train, from checkpoints."""
    from .strategies import pbt_mutable
    from .trainable import get_trainable

    problems = []
    s = spec.search
    if s.sampler != "random":
        problems.append(
            (
                "search.sampler",
                "pbt explores the population itself and changes "
                "configurations mid-trial, which a model-based sampler would misread: "
                "use sampler: random",
            )
        )
    if spec.execution != "warm":
        problems.append(
            ("execution", "pbt hands checkpoints between warm slots: use execution: warm")
        )
    if spec.confirm is not None:
        problems.append(
            (
                "confirm",
                "a PBT result is a schedule, not a fixed configuration; "
                "confirmation re-trains fixed configurations (remove confirm)",
            )
        )
    if s.warm_start:
        problems.append(("search.warm_start", "pbt starts from a random population"))
    if spec.define_by_run:
        problems.append(("define_by_run", "pbt draws its population from `space` alone"))
    defaults = get_trainable(spec.trainable).pbt_defaults
    mutable = pbt_mutable(list(spec.space), defaults, s.scheduler_options)
    for name in mutable:
        if name not in spec.space:
            problems.append(("search.scheduler_options.mutate", f"{name!r} is not in space"))
    if not mutable:
        problems.append(
            (
                "space",
                f"pbt perturbs {', '.join(p + '*' if p.endswith('_') else p for p in defaults)} "
                "by default; none is searched here (or name them in scheduler_options.mutate)",
            )
        )
    return problems


def _check_param(field: str, p: ParamSpec) -> list[tuple[str, str]]:
    if p.type == "choice":
        if not p.values:
            return [(f"{field}.values", "a choice needs at least one value")]
        if p.low is not None or p.high is not None:
            return [(field, "a choice takes `values`, not low/high")]
        return []
    if p.values is not None:
        return [(f"{field}.values", f"only a choice takes values (type is {p.type})")]
    if p.low is None or p.high is None:
        return [(field, f"a {p.type} needs low and high")]
    if not (math.isfinite(p.low) and math.isfinite(p.high)):
        return [(field, "low and high must be finite")]
    if p.low > p.high:
        return [(field, f"low ({p.low}) > high ({p.high})")]
    if p.log and p.low <= 0:
        return [(f"{field}.low", f"a log scale needs low > 0, got {p.low}")]
    if p.type == "int" and not (float(p.low).is_integer() and float(p.high).is_integer()):
        return [(field, f"an int needs whole low/high, got {p.low}..{p.high}")]
    if p.step is not None and (p.step <= 0 or p.log):
        return [(f"{field}.step", "step must be > 0 and cannot be combined with log")]
    return []


def _corners(spec: SearchSpec) -> list[tuple[dict[str, Any], list[str]]]:
    """The all-low and all-high corners of the space, plus the low corner with each other value
    of every choice, for a dry check of what the trainable accepts; each with the parameters
    that may be to blame."""
    lo, hi = {}, {}
    for name, p in spec.space.items():
        if p.type == "choice":
            lo[name], hi[name] = p.values[0], p.values[-1]
        else:
            cast = int if p.type == "int" else float
            lo[name], hi[name] = cast(p.low), cast(p.high)
    if not spec.space:
        return [({}, [])]
    middle = [
        ({**lo, name: v}, [name])
        for name, p in spec.space.items()
        if p.type == "choice"
        for v in p.values[1:-1]
    ]
    return [(lo, list(lo)), (hi, list(hi)), *middle]


def load_define_by_run(ref: str, base: Path, src: str = "<spec>"):
    """Import ``file.py:function`` (relative to the spec's folder) for Optuna define-by-run."""
    file, _, func = ref.partition(":")
    path = (base / file) if not Path(file).is_absolute() else Path(file)
    if not func or not path.is_file():
        raise SpecError(
            src, "define_by_run", f"expected 'file.py:function' beside the spec, got {ref!r}"
        )
    mod_spec = importlib.util.spec_from_file_location(f"sertune_space_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    try:
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        raise SpecError(src, "define_by_run", f"{path}: failed to import: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise SpecError(src, "define_by_run", f"{path}: no function {func!r}")
    return fn


def split_signature(spec: SearchSpec) -> dict[str, Any]:
    """What fixes which speakers a search's trials train, validate and test on (besides the
    corpus itself): two searches with the same signature on the same data share every fold's
    speakers, so their figures pair fold by fold (``sertune compare``)."""
    cv = spec.objective.cv
    return {
        "fold": spec.data.fold,
        "n_folds": spec.data.n_folds,
        "cv_folds": cv.folds if cv is not None else 0,
        "dealing": getattr(spec.data, "dealing", "sorted"),
    }
