"""The trainable interface: everything the control plane asks of a model family, and nothing more.

sertune searches, trains, evaluates, serves and benchmarks a trainable only through the methods
below; it never imports a particular one. A trainable is found by name:

1. the ``sertune.trainables`` entry point group (the project registers ``mtl_aug``),
2. ``SERTUNE_TRAINABLES="name=module:attribute,..."`` for trainables that are not installed as a
   distribution (tests register a second, linear trainable this way; Ray workers inherit the
   variable),
3. a built-in fallback for ``mtl_aug`` when the distribution's metadata is absent (a Ray
   ``py_modules`` upload, a model served from its own ``code/`` folder).

Every registered trainable passes the shared suite in ``tests/trainable_suite.py``.

The training loop gets a *session* (:class:`Session`) from the control plane: in-process, a Ray
Train worker, or a warm slot that runs trial after trial. The loop never imports Ray itself.
"""

from __future__ import annotations

import importlib
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from .errors import DataError, UsageError

# Fallback when the distribution's entry points are not installed (a Ray py_modules upload, a
# served model's code folder).
_BUILTIN = {"mtl_aug": "trainables.mtl_aug.trainable:TRAINABLE"}
EXTRA_ENV = "SERTUNE_TRAINABLES"


class Session(Protocol):
    """What a training loop may ask of where it runs (see ``sertune.sessions``)."""

    rank: int
    world_size: int

    def torch_device(self) -> Any:
        """The ``torch.device`` this worker trains on."""

    def all_reduce_sum(self, tensor: Any) -> Any:
        """Sum a tensor over every worker of the trial (identity for one worker)."""

    def wrap_model(self, model: Any) -> Any:
        """The model as this session trains it (DDP across several workers)."""

    def get_checkpoint_dir(self) -> str | None:
        """A local folder to resume from, or None for a fresh start."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """Hand one epoch's metrics (and rank 0's checkpoint folder) to the control plane.

        May raise ``TrialStopped`` when the control plane no longer wants this trial (a scheduler
        stopped it, the search was interrupted): the loop lets it propagate."""

    def poll(self) -> None:
        """Called between steps; raises ``TrialStopped`` as soon as the trial is not wanted."""

    def cache(self) -> dict[str, Any]:
        """A dict that outlives this trial on this worker (warm slots keep corpora resident)."""

    def placement(self) -> dict[str, str]:
        """Where this worker runs, as ``placement/*`` metrics (empty when that says nothing)."""


class TrialStopped(Exception):
    """Raised by a session inside the loop: the control plane stopped this trial."""


class TrialDiverged(RuntimeError):
    """Raised by a training loop whose loss became nan/inf: the configuration's fault, not the
    search's, so it never counts towards stopping a search whose trials fail alike."""


# The parameter that says how many epochs a trial trains (budget.max_epochs; a refit sets fewer)
EPOCHS_PARAM = "optim.epochs"

# -- the trial report: keys the control plane reads by name ----------------------------------------
# Every epoch's report (``Session.report``) carries these besides the trainable's own metrics.
# Schedulers, the leaderboard, MLflow steps and the warm proxies read them by these constants
# (the same contract Ray Tune writes down for ``time_attr``).
EPOCHS_DONE = "epochs_done"  # epochs trained so far (1-based): survives a resume, unlike Tune's
BEST_EPOCH = "best_epoch"  # 0-based epoch whose checkpoint is the trial's result so far
# Added by the control plane to every relayed epoch (never by a trainable): the epoch a trial
# keeps is the best of its smoothed validation curve (``sertune.stats.kept_epoch``: the centred
# 3-epoch mean; under cross-validation the fold-mean curve), and the smoothed figure there is the
# trial's objective (:func:`objective_value`), not the last or the peak epoch's raw figure.
KEPT_EPOCH = "kept_epoch"  # 0-based epoch of the smoothed curve's best so far
KEPT_PREFIX = "kept/"  # kept/<metric>: the smoothed figure at the kept epoch
RAW_BEST_PREFIX = "raw_best/"  # raw_best/<metric>: the best raw epoch figure so far (shown only)
CHECKPOINT_PATH = "checkpoint_path"  # where rank 0's checkpoint of this epoch was persisted
LOOP_STARTED_AT = "loop_started_at"  # wall time the training loop began (benches)
SLOT_NOTE = "slot_note"  # a warm slot's word for the console (a damaged checkpoint passed over)
DATA_MODE = "data_mode"  # where the trial's corpora are ("demo resident"): a tag on its run
# Added by the warm proxy for a replicated objective (objective.cv folds and/or objective.repeats;
# never by a trainable): every figure is the jobs' mean, with ``<figure>_se`` and
# ``<label>/<figure>`` (fold1, rep2, fold1.rep2) beside it, and
CV_FOLD = "cv_fold"  # the index of the job whose model stands for the trial (closest to the mean)
REPLICA_CHECKPOINTS = "replica_checkpoints"  # JSON list: each job's checkpoint this epoch
# Added by the warm proxy under population-based training (never by a trainable):
SCHEDULE_PREFIX = "schedule/"  # schedule/<param>: the value this epoch trained with
PBT_LINEAGE = "pbt_lineage"  # JSON [[epoch, {param: value}, trained as trial], ...]
PBT_EXPLOITED_FROM = "pbt_exploited_from"  # the trial whose checkpoint this one took ...
PBT_EXPLOITED_EPOCH = "pbt_exploited_epoch"  # ... at that epoch
# Reported keys that are bookkeeping, never metrics (MLflow logs neither these nor Tune's own).
REPORT_BOOKKEEPING = frozenset(
    {
        LOOP_STARTED_AT,
        CHECKPOINT_PATH,
        REPLICA_CHECKPOINTS,
        SLOT_NOTE,
        DATA_MODE,
        PBT_LINEAGE,
        PBT_EXPLOITED_EPOCH,
        PBT_EXPLOITED_FROM,
    }
)


def objective_value(metrics: Mapping[str, Any], metric: str) -> Any:
    """A trial's objective figure from its result: the smoothed figure at its kept epoch
    (``kept/<metric>``) when the control plane computed one, else the raw ``metric``."""
    kept = metrics.get(f"{KEPT_PREFIX}{metric}")
    return kept if kept is not None else metrics.get(metric)


def keep_epoch(curve: Sequence[float], metric: str, mode: str) -> tuple[int, float] | None:
    """The epoch a training loop keeps from its ``metric`` curve (0-based epochs) and the
    smoothed figure there; a refit, which selects on :data:`EPOCHS_DONE`, keeps its last."""
    from .stats import kept_epoch

    if metric == EPOCHS_DONE:
        return (len(curve) - 1, float(curve[-1])) if curve else None
    return kept_epoch(curve, mode)


class KeptModel:
    """The model a training loop keeps: the epoch :func:`keep_epoch` picks on its select
    metric's curve. The newest epoch's smoothed figure is provisional (it averages only the
    epochs it has), so the next epoch may make the previous one, or the best of the earlier ones,
    the kept epoch: it holds the states of the newest epoch and of the best settled one (at most
    one copy more than keeping the raw best).

    ``curve``: the values of the epochs before (a resumed loop's, from its checkpoint);
    ``states``: {0-based epoch: model state} a resumed loop still has (its kept epoch's and its
    checkpoint's own)."""

    def __init__(self, metric: str, mode: str, curve: Sequence[float] = (), states=None):
        self.metric, self.mode = metric, mode
        self.curve = [float(v) for v in curve]
        self.states: dict[int, Any] = dict(states or {})
        self.epoch: int | None = None  # the kept epoch (0-based) and its smoothed figure
        self.value: float | None = None

    def _ranks(self) -> list[float]:
        """Each epoch's smoothed figure as :func:`sertune.stats.kept_epoch` ranks it (higher is
        better; a non-finite epoch is the worst)."""
        from .stats import smoothed

        sign = 1.0 if self.mode == "max" else -1.0
        return [sign * s if math.isfinite(s) else -math.inf for s in smoothed(self.curve)]

    def add(self, value: float, state: Any) -> Any:
        """The next epoch's select figure and model state (a copy the loop no longer changes);
        returns the kept epoch's state (:attr:`epoch`, :attr:`value` say which)."""
        newest = len(self.curve)
        self.curve.append(float(value))
        self.states[newest] = state
        kept, self.value = keep_epoch(self.curve, self.metric, self.mode) or (newest, value)
        need = {newest, kept}
        if self.metric != EPOCHS_DONE and newest:
            ranks = self._ranks()
            need.add(max(range(newest), key=lambda e: (ranks[e], -e)))  # the best settled
        if kept not in self.states:  # a resumed loop that no longer has it: its best at hand
            ranks = self._ranks()
            kept = max(self.states, key=lambda e: (ranks[e], -e))
            self.value = (
                self.curve[kept] if self.metric == EPOCHS_DONE else self._smoothed_at(kept)
            )
        self.epoch = kept
        self.states = {e: s for e, s in self.states.items() if e in need or e == kept}
        return self.states[kept]

    def _smoothed_at(self, epoch: int) -> float:
        from .stats import smoothed

        return smoothed(self.curve)[epoch]


def kept_figures(
    curves: Mapping[str, Mapping[int, float]], modes: Mapping[str, str]
) -> dict[str, Any]:
    """What the control plane adds to a relayed epoch from the trial's curves so far (metric ->
    {0-based epoch: value}; the first metric, the select metric, chooses the epoch):
    :data:`KEPT_EPOCH`, ``kept/<metric>`` (each curve smoothed, at that epoch) and
    ``raw_best/<metric>``."""
    from .stats import smoothed

    out: dict[str, Any] = {}
    if not curves:
        return out
    select = next(iter(curves))
    epochs = sorted(curves[select])
    got = keep_epoch([curves[select][e] for e in epochs], select, modes.get(select, "max"))
    if got is None:
        return out
    kept = out[KEPT_EPOCH] = epochs[got[0]]
    for metric, curve in curves.items():
        have = sorted(curve)
        values = [float(curve[e]) for e in have]
        finite = [v for v in values if math.isfinite(v)]
        if metric == select:
            out[f"{KEPT_PREFIX}{metric}"] = got[1]
        elif finite and len(finite) == len(values):  # at the kept epoch, or the last before it
            at = max([i for i, e in enumerate(have) if e <= kept] or [0])
            out[f"{KEPT_PREFIX}{metric}"] = smoothed(values)[at]
        if finite:
            pick = max if modes.get(metric, "max") == "max" else min
            out[f"{RAW_BEST_PREFIX}{metric}"] = pick(finite)
    return out


# The robustness evaluation's defaults, in one place: a spec's ``robustness:`` section starts
# from them and so does every trainable's evaluation (``trainables.common.robustness``).
ROBUSTNESS_DEFAULTS: dict[str, Any] = {
    "snrs_db": (20.0, 10.0, 5.0, 0.0),  # SNRs of the noisy copies of the test set
    "noises": ("white", "babble"),  # noise types: white, babble, file (data.noise_files)
    "fgsm_eps": (0.001, 0.005, 0.01),  # L-inf budgets on the waveform (full scale = 1)
    "pgd_eps": (0.005,),
    "pgd_steps": 5,
    "max_utterances": 200,  # class-stratified sample of the test set (cost per trial)
}


@dataclass(frozen=True)
class TrainBench:
    """What ``bench_train`` measures: samples/s of the model step alone and of the whole pipeline."""

    ceiling: float  # samples/s: fwd + bwd + step on features already on the device
    pipeline: float  # samples/s: waveform -> augmentation -> features -> the same step
    params: int  # model parameters

    @property
    def ratio(self) -> float:
        return self.pipeline / self.ceiling


@dataclass(frozen=True)
class CheckpointEvaluation:
    """What the evaluation of a stopped trial's best checkpoint gives back to the driver (warm
    slots and per-trial tasks alike): its test and robustness figures and the robustness report's
    files, or why it failed."""

    metrics: dict[str, float] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)  # robustness/<name> -> content
    error: str | None = None


@dataclass(frozen=True)
class CorpusCache:
    """A decoded corpus cache as the control plane reports it (``sertune data cache``)."""

    path: str
    fingerprint: str
    utterances: int
    megabytes: float
    report_summary: str


class Predictor(Protocol):
    """A loaded model: 16 kHz mono float waveforms in, class probabilities out."""

    label_names: list[str]
    sample_rate: int

    def predict_proba(self, waveforms: list[Any]) -> Any:
        """(n,) list of (L_i,) float arrays -> (n, n_classes) probabilities, rows sum to 1."""


class Trainable(ABC):
    """A model family that sertune can search, train, evaluate, serve and benchmark."""

    #: registry name, as written in a spec's ``trainable:`` field
    name: str = ""
    #: metrics reported after every epoch (candidates for objectives and schedulers)
    epoch_metrics: tuple[str, ...] = ()
    #: metrics reported once per trial, from its best-validation epoch (test speakers)
    final_metrics: tuple[str, ...] = ()
    #: what people read first, in order, after the objective: the leaderboard's columns, the
    #: summary's and the MLflow trials table's; the first final metric among them is the
    #: headline figure beside the objective in confirmations and registry descriptions
    display_metrics: tuple[str, ...] = ()
    #: robustness figures worth a column when a trial reports them, in order (trials table,
    #: confirmation, trial notes); the first reported one is the headline robustness figure
    display_robust: tuple[str, ...] = ()
    #: the epoch metric (and its mode) that picks a trial's best checkpoint when no objective is
    #: an epoch metric
    checkpoint_metric: tuple[str, str] = ("", "max")
    #: population-based training perturbs these searched parameters by default (names, or
    #: prefixes ending in ``_`` such as ``aug.p_``): what may change while a model trains
    pbt_defaults: tuple[str, ...] = ()
    #: ``train`` honours ``config["data"]["cv"] = {"fold": k, "folds": K}`` (validates on fold k of
    #: the non-test speakers, e.g. through ``speaker_independent_split(..., cv=...)``): a
    #: cross-validated objective (``objective.cv``) is possible
    supports_cv: bool = False

    # -- the search space ----------------------------------------------------------------------
    @abstractmethod
    def param_names(self) -> set[str]:
        """Every dotted parameter name a spec may set or search (``loss.w_aug``)."""

    @abstractmethod
    def validate_params(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the field when ``params`` cannot train."""

    def smoke_params(self) -> dict[str, Any]:
        """Parameters that make a trial tiny (``--smoke``): seconds on one CPU core."""
        return {}

    def baselines(self) -> dict[str, dict[str, Any]]:
        """Named baselines of this trainable: fixed parameters that turn a spec into its baseline
        with the same data, folds, budget and seeds (``baseline: stl_baseline``)."""
        return {}

    def metric_names(
        self, robustness: dict[str, Any] | None = None, cross_corpus: list[str] | None = None
    ) -> set[str]:
        """Every metric a trial of this trainable reports under these robustness options."""
        return set(self.epoch_metrics) | set(self.final_metrics)

    # -- data ----------------------------------------------------------------------------------
    @abstractmethod
    def corpora(self) -> tuple[str, ...]:
        """Corpus adapter names this trainable reads."""

    @abstractmethod
    def prepare_data(
        self, data: dict[str, Any], cache_root: str, progress: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Build or reuse the decoded caches on the driver; return the loop's ``data`` config,
        with ``fingerprint`` and ``report`` (a data report dict) added."""

    def split_report(self, data: dict[str, Any], cv_folds: int | None = None) -> list[str]:
        """Who tests, validates and trains under ``data`` (a ``prepare_data`` result), one line
        per part; with ``cv_folds`` K each fold's validation speakers. Raises
        :class:`TooFewSpeakerGroups` when K exceeds the groups outside the test set. Printed at
        a search's start and by ``sertune data split``; a trainable without corpora: none."""
        return []

    def speaker_groups(self, data: dict[str, Any]) -> list[str]:
        """The labelled speaker groups (speakers, or sessions) of ``data``'s corpus: what a
        study's outer folds are dealt from. A corpus whose manifest fixes its own split has
        none to deal (:class:`UsageError`)."""
        raise UsageError(f"trainable {self.name!r} has no speaker groups to deal into folds")

    def reference(
        self,
        data: dict[str, Any],
        robustness: dict[str, Any] | None,
        seed: int,
        cache_root: str,
        log: Callable[[str], None] = print,
    ) -> dict[str, Any] | None:
        """The field's reference baseline on ``data``'s split (a ``prepare_data`` result): fitted
        on the training speakers, C chosen on the validation speakers, figures on the test
        speakers under the same names and conditions as a trial's (``test_*``, ``robust/*``);
        None when this trainable has none."""
        return None

    @abstractmethod
    def cache_corpus(self, corpus: str, root: str, cache_root: str) -> CorpusCache:
        """Decode one corpus into the cache (``sertune data cache``)."""

    @abstractmethod
    def synthesise_corpus(self, out: str, **options: Any) -> Path:
        """Write a synthetic corpus for tests and demos; return its manifest."""

    @abstractmethod
    def read_audio(self, path: str, sample_rate: int) -> Any:
        """One file as a mono float waveform; raise ``sertune.errors.DataError`` if unusable."""

    # -- training ------------------------------------------------------------------------------
    @abstractmethod
    def train(self, config: dict[str, Any], session: Session) -> list[dict[str, Any]]:
        """Train one configuration, reporting every epoch through ``session``; return the history.

        ``config`` = ``{"params": {...}, "data": prepare_data(...), "run": {...}}``. The last
        report carries ``final_metrics`` and ``robust/*`` of the best-validation epoch; every
        checkpoint folder holds ``best/`` (the servable model of that epoch)."""

    @abstractmethod
    def evaluate_checkpoint(
        self, checkpoint_dir: str, data: dict[str, Any], run: dict[str, Any], device: str = "cpu"
    ) -> dict[str, Any]:
        """Test and robustness figures of a checkpoint's best model (for trials a scheduler stopped
        before their last epoch). Writes the robustness report into ``checkpoint_dir/best``."""

    # -- serving and reports -------------------------------------------------------------------
    @abstractmethod
    def load_predictor(self, model_dir: str | Path) -> Predictor:
        """Load a saved model without pickle."""

    def check_model(self, params: dict[str, Any]) -> list[tuple[bool, str]]:
        """``sertune doctor SPEC``: build what the spec's model needs beyond the environment (a
        pretrained checkpoint: load it, run it once); ``(ok, one line)`` each, none by default."""
        return []

    def package_model(self, model_dir: str | Path, out: str | Path) -> bool:
        """Write into ``out`` a self-contained copy of the saved model ``model_dir`` when that one
        keeps part of itself outside (a frozen pretrained encoder named by path and content hash,
        so that each trial's model stays small); return False, writing nothing, when it is
        self-contained already. Promotion registers the packaged copy."""
        return False

    @abstractmethod
    def robustness_report(
        self,
        model_dir: str | Path,
        data: dict[str, Any],
        options: dict[str, Any],
        out: Path,
        split: str = "test",
        title: str = "",
    ) -> dict[str, Any]:
        """Evaluate a saved model on ``data`` (``split``: ``test`` speakers or ``all``); write
        ``robustness.json``, plots (named ``title``) and ``summary.md`` into ``out``."""

    @abstractmethod
    def bench_train(
        self, device: str, batch: int | None, steps: int, rounds: int, log: Callable = print
    ) -> TrainBench:
        """``sertune bench train``: the input pipeline against the model step it feeds."""

    def bench_encoder(self, log: Callable = print, **options: Any) -> list[dict[str, Any]]:
        """``sertune bench encoder``: a pretrained encoder's train step, memory per slot and fixed
        cost per trial warm vs from disk, per size and mode (a trainable without one: none)."""
        raise UsageError(f"trainable {self.name!r} has no encoder bench")

    def bench_data(self, log: Callable = print, **options: Any) -> dict[str, Any]:
        """``sertune bench data``: cache build with 1 and N processes, training input resident
        against streamed, each slot's peak memory (a trainable that reads no corpora: none)."""
        raise UsageError(f"trainable {self.name!r} has no data bench")


class TooFewSpeakerGroups(DataError):
    """K-fold cross-validation asks for more folds than the corpus has speaker groups outside
    its test set (IEMOCAP: 4 sessions beside the test session)."""

    def __init__(self, corpus: str, folds: int, groups: list[str]):
        self.corpus, self.folds, self.groups = corpus, folds, groups
        shown = ", ".join(groups[:8]) + (f", ... ({len(groups)})" if len(groups) > 8 else "")
        super().__init__(
            f"{folds}-fold cross-validation needs at least {folds} speaker groups outside the "
            f"test set; corpus {corpus} has {len(groups)} ({shown}): use at most "
            f"{len(groups)} folds"
        )


class UnknownTrainable(UsageError):
    pass


def available() -> dict[str, str]:
    """Name -> ``module:attribute`` of every registered trainable."""
    found = dict(_BUILTIN)
    for ep in entry_points(group="sertune.trainables"):
        found[ep.name] = ep.value
    for item in filter(None, os.environ.get(EXTRA_ENV, "").split(",")):
        name, _, target = item.partition("=")
        if name.strip() and ":" in target:
            found[name.strip()] = target.strip()
    return found


def get_trainable(name: str) -> Trainable:
    registry = available()
    if name not in registry:
        raise UnknownTrainable(f"unknown trainable {name!r}; known: {', '.join(sorted(registry))}")
    module, _, attr = registry[name].partition(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj() if isinstance(obj, type) else obj
