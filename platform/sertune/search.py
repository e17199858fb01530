"""Running a search: start one, resume one, confirm one (the driver itself: ``sertune.driver``).

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

from . import ray_compat, records, tracking, warmstart
from .diskspace import check_free_space
from .doctor import preflight
from .driver import Search, state_save_period
from .errors import NotFound, UsageError
from .execution import Log
from .leaderboard import SearchResult
from .records import Phase, SearchRecord, driver_stamp, load_record
from .spec import ConfirmSpec, SearchSpec, SpecError
from .storage import fs_and_path
from .trainable import TooFewSpeakerGroups, get_trainable

__all__ = ["Search", "confirm_search", "resume_search", "run_search", "state_save_period"]


# -- entry points ---------------------------------------------------------------------------------


def run_search(
    spec: SearchSpec,
    name: str | None = None,
    tracking_uri: str | None = None,
    num_cpus: int | None = None,
    log: Log = print,
    verbose: bool = False,
    replace: bool = False,
) -> SearchResult:
    """Check, prepare data, record the search, run its phases, return the leaderboard. A name
    in use is refused (running: always; ended: unless ``replace``, which removes that search's
    state and runs first)."""
    name = records.check_name(spec.name if name is None else name)
    preflight()  # a broken torch/torchaudio refuses here, not in every trial
    ray_compat.quiet(verbose)
    with records.search_lock(name):  # one search per name, atomically
        _claim(name, replace, log)
        check_free_space()  # a full disk would cut the state files mid-write
        uri = tracking.check_store(tracking_uri)  # before data, before Ray: one line if it fails
        seeds = warmstart.collect(spec, uri, log)  # an unknown earlier search: one line, exit 2
        search = Search(name, spec, _new_record(spec, name, uri, log, warm_start=seeds), log)
        return search.drive(restore=False, num_cpus=num_cpus, verbose=verbose)


def _claim(name: str, replace: bool, log: Log) -> None:
    """Refuse a name an earlier search holds, unless ``replace`` (then remove that search)."""
    try:
        old = load_record(name)
    except NotFound:
        return
    except UsageError:  # an unreadable record: only --replace may take its name
        if not replace:
            raise
        records.delete_record(name)
        return
    if old.submission_id and os.environ.get("SERTUNE_SUBMITTED") == name:
        return  # the Ray Job of a submitted search, on a node that shares the submitter's home
    status = records.effective_status(old)
    if status == "running":
        d = old.driver
        raise UsageError(
            f"search {name!r} is running (pid {d.get('pid')} on {d.get('host')}); stop it first"
        )
    if not replace:
        raise UsageError(
            f"search {name!r} exists ({status}, {old.created}): resume it (sertune search "
            f"resume {name}), remove it (sertune search rm {name}), give another --name, or "
            "run with --replace"
        )
    from .remove import remove_search

    for line in remove_search(name, mlflow_runs=True, locked=True):
        log(f"[sertune] --replace: {line}")


def _new_record(
    spec: SearchSpec,
    name: str,
    uri: str,
    log: Log,
    warm_start: dict[str, Any] | None = None,
) -> SearchRecord:
    from . import settings

    plugin = get_trainable(spec.trainable)
    log(
        f"[sertune] search {name!r}: {spec.budget.trials} trials of {spec.trainable} "
        f"on {spec.data.corpus} ({spec.source})"
    )
    data = plugin.prepare_data(spec.data.model_dump(), settings.cache_root(), progress=log)
    report = data.get("report") or {}
    skipped = sum(len(v) for v in (report.get("skipped") or {}).values())
    if skipped:
        log(
            f"[sertune] data: {report.get('used')}/{report.get('found')} files used, {skipped} "
            "skipped (listed in the data report on the MLflow parent run)"
        )
    cv_folds = spec.objective.cv.folds if spec.objective.cv else None
    try:  # who tests, validates, trains; K folds above the groups there are: refused here
        split = plugin.split_report({**data, "corpus": spec.data.corpus}, cv_folds)
    except TooFewSpeakerGroups as e:
        raise SpecError(spec.source or spec.name, "objective.cv.folds", str(e)) from None
    for line in split:
        log(f"[sertune] data: {line}")
    reference = _reference(plugin, spec, data, log)
    record = SearchRecord(
        name=name,
        spec=spec,
        source=spec.source,
        data=data,
        created=records.now(),
        path=records.experiment_path(name),
        tracking_uri=uri,
        driver=driver_stamp(),
        warm_start=warm_start or None,
        reference=reference,
    )
    records.save_record(name, record)
    return record


def _reference(plugin: Any, spec: SearchSpec, data: dict[str, Any], log: Log) -> dict | None:
    """The reference baseline on this search's split (``reference:``; null: none), computed once
    before the trials: seconds on a CPU, its features cached beside the decoded corpus. One that
    cannot be computed is said in one line; the search goes on without its row."""
    from . import settings

    if spec.reference is None:
        return None
    try:
        return plugin.reference(
            {**data, "corpus": spec.data.corpus},
            spec.robustness_options(),
            spec.seed,
            settings.cache_root(),
            log,
        )
    except Exception as e:  # noqa: BLE001 - the search does not depend on it
        log(f"[sertune] reference baseline not computed: {type(e).__name__}: {e}")
        return None


def resume_search(
    name: str, num_cpus: int | None = None, log: Log = print, verbose: bool = False
) -> SearchResult:
    """Continue an interrupted or crashed search; finished trials are kept, not re-run."""
    preflight()
    ray_compat.quiet(verbose)
    with records.search_lock(name):
        check_free_space()
        return _resume(name, num_cpus, log, verbose)


def _resume(name: str, num_cpus: int | None, log: Log, verbose: bool) -> SearchResult:
    from ray import tune

    record = load_record(name)
    if record.submission_id:
        raise UsageError(
            f"search {name!r} was submitted to {record.address}; it resumes on the cluster "
            f"(`sertune search submit` again with --name {name})"
        )
    status = records.effective_status(record)
    if status == "running":
        d = record.driver
        raise UsageError(
            f"search {name!r} is still running (pid {d.get('pid')} on {d.get('host')})"
        )
    phase = record.phase
    if phase == Phase.DONE and status in ("crashed", "interrupted"):
        # a driver killed after its last phase, before its record said so (made before the
        # closing phase existed): only the closing steps are missing
        record = record.but(phase=Phase.CLOSING)
        phase = record.phase
    if phase == Phase.DONE:
        raise UsageError(f"search {name!r} has {status}; nothing to resume")
    tracking.check_store(record.tracking_uri)
    if phase == Phase.SEARCH:
        fs, path = fs_and_path(record.path)
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise NotFound(f"{record.path}: no saved search state to resume from")
    log(f"[sertune] resuming search {name!r} ({phase} phase) from {record.path}")
    search = Search(name, record.spec, record, log)
    search.save(status="running", driver=driver_stamp())
    return search.drive(restore=True, num_cpus=num_cpus, verbose=verbose)


def confirm_search(
    name: str,
    top_k: int,
    seeds: int,
    num_cpus: int | None = None,
    log: Log = print,
    verbose: bool = False,
) -> SearchResult:
    """Run (or re-run) the confirmation phase of a finished search (``promote --confirm-top``)."""
    preflight()
    with records.search_lock(name):
        record = load_record(name)
        spec = record.spec.model_copy(update={"confirm": ConfirmSpec(top_k=top_k, seeds=seeds)})
        search = Search(name, spec, record, log)
        search.save(spec=spec, phase=Phase.CONFIRM, status="running", driver=driver_stamp())
        ray_compat.quiet(verbose)
        return search.drive(
            restore=True, num_cpus=num_cpus, verbose=verbose, only=(Phase.CONFIRM,)
        )
