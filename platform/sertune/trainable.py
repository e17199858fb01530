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
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from .errors import UsageError

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

    def bench_data(self, log: Callable = print, **options: Any) -> dict[str, Any]:
        """``sertune bench data``: cache build with 1 and N processes, training input resident
        against streamed, each slot's peak memory (a trainable that reads no corpora: none)."""
        raise UsageError(f"trainable {self.name!r} has no data bench")


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
