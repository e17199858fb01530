"""A search in MLflow while it runs: its parent run (:class:`SearchRuns`) and the Tune callback
that turns trial events into journal records (:class:`TrialLogger`, one per phase).

One parent run per search (spec, data report, search settings; at the end the leaderboard,
plots and ``best/*``, written by ``sertune.search_report``) and one nested child run per trial:
params, per-epoch metrics with the trial's real epoch as step, the best-validation model as a
pickle-free pyfunc, its robustness report, and a status tag: ``finished``, ``stopped_early``
(with the epoch), ``failed`` (with the reason) or ``interrupted``. Trials a scheduler stopped are
evaluated afterwards on their best checkpoint, so they get test and robustness figures too.

Records go through :class:`sertune.tracking.Journal`; nothing here calls MLflow directly.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ray.tune import Callback

from . import tracking
from .failures import trial_error_reason
from .leaderboard import Columns, trial_epochs
from .records import SearchRecord
from .run_notes import NOTE, metric_rows, parent_params, trial_note
from .spec import SearchSpec, split_signature
from .storage import exists
from .tracking import Kind, Op
from .trainable import (
    BEST_EPOCH,
    CHECKPOINT_PATH,
    CV_FOLD,
    DATA_MODE,
    PBT_EXPLOITED_EPOCH,
    PBT_EXPLOITED_FROM,
    PBT_LINEAGE,
    REPLICA_CHECKPOINTS,
    SLOT_NOTE,
    CheckpointEvaluation,
)

PARENT = "parent"


class SearchRuns:
    """A search's runs in MLflow while its driver lives: the parent run and the journal, and what
    the phases' :class:`TrialLogger` callbacks share (open trials, stopped trials' figures, the
    PBT schedules). The driver starts it once and ends it through ``sertune.search_report``."""

    def __init__(
        self,
        record: SearchRecord,
        spec: SearchSpec,
        log: Callable[[str], None] = print,
        on_parent_run: Callable[[str], None] | None = None,
    ):
        self.uri = record.tracking_uri
        self.name = record.name
        self.record = record  # read here; its owner (the driver's Search) writes it
        self.spec = spec
        self.columns = Columns.of(spec)
        self.on_parent_run = on_parent_run  # called once the parent run exists
        self.log = log
        self.resumed = False  # a resumed search may find its trials' runs already in MLflow
        self.journal: tracking.Journal | None = None
        self.open_trials: set[str] = set()
        self.seen: set[str] = set()  # every trial this driver logged (open or ended)
        self.stopped: dict[str, int] = {}  # trials stopped early -> their epochs
        self.evaluated: dict[str, dict[str, float]] = {}  # stopped trials' test + robustness
        # population-based training: per trial, the weights each of its epochs trained with,
        # through the trials whose checkpoints it took ([epoch, {param: value}, from trial])
        self.schedules: dict[str, list[list[Any]]] = {}

    def append(self, op: Op) -> None:
        self.journal.append(op)

    # -- the parent ------------------------------------------------------------------------------
    def start(self, resumed: bool = False) -> SearchRuns:
        self.resumed = resumed
        self.journal = tracking.Journal(self.name, self.uri, self.log)
        self.journal.on_run = self._on_run
        self.journal.start()
        spec = self.spec
        tags = {
            tracking.TAG_SEARCH: self.name,
            tracking.TAG_KIND: "search",
            tracking.TAG_STATUS: "running",
            "sertune.trainable": spec.trainable,
            "sertune.corpus": spec.data.corpus,
            "sertune.data_fingerprint": self.record.data.get("fingerprint", ""),
            "sertune.data_dealing": spec.data.dealing,  # which speakers test (data.dealing)
            "sertune.objective": json.dumps([m.model_dump() for m in spec.metrics]),
            "sertune.split": json.dumps(split_signature(spec), sort_keys=True),
            "sertune.storage": self.record.path,
            "mlflow.runName": self.name,
        }
        if self.record.baseline_of:
            tags["sertune.baseline_of"] = self.record.baseline_of
        params = parent_params(spec)
        if self.record.warm_start:
            sources = self.record.warm_start["sources"]
            tags["sertune.warm_start"] = ", ".join(f"{k} ({n} trials)" for k, n in sources.items())
        self.append(
            Op(
                Kind.RUN,
                key=PARENT,
                identity={tracking.TAG_SEARCH: self.name, tracking.TAG_KIND: "search"},
                run_name=self.name,
                tags=tags,
                params=params,
            )
        )
        if resumed:
            self.append(Op(Kind.TAGS, key=PARENT, tags={tracking.TAG_STATUS: "running"}))
            return self
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(self.record.source or "")
            if src.is_file():
                (Path(tmp) / "spec.yaml").write_text(src.read_text())
            (Path(tmp) / "spec.resolved.json").write_text(
                json.dumps(spec.model_dump(mode="json"), indent=2)
            )
            (Path(tmp) / "data_report.json").write_text(
                json.dumps(self.record.data.get("report", {}), indent=2)
            )
            self.append(Op(Kind.ARTIFACTS, key=PARENT, src=self.journal.stage(tmp), path="search"))
        return self

    def _on_run(self, key: str, run_id: str) -> None:
        if key == PARENT and self.on_parent_run is not None:
            self.on_parent_run(run_id)

    @property
    def parent_run_id(self) -> str | None:
        return self.journal.run_id(PARENT) if self.journal else self.record.parent_run_id

    def interrupted(self) -> None:
        """Ctrl-C / SIGTERM: open trials become KILLED + ``interrupted``, so is the parent."""
        for key in sorted(self.open_trials):
            self.append(Op(Kind.TAGS, key=key, tags={tracking.TAG_STATUS: "interrupted"}))
            self.append(Op(Kind.END, key=key, status="KILLED"))
        self.open_trials.clear()
        self.append(Op(Kind.TAGS, key=PARENT, tags={tracking.TAG_STATUS: "interrupted"}))
        self.append(Op(Kind.END, key=PARENT, status="KILLED"))

    def close(self, timeout_s: float = 120.0) -> int:
        return self.journal.close(timeout_s) if self.journal else 0


class Evaluator(Protocol):
    """Evaluates stopped trials' best checkpoints (``sertune.warm.BoardEvaluator`` in warm
    slots, ``sertune.trials.TaskEvaluator`` per trial)."""

    @property
    def pending(self) -> int: ...

    def submit(self, key: str, checkpoint_uri: str) -> None:
        """Evaluate ``checkpoint_uri``; returns the checkpoint it will read (another one of the
        same job when that one is gone), whose ``best/`` is the trial's model."""

    def ready(self, wait_s: float = 0.0) -> list[tuple[str, CheckpointEvaluation]]: ...


class TrialLogger(Callback):
    """Tune callback of one phase: trial events -> child runs, through the search's journal.
    Picklable (Tune saves callbacks with its state; a resumed search gets live ones back)."""

    def __init__(self, runs: SearchRuns, evaluator: Evaluator | None = None, tag: str = ""):
        self.runs = runs
        self.evaluator = evaluator  # evaluates stopped trials' best checkpoints
        self.tag = tag  # e.g. "confirm": extra tag on the child runs of this phase

    def __getstate__(self) -> dict:
        return {"runs": None, "evaluator": None, "tag": self.tag}

    # Tune saves this with its experiment state, so a resumed PBT search keeps the lineages its
    # killed driver had built (epochs trained after that save are reported again and replace)
    def get_state(self) -> dict[str, Any] | None:
        return {"schedules": self.runs.schedules} if self.runs.schedules else None

    def set_state(self, state: dict[str, Any]) -> None:
        schedules = {k: [list(e) for e in v] for k, v in state.get("schedules", {}).items()}
        self.runs.schedules.update(schedules)

    def _child(self, trial: Any) -> str:
        from .tuner import flat_config

        runs, tid = self.runs, trial.trial_id
        config = flat_config(trial.config)
        runs.seen.add(tid)
        if tid not in runs.open_trials:
            runs.open_trials.add(tid)
            tags = {
                tracking.TAG_SEARCH: runs.name,
                tracking.TAG_TRIAL: tid,
                tracking.TAG_KIND: "trial",
                tracking.TAG_STATUS: "running",
            }
            if self.tag:
                tags["sertune.phase"] = self.tag
            if self.tag == "refit":
                tags["sertune.refit"] = (
                    "trained on every fold's training speakers for the search's best epoch "
                    "count; its val_* speakers are among them (not an estimate): the "
                    "cross-validated trial's figures are the search's, its test figures are "
                    "this model's"
                )
            for k, v in config.items():
                if k.startswith("__"):  # confirm runs carry their origin in the config
                    tags[f"sertune.{k.strip('_')}"] = str(v)
            runs.append(
                Op(
                    Kind.RUN,
                    key=tid,
                    parent=PARENT,
                    identity={tracking.TAG_SEARCH: runs.name, tracking.TAG_TRIAL: tid},
                    lookup=runs.resumed,
                    run_name=f"{runs.name}-{tid}",
                    tags=tags,
                    params={k: v for k, v in config.items() if not k.startswith("__")},
                )
            )
        return tid

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._child(trial)

    def _track_schedule(self, key: str, result: dict[str, Any]) -> None:
        """Population-based training: tag a hand-over, keep the trial's lineage. The warm proxy
        sends the whole lineage (every epoch's values and the trial that trained it, kept with
        the checkpoints) on each result, so nothing is rebuilt here."""
        donor = result.get(PBT_EXPLOITED_FROM)
        if donor:
            at = int(result.get(PBT_EXPLOITED_EPOCH, 0))
            note = f"took trial {donor}'s checkpoint at epoch {at}"
            self.runs.append(
                Op(Kind.TAGS, key=key, tags={f"sertune.pbt_exploit_epoch_{at}": note})
            )
        if result.get(PBT_LINEAGE):
            self.runs.schedules[key] = json.loads(result[PBT_LINEAGE])

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        key = self._child(trial)
        self._track_schedule(key, result)
        if result.get(SLOT_NOTE):  # e.g. a damaged checkpoint passed over on resume
            at = trial_epochs(result)
            tags = {f"sertune.slot_note_epoch_{at}": str(result[SLOT_NOTE])[:500]}
            self.runs.append(Op(Kind.TAGS, key=key, tags=tags))
        if result.get(DATA_MODE):  # where its corpora were: on the device or streamed
            mode = {"sertune.data_mode": str(result[DATA_MODE])[:500]}
            self.runs.append(Op(Kind.TAGS, key=key, tags=mode))
        ts = int(result.get("timestamp", time.time()) * 1000)
        self.runs.append(
            Op(Kind.METRICS, key=key, step=trial_epochs(result), metrics=metric_rows(result, ts))
        )

    def _checkpoint_uri(self, result: dict[str, Any]) -> str | None:
        ckpt = result.get(CHECKPOINT_PATH)
        path = self.runs.record.path
        scheme = path.split("://")[0] if "://" in path else ""
        if ckpt and scheme and "://" not in ckpt:  # Ray reports paths without the scheme
            ckpt = f"{scheme}://{ckpt}"
        return ckpt

    def _replica_uris(self, result: dict[str, Any]) -> list[str] | None:
        """A replicated trial's every job's checkpoint of its last epoch (their best models)."""
        raw = result.get(REPLICA_CHECKPOINTS)
        if not raw:
            return None
        return [self._checkpoint_uri({CHECKPOINT_PATH: p}) for p in json.loads(raw)]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        runs, key = self.runs, self._child(trial)
        last = trial.last_result or {}
        epochs = trial_epochs(last)
        from .tuner import epochs_of

        finished = epochs >= epochs_of(runs.spec.budget.max_epochs, trial.config)
        tags = {tracking.TAG_STATUS: "finished" if finished else "stopped_early"}
        if not finished:
            tags["sertune.stopped_by"] = f"scheduler at epoch {epochs}"
        if BEST_EPOCH in last:
            tags["sertune.best_epoch"] = str(int(last[BEST_EPOCH]) + 1)
        tags.update(self._constraint_tags(last))
        replicas = runs.spec.objective.replicas
        rep = int(last[CV_FOLD]) if isinstance(last.get(CV_FOLD), (int, float)) else None
        if rep is not None and rep < len(replicas):  # which job's model the trial logs
            kind = runs.spec.objective.replica_kind
            tags["sertune.model_fold"] = (
                f"{replicas[rep].words} ({rep + 1} of {len(replicas)} {kind} jobs): the model "
                "closest to the mean"
            )
        runs.append(Op(Kind.TAGS, key=key, tags=tags))
        ckpt = self._checkpoint_uri(last)
        if ckpt:
            if not finished and self.evaluator is not None:  # its best epoch's test figures, later
                runs.stopped[key] = epochs
                every = self._replica_uris(last) if rep is not None else None
                if every:  # a replicated trial (warm): each job's best model
                    used = self.evaluator.submit(key, ckpt, every, rep or 0)
                else:
                    used = self.evaluator.submit(key, ckpt)
                # the model is what the evaluation reads: the stopped job may have trained past
                # the relayed epoch and pruned its checkpoint before the stop reached it
                best = f"{(used or ckpt).rstrip('/')}/best"
                runs.append(Op(Kind.MODEL, key=key, src=best, trainable=runs.spec.trainable))
                runs.open_trials.discard(key)
                return
            best = f"{ckpt.rstrip('/')}/best"
            runs.append(Op(Kind.MODEL, key=key, src=best, trainable=runs.spec.trainable))
            # the robustness report, or what a trainable leaves there without one (an SSL
            # encoder's layer weights)
            if runs.spec.robustness is not None or exists(f"{best}/robustness"):
                runs.append(
                    Op(Kind.ARTIFACTS, key=key, src=f"{best}/robustness", path="robustness")
                )
                note = trial_note(key, last, epochs, False, tuple(runs.columns.table))
                runs.append(Op(Kind.TAGS, key=key, tags={NOTE: note}))
        runs.append(Op(Kind.END, key=key, status="FINISHED"))
        runs.open_trials.discard(key)

    def _constraint_tags(self, metrics: dict[str, Any]) -> dict[str, str]:
        """``sertune.feasible`` (true, false or unknown) and what fails, for the trials view."""
        columns = self.runs.columns
        if not columns.constraints:
            return {}
        ok = columns.feasible(metrics)
        tags = {"sertune.feasible": "unknown" if ok is None else str(ok).lower()}
        if ok is False:
            tags["sertune.constraints_failed"] = ", ".join(columns.failing(metrics))
        return tags

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._child(trial)
        reason = trial_error_reason(trial)
        tags = {tracking.TAG_STATUS: "failed", "sertune.failure_reason": reason}
        self.runs.append(Op(Kind.TAGS, key=key, tags=tags))
        self.runs.append(Op(Kind.END, key=key, status="FAILED"))
        self.runs.open_trials.discard(key)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.collect_evaluations()

    # -- evaluations of stopped trials ---------------------------------------------------------------
    def collect_evaluations(self, wait_s: float = 0.0) -> None:
        if self.evaluator is None:
            return
        runs = self.runs
        for key, outcome in self.evaluator.ready(wait_s):
            if outcome.error:
                tags = {"sertune.evaluation_error": outcome.error[:500]}
                runs.append(Op(Kind.TAGS, key=key, tags=tags))
            else:
                step = runs.stopped.get(key, 0)
                runs.evaluated[key] = outcome.metrics
                ts = int(time.time() * 1000)
                rows = [
                    [k, tracking.clean_value(v), ts]
                    for k, v in outcome.metrics.items()
                    if tracking.clean_value(v) is not None
                ]
                runs.append(Op(Kind.METRICS, key=key, step=step, metrics=rows, dedupe=False))
                note = trial_note(key, outcome.metrics, step, True, tuple(runs.columns.table))
                tags = {NOTE: note, **self._constraint_tags(outcome.metrics)}
                runs.append(Op(Kind.TAGS, key=key, tags=tags))
                if outcome.files:
                    with tempfile.TemporaryDirectory() as tmp:
                        for name, data in outcome.files.items():
                            (Path(tmp) / name).write_bytes(data)
                        src = runs.journal.stage(tmp)
                        runs.append(Op(Kind.ARTIFACTS, key=key, src=src, path="robustness"))
            runs.append(Op(Kind.END, key=key, status="FINISHED"))

    def wait_for_evaluations(self, wait_s: float = 600.0) -> None:
        """Collect the evaluations of stopped trials still running, for up to ``wait_s``."""
        if self.evaluator is None or not self.evaluator.pending:
            return
        self.runs.log(
            f"[sertune] evaluating {self.evaluator.pending} stopped trial(s) on their best epoch"
        )
        deadline = time.monotonic() + wait_s
        while self.evaluator.pending and time.monotonic() < deadline:
            self.collect_evaluations(wait_s=1.0)
