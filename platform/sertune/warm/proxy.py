"""The driver's side of warm execution: the Tune proxy of each trial (:class:`WarmTrial`), the
pool that starts the board and the slots (:class:`SlotPool`), and the evaluator that sends
stopped trials' checkpoints to free slots (:class:`BoardEvaluator`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ..stats import design_summary
from ..storage import exists, list_dirs, read_text, remove_dir, upload_dir, write_text
from ..trainable import (
    BEST_EPOCH,
    CHECKPOINT_PATH,
    CV_FOLD,
    DATA_MODE,
    EPOCHS_DONE,
    KEPT_EPOCH,
    LOOP_STARTED_AT,
    PBT_EXPLOITED_EPOCH,
    PBT_EXPLOITED_FROM,
    PBT_LINEAGE,
    REPLICA_CHECKPOINTS,
    SCHEDULE_PREFIX,
    SLOT_NOTE,
    CheckpointEvaluation,
    TrialDiverged,
)
from ..tuner import KeptCurves, TrialPlan, epochs_of, flat_config, loop_config
from .board import EpochReport, Job, JobBoard, JobEnded, JobFailed, JobState, TrialFailed
from .slot import run_slot

# what a fold's report carries that is not a figure: never averaged, never per fold
_NOT_FIGURES = frozenset(
    {
        EPOCHS_DONE,
        BEST_EPOCH,
        KEPT_EPOCH,
        CHECKPOINT_PATH,
        LOOP_STARTED_AT,
        REPLICA_CHECKPOINTS,
        SLOT_NOTE,
        DATA_MODE,
        "epoch",
    }
)


def fold_mean(
    reports: list[dict[str, Any]], select: str, labels: list[str] | None = None
) -> dict[str, Any]:
    """One epoch of a replicated trial (cross-validation folds and/or repeats) from its jobs'
    reports of that epoch: the mean of every figure they share, ``<figure>_se`` (its standard
    error by the design, ``sertune.stats.design_summary``: over the K folds, each fold's repeats
    averaged first; over the repeats when there are no folds), ``<label>/<figure>`` for each job (``labels``, default ``fold<k>``), each
    job's checkpoint (:data:`REPLICA_CHECKPOINTS`), and the checkpoint and best epoch of the job
    whose ``select`` figure is closest to the mean (:data:`CV_FOLD`), the model that stands for
    it."""
    k = len(reports)
    labels = labels or [f"fold{i}" for i in range(k)]
    shared = set.intersection(*(set(r) for r in reports))
    out: dict[str, Any] = {}
    for key in sorted(shared - _NOT_FIGURES):
        values = [r[key] for r in reports]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue
        out[key] = sum(values) / k
        out[f"{key}_se"] = design_summary(dict(zip(labels, values, strict=True))).se
        for label, v in zip(labels, values, strict=True):
            out[f"{label}/{key}"] = v
    target = out.get(select)
    rep = (
        min(range(k), key=lambda i: abs(reports[i][select] - target))
        if isinstance(target, (int, float))
        else 0
    )
    for key in (CHECKPOINT_PATH, BEST_EPOCH):
        if key in reports[rep]:
            out[key] = reports[rep][key]
    if all(CHECKPOINT_PATH in r for r in reports):
        out[REPLICA_CHECKPOINTS] = json.dumps([r[CHECKPOINT_PATH] for r in reports])
    notes = [
        f"{lb}: {r[SLOT_NOTE]}" for lb, r in zip(labels, reports, strict=True) if r.get(SLOT_NOTE)
    ]
    said = {r.get(SLOT_NOTE) for r in reports}
    if len(notes) == k > 1 and len(said) == 1:  # every job's slot said the same: once
        notes = [f"all {k} jobs: {reports[0][SLOT_NOTE]}"]
    if notes:
        out[SLOT_NOTE] = "; ".join(notes)
    modes = {r[DATA_MODE] for r in reports if r.get(DATA_MODE)}
    if modes:  # where each job's corpora were (one line when they agree)
        out[DATA_MODE] = "; ".join(sorted(modes))
    out[CV_FOLD] = rep
    out[EPOCHS_DONE] = reports[0].get(EPOCHS_DONE)
    starts = [r[LOOP_STARTED_AT] for r in reports if LOOP_STARTED_AT in r]
    if starts:
        out[LOOP_STARTED_AT] = min(starts)
    return out


# How long a trial's running job may be silent before the trial ends, saying so: 10x the longest
# gap between its reports (an epoch; the last one also runs the end-of-trial evaluation), at
# least two minutes; before its first report (the corpus loads, the model builds) half an hour.
SILENCE_MIN_S = 120.0
SILENCE_EPOCHS = 10
SILENCE_FIRST_S = 1800.0


class Silence:
    """A bound on waiting for a trial's jobs, per job and kept for the trial's life: a job on a
    slot that has been silent for longer than :meth:`bound` ends the trial. Time a job spends
    queued for a slot is not silence."""

    def __init__(self, board: Any, keys: list[str]):
        self.board, self.keys = board, keys
        now = time.monotonic()
        self.last = dict.fromkeys(keys, now)
        self.longest = dict.fromkeys(keys, 0.0)  # the longest gap between a job's own reports
        self.reports = dict.fromkeys(keys, 0)

    def heard(self, key: str) -> None:
        now = time.monotonic()
        if self.reports[key]:
            self.longest[key] = max(self.longest[key], now - self.last[key])
        self.reports[key] += 1
        self.last[key] = now

    def bound(self, key: str) -> float:
        if self.reports[key] < 2:  # before its first epoch-to-epoch gap: corpus, model, setup
            return SILENCE_FIRST_S
        return max(SILENCE_MIN_S, SILENCE_EPOCHS * self.longest[key])

    def check(self, what: str) -> None:
        states = ray.get(self.board.states.remote(self.keys))
        now = time.monotonic()
        for key, state in states.items():
            if state != JobState.RUNNING.value:
                self.last[key] = now  # queued for a slot, or ended: not silence
            elif now - self.last[key] > self.bound(key):
                raise TrialFailed(
                    f"no report from {what} ({key}) for {now - self.last[key]:.0f} s while on "
                    f"a slot (the bound: {SILENCE_EPOCHS}x its longest epoch, at least "
                    f"{SILENCE_MIN_S:.0f} s; {SILENCE_FIRST_S:.0f} s before its second report): "
                    "the trial ends"
                )


class WarmTrial(tune.Trainable):
    """A Tune trial in warm mode: submits its configuration and relays the slot's reports.

    The job is submitted at the first ``step()``, not in ``setup()``: Tune may restore a
    checkpoint in between (population-based training hands a trial another's checkpoint), which
    must be in the trial's storage before a slot starts on it."""

    def setup(self, config: dict[str, Any], plan: TrialPlan | None = None, board=None):
        self.plan, self.board = plan, board
        self._config = config
        self._active: str | None = None
        self._folds: list[str] = []  # a replicated trial's jobs (keys): folds x repeats
        self._fold_reports: list[dict[int, dict[str, Any]]] = []  # per job: epoch -> report
        self._last_epoch = 0
        self._last_uri: str | None = None
        self._exploited: dict[str, Any] | None = None
        # population-based training: [epoch, {param: value}, trained as trial] for every epoch
        # of this trial's model so far, through the trials whose checkpoints it took; it travels
        # with the checkpoints, so a resumed driver gets it back from them
        self._lineage: list[list[Any]] = []

    @property
    def _slot_storage(self) -> str:
        return f"{self.plan.train_storage}/{self.trial_id}"

    def _submit(self) -> None:
        if self.plan.replicas:
            return self._submit_folds()
        key = self.trial_id
        job = Job(
            key=key,
            trainable=self.plan.trainable,
            config=loop_config(self.plan, self._config, key),
            checkpoints=self._slot_storage,
        )
        ray.get(self.board.settled.remote(key, 120.0))  # a cancelled run of this trial is gone
        ray.get(self.board.submit.remote(job))
        self._active = key
        self._silence = Silence(self.board, [key])

    def _submit_folds(self) -> None:
        """One job per replica (fold and/or repeat), each with its own checkpoints; they run in
        parallel on free slots."""
        replicas = self.plan.replicas
        self._folds = [f"{self.trial_id}.{r.label}" for r in replicas]
        self._fold_reports = [{} for _ in self._folds]
        self._ended: set[int] = set()  # jobs that reported their last epoch
        self._silence = Silence(self.board, self._folds)
        for r, key in zip(replicas, self._folds, strict=True):
            job = Job(
                key=key,
                trainable=self.plan.trainable,
                config=loop_config(self.plan, self._config, self.trial_id, replica=r),
                checkpoints=f"{self._slot_storage}/{r.label}",
            )
            ray.get(self.board.settled.remote(key, 120.0))
            ray.get(self.board.submit.remote(job))
        self._active = self.trial_id

    def _next_fold_epoch(self) -> int:
        """The next epoch to relay: the one after the last, unless the jobs start later - a
        resumed trial's jobs restart on their own checkpoints and report consecutive epochs from
        there, and a job may have ended (it trained on past a stop before a killed driver came
        back). Once every job has reported an epoch at or after the wanted one, the next is the
        latest of their first such epochs: every job reports it. A job that ended before the
        wanted epoch ends the trial, saying so."""
        want = self._last_epoch + 1
        firsts = []
        for k, reports in enumerate(self._fold_reports):
            later = [e for e in reports if e >= want]
            if later:
                firsts.append(min(later))
            elif k in self._ended:
                raise TrialFailed(
                    f"{self.plan.replicas[k].words} ended without reporting epoch {want} or later"
                )
            else:
                return want  # this job has not reported that far yet
        return max(firsts)

    def _step_folds(self) -> dict[str, Any]:
        """The next epoch once every job has reported it: their mean (:func:`fold_mean`). A job
        that ended is noticed at once (the epochs it skipped are skipped for all); jobs silent
        on their slots past :class:`Silence`'s bound end the trial."""
        select = self.plan.run["select"]["metric"]
        labels = [r.label for r in self.plan.replicas]
        while True:
            epoch = self._next_fold_epoch()
            if all(epoch in r for r in self._fold_reports):
                reports = [r.pop(epoch) for r in self._fold_reports]
                for r in self._fold_reports:  # epochs a job skipped: never relayed
                    for e in [e for e in r if e < epoch]:
                        del r[e]
                return self._relay(epoch, fold_mean(reports, select, labels))
            got = ray.get(self.board.next_of.remote(self._folds, 10.0))
            if got is None:
                self._silence.check(f"the {len(self._folds)} jobs of trial {self.trial_id}")
                continue
            key, report = got
            self._silence.heard(key)
            k = self._folds.index(key)
            which = self.plan.replicas[k].words
            match report:
                case EpochReport(metrics=reported):
                    e = int(reported.get(EPOCHS_DONE, 0))
                    if e > self._last_epoch:  # a restarted fold re-sends what Tune has
                        self._fold_reports[k][e] = dict(reported)
                case JobFailed(reason=reason, diverged=True):
                    raise TrialDiverged(
                        f"{which}: " + reason.removeprefix(f"{TrialDiverged.__name__}: ")
                    )
                case JobFailed(reason=reason):
                    raise TrialFailed(f"{which}: {reason}")
                case JobEnded(outcome=JobState.DONE):
                    self._ended.add(k)  # it reported its last epoch; the others may still train
                case JobEnded(outcome=outcome):
                    raise TrialFailed(f"the slot ended {which} of this trial ({outcome})")

    def _schedule(self) -> dict[str, float]:
        """The perturbed parameters' values this epoch trained with (population-based training)."""
        config = flat_config(self._config)
        return {
            f"{SCHEDULE_PREFIX}{k}": float(config[k])
            for k in self.plan.mutable
            if isinstance(config.get(k), (int, float))
        }

    def step(self) -> dict[str, Any]:
        if self._active is None:
            self._submit()
        if self._folds:
            return self._step_folds()
        while True:
            got = ray.get(self.board.next_report.remote(self._active, 10.0))
            if got is None:
                self._silence.check(f"trial {self.trial_id}'s job")
                continue
            self._silence.heard(self._active)
            match got:
                case EpochReport(metrics=reported):
                    epoch = int(reported.get(EPOCHS_DONE, 0))
                    # a restarted worker group re-sends its checkpoint's epoch: Tune has it
                    if epoch <= self._last_epoch:
                        continue
                    return self._relay(epoch, dict(reported))
                case JobFailed(reason=reason, diverged=True):
                    # the same exception as in the slot (failfast never counts it); its reason
                    # without the slot's "TrialDiverged: ", which the traceback line says again
                    raise TrialDiverged(reason.removeprefix(f"{TrialDiverged.__name__}: "))
                case JobFailed(reason=reason):
                    raise TrialFailed(reason)
                case JobEnded(outcome=outcome):  # without a final result: the board shut down
                    raise TrialFailed(f"the slot ended this trial ({outcome})")
                case other:
                    raise TrialFailed(f"the job board sent {other!r}")

    def _relay(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """A new epoch's metrics as Tune gets them: ``done`` at the last epoch, and under
        population-based training the schedule, the lineage and a hand-over."""
        self._last_epoch = epoch
        self._last_uri = metrics.get(CHECKPOINT_PATH) or self._last_uri
        # the kept epoch and figure of the curve relayed so far (the fold means of a replicated
        # trial): the trial's objective (``sertune.trainable.objective_value``)
        if getattr(self, "_curves", None) is None or self._curves_of != self.trial_id:
            self._curves, self._curves_of = KeptCurves(self.plan, self.trial_id), self.trial_id
        metrics.update(self._curves.add(metrics))
        if epoch >= epochs_of(self.plan.max_epochs, self._config):
            metrics["done"] = True
        schedule = self._schedule()
        metrics.update(schedule)
        if schedule:
            self._extend_lineage(epoch, schedule)
            metrics[PBT_LINEAGE] = json.dumps(self._lineage)
        if self._exploited:
            metrics[PBT_EXPLOITED_FROM] = self._exploited["trial"]
            metrics[PBT_EXPLOITED_EPOCH] = self._exploited["epoch"]
            self._exploited = None
        return metrics

    def _extend_lineage(self, epoch: int, schedule: dict[str, float]) -> None:
        """Add ``epoch``; epochs since the last one known were trained here with the same
        values (the configuration changes only when a checkpoint is taken, which resets this)."""
        values = {k.removeprefix(SCHEDULE_PREFIX): v for k, v in schedule.items()}
        kept = [e for e in self._lineage if e[0] < epoch]
        last = kept[-1][0] if kept else 0
        gap = [[e, values, self.trial_id] for e in range(last + 1, epoch)]
        self._lineage = [*kept, *gap, [epoch, values, self.trial_id]]

    def _cancel(self) -> None:
        """Cancel the trial's job, or every fold job of a cross-validated trial (a scheduler's
        stop, the end of the search)."""
        if getattr(self, "_active", None):
            for key in getattr(self, "_folds", None) or [self._active]:
                try:
                    ray.get(self.board.cancel.remote(key), timeout=10)
                except Exception:  # the board is gone with the driver: nothing left to cancel
                    break
            self._active = None
            self._folds = []

    def cleanup(self) -> None:
        self._cancel()

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._cancel()
        self._config = new_config
        self._last_epoch, self._last_uri, self._exploited = 0, None, None
        self._lineage = []
        return True

    def save_checkpoint(self, checkpoint_dir: str) -> dict | None:
        """Outside population-based training the slot keeps the trial's checkpoints and Tune
        needs none. Under it, a copy of the last reported epoch's checkpoint, for another trial
        to continue from."""
        from ..storage import download_dir

        if self.plan.mutable and self._last_uri:
            download_dir(self._last_uri, Path(checkpoint_dir) / "slot")
            pointer = {
                "trial": self.trial_id,
                "epoch": self._last_epoch,
                "name": self._last_uri.rstrip("/").rsplit("/", 1)[-1],
                "lineage": self._lineage,
            }
            (Path(checkpoint_dir) / "pbt.json").write_text(json.dumps(pointer))
        return None

    def load_checkpoint(self, checkpoint: Any) -> None:
        """Continue from another trial's checkpoint (population-based training exploits it):
        it replaces this trial's own in the trial's storage, once. The trial's own checkpoint
        (a resumed search) is older than what its storage holds: nothing to do."""
        pointer_file = Path(str(checkpoint)) / "pbt.json" if isinstance(checkpoint, str) else None
        if pointer_file is None or not pointer_file.is_file():
            return
        pointer = json.loads(pointer_file.read_text())
        lineage = [e for e in pointer.pop("lineage", []) if e[0] <= int(pointer["epoch"])]
        if pointer["trial"] == self.trial_id:  # the slot re-sends its latest epoch if newer
            self._last_epoch = max(self._last_epoch, int(pointer["epoch"]))
            self._lineage = lineage
            return
        self._lineage = lineage
        marker = f"{self._slot_storage}/EXPLOITED"
        if exists(marker) and read_text(marker) == json.dumps(pointer):
            return  # applied before a driver crash; the storage has moved on since
        self._cancel()
        ray.get(self.board.settled.remote(self.trial_id, 120.0))
        remove_dir(self._slot_storage)
        upload_dir(str(pointer_file.parent / "slot"), f"{self._slot_storage}/{pointer['name']}")
        write_text(f"{self._slot_storage}/{pointer['name']}/COMPLETE", "")
        write_text(marker, json.dumps(pointer))
        self._last_epoch, self._last_uri = int(pointer["epoch"]), None
        self._exploited = pointer


class SlotPool:
    """The board and the warm slots of a driver (shared by a search's phases and its baseline)."""

    def __init__(
        self,
        resources: dict[str, Any],
        device: str,
        threads: int,
        max_failures: int,
        storage: str,
        n_slots: int,
        log=print,
    ):
        self.resources, self.device, self.threads = resources, device, threads
        self.max_failures, self.storage, self.n, self.log = max_failures, storage, n_slots, log
        self.board = None
        self.slots: dict[Any, int] = {}

    def start(self) -> SlotPool:
        env = {"RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "")}
        self.board = JobBoard.options(runtime_env={"env_vars": env}).remote(self.max_failures)
        task = ray.remote(num_cpus=0)(run_slot).options(runtime_env={"env_vars": env})
        for i in range(self.n):
            ref = task.remote(
                i,
                self.board,
                self.resources,
                self.device,
                self.threads,
                f"{self.storage}/_slots",
                max(1000, self.max_failures + 1),
            )
            self.slots[ref] = i
        return self

    def trainable(self, plan: TrialPlan):
        return tune.with_resources(
            tune.with_parameters(WarmTrial, plan=plan, board=self.board),
            {"CPU": 0, "memory": 1 << 20},
        )

    def check(self) -> None:
        """Say so when a slot's trainer ended on its own (it should live until close())."""
        if not self.slots:
            return
        done, _ = ray.wait(list(self.slots), num_returns=len(self.slots), timeout=0)
        for ref in done:
            slot = self.slots.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as e:
                outcome = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            self.log(f"[sertune] warm slot {slot} stopped: {outcome}")

    def close(self, timeout_s: float = 60.0) -> None:
        if self.board is None:
            return
        try:
            ray.get(self.board.close.remote(), timeout=10)
        except Exception:  # the board died with its node: the slots stop on their own
            pass
        if self.slots:
            _, stuck = ray.wait(list(self.slots), num_returns=len(self.slots), timeout=timeout_s)
            # only unfinished ones: Ray 2.60 aborts on cancelling a finished task
            for ref in stuck:
                ray.cancel(ref, force=True)
        self.slots.clear()
        ray.kill(self.board)
        self.board = None
        remove_dir(f"{self.storage}/_slots")


def _still_there(checkpoint_uri: str) -> str:
    """The checkpoint of a stopped trial's last relayed epoch, or, when its job trained on past
    that epoch before the stop reached it and pruned it, the job's newest complete one (whose
    ``best/`` is the best model up to its later epoch)."""
    if exists(f"{checkpoint_uri}/COMPLETE"):
        return checkpoint_uri
    parent, _, _ = checkpoint_uri.rstrip("/").rpartition("/")
    done = [
        d
        for d in list_dirs(parent)
        if d.startswith("checkpoint_") and exists(f"{parent}/{d}/COMPLETE")
    ]
    return f"{parent}/{done[-1]}" if done else checkpoint_uri


class BoardEvaluator:
    """Evaluates stopped trials' best checkpoints in free slots (warm mode); a replicated trial's
    every job's best checkpoint, the figures then their mean ± se as during training."""

    def __init__(self, pool: SlotPool, plan: TrialPlan):
        self.pool, self.plan = pool, plan
        self.waiting: set[str] = set()  # evaluation job keys
        # a replicated trial: its jobs' keys, the one whose files stand for it, what came back
        self._trials: dict[str, tuple[list[str], int, dict[str, CheckpointEvaluation]]] = {}

    @property
    def pending(self) -> int:
        return len(self._trials) + len(
            self.waiting - {k for t in self._trials.values() for k in t[0]}
        )

    def submit(
        self,
        key: str,
        checkpoint_uri: str,
        replicas: list[str] | None = None,
        representative: int = 0,
    ) -> str:
        """Evaluate ``checkpoint_uri``, or for a replicated trial each of ``replicas`` (its
        jobs' checkpoints, in the plan's order) with job ``representative``'s files kept.
        Returns the checkpoint read in place of ``checkpoint_uri`` (the representative's)."""
        if not replicas:
            return self._submit(key, checkpoint_uri)
        keys = [f"{key}.{r.label}" for r in self.plan.replicas]
        self._trials[key] = (keys, representative, {})
        used = [self._submit(job_key, uri) for job_key, uri in zip(keys, replicas, strict=True)]
        return used[representative]

    def _submit(self, key: str, checkpoint_uri: str) -> str:
        # the trial's job (same key) may still be training past the stop and pruning its
        # checkpoints: stop it, wait until its slot lets go, then read what it left
        board = self.pool.board
        ray.get(board.cancel.remote(key))
        ray.get(board.settled.remote(key, 60.0))
        checkpoint_uri = _still_there(checkpoint_uri)
        job = Job.evaluation(
            key,
            trainable=self.plan.trainable,
            config=loop_config(self.plan, {}, key),
            checkpoint=checkpoint_uri,
            device=self.pool.device,
        )
        ray.get(self.pool.board.submit.remote(job))
        self.waiting.add(key)
        return checkpoint_uri

    def ready(self, wait_s: float = 0.0) -> list[tuple[str, CheckpointEvaluation]]:
        """(trial, evaluation) of the evaluations that ended, waiting up to ``wait_s`` for one."""
        if not self.waiting:
            return []
        out = []
        for key, outcome in ray.get(
            self.pool.board.evaluations.remote(wait_s, sorted(self.waiting))
        ):
            self.waiting.discard(key)
            trial = next((t for t, v in self._trials.items() if key in v[0]), None)
            if trial is None:
                out.append((key, outcome))
                continue
            keys, rep, got = self._trials[trial]
            got[key] = outcome
            if len(got) == len(keys):
                del self._trials[trial]
                out.append((trial, self._combine(keys, rep, got)))
        return out

    def _combine(
        self, keys: list[str], rep: int, got: dict[str, CheckpointEvaluation]
    ) -> CheckpointEvaluation:
        labels = [r.label for r in self.plan.replicas]
        errors = [
            f"{lb}: {got[k].error}" for lb, k in zip(labels, keys, strict=True) if got[k].error
        ]
        if errors:
            return CheckpointEvaluation(error="; ".join(errors))
        metrics = fold_mean([dict(got[k].metrics) for k in keys], "", labels)
        figures = {
            k: v
            for k, v in metrics.items()
            if k not in (CV_FOLD, EPOCHS_DONE, REPLICA_CHECKPOINTS)
        }
        return CheckpointEvaluation(metrics=figures, files=got[keys[rep]].files)
