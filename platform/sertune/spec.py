"""Search specs: YAML files in ``search_spaces/``, validated once, before anything starts.

Every error names the file, the dotted field and what was expected, e.g.::

    search_spaces/x.yaml: space.loss.w_aug: low (2.0) > high (1.0)

and the CLI exits with code 2 before Ray is started. See ``search_spaces/mtl_aug.yaml`` for a
commented example of every field.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Scalar = bool | int | float | str | None


class SpecError(ValueError):
    """A spec is invalid. ``str()`` is one line: ``FILE: FIELD: message``."""

    def __init__(self, source: str, field: str, message: str):
        self.source, self.field, self.message = source, field, message
        super().__init__(f"{source}: {field}: {message}" if field else f"{source}: {message}")


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


class MetricSpec(_Strict):
    metric: str
    mode: Literal["max", "min"] = "max"


class ObjectiveSpec(_Strict):
    metric: str | None = None  # a single objective ...
    mode: Literal["max", "min"] = "max"
    metrics: list[MetricSpec] = []  # ... or several (multi-objective, Pareto front)

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


class BudgetSpec(_Strict):
    trials: int = Field(20, ge=1)
    concurrency: int = Field(2, ge=1)
    max_epochs: int = Field(20, ge=1)
    grace_epochs: int = Field(2, ge=1)  # ASHA: no trial is stopped before this many epochs
    reduction_factor: float = Field(3.0, gt=1.0)  # ASHA: keep the top 1/rf at each rung
    max_steps_per_epoch: int | None = Field(None, ge=1)  # cap for smoke runs
    trial_max_failures: int = Field(0, ge=0)  # Ray Train restarts a crashed worker group


class ResourcesSpec(_Strict):
    workers: int = Field(1, ge=1)  # Ray Train workers per trial (DDP when > 1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0)  # fractions pack several trials onto one GPU

    @model_validator(mode="after")
    def _whole_or_fraction(self) -> ResourcesSpec:
        g = self.gpus_per_worker
        if g > 1 and not float(g).is_integer():
            raise ValueError(f"gpus_per_worker: above 1 it must be whole, got {g}")
        return self


class ParamSpec(_Strict):
    type: Literal["float", "int", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    values: list[Scalar] | None = None


class RobustnessSpec(_Strict):
    snrs_db: list[float] = [20.0, 10.0, 5.0, 0.0]
    noises: list[Literal["white", "babble", "file"]] = ["white", "babble"]
    fgsm_eps: list[float] = [0.001, 0.005, 0.01]  # on the waveform (full scale = 1)
    pgd_eps: list[float] = [0.005]
    pgd_steps: int = 5
    max_utterances: int | None = 200  # of the test set, to bound the cost per trial


class SearchSpec(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    trainable: str
    seed: int = 0
    data: DataSpec
    objective: ObjectiveSpec
    budget: BudgetSpec = BudgetSpec()
    resources: ResourcesSpec = ResourcesSpec()
    params: dict[str, Any] = {}  # fixed trainable parameters (dotted names)
    space: dict[str, ParamSpec] = {}  # searched parameters (dotted names)
    define_by_run: str | None = None  # "file.py:function" beside the spec: conditional params
    robustness: RobustnessSpec | None = RobustnessSpec()  # null turns it off
    device: str = "auto"  # auto | cpu | cuda

    # filled by load_spec
    source: str = ""

    def scheduler_metric(self) -> MetricSpec:
        return self.objective.as_list()[0]


def _fmt_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def apply_sets(raw: dict[str, Any], sets: list[str], source: str) -> dict[str, Any]:
    """``--set data.root=/x --set budget.trials=8``: dotted path = YAML value."""
    import copy

    raw = copy.deepcopy(raw)
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SpecError(source, "--set", f"expected KEY=VALUE, got {item!r}")
        node = raw
        parts = key.split(".")
        # params/space keys are dotted names themselves: `params.loss.w_aug=0` sets params["loss.w_aug"]
        if parts[0] in ("params", "space") and len(parts) > 1:
            parts = [parts[0], ".".join(parts[1:])]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(source, key, "cannot --set inside a non-mapping value")
        node[parts[-1]] = yaml.safe_load(value)
    return raw


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


def load_spec(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    smoke: bool = False,
) -> SearchSpec:
    """Read, parse and fully validate a spec; raise :class:`SpecError` on the first problem.

    ``overrides`` replace top-level fields, ``sets`` are ``KEY=VALUE`` edits (``--set``), and
    ``smoke`` shrinks the search to a CPU smoke run (``--smoke``).
    """
    path = Path(path)
    src = str(path)
    if not path.is_file():
        raise SpecError(src, "", "spec file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(src, "", f"not valid YAML: {e}".replace("\n", " ")) from None
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
            raise SpecError(src, "trainable", str(e.args[0])) from None
    return validate_spec(raw, src)


def _expand_paths(value: Any) -> Any:
    """``${SERTUNE_HOME}``, other environment variables and ``~`` in data paths."""
    import os

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


def validate_spec(raw: dict[str, Any], source: str = "<spec>") -> SearchSpec:
    if isinstance(raw.get("data"), dict):
        raw = {**raw, "data": _expand_paths(raw["data"])}
    try:
        spec = SearchSpec(**raw, source=source)
    except ValidationError as e:
        err = e.errors()[0]
        loc, msg = _fmt_loc(err["loc"]), err["msg"]
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (allowed: {_allowed(err['loc'])})"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        raise SpecError(source, loc, msg) from None
    _check_semantics(spec)
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


def _check_semantics(spec: SearchSpec) -> None:
    from .trainable import UnknownTrainable, get_trainable

    src = spec.source
    try:
        trainable = get_trainable(spec.trainable)
    except UnknownTrainable as e:
        raise SpecError(src, "trainable", str(e.args[0])) from None

    # data
    if spec.data.corpus not in trainable.corpora():
        raise SpecError(
            src,
            "data.corpus",
            f"unknown corpus {spec.data.corpus!r}; known: {', '.join(trainable.corpora())}",
        )
    refs = [("data", spec.data.corpus, spec.data.root)]
    if spec.data.unlabelled:
        refs.append(("data.unlabelled", spec.data.unlabelled.corpus, spec.data.unlabelled.root))
    refs += [
        (f"data.cross_corpus.{i}", c.corpus, c.root) for i, c in enumerate(spec.data.cross_corpus)
    ]
    for field, corpus, root in refs:
        if corpus not in trainable.corpora():
            raise SpecError(src, f"{field}.corpus", f"unknown corpus {corpus!r}")
        if corpus != "synthetic" and not Path(root).expanduser().exists():
            raise SpecError(src, f"{field}.root", f"data root does not exist: {root}")
    for i, f in enumerate(spec.data.noise_files):
        if not Path(f).expanduser().is_file():
            raise SpecError(src, f"data.noise_files.{i}", f"noise file not found: {f}")

    # objective
    known_metrics = trainable.metric_names() | _robust_metric_names(spec)
    for i, m in enumerate(spec.objective.as_list()):
        field = (
            "objective.metric" if not spec.objective.metrics else f"objective.metrics.{i}.metric"
        )
        if m.metric not in known_metrics:
            raise SpecError(
                src,
                field,
                f"unknown metric {m.metric!r}; known: {', '.join(sorted(known_metrics))}",
            )
        if m.metric.startswith("test_"):
            raise SpecError(src, field, "never optimise on the test speakers; use a val_* metric")
        if m.metric not in trainable.epoch_metrics and not spec.objective.multi:
            raise SpecError(
                src,
                field,
                f"{m.metric!r} is only known at the end of a trial; ASHA needs an "
                "epoch metric (e.g. val_uar), or list several metrics for a multi-objective search",
            )
    if spec.budget.grace_epochs > spec.budget.max_epochs:
        raise SpecError(
            src,
            "budget.grace_epochs",
            f"({spec.budget.grace_epochs}) > budget.max_epochs ({spec.budget.max_epochs})",
        )

    # space and params
    names = trainable.param_names()
    for name in spec.params:
        if name not in names:
            raise SpecError(src, f"params.{name}", f"unknown parameter for {spec.trainable}")
    for name, p in spec.space.items():
        field = f"space.{name}"
        if name not in names:
            raise SpecError(src, field, f"unknown parameter for {spec.trainable}")
        if name in spec.params:
            raise SpecError(src, field, "is both fixed (params) and searched (space)")
        _check_param(src, field, p)
    if spec.define_by_run:
        load_define_by_run(spec.define_by_run, Path(src).parent, src)

    # the fixed params alone, then every corner of the space, must give a trainable config
    try:
        trainable.validate_params(dict(spec.params))
    except ValueError as e:
        named = [k for k in spec.params if k in str(e)]
        raise SpecError(src, f"params.{named[0]}" if named else "params", str(e)) from None
    for corner in _corners(spec):
        try:
            trainable.validate_params({**spec.params, **corner})
        except ValueError as e:
            named = [k for k in corner if k in str(e)] or list(corner)
            raise SpecError(src, f"space.{named[0]}", f"{e} (at {corner})") from None


def _check_param(src: str, field: str, p: ParamSpec) -> None:
    if p.type == "choice":
        if not p.values:
            raise SpecError(src, f"{field}.values", "a choice needs at least one value")
        if p.low is not None or p.high is not None:
            raise SpecError(src, field, "a choice takes `values`, not low/high")
        return
    if p.values is not None:
        raise SpecError(src, f"{field}.values", f"only a choice takes values (type is {p.type})")
    if p.low is None or p.high is None:
        raise SpecError(src, field, f"a {p.type} needs low and high")
    if not (math.isfinite(p.low) and math.isfinite(p.high)):
        raise SpecError(src, field, "low and high must be finite")
    if p.low > p.high:
        raise SpecError(src, f"{field}", f"low ({p.low}) > high ({p.high})")
    if p.log and p.low <= 0:
        raise SpecError(src, f"{field}.low", f"a log scale needs low > 0, got {p.low}")
    if p.type == "int" and not (float(p.low).is_integer() and float(p.high).is_integer()):
        raise SpecError(src, field, f"an int needs whole low/high, got {p.low}..{p.high}")
    if p.step is not None and (p.step <= 0 or p.log):
        raise SpecError(src, f"{field}.step", "step must be > 0 and cannot be combined with log")


def _corners(spec: SearchSpec) -> list[dict[str, Any]]:
    """The all-low and all-high corners of the space (plus each choice value) for a dry check."""
    lo, hi = {}, {}
    for name, p in spec.space.items():
        if p.type == "choice":
            lo[name], hi[name] = p.values[0], p.values[-1]
        else:
            cast = int if p.type == "int" else float
            lo[name], hi[name] = cast(p.low), cast(p.high)
    return [lo, hi] if spec.space else [{}]


def _robust_metric_names(spec: SearchSpec) -> set[str]:
    r = spec.robustness
    if r is None:
        return set()
    names = {f"robust/uar_snr{int(s)}_{n}" for s in r.snrs_db for n in r.noises}
    names |= {f"robust/uar_fgsm{e:g}" for e in r.fgsm_eps} | {
        f"robust/uar_pgd{e:g}" for e in r.pgd_eps
    }
    names |= {f"robust/uar_cross_{c.name or c.corpus}" for c in spec.data.cross_corpus}
    names |= {"robust/uar_clean", "robust/uar_noise_mean"}
    return names


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
