"""The driver of one search: its record's one writer, its phases in order, how it ends.

:class:`Search` runs a spec's phases (``sertune.search`` has the entry points that make one):
each phase is a Ray Tune experiment on the same :class:`sertune.execution.Execution`; the
search's MLflow runs are opened once (:class:`sertune.search_logger.SearchRuns`), each phase
records its trials through a :class:`sertune.search_logger.TrialLogger`, and the conclusions go
on the parent run through :class:`sertune.search_report.SearchReport`.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import ray_compat
from .cluster import concurrent_slots, init_ray
from .diskspace import DiskWatch
from .errors import Interrupted, NotFound, SearchFailed
from .execution import Execution, Log
from .failfast import FailFast
from .interrupts import Stopped, StopSignals, ignoring_signals
from .leaderboard import SearchResult, from_saved_state, summarise
from .records import (
    Phase,
    SearchRecord,
    driver_stamp,
    effective_status,
    experiment_path,
    load_record,
    log_path,
    now,
    save_record,
)
from .search_logger import PARENT, SearchRuns, TrialLogger
from .search_report import SearchReport
from .spec import SearchSpec
from .stoprule import NoiseStop
from .storage import fs_and_path
from .tracking import Kind, Op, Store
from .trainable import BEST_EPOCH, EPOCHS_PARAM, KEPT_EPOCH, get_trainable
from .tuner import build_tuner, refit_plan, trial_plan, tune_callbacks


def state_save_period(trials: int) -> str:
    """How often Tune saves the search's state: every 2 s (a crashed driver loses at most 2 s of
    bookkeeping; trials keep their own checkpoints), longer for big searches, whose state costs
    more to write each time: 20 s at 1,000 trials keeps the cost linear in the search's size."""
    return os.environ.get("SERTUNE_STATE_SAVE_S") or f"{max(2.0, trials / 50):g}"


# -- the driver --------------------------------------------------------------------------------------


def lost_from_state(state: set[str], runs: list[Any]) -> str | None:
    """The line a resume says when MLflow holds ended trials of the search (``runs``: its trial
    runs, confirmations and refits aside) that Tune's restored state (``state``: trial ids) does
    not, or None when the state has every one."""
    lost = sorted(
        r.trial
        for r in runs
        if r.done
        and r.tags.get("sertune.phase") not in ("confirm", "refit")
        and r.trial not in state
    )
    if not lost:
        return None
    shown = ", ".join(lost[:8]) + (f" and {len(lost) - 8} more" if len(lost) > 8 else "")
    return (
        f"resume: Tune's saved state holds {len(state)} trial(s) but not {len(lost)} that ended "
        f"before the stop ({shown}); their MLflow runs stay (status, compare and promote count "
        "them) and the search runs its remaining budget from the state it has"
    )


class Search:
    """One search run to its end: its phases in order, each a Tune experiment on the same
    execution (warm slots or per-trial runs). The baseline is a second ``Search`` whose phases
    the same runner (:meth:`run_phases`) drives."""

    def __init__(self, name: str, spec: SearchSpec, record: SearchRecord, log: Log = print):
        self.name, self.spec, self.record, self.log = name, spec, record, log
        self._saving = threading.Lock()  # the MLflow journal's thread reports the parent run
        self._unsaved = False  # the last record write failed (a full disk)
        self.runs: SearchRuns | None = None  # its runs in MLflow, while the driver runs it
        self.last_phase: TrialLogger | None = None  # the last phase's trial logger

    # -- the record (this object is its one writer while the search runs) -------------------
    def save(self, **changes: Any) -> None:
        with self._saving:
            self.record = self.record.but(**changes)
            try:
                save_record(self.name, self.record)  # a temporary file renamed: all or nothing
            except OSError as e:  # a full disk: the last whole record stays; said once
                if not self._unsaved:
                    self.log(
                        f"[sertune] cannot write the search record ({e.strerror or e}): it "
                        f"keeps its last state ({self._saved_status()}); `sertune search resume "
                        f"{self.name}` goes on from the saved search state"
                    )
                self._unsaved = True
            else:
                self._unsaved = False

    def _saved_status(self) -> str:
        try:
            return load_record(self.name).status
        except Exception:  # noqa: BLE001 - only for the message
            return "unknown"

    def on_parent_run(self, run_id: str) -> None:
        """The MLflow runs' callback: the search's parent run was created (or found)."""
        if self.record.parent_run_id != run_id:
            self.save(parent_run_id=run_id)

    def start_runs(self, restore: bool) -> SearchRuns:
        """Open the search's runs in MLflow (the parent, the journal) for this driver."""
        self.runs = SearchRuns(
            self.record, self.spec, log=self.log, on_parent_run=self.on_parent_run
        ).start(resumed=restore)
        return self.runs

    @property
    def report(self) -> SearchReport:
        return SearchReport(self.runs)

    def finish(self, result: SearchResult, status: str, cause: str | None = None) -> None:
        """The search's conclusions on its parent run (stopped trials' evaluations first)."""
        self.report.finish(result, status, trials=self.last_phase, cause=cause)

    @property
    def phase(self) -> Phase:
        return self.record.phase

    def phases(self) -> list[Phase]:
        spec = self.spec
        return [
            Phase.SEARCH,
            *([Phase.CONFIRM] if spec.confirm else []),
            *([Phase.BASELINE] if spec.baseline else []),
            Phase.CLOSING,
            Phase.DONE,
        ]

    def advance(self) -> None:
        order = self.phases()
        self.save(phase=order[order.index(self.phase) + 1])

    # -- the whole search -----------------------------------------------------------------------
    def drive(
        self,
        restore: bool,
        num_cpus: int | None,
        verbose: bool,
        only: tuple[Phase, ...] | None = None,
    ) -> SearchResult:
        """Start Ray and the MLflow runs, run the phases, end the search's record and runs."""
        spec, name, log = self.spec, self.name, self.log
        init_ray(num_cpus, verbose=verbose)
        n_slots = concurrent_slots(spec, log)
        runs = self.start_runs(restore)
        execution: Execution | None = None
        failed_fast: _FailedFast | None = None
        stop = StopSignals(log)
        try:
            with stop, DiskWatch(log, name), ray_compat.tune_logs_to(log_path(name), verbose):
                try:
                    execution = Execution.start(spec, name, n_slots, log)
                    result = self.run_phases(execution, stop, restore, only)
                except (KeyboardInterrupt, Stopped):
                    stop.fired = stop.fired or "SIGINT"
                except _FailedFast as e:
                    failed_fast = e
                finally:
                    if execution is not None and not stop.forced:
                        execution.close()
        except KeyboardInterrupt:  # a second signal while closing: stop at once ...
            stop.fired, stop.forced = stop.fired or "SIGINT", True
        if stop.fired:
            # ... but never leave the record `running` or a run RUNNING: written before the
            # exit, further signals ignored, MLflow given a bounded time
            with ignoring_signals():
                self.mark_interrupted()
                runs.close(timeout_s=10.0 if stop.forced else 120.0)
            raise Interrupted(
                f"search {name!r} interrupted ({stop.fired}); what ran is saved. "
                f"Resume it with: sertune search resume {name}"
            )
        runs.close()
        if failed_fast is not None:
            raise SearchFailed(
                f"search {name!r} stopped: {failed_fast.cause}. Tracebacks: {log_path(name)}"
            )
        result.parent_run_id = runs.parent_run_id or self.record.parent_run_id
        result.stats = {
            "mlflow_write_s": runs.journal.write_seconds,
            "mlflow_calls": runs.journal.calls,
        }
        return result

    def run_phases(
        self,
        execution: Execution,
        stop: StopSignals,
        restore: bool,
        only: tuple[Phase, ...] | None = None,
    ) -> SearchResult:
        """From the record's phase to the end - search, confirm, baseline - then how they ended,
        on the parent run and in the record: finished (or failed: no trial has a result);
        interrupted (re-raises :class:`Stopped`, which a stop signal raises out of the phase it
        arrived in, so a phase that returns is complete); stopped because its trials failed
        alike (re-raises :class:`_FailedFast`)."""

        def runs(phase: Phase) -> bool:
            return self.phase == phase and (only is None or phase in only)

        try:
            result = None
            if runs(Phase.SEARCH):
                result = self.tune(execution, stop, restore)
                self.advance()
            if result is None:
                result = from_saved_state(self.name, self.spec)  # resuming a later phase
                result.stopped_by = self.record.stopped_by
            if runs(Phase.CONFIRM):
                result.confirm = self.confirm(result, execution, stop)
                self.advance()
            if self.phase == Phase.BASELINE and only is None:
                self.baseline(execution, stop)
                self.advance()
            result.reference = self.record.reference
            status = "finished" if result.completed else "failed"
            self.finish(result, status)  # waits for stopped trials' evaluations
        except _FailedFast as e:
            e.result.reference = self.record.reference
            self.finish(e.result, "failed", cause=e.cause)
            self.save(status="failed", ended=now(), phase=Phase.DONE, failure=e.cause)
            raise
        except (KeyboardInterrupt, Stopped):
            self.mark_interrupted()
            raise
        self.save(status=status, ended=now(), phase=Phase.DONE)
        return result

    def mark_interrupted(self) -> None:
        """Open runs KILLED, the record ``interrupted`` (resumable); once, and never once the
        search has ended (a signal while the slots close after the record said so)."""
        ended = self.record.phase == Phase.DONE and self.record.status in ("finished", "failed")
        if self.record.status != "interrupted" and not ended:
            self.runs.interrupted()
            self.save(status="interrupted", ended=now())

    # -- one phase -------------------------------------------------------------------------------
    def tune(
        self,
        execution: Execution,
        stop: StopSignals,
        restore: bool,
        points: list[dict[str, Any]] | None = None,
        tune_name: str | None = None,
        budget: int | None = None,
        tag: str = "",
    ) -> SearchResult:
        """One Tune experiment of the search (the search itself, or its confirmation runs)."""
        from ray.tune.stopper import CombinedStopper

        from .progress import ProgressPrinter

        spec, name = self.spec, self.name
        plan = trial_plan(spec, name, self.record.data)
        if tag == "refit":
            plan = refit_plan(plan)
        self.last_phase = TrialLogger(self.runs, execution.evaluator(plan), tag)
        tune_name = tune_name or name
        watch = FailFast(tune_name, spec.budget.concurrency)
        callbacks = [ProgressPrinter(spec, log=self.log, budget=budget), watch, self.last_phase]
        rule = NoiseStop.of(spec, tune_name, self.log) if points is None else None
        stopper: Any = watch.stopper()
        if restore and points is None:
            self.check_restored(tune_name)
        if rule is not None:
            if restore:
                rule.seed_from(from_saved_state(name, spec))
            callbacks.append(rule)
            stopper = CombinedStopper(stopper, rule.stopper())
        epoch_metrics = get_trainable(spec.trainable).epoch_metrics
        end_metrics = any(m.metric not in epoch_metrics for m in spec.metrics)
        fifo = points is not None or spec.scheduler == "none"
        tuner = build_tuner(
            spec,
            tune_name,
            execution.tune_trainable(plan),
            callbacks=callbacks,
            restore=restore,
            points=points,
            reuse_actors=execution.reuse_actors(fifo),
            stop=stopper,
            seeds=self.record.warm_start,
        )
        if restore:
            ray_compat.set_restored_callbacks(tuner, tune_callbacks(callbacks))
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = state_save_period(budget or spec.budget.trials)
        try:
            with ray_compat.strict_metric_checking(not end_metrics), stop.tune_loop():
                grid = tuner.fit()
        finally:
            watch.close()
            if rule is not None:
                rule.close()
        stop.check()  # a signal ended Tune's loop: the phase is not complete
        result = summarise(name, spec, grid)
        if watch.tripped:
            raise _FailedFast(watch.tripped, result)
        if rule is not None and rule.tripped:
            result.stopped_by = rule.tripped
            for row in result.rows:  # begun, then ended with the search before any epoch
                if row["state"] == "interrupted":
                    row["status"] = "cancelled: the search ended early"
            self.log(f"[sertune] search {name!r} ended early, {rule.tripped}")
            self.save(stopped_by=rule.tripped)
        return result

    def check_restored(self, tune_name: str) -> None:
        """A resume never quietly holds fewer trials than before: the trials MLflow saw end
        that Tune's saved state lacks (a state file older than its trials, one restored from a
        copy) are named on the console and on the parent run; their runs stay, so status,
        compare and promote still count them."""
        try:
            note = self.restored_note(tune_name)
        except Exception:  # noqa: BLE001 - MLflow away: the journal says so; Tune resumes anyway
            return
        if note:
            self.log(f"[sertune] {note}")
            if self.runs is not None:
                self.runs.append(Op(Kind.TAGS, key=PARENT, tags={"sertune.resume_note": note}))

    def restored_note(self, tune_name: str) -> str | None:
        """:func:`lost_from_state` of this search's trial runs and ``tune_name``'s saved state."""
        state = {r["trial"] for r in from_saved_state(tune_name, self.spec).rows}
        uri = self.runs.uri if self.runs else self.record.tracking_uri
        return lost_from_state(state, Store(uri).runs_of(self.name, kind="trial"))

    def confirm(
        self, result: SearchResult, execution: Execution, stop: StopSignals
    ) -> list[dict[str, Any]]:
        """Re-train the top-K configurations with fresh seeds; return mean ± sd per
        configuration. Then, with ``confirm.refit``, the best one on all training speakers."""
        from .confirm import aggregate, confirmation_points

        spec, name = self.spec, self.name
        groups: list[dict[str, Any]] = []
        points = confirmation_points(result, spec.confirm.top_k, spec.confirm.seeds, spec.seed)
        if not points and not spec.confirm.refit:
            self.log("[sertune] no finished trial to confirm")
            return []
        if points:
            self.log(
                f"[sertune] confirming the best {spec.confirm.top_k} configuration(s) with "
                f"{spec.confirm.seeds} fresh seed(s) each ({len(points)} trials)"
            )
            confirm = self.fixed_points(execution, stop, points, f"{name}-confirm", "confirm")
            groups = aggregate(confirm.rows, spec.metrics[0])
            self.report.confirmation(groups)
            self.save(confirm=groups)
        if spec.confirm.refit:
            self.refit(result, groups, execution, stop)
        return groups

    def fixed_points(
        self,
        execution: Execution,
        stop: StopSignals,
        points: list[dict[str, Any]],
        tune_name: str,
        tag: str,
    ) -> SearchResult:
        """A phase of fixed configurations (confirmation runs, the refit), resumed if begun."""
        from ray import tune

        fs, path = fs_and_path(experiment_path(tune_name))
        restore = tune.Tuner.can_restore(path, storage_filesystem=fs)
        return self.tune(
            execution,
            stop,
            restore,
            points=points,
            tune_name=tune_name,
            budget=len(points),
            tag=tag,
        )

    def refit(
        self,
        result: SearchResult,
        groups: list[dict[str, Any]],
        execution: Execution,
        stop: StopSignals,
    ) -> None:
        """The best configuration (the confirmed best, else the search's best trial) trained
        once on every fold's training speakers for its best epoch count; promotion registers
        this model, and its run says so."""
        objective = result.columns.first.metric
        rows = {r["trial"]: r for r in result.rows}
        done = [
            r
            for r in result.rows
            if r["state"] in ("finished", "stopped") and isinstance(r.get(objective), (int, float))
        ]
        origin = (
            str(groups[0]["configuration_of"]) if groups else (done[0]["trial"] if done else None)
        )
        if origin is None or origin not in rows:
            self.log("[sertune] no finished trial to re-train on all training speakers")
            return
        row = rows[origin]
        # the kept epoch of the trial's fold-mean curve (the proxy's): not the representative
        # fold's own best epoch, which is one fold's and may sit far from the mean curve's
        best_epoch = row.get(KEPT_EPOCH)
        best_epoch = row.get(BEST_EPOCH) if best_epoch is None else best_epoch
        epochs = (
            int(best_epoch) + 1
            if isinstance(best_epoch, (int, float))
            else self.spec.budget.max_epochs
        )
        point = {**row["config"], EPOCHS_PARAM: epochs, "__refit_of": origin}
        self.log(
            f"[sertune] re-training trial {origin}'s configuration on all training speakers "
            f"(every fold's) for {epochs} epoch(s), its fold-mean curve's kept epoch count: the "
            "model promotion registers"
        )
        self.fixed_points(execution, stop, [point], f"{self.name}-refit", "refit")

    def baseline(self, execution: Execution, stop: StopSignals) -> None:
        """The same search with the trainable's baseline parameters fixed, run by the same
        phase runner on the same execution; compared with this one on the parent run."""
        from .confirm import baseline_spec

        bspec = baseline_spec(self.spec)
        bname = bspec.name
        self.log(
            f"[sertune] baseline {self.spec.baseline!r}: search {bname!r} on the same data, "
            "folds, budget and seeds"
        )
        try:
            brecord = load_record(bname)
            restore = brecord.phase != Phase.SEARCH or effective_status(brecord) in (
                "interrupted",
                "crashed",
            )
        except NotFound:
            brecord, restore = None, False
        if brecord is None or brecord.status != "finished":
            if brecord is None:
                brecord = self.record.but(
                    name=bname,
                    spec=bspec,
                    path=experiment_path(bname),
                    status="running",
                    phase=Phase.SEARCH,
                    created=now(),
                    baseline_of=self.name,
                    driver=driver_stamp(),
                    parent_run_id=None,
                    confirm=None,
                )
            base = Search(bname, bspec, brecord, self.log)
            base.save()
            base.start_runs(restore)
            try:
                base.run_phases(execution, stop, restore)
            finally:
                base.runs.close()
        self.report.comparison(self.name, bname)


class _FailedFast(Exception):
    """A phase stopped by :class:`sertune.failfast.FailFast`; carries its leaderboard."""

    def __init__(self, cause: str, result: SearchResult):
        super().__init__(cause)
        self.cause, self.result = cause, result
