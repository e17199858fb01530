"""Running a search: its phases, resume, and what happens on Ctrl-C.

A search is a spec run to its end in phases, each a Ray Tune experiment on the same warm slots:

1. ``search`` - Optuna proposes, ASHA stops weak trials early (``sertune.tuner``);
2. ``confirm`` (``confirm: {top_k, seeds}``) - the best configurations again with fresh seeds, so
   promotion ranks configurations by their mean, not by one lucky run;
3. ``baseline`` (``baseline: stl_baseline``) - the same search (data, folds, budget, seeds) with the
   trainable's baseline parameters fixed, compared side by side on the parent run.

Before anything starts: the environment passes ``sertune doctor``'s checks (here, and on every
node of a joined cluster), the spec is valid, the MLflow store answers, one trial fits the cluster.
While it runs: when its first trials all fail the same way, or one fails on the environment (a
library that does not load), the search stops at once (``sertune.failfast``, exit 1).
Ctrl-C or SIGTERM ends the search as ``interrupted`` (exit 130); ``sertune search resume NAME``
continues the phase that was running, keeping every finished trial.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import ray_compat, tracking, warmstart
from .cluster import check_nodes, check_resources, init_ray
from .doctor import preflight
from .errors import Interrupted, NotFound, SearchFailed, UsageError
from .failfast import FailFast
from .interrupts import Stopped, StopSignals
from .leaderboard import SearchResult, rank, summarise
from .records import (
    Phase,
    SearchRecord,
    driver_stamp,
    effective_status,
    experiment_path,
    load_record,
    log_path,
    now,
    record_spec,
    save_record,
)
from .search_logger import MLflowSearchLogger
from .spec import SearchSpec
from .storage import fs_and_path
from .trainable import get_trainable
from .tuner import TrialPlan, build_tuner, trial_plan, tune_callbacks


def state_save_period(trials: int) -> str:
    """How often Tune saves the search's state: every 2 s (a crashed driver loses at most 2 s of
    bookkeeping; trials keep their own checkpoints), longer for big searches, whose state costs
    more to write each time: 20 s at 1,000 trials keeps the cost linear in the search's size."""
    return os.environ.get("SERTUNE_STATE_SAVE_S") or f"{max(2.0, trials / 50):g}"


# -- where trials run ------------------------------------------------------------------------------


class Execution:
    """The warm slots (default) or per-trial Train runs of one driver, shared by its phases."""

    def __init__(self, spec: SearchSpec, name: str, n_slots: int, log=print):
        self.mode = spec.execution
        self.pool = None
        if self.mode == "warm":
            from .warm import SlotPool

            self.pool = SlotPool(
                spec.resources.model_dump(),
                spec.device,
                max(1, int(spec.resources.cpus_per_worker)),
                spec.budget.trial_max_failures,
                experiment_path(name),
                n_slots,
                log,
            ).start()

    def trainable(self, fixed: TrialPlan):
        if self.pool is not None:
            return self.pool.trainable(fixed)
        from ray import tune

        from .trials import run_trial

        # The trial function only drives a TorchTrainer; the workers hold the CPUs and GPUs (a
        # tiny memory request keeps the bundle non-empty without taking a CPU from them).
        return tune.with_resources(
            tune.with_parameters(run_trial, fixed=fixed), {"CPU": 0, "memory": 1 << 20}
        )

    def evaluator(self, fixed: TrialPlan):
        if self.pool is not None:
            from .warm import BoardEvaluator

            return BoardEvaluator(self.pool, fixed)
        from .trials import TaskEvaluator

        return TaskEvaluator(fixed)

    def reuse_actors(self, fifo: bool) -> bool:
        # Warm proxies reset in microseconds. A per-trial run stopped by ASHA is still inside
        # TorchTrainer.fit() when Tune resets its actor, and Ray 2.60 then fails the *next*
        # trial: reuse there only where nothing stops trials early (FIFO).
        return self.pool is not None or fifo

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


# -- entry points ---------------------------------------------------------------------------------


def run_search(
    spec: SearchSpec,
    name: str | None = None,
    tracking_uri: str | None = None,
    num_cpus: int | None = None,
    log=print,
    verbose: bool = False,
) -> SearchResult:
    """Check, prepare data, record the search, run its phases, return the leaderboard."""
    name = name or spec.name
    preflight()  # a broken torch/torchaudio refuses here, not in every trial
    ray_compat.quiet(verbose)
    uri = tracking.check_store(tracking_uri)  # before data, before Ray: one line if it fails
    seeds = warmstart.collect(spec, uri, log)  # an unknown earlier search: one line, exit 2
    search = Search(name, spec, _new_record(spec, name, uri, log, warm_start=seeds), log)
    return search.drive(restore=False, num_cpus=num_cpus, verbose=verbose)


def _new_record(spec: SearchSpec, name: str, uri: str, log, warm_start=None) -> SearchRecord:
    trainable = get_trainable(spec.trainable)
    from . import settings

    log(
        f"[sertune] search {name!r}: {spec.budget.trials} trials of {spec.trainable} "
        f"on {spec.data.corpus} ({spec.source})"
    )
    data = trainable.prepare_data(spec.data.model_dump(), settings.cache_root(), progress=log)
    report = data.get("report") or {}
    skipped = sum(len(v) for v in (report.get("skipped") or {}).values())
    if skipped:
        log(
            f"[sertune] data: {report.get('used')}/{report.get('found')} files used, {skipped} "
            "skipped (listed in the data report on the MLflow parent run)"
        )
    record = SearchRecord(
        name=name,
        spec=spec.model_dump(),
        source=spec.source,
        data=data,
        created=now(),
        path=experiment_path(name),
        tracking_uri=uri,
        driver=driver_stamp(),
        warm_start=warm_start or None,
    )
    save_record(name, record)
    return record


def resume_search(
    name: str, num_cpus: int | None = None, log=print, verbose: bool = False
) -> SearchResult:
    """Continue an interrupted or crashed search; finished trials are kept, not re-run."""
    preflight()
    from ray import tune

    ray_compat.quiet(verbose)
    record = load_record(name)
    if record.submission_id:
        raise UsageError(
            f"search {name!r} was submitted to {record.address}; it resumes on the cluster "
            f"(`sertune search submit` again with --name {name})"
        )
    status = effective_status(record)
    if status == "running":
        d = record.driver
        raise UsageError(
            f"search {name!r} is still running (pid {d.get('pid')} on {d.get('host')})"
        )
    phase = record.phase
    if phase == Phase.DONE:
        raise UsageError(f"search {name!r} has finished; nothing to resume")
    spec = record_spec(record)
    tracking.check_store(record.tracking_uri)
    if phase == Phase.SEARCH:
        fs, path = fs_and_path(record.path)
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise NotFound(f"{record.path}: no saved search state to resume from")
    log(f"[sertune] resuming search {name!r} ({phase} phase) from {record.path}")
    search = Search(name, spec, record, log)
    search.save(status="running", driver=driver_stamp())
    return search.drive(restore=True, num_cpus=num_cpus, verbose=verbose)


def confirm_search(
    name: str, top_k: int, seeds: int, num_cpus: int | None = None, log=print, verbose=False
) -> SearchResult:
    """Run (or re-run) the confirmation phase of a finished search (``promote --confirm-top``)."""
    preflight()
    record = load_record(name)
    spec = record_spec(record, confirm={"top_k": top_k, "seeds": seeds})
    search = Search(name, spec, record, log)
    search.save(
        spec=spec.model_dump(),
        phase=Phase.CONFIRM,
        status="running",
        driver=driver_stamp(),
    )
    ray_compat.quiet(verbose)
    return search.drive(restore=True, num_cpus=num_cpus, verbose=verbose, only=(Phase.CONFIRM,))


# -- the driver --------------------------------------------------------------------------------------


class Search:
    """One search run to its end: its phases in order, each a Tune experiment on the same
    execution (warm slots or per-trial runs). The baseline is a second ``Search`` whose phases
    the same runner (:meth:`run_phases`) drives."""

    def __init__(self, name: str, spec: SearchSpec, record: SearchRecord, log=print):
        self.name, self.spec, self.record, self.log = name, spec, record, log
        self._saving = threading.Lock()  # the MLflow journal's thread reports the parent run

    # -- the record (this object is its one writer while the search runs) -------------------
    def save(self, **changes: Any) -> None:
        with self._saving:
            self.record = self.record.but(**changes)
            save_record(self.name, self.record)

    def on_parent_run(self, run_id: str) -> None:
        """The MLflow logger's callback: the search's parent run was created (or found)."""
        if self.record.parent_run_id != run_id:
            self.save(parent_run_id=run_id)

    def logger(self, restore: bool) -> MLflowSearchLogger:
        return MLflowSearchLogger(
            self.record, self.spec, log=self.log, on_parent_run=self.on_parent_run
        ).start(resumed=restore)

    @property
    def phase(self) -> Phase:
        return self.record.phase

    def phases(self) -> list[Phase]:
        spec = self.spec
        return [
            Phase.SEARCH,
            *([Phase.CONFIRM] if spec.confirm else []),
            *([Phase.BASELINE] if spec.baseline else []),
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
        """Start Ray and the logger, run the phases, end the search's record and MLflow run."""
        spec, name, log = self.spec, self.name, self.log
        init_ray(num_cpus, verbose=verbose)
        fit = check_resources(spec, log)
        checked = check_nodes()  # a joined cluster: every node's torch/torchaudio, versions
        if checked:
            log(f"[sertune] {checked}")
        n_slots = min(spec.budget.concurrency, fit)
        if n_slots < spec.budget.concurrency:
            log(
                f"[sertune] {spec.budget.concurrency} trials at once were asked for; the "
                f"cluster holds {fit}: running {n_slots} at a time"
            )
        logger = self.logger(restore)
        execution = None
        result: SearchResult | None = None
        failed_fast: _FailedFast | None = None
        with StopSignals(log) as stop, ray_compat.tune_logs_to(log_path(name), verbose):
            try:
                execution = Execution(spec, name, n_slots, log)
                result = self.run_phases(logger, execution, stop, restore, only)
                status = "finished" if result.finished else "failed"
                logger.finish(result, status)  # waits for stopped trials' evaluations
            except (KeyboardInterrupt, Stopped):
                stop.fired = stop.fired or "SIGINT"
            except _FailedFast as e:
                failed_fast = e
                logger.finish(e.result, "failed", cause=e.cause)
            finally:
                if execution is not None:
                    execution.close()
        if stop.fired:
            logger.interrupted()
            self.save(status="interrupted", ended=now())
            logger.close()
            raise Interrupted(
                f"search {name!r} interrupted ({stop.fired}); what ran is saved. "
                f"Resume it with: sertune search resume {name}"
            )
        if failed_fast is not None:
            self.save(status="failed", ended=now(), phase=Phase.DONE, failure=failed_fast.cause)
            logger.close()
            raise SearchFailed(
                f"search {name!r} stopped: {failed_fast.cause}. Tracebacks: {log_path(name)}"
            )
        self.save(status=status, ended=now(), phase=Phase.DONE)
        logger.close()
        result.parent_run_id = logger.parent_run_id or self.record.parent_run_id
        result.stats = {
            "mlflow_write_s": logger.journal.write_seconds,
            "mlflow_calls": logger.journal.calls,
        }
        return result

    def run_phases(self, logger, execution, stop, restore: bool, only=None) -> SearchResult:
        """From the record's phase to the end: search, confirm, baseline. A stop signal raises
        :class:`Stopped` out of the phase it arrived in, so a phase that returns is complete."""

        def runs(phase: Phase) -> bool:
            return self.phase == phase and (only is None or phase in only)

        result = None
        if runs(Phase.SEARCH):
            result = self.tune(logger, execution, stop, restore)
            self.advance()
        if result is None:
            result = self.leaderboard_from_state()
        if runs(Phase.CONFIRM):
            result.confirm = self.confirm(result, logger, execution, stop)
            self.advance()
        if self.phase == Phase.BASELINE and only is None:
            self.baseline(logger, execution, stop)
            self.advance()
        return result

    # -- one phase -------------------------------------------------------------------------------
    def tune(
        self, logger, execution, stop, restore: bool, points=None, tune_name=None, budget=None
    ) -> SearchResult:
        """One Tune experiment of the search (the search itself, or its confirmation runs)."""
        from .progress import ProgressPrinter

        spec, name = self.spec, self.name
        fixed = trial_plan(spec, name, self.record.data)
        evaluator = execution.evaluator(fixed)
        logger.evaluator = evaluator
        tune_name = tune_name or name
        watch = FailFast(tune_name, spec.budget.concurrency)
        callbacks = [ProgressPrinter(spec, log=self.log, budget=budget), watch, logger]
        end_metrics = any(
            m.metric not in get_trainable(spec.trainable).epoch_metrics
            for m in spec.objective.as_list()
        )
        fifo = points is not None or spec.search.scheduler_name(spec.objective.multi) == "none"
        trainable = execution.trainable(fixed)
        tuner = build_tuner(
            spec,
            tune_name,
            trainable,
            callbacks=callbacks,
            restore=restore,
            points=points,
            reuse_actors=execution.reuse_actors(fifo),
            stop=watch.stopper(),
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
        stop.check()  # a signal ended Tune's loop: the phase is not complete
        result = summarise(name, spec, grid)
        if watch.tripped:
            raise _FailedFast(watch.tripped, result)
        return result

    def leaderboard_from_state(self) -> SearchResult:
        """The search phase's leaderboard from its saved Tune state (resuming a later phase)."""
        from ray.tune import ExperimentAnalysis

        from .leaderboard import trial_row

        fs, path = fs_and_path(experiment_path(self.name))
        ea = ExperimentAnalysis(path, storage_filesystem=fs)
        objectives = [m.model_dump() for m in self.spec.objective.as_list()]
        rows = [
            trial_row(
                t.trial_id,
                t.last_result or {},
                t.config,
                self.spec.budget.max_epochs,
                objectives,
                error="failed" if t.status == "ERROR" else None,
            )
            for t in ea.trials
        ]
        rows = rank(rows, objectives[0])
        failed = sum(r["state"] == "failed" for r in rows)
        return SearchResult(self.name, experiment_path(self.name), rows, objectives, failed)

    def confirm(self, result, logger, execution, stop) -> list[dict[str, Any]]:
        """Re-train the top-K configurations with fresh seeds; return mean ± sd per
        configuration."""
        from ray import tune

        from .confirm import aggregate, confirmation_points

        spec, name = self.spec, self.name
        points = confirmation_points(result, spec.confirm.top_k, spec.confirm.seeds, spec.seed)
        if not points:
            self.log("[sertune] no finished trial to confirm")
            return []
        self.log(
            f"[sertune] confirming the best {spec.confirm.top_k} configuration(s) with "
            f"{spec.confirm.seeds} fresh seed(s) each ({len(points)} trials)"
        )
        logger.tag = "confirm"
        tune_name = f"{name}-confirm"
        fs, path = fs_and_path(experiment_path(tune_name))
        restore = tune.Tuner.can_restore(path, storage_filesystem=fs)
        confirm = self.tune(
            logger,
            execution,
            stop,
            restore,
            points=points,
            tune_name=tune_name,
            budget=len(points),
        )
        logger.tag = ""
        groups = aggregate(confirm.rows, spec.objective.as_list()[0].model_dump())
        logger.log_confirmation(groups)
        self.save(confirm=groups)
        return groups

    def baseline(self, logger, execution, stop) -> None:
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
                    spec=bspec.model_dump(),
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
            blogger = base.logger(restore)
            try:
                try:
                    bres = base.run_phases(blogger, execution, stop, restore)
                except _FailedFast as e:
                    blogger.finish(e.result, "failed", cause=e.cause)
                    base.save(status="failed", phase=Phase.DONE, ended=now(), failure=e.cause)
                    raise
                except Stopped:
                    blogger.interrupted()
                    base.save(status="interrupted")
                    raise
                status = "finished" if bres.finished else "failed"
                blogger.finish(bres, status)
                base.save(status=status, phase=Phase.DONE, ended=now())
            finally:
                blogger.close()
        logger.log_comparison(self.name, bname)


class _FailedFast(Exception):
    """A phase stopped by :class:`sertune.failfast.FailFast`; carries its leaderboard."""

    def __init__(self, cause: str, result: SearchResult):
        super().__init__(cause)
        self.cause, self.result = cause, result
