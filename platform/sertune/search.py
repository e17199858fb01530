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
from typing import Any

from . import ray_compat, tracking, warmstart
from .cluster import check_nodes, check_resources, init_ray
from .doctor import preflight
from .errors import Interrupted, NotFound, SearchFailed, UsageError
from .failfast import FailFast
from .interrupts import StopSignals
from .leaderboard import SearchResult, rank, summarise
from .records import (
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
from .spec import SearchSpec, validate_spec
from .storage import fs_and_path
from .trainable import get_trainable
from .tuner import build_tuner, trial_fixed, tune_callbacks


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

    def trainable(self, fixed: dict[str, Any]):
        if self.pool is not None:
            return self.pool.trainable(fixed)
        from ray import tune

        from .trials import run_trial

        # The trial function only drives a TorchTrainer; the workers hold the CPUs and GPUs (a
        # tiny memory request keeps the bundle non-empty without taking a CPU from them).
        return tune.with_resources(
            tune.with_parameters(run_trial, fixed=fixed), {"CPU": 0, "memory": 1 << 20}
        )

    def evaluator(self, fixed: dict[str, Any]):
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
    record = _new_record(spec, name, uri, log)
    if seeds:
        record["warm_start"] = seeds
        save_record(name, record)
    return _drive(name, spec, record, restore=False, num_cpus=num_cpus, log=log, verbose=verbose)


def _new_record(spec: SearchSpec, name: str, uri: str, log, baseline_of: str | None = None):
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
        log(f"[sertune] data: {report.get('used')}/{report.get('found')} files used, {skipped} "
            "skipped (listed in the data report on the MLflow parent run)")  # fmt: skip
    record = {
        "name": name,
        "spec": spec.model_dump(),
        "source": spec.source,
        "data": data,
        "created": now(),
        "path": experiment_path(name),
        "tracking_uri": uri,
        "status": "running",
        "phase": "search",
        "driver": driver_stamp(),
    }
    if baseline_of:
        record["baseline_of"] = baseline_of
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
    if record.get("submission_id"):
        raise UsageError(
            f"search {name!r} was submitted to {record.get('address')}; it resumes on the cluster "
            f"(`sertune search submit` again with --name {name})"
        )
    status = effective_status(record)
    if status == "running":
        d = record.get("driver", {})
        raise UsageError(
            f"search {name!r} is still running (pid {d.get('pid')} on {d.get('host')})"
        )
    if record.get("phase") == "done":
        raise UsageError(f"search {name!r} has finished; nothing to resume")
    spec = record_spec(record)
    tracking.check_store(record["tracking_uri"])
    if record.get("phase", "search") == "search":
        fs, path = fs_and_path(record["path"])
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise NotFound(f"{record['path']}: no saved search state to resume from")
    log(
        f"[sertune] resuming search {name!r} ({record.get('phase', 'search')} phase) from {record['path']}"
    )
    record.update(status="running", driver=driver_stamp())
    save_record(name, record)
    return _drive(name, spec, record, restore=True, num_cpus=num_cpus, log=log, verbose=verbose)


def confirm_search(
    name: str, top_k: int, seeds: int, num_cpus: int | None = None, log=print, verbose=False
) -> SearchResult:
    """Run (or re-run) the confirmation phase of a finished search (``promote --confirm-top``)."""
    preflight()
    record = load_record(name)
    raw = {k: v for k, v in record["spec"].items() if k != "source"}
    raw["confirm"] = {"top_k": top_k, "seeds": seeds}
    spec = validate_spec(raw, record.get("source") or "<record>", check_paths=False)
    record.update(spec=spec.model_dump(), phase="confirm", status="running", driver=driver_stamp())
    record.pop("confirm_done", None)
    save_record(name, record)
    ray_compat.quiet(verbose)
    return _drive(name, spec, record, restore=True, num_cpus=num_cpus, log=log, verbose=verbose,
                  only=("confirm",))  # fmt: skip


# -- the driver --------------------------------------------------------------------------------------


def _drive(
    name: str,
    spec: SearchSpec,
    record: dict[str, Any],
    restore: bool,
    num_cpus: int | None,
    log,
    verbose: bool,
    only: tuple[str, ...] | None = None,
) -> SearchResult:
    init_ray(num_cpus, verbose=verbose)
    fit = check_resources(spec, log)
    checked = check_nodes()  # a joined cluster: every node's torch/torchaudio, versions
    if checked:
        log(f"[sertune] {checked}")
    n_slots = min(spec.budget.concurrency, fit)
    if n_slots < spec.budget.concurrency:
        log(f"[sertune] {spec.budget.concurrency} trials at once were asked for; the cluster "
            f"holds {fit}: running {n_slots} at a time")  # fmt: skip
    logger = MLflowSearchLogger(record, spec, log=log).start(resumed=restore)
    execution = None
    result: SearchResult | None = None
    failed_fast: _FailedFast | None = None
    with StopSignals(log) as stop, ray_compat.tune_logs_to(log_path(name), verbose):
        try:
            execution = Execution(spec, name, n_slots, log)
            phase = record.get("phase", "search")
            if phase == "search" and (only is None or "search" in only):
                result = _phase(name, spec, record, logger, execution, stop, restore, log)
                if not stop.fired:
                    _advance(record, spec)
            if result is None:
                result = _leaderboard_from_state(name, spec)
            if (
                not stop.fired
                and record["phase"] == "confirm"
                and (only is None or "confirm" in only)
            ):
                result.confirm = _confirm(name, spec, record, result, logger, execution, stop, log)
                if not stop.fired:
                    record["confirm_done"] = True
                    _advance(record, spec, after="confirm")
            if not stop.fired and record["phase"] == "baseline" and only is None:
                _baseline(name, spec, record, logger, execution, stop, num_cpus, log, verbose)
                if not stop.fired:
                    record["phase"] = "done"
            if not stop.fired:
                status = "finished" if result.finished else "failed"
                logger.finish(result, status)  # waits for stopped trials' evaluations in the slots
        except KeyboardInterrupt:
            stop.fired = stop.fired or "SIGINT"
        except _FailedFast as e:
            failed_fast = e
            logger.finish(e.result, "failed", cause=e.cause)
        finally:
            if execution is not None:
                execution.close()
    if failed_fast is not None and not stop.fired:
        record.update(status="failed", ended=now(), phase="done", failure=failed_fast.cause)
        save_record(name, record)
        logger.close()
        raise SearchFailed(
            f"search {name!r} stopped: {failed_fast.cause}. Tracebacks: {log_path(name)}"
        )
    if stop.fired:
        logger.interrupted()
        record.update(status="interrupted", ended=now())
        save_record(name, record)
        logger.close()
        raise Interrupted(f"search {name!r} interrupted ({stop.fired}); what ran is saved. "
                          f"Resume it with: sertune search resume {name}")  # fmt: skip
    record.update(status=status, ended=now(), phase="done")
    save_record(name, record)
    logger.close()
    result.parent_run_id = logger.parent_run_id or record.get("parent_run_id")
    result.stats = {
        "mlflow_write_s": logger.journal.write_seconds,
        "mlflow_calls": logger.journal.calls,
    }
    return result


def _advance(record: dict[str, Any], spec: SearchSpec, after: str = "search") -> None:
    order = (
        ["search"]
        + (["confirm"] if spec.confirm else [])
        + (["baseline"] if spec.baseline else [])
    )
    nxt = (
        order[order.index(after) + 1]
        if after in order and order.index(after) + 1 < len(order)
        else "done"
    )
    record["phase"] = nxt
    save_record(record["name"], record)


def _phase(name, spec, record, logger, execution, stop, restore, log, points=None,
           tune_name=None, budget=None) -> SearchResult:  # fmt: skip
    """One Tune experiment of the search (the search itself, or its confirmation runs)."""
    from .progress import ProgressPrinter

    fixed = trial_fixed(spec, name, record["data"])
    evaluator = execution.evaluator(fixed)
    logger.evaluator = evaluator
    tune_name = tune_name or name
    watch = FailFast(tune_name, spec.budget.concurrency)
    callbacks = [ProgressPrinter(spec, log=log, budget=budget), watch, logger]
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
        seeds=record.get("warm_start"),
    )
    if restore:
        ray_compat.set_restored_callbacks(tuner, tune_callbacks(callbacks))
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = state_save_period(budget or spec.budget.trials)
    try:
        with ray_compat.strict_metric_checking(not end_metrics), stop.tune_loop():
            grid = tuner.fit()
    finally:
        watch.close()
    if stop.fired:
        return summarise(name, spec, grid, interrupted=True)
    result = summarise(name, spec, grid)
    if watch.tripped:
        raise _FailedFast(watch.tripped, result)
    return result


class _FailedFast(Exception):
    """A phase stopped by :class:`sertune.failfast.FailFast`; carries its leaderboard."""

    def __init__(self, cause: str, result: SearchResult):
        super().__init__(cause)
        self.cause, self.result = cause, result


def _leaderboard_from_state(name: str, spec: SearchSpec) -> SearchResult:
    """The search phase's leaderboard from its saved Tune state (resuming a later phase)."""
    from ray.tune import ExperimentAnalysis

    from .leaderboard import trial_row

    fs, path = fs_and_path(experiment_path(name))
    ea = ExperimentAnalysis(path, storage_filesystem=fs)
    objectives = [m.model_dump() for m in spec.objective.as_list()]
    rows = [
        trial_row(
            t.trial_id,
            t.last_result or {},
            t.config,
            spec.budget.max_epochs,
            objectives,
            error="failed" if t.status == "ERROR" else None,
        )  # fmt: skip
        for t in ea.trials
    ]
    rows = rank(rows, objectives[0])
    return SearchResult(name, experiment_path(name), rows, objectives,
                        sum(r["state"] == "failed" for r in rows))  # fmt: skip


def _confirm(name, spec, record, result, logger, execution, stop, log) -> list[dict[str, Any]]:
    """Re-train the top-K configurations with fresh seeds; return mean ± sd per configuration."""
    from .confirm import aggregate, confirmation_points

    points = confirmation_points(result, spec.confirm.top_k, spec.confirm.seeds, spec.seed)
    if not points:
        log("[sertune] no finished trial to confirm")
        return []
    log(f"[sertune] confirming the best {spec.confirm.top_k} configuration(s) with "
        f"{spec.confirm.seeds} fresh seed(s) each ({len(points)} trials)")  # fmt: skip
    logger.tag = "confirm"
    tune_name = f"{name}-confirm"
    fs, path = fs_and_path(experiment_path(tune_name))
    from ray import tune

    restore = tune.Tuner.can_restore(path, storage_filesystem=fs)
    confirm = _phase(name, spec, record, logger, execution, stop, restore, log, points=points,
                     tune_name=tune_name, budget=len(points))  # fmt: skip
    logger.tag = ""
    if stop.fired:
        return []
    groups = aggregate(confirm.rows, spec.objective.as_list()[0].model_dump())
    logger.log_confirmation(groups)
    record["confirm"] = groups
    save_record(name, record)
    return groups


def _baseline(name, spec, record, logger, execution, stop, num_cpus, log, verbose) -> None:
    """The same search with the trainable's baseline parameters fixed; compared on the parent."""
    from .confirm import baseline_spec

    bspec = baseline_spec(spec)
    bname = bspec.name
    log(f"[sertune] baseline {spec.baseline!r}: search {bname!r} on the same data, folds, budget "
        "and seeds")  # fmt: skip
    try:
        brecord = load_record(bname)
        restore = brecord.get("phase") not in (None, "search") or effective_status(brecord) in (
            "interrupted", "crashed")  # fmt: skip
    except NotFound:
        brecord, restore = None, False
    if brecord is None or brecord.get("status") != "finished":
        if brecord is None:
            brecord = {**record, "name": bname, "spec": bspec.model_dump(), "path": experiment_path(bname),
                       "status": "running", "phase": "search", "created": now(),
                       "baseline_of": name, "driver": driver_stamp()}  # fmt: skip
            brecord.pop("parent_run_id", None)
            brecord.pop("confirm", None)
            save_record(bname, brecord)
        blogger = MLflowSearchLogger(brecord, bspec, log=log).start(resumed=restore)
        try:
            try:
                bres = _phase(bname, bspec, brecord, blogger, execution, stop, restore, log)
            except _FailedFast as e:
                blogger.finish(e.result, "failed", cause=e.cause)
                brecord.update(status="failed", phase="done", ended=now(), failure=e.cause)
                save_record(bname, brecord)
                raise
            if stop.fired:
                blogger.interrupted()
                brecord.update(status="interrupted")
                save_record(bname, brecord)
                return
            if bspec.confirm:
                brecord["phase"] = "confirm"
                bres.confirm = _confirm(bname, bspec, brecord, bres, blogger, execution, stop, log)
                if stop.fired:
                    blogger.interrupted()
                    brecord.update(status="interrupted")
                    save_record(bname, brecord)
                    return
            blogger.finish(bres, "finished" if bres.finished else "failed")
            brecord.update(
                status="finished" if bres.finished else "failed", phase="done", ended=now()
            )
            save_record(bname, brecord)
        finally:
            blogger.close()
    logger.log_comparison(name, bname)
