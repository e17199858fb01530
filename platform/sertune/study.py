"""The study: the paper's question in one command - nested speaker-independent cross-validation of a
spec against its ``--vs`` arm (the trainable's named baseline, e.g. ``stl_baseline``, or another
spec) and the field's reference baseline, on every condition, with intervals.

``sertune study run SPEC --vs stl_baseline --outer 4``:

* **Outer folds.** The corpus's speaker groups (speakers, or sessions where the corpus has them)
  are dealt into K outer folds the way every split is dealt (``data.dealing``: balanced on gender
  and classes by default); ``--outer all`` is leave-one-group-out. Outer fold k is the test set
  of fold k's searches (``data.fold=k, data.n_folds=K``).
* **A complete search per outer fold and arm**, on the other speakers, with the spec's own
  objective (its validation split or inner cross-validation, its budget, its confirmation). Every
  fold search is an ordinary search named ``STUDY.fold<k>.<arm>`` (``sertune search status``
  works on it). Its champion - chosen on validation speakers only - was evaluated once on the
  outer fold's speakers at the end of its trial (``test_*``, ``robust/*``, cross-corpus): those
  figures are the fold's. The reference baseline (eGeMAPS + logistic regression) is computed on
  the spec arm's split of each fold. Arms share the outer folds, the inner folds and the seeds,
  so they pair fold by fold.
* **The table** (:mod:`sertune.study_table`): each condition's mean ± sd over outer folds per arm,
  the paired differences with 95 % t intervals (n_outer - 1 df), a per-fold table and each
  fold's winning configuration; as Markdown, a self-contained HTML page and on a ``study`` run in
  MLflow whose children are the fold searches' parent runs.
* **Resumable.** The study's record lists every fold search; a killed driver resumes where it was
  (``sertune study resume``): finished fold searches are kept, a fold search that was running
  resumes from its own saved state.

The fold searches run one after the other on the same warm slots (the slots, Ray and the corpus
stay resident across fold searches); each search runs its trials ``budget.concurrency`` at a time.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from . import ray_compat, records, settings, tracking
from .errors import Interrupted, NotFound, UsageError
from .execution import Log
from .records import Phase, driver_stamp, load_record, now
from .spec import SearchSpec, SpecError, load_spec
from .trainable import TooFewSpeakerGroups, get_trainable

REFERENCE = "reference"
FIGURES = ("test_", "robust/")  # a champion's figures on the outer fold's speakers
KIND = "study"  # the MLflow run's sertune.kind


class StudyRecord(BaseModel):
    """What this machine knows of one study (``state/studies/NAME.json``)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    spec: SearchSpec  # the spec arm, before the outer fold is set
    vs: str  # what --vs named
    vs_spec: SearchSpec  # the --vs arm
    arms: list[str]  # [spec arm, vs arm] labels (search name suffixes)
    n_outer: int  # K: the outer folds the groups are dealt into
    outer: list[int]  # the outer folds run
    groups: int = 0  # labelled speaker groups in the corpus
    created: str = ""
    ended: str | None = None
    status: str = "running"  # running, finished, interrupted, failed, submitted
    driver: dict[str, Any] = Field(default_factory=dict)
    tracking_uri: str | None = None
    run_id: str | None = None  # the MLflow study run
    folds: dict[str, dict[str, Any]] = Field(default_factory=dict)  # "k/arm" -> figures
    wall_s: float = 0.0  # the study driver's own time, all its sessions together
    parallel: int = 1  # fold searches at once in its last session
    submission_id: str | None = None
    address: str | None = None

    def but(self, **changes: Any) -> StudyRecord:
        return type(self).model_validate({**self.model_dump(), **changes})

    def search_name(self, fold: int, arm: str) -> str:
        return f"{self.name}.fold{fold}.{arm}"

    def searches(self) -> list[tuple[int, str, str]]:
        return [(k, arm, self.search_name(k, arm)) for k in self.outer for arm in self.arms]

    def spec_of(self, fold: int, arm: str) -> SearchSpec:
        """The arm's spec with the outer fold as its test set."""
        base = self.spec if arm == self.arms[0] else self.vs_spec
        data = base.data.model_copy(update={"fold": fold, "n_folds": self.n_outer})
        update: dict[str, Any] = {"data": data, "name": self.search_name(fold, arm)}
        if arm != self.arms[0]:
            update["reference"] = None  # the reference is the spec arm's split's: the same
        return base.model_copy(update=update)


# -- the record ----------------------------------------------------------------------------------


def study_dir() -> Path:
    d = settings.local_state_dir() / "studies"
    d.mkdir(parents=True, exist_ok=True)
    return d


def record_path(name: str) -> Path:
    return study_dir() / f"{records.check_name(name)}.json"


def output_dir(name: str) -> Path:
    """Where the study's report files go (report.md, report.html, study.json)."""
    return study_dir() / records.check_name(name)


def save_study(record: StudyRecord) -> None:
    path = record_path(record.name)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(record.model_dump_json(indent=2, exclude_none=True))
    tmp.replace(path)


def load_study(name: str) -> StudyRecord:
    path = record_path(name)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in study_dir().glob("*.json"))) or "none"
        raise NotFound(f"no study named {name!r} (known: {known}); see `sertune study list`")
    try:
        return StudyRecord.model_validate_json(path.read_text())
    except ValueError as e:
        raise UsageError(f"{path}: not a study record ({str(e).splitlines()[0]})") from None


def list_studies() -> list[StudyRecord]:
    out = []
    for p in sorted(study_dir().glob("*.json")):
        try:
            out.append(StudyRecord.model_validate_json(p.read_text()))
        except ValueError:
            continue
    return out


def study_status(record: StudyRecord) -> str:
    """running (a live driver), crashed (a dead one left it running), else what it says."""
    if record.status != "running":
        return record.status
    alive = records.driver_alive(record)  # it reads only the driver stamp
    return "running" if alive in (True, None) else "crashed"


# -- planning ------------------------------------------------------------------------------------


def arms_of(spec: SearchSpec, vs: str, sets: list[str] | None = None) -> tuple[SearchSpec, str]:
    """The ``--vs`` arm's spec and label: the trainable's named baseline (the same search with its
    baseline parameters fixed), or another spec on the same data."""
    from .confirm import baseline_spec

    trainable = get_trainable(spec.trainable)
    if vs in trainable.baselines():
        vspec = baseline_spec(spec.model_copy(update={"baseline": vs}))
        label = vs
    else:
        from .spec import presets

        if vs not in presets() and not Path(vs).expanduser().is_file():
            known = ", ".join(trainable.baselines()) or "none"
            raise UsageError(
                f"--vs {vs!r}: neither a baseline of {spec.trainable} (known: {known}) nor a "
                f"spec (a preset: {', '.join(presets())}; or a YAML file)"
            )
        vspec = load_spec(vs, sets=list(sets or []))
        mine = spec.data.model_dump(exclude={"fold", "n_folds"})
        theirs = vspec.data.model_dump(exclude={"fold", "n_folds"})
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise SpecError(
                vspec.source or vs,
                "data",
                f"the --vs spec must read the same data as {spec.name!r} to pair with it "
                f"(differs in: {', '.join(diff)}); give it the same data with --set",
            )
        label = vspec.name
    if label == spec.name:
        label = f"{label}-vs"
    return vspec.model_copy(update={"baseline": None, "name": label}), label


def parse_outer(text: str, groups: int, spec: SearchSpec) -> tuple[int, list[int]]:
    """``all`` (leave one group out), ``K`` (K folds, every one), ``0,3,7`` (those folds of
    leave-one-group-out, or of ``data.n_folds`` when the spec sets it)."""
    text = str(text).strip()
    if text == "all":
        return groups, list(range(groups))
    if "," in text or text.startswith("["):
        try:
            folds = sorted({int(x) for x in text.strip("[]").split(",") if x.strip()})
        except ValueError:
            raise UsageError(f"--outer {text!r}: expected all, K, or fold numbers 0,3,7") from None
        n = spec.data.n_folds or groups
        bad = [k for k in folds if not 0 <= k < n]
        if bad:
            raise UsageError(f"--outer: fold(s) {bad} outside 0..{n - 1} ({n} outer folds)")
        return n, folds
    try:
        k = int(text)
    except ValueError:
        raise UsageError(f"--outer {text!r}: expected all, K, or fold numbers 0,3,7") from None
    if k < 3:
        raise UsageError(f"--outer {k}: at least 3 outer folds (test, validation, training)")
    if k > groups:
        raise UsageError(f"--outer {k}: the corpus has {groups} speaker groups")
    return k, list(range(k))


def plan(
    spec: SearchSpec,
    vs: str,
    outer: str,
    name: str | None = None,
    sets: list[str] | None = None,
    log: Log = print,
) -> tuple[StudyRecord, dict[str, Any]]:
    """Check everything a study needs before it starts (refusing in one line), print what it
    will run; return its record (not saved) and the prepared data."""
    name = records.check_name(name or f"{spec.name}-study")
    trainable = get_trainable(spec.trainable)
    vspec, vlabel = arms_of(spec, vs, sets)
    data = trainable.prepare_data(spec.data.model_dump(), settings.cache_root(), progress=log)
    groups = trainable.speaker_groups(data)
    if len(groups) < 3:
        raise UsageError(
            f"{spec.data.corpus}: a study needs >= 3 speaker groups (test, validation, "
            f"training), found {len(groups)}"
        )
    n_outer, folds = parse_outer(outer, len(groups), spec)
    for arm_spec in (spec, vspec):
        cv = arm_spec.objective.cv.folds if arm_spec.objective.cv else None
        for k in folds:
            fold_data = {**data, "fold": k, "n_folds": n_outer, "corpus": spec.data.corpus}
            try:
                trainable.split_report(fold_data, cv)
            except TooFewSpeakerGroups as e:
                raise UsageError(
                    f"study refused before anything ran: outer fold {k} of {n_outer} leaves too "
                    f"few speaker groups for {arm_spec.name!r}'s inner cross-validation: {e}"
                ) from None
            except ValueError as e:
                raise UsageError(f"study refused: outer fold {k} of {n_outer}: {e}") from None
    arms = [spec.name, vlabel]
    record = StudyRecord(
        name=name,
        spec=spec.model_copy(update={"baseline": None}),
        vs=vs,
        vs_spec=vspec,
        arms=arms,
        n_outer=n_outer,
        outer=folds,
        groups=len(groups),
        created=now(),
    )
    for k, arm, _ in record.searches():
        records.check_name(record.search_name(k, arm))
    b = spec.budget
    inner = (
        f"{spec.objective.cv.folds}-fold inner cross-validation"
        if spec.objective.cv
        else "one validation fold"
    )
    confirm = (
        f", then the top {spec.confirm.top_k} x {spec.confirm.seeds} fresh seeds"
        if spec.confirm and spec.confirm.seeds
        else ""
    )
    what = "leave-one-group-out" if n_outer == len(groups) else f"{n_outer} balanced folds"
    per = len(folds) * len(arms)
    log(
        f"[sertune] study {name!r}: {len(folds)} outer fold(s) of {n_outer} ({what} of "
        f"{len(groups)} speaker groups) x {len(arms)} arms ({', '.join(arms)}) + the reference "
        f"baseline ({'on' if spec.reference else 'off'})"
    )
    log(
        f"[sertune] each fold search: {b.trials} trials x <= {b.max_epochs} epochs, {inner}"
        f"{confirm}; {per} searches, {per * b.trials} trials in all"
    )
    for k in folds:
        fold_data = {**data, "fold": k, "n_folds": n_outer, "corpus": spec.data.corpus}
        test = next(
            (ln for ln in trainable.split_report(fold_data, None) if ln.startswith("test")), ""
        )
        log(f"[sertune] outer fold {k}: {test}")
    return record, data


# -- running -------------------------------------------------------------------------------------


def run_study(
    spec: SearchSpec,
    vs: str,
    outer: str = "all",
    name: str | None = None,
    sets: list[str] | None = None,
    tracking_uri: str | None = None,
    num_cpus: int | None = None,
    log: Log = print,
    verbose: bool = False,
    parallel: int | None = None,
) -> StudyRecord:
    """Plan, record and run a study to its end; return its record (with every fold's figures).
    ``parallel``: fold searches at once (default: as many as the cluster holds)."""
    from .doctor import preflight

    preflight()
    ray_compat.quiet(verbose)
    name = records.check_name(name or f"{spec.name}-study")
    submitted: dict[str, Any] = {}
    if record_path(name).exists():
        old = load_study(name)
        # the Ray Job of a submitted study, on a node that shares the submitter's home: it
        # keeps the submission (`study status` shows the job's state)
        submitted = {"submission_id": old.submission_id, "address": old.address}
        if os.environ.get("SERTUNE_SUBMITTED") != name or not old.submission_id:
            raise UsageError(
                f"study {name!r} exists ({study_status(old)}, {old.created}): resume it "
                f"(sertune study resume {name}), remove it (sertune study rm {name}) or give "
                "another --name"
            )
    uri = tracking.check_store(tracking_uri)
    record, _ = plan(spec, vs, outer, name, sets, log)
    record = record.but(tracking_uri=uri, driver=driver_stamp(), status="running", **submitted)
    save_study(record)
    return _drive(record, num_cpus, log, verbose, parallel)


def resume_study(
    name: str,
    num_cpus: int | None = None,
    log: Log = print,
    verbose: bool = False,
    parallel: int | None = None,
) -> StudyRecord:
    """Go on with a study where it was: finished fold searches kept, the others run or resumed,
    ``parallel`` at a time (default: as many as its last session ran)."""
    from .doctor import preflight

    preflight()
    ray_compat.quiet(verbose)
    record = load_study(name)
    status = study_status(record)
    if status == "running":
        raise UsageError(
            f"study {name!r} is running (pid {record.driver.get('pid')}); stop it first"
        )
    if status == "finished":
        raise UsageError(f"study {name!r} has finished; `sertune study report {name}` shows it")
    tracking.check_store(record.tracking_uri)
    log(f"[sertune] resuming study {name!r}")
    record = record.but(status="running", driver=driver_stamp())
    save_study(record)
    # as the study last ran unless told otherwise: a study run one fold search at a time on
    # shared warm slots is not resumed as several drivers contending for the same cores
    return _drive(
        record, num_cpus, log, verbose, record.parallel if parallel is None else parallel
    )


def _drive(
    record: StudyRecord,
    num_cpus: int | None,
    log: Log,
    verbose: bool,
    parallel: int | None = None,
) -> StudyRecord:
    """Run every fold search not finished yet, then the table. One at a time, the fold searches
    share this driver's warm slots; several at a time (``parallel`` > 1, by default as many as
    the cluster holds: its trial slots // ``budget.concurrency``), each runs in a driver process
    of its own on the same Ray cluster (``sertune study fold``), its output prefixed here."""
    from .cluster import check_resources, init_ray

    t0 = time.monotonic()
    store = tracking.Store(record.tracking_uri)
    record = record.but(run_id=_study_run(store, record))
    save_study(record)
    first = record.spec_of(record.outer[0], record.arms[0])
    address = init_ray(num_cpus, verbose=verbose)
    if parallel is None:
        parallel = max(1, check_resources(first, log) // max(1, first.budget.concurrency))
    todo = [x for x in record.searches() if not _finished(x[2])]
    parallel = max(1, min(parallel, len(todo) or 1))
    log(
        f"[sertune] study {record.name!r}: {len(todo)} fold search(es) to run, "
        + (
            f"{parallel} at a time, each in a driver of its own on this cluster ({address})"
            if parallel > 1
            else "one after the other on shared warm slots"
        )
    )
    record = record.but(parallel=parallel)
    run = _run_parallel if parallel > 1 else _run_serial
    record, interrupted = run(record, store, log, verbose, parallel, address, t0)
    wall = record.wall_s + time.monotonic() - t0
    if interrupted:
        save_study(record.but(status="interrupted", ended=now(), wall_s=wall))
        raise Interrupted(
            f"study {record.name!r} interrupted; finished fold searches are kept. Resume it "
            f"with: sertune study resume {record.name}"
        )
    record = record.but(wall_s=wall)
    failed = [key for key, f in record.folds.items() if f.get("status") != "finished"]
    record = record.but(status="failed" if failed else "finished", ended=now())
    save_study(record)
    write_report(record, store, log)
    return record


def _finished(sname: str) -> bool:
    try:
        srec = load_record(sname)
    except NotFound:
        return False
    return srec.phase == Phase.DONE and srec.status in ("finished", "failed")


def _wait_elsewhere(sname: str, log: Log, poll_s: float = 5.0) -> None:
    """A fold search another live driver runs (a fold driver a killed study left running):
    wait for it to end, saying so once."""
    said = False
    while True:
        try:
            srec = load_record(sname)
        except NotFound:
            return
        if records.effective_status(srec) != "running":
            return
        if not said:
            log(
                f"[sertune] {sname}: running in another driver (pid {srec.driver.get('pid')}); "
                "waiting for it to end"
            )
            said = True
        time.sleep(poll_s)


def _run_serial(
    record: StudyRecord,
    store: tracking.Store,
    log: Log,
    verbose: bool,
    parallel: int,
    address: str,
    t0: float,
) -> tuple[StudyRecord, bool]:
    from .cluster import concurrent_slots
    from .diskspace import DiskWatch
    from .execution import Execution
    from .interrupts import Stopped, StopSignals

    first = record.spec_of(record.outer[0], record.arms[0])
    n_slots = concurrent_slots(first, log)
    stop = StopSignals(log)
    execution = None
    interrupted = False
    try:
        with (
            stop,
            DiskWatch(log, record.name),
            ray_compat.tune_logs_to(records.log_path(record.name), verbose),
        ):
            try:
                execution = Execution.start(first, record.name, n_slots, log)
                for k, arm, sname in record.searches():
                    _wait_elsewhere(sname, log)
                    record = _fold_search(record, k, arm, sname, execution, stop, store, log)
                    save_study(record.but(wall_s=record.wall_s + time.monotonic() - t0))
            except (KeyboardInterrupt, Stopped):
                interrupted = True
            finally:
                if execution is not None and not stop.forced:
                    execution.close()
    except KeyboardInterrupt:
        interrupted = True
    return record, interrupted or bool(stop.fired)


def _run_parallel(
    record: StudyRecord,
    store: tracking.Store,
    log: Log,
    verbose: bool,
    parallel: int,
    address: str,
    t0: float,
) -> tuple[StudyRecord, bool]:
    import signal
    import subprocess
    import sys
    import threading

    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    fired: list[str] = []

    def on_signal(sig, _frame) -> None:
        if not fired:
            log(f"[sertune] {signal.Signals(sig).name}: stopping the fold searches (resumable)")
        fired.append(signal.Signals(sig).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    pending = list(record.searches())
    running: dict[Any, tuple[int, str, str]] = {}

    def start(k: int, arm: str, sname: str):
        args = ["study", "fold", record.name, str(k), arm] + (["--verbose"] if verbose else [])
        proc = subprocess.Popen(
            [sys.executable, "-m", "sertune.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a terminal's Ctrl-C reaches this driver, which forwards it
        )

        def relay() -> None:
            for line in iter(proc.stdout.readline, ""):
                log(f"[{sname}] {line.rstrip()}")

        threading.Thread(target=relay, daemon=True).start()
        running[proc] = (k, arm, sname)

    try:
        while pending or running:
            while pending and len(running) < parallel and not fired:
                k, arm, sname = pending.pop(0)
                if _finished(sname) and f"{k}/{arm}" in record.folds:
                    log(f"[sertune] outer fold {k}, {arm}: done before ({sname}), kept")
                    continue
                _wait_elsewhere(sname, log)
                if _finished(sname):
                    record = _collected(record, k, arm, sname, store, log)
                    save_study(record)
                    continue
                log(f"[sertune] outer fold {k}, {arm}: search {sname!r} (a driver of its own)")
                start(k, arm, sname)
            if fired:
                for proc in running:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGINT)
                for proc in list(running):
                    try:
                        proc.wait(timeout=300)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                running.clear()
                break
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                k, arm, sname = running.pop(proc)
                if proc.returncode != 0:
                    log(
                        f"[sertune] outer fold {k}, {arm}: its driver ended with {proc.returncode}"
                    )
                if _finished(sname):
                    record = _collected(record, k, arm, sname, store, log)
                else:
                    entry = {"search": sname, "status": "failed"}
                    record = record.but(folds={**record.folds, f"{k}/{arm}": entry})
                save_study(record.but(wall_s=record.wall_s + time.monotonic() - t0))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return record, bool(fired)


def run_fold(name: str, k: int, arm: str, log: Log = print, verbose: bool = False) -> int:
    """One fold search of a study in this process (``sertune study fold``, what a parallel
    study's driver starts): run it, resume it, or leave it when it has ended. Exit code."""
    from .search import resume_search, run_search

    record = load_study(name)
    if k not in record.outer or arm not in record.arms:
        raise UsageError(f"study {name!r} has no outer fold {k} x arm {arm!r}")
    sname = record.search_name(k, arm)
    try:
        srec = load_record(sname)
    except NotFound:
        srec = None
    if srec is None:
        run_search(record.spec_of(k, arm), name=sname, tracking_uri=record.tracking_uri, log=log)
    elif not _finished(sname):
        try:
            resume_search(sname, log=log, verbose=verbose)
        except NotFound:  # killed before its first saved state: start it again
            run_search(
                record.spec_of(k, arm),
                name=sname,
                tracking_uri=record.tracking_uri,
                log=log,
                verbose=verbose,
                replace=True,
            )
    return 0 if _finished(sname) else 1


def _fold_search(
    record: StudyRecord,
    k: int,
    arm: str,
    sname: str,
    execution: Any,
    stop: Any,
    store: tracking.Store,
    log: Log,
) -> StudyRecord:
    """One fold search run (or resumed, or kept), its champion's figures into the record."""
    from ray import tune

    from .driver import Search, _FailedFast
    from .search import _new_record
    from .storage import fs_and_path

    key = f"{k}/{arm}"
    spec = record.spec_of(k, arm)
    try:
        srec = load_record(sname)
    except NotFound:
        srec = None
    if srec is not None and srec.phase == Phase.DONE and srec.status in ("finished", "failed"):
        if key not in record.folds:
            log(f"[sertune] outer fold {k}, {arm}: search {sname!r} has {srec.status}: kept")
            record = _collected(record, k, arm, sname, store, log)
        else:
            log(f"[sertune] outer fold {k}, {arm}: done before ({sname}), kept")
        return record
    log(f"[sertune] outer fold {k}, {arm}: search {sname!r}")
    restore = False
    if srec is None:
        srec = _new_record(spec, sname, record.tracking_uri, log)
    else:
        if srec.phase != Phase.SEARCH:
            restore = True
        else:
            fs, path = fs_and_path(srec.path)
            restore = tune.Tuner.can_restore(path, storage_filesystem=fs)
        log(
            f"[sertune] outer fold {k}, {arm}: "
            + ("resuming it from its saved state" if restore else "starting it again (no state)")
        )
        if srec.phase == Phase.DONE:  # a driver killed after its last phase
            srec = srec.but(phase=Phase.CLOSING)
    search = Search(sname, spec, srec, log)
    search.save(status="running", driver=driver_stamp())
    search.start_runs(restore)
    with records.search_lock(sname):
        try:
            search.run_phases(execution, stop, restore)
        except _FailedFast as e:
            log(f"[sertune] outer fold {k}, {arm}: the search stopped: {e.cause}")
        finally:
            search.runs.close()
    if stop.fired:
        from .interrupts import Stopped

        raise Stopped(stop.fired)
    return _collected(record, k, arm, sname, store, log)


def _collected(
    record: StudyRecord, k: int, arm: str, sname: str, store: tracking.Store, log: Log
) -> StudyRecord:
    """The fold search's champion figures (what ``sertune compare`` reads: the confirmed
    configuration's mean over seeds, else the best trial), its winner, its time."""
    from .comparison import search_figures
    from .leaderboard import from_saved_state

    srec = load_record(sname)
    entry: dict[str, Any] = {"search": sname, "status": srec.status}
    try:
        fig = search_figures(store, sname)
    except (NotFound, UsageError) as e:
        log(f"[sertune] outer fold {k}, {arm}: no champion ({e})")
        entry["status"] = "failed"
        return record.but(folds={**record.folds, f"{k}/{arm}": entry})
    stats = fig.get("stats") or {}
    metric = fig["objective"]["metric"]
    entry["metrics"] = {
        m: s["mean"]
        for m, s in stats.items()
        if m.startswith(FIGURES) and isinstance(s.get("mean"), (int, float))
    }
    entry["objective"] = {"metric": metric, "value": (stats.get(metric) or {}).get("mean")}
    entry["source"] = fig.get("source")
    trial = fig.get("configuration_of")
    entry["trial"] = trial
    try:
        rows = from_saved_state(sname, srec.spec).rows
        row = next((r for r in rows if r["trial"] == trial), None)
    except Exception:  # noqa: BLE001 - the winner's config is a nicety of the report
        row = None
    space = set(srec.spec.space)
    if row is not None:
        entry["winner"] = {p: v for p, v in (row.get("config") or {}).items() if p in space}
        kept = row.get("kept_epoch")
        if isinstance(kept, (int, float)) and math.isfinite(kept):
            entry["epochs"] = int(kept) + 1
    parents = store.runs_of(sname, "search")
    if parents:
        p = parents[0]
        entry["seconds"] = max(0.0, (p.end_ms - p.start_ms) / 1000.0)
        if record.run_id:
            store.set_run_tags(p.run_id, {"mlflow.parentRunId": record.run_id})
    if arm == record.arms[0] and srec.reference:
        entry["reference"] = dict(srec.reference.get("metrics") or {})
        entry["reference_model"] = srec.reference.get("description", "")
    if entry["status"] == "finished":
        obj = entry["objective"]["value"]
        shown = f"{metric} {obj:.3f}" if isinstance(obj, (int, float)) else metric
        test = entry["metrics"].get("test_uar")
        log(
            f"[sertune] outer fold {k}, {arm}: champion {trial} ({shown} on validation"
            + (f"; test UAR {test:.3f} on the outer fold)" if test is not None else ")")
        )
    return record.but(folds={**record.folds, f"{k}/{arm}": entry})


def _study_run(store: tracking.Store, record: StudyRecord) -> str:
    """The study's parent run in MLflow (found again on resume)."""
    tags = {
        tracking.TAG_KIND: KIND,
        tracking.TAG_SEARCH: record.name,
        "mlflow.runName": record.name,
        "sertune.study.arms": json.dumps(record.arms),
        "sertune.study.outer": json.dumps({"n": record.n_outer, "folds": record.outer}),
        "sertune.study.vs": record.vs,
        "sertune.trainable": record.spec.trainable,
        tracking.TAG_STATUS: "running",
    }
    return store.open_run(record.run_id, record.name, KIND, tags)


# -- the table -----------------------------------------------------------------------------------


def per_fold(record: StudyRecord) -> tuple[list[str], dict[str, dict[int, dict[str, float]]]]:
    """The arms (reference first, then --vs, then the spec) and each one's figures per fold."""
    spec_arm, vs_arm = record.arms
    out: dict[str, dict[int, dict[str, float]]] = {REFERENCE: {}, vs_arm: {}, spec_arm: {}}
    for k in record.outer:
        for arm in record.arms:
            f = record.folds.get(f"{k}/{arm}") or {}
            if f.get("status") == "finished" and f.get("metrics"):
                out[arm][k] = dict(f["metrics"])
            if arm == spec_arm and f.get("reference"):
                out[REFERENCE][k] = {
                    m: v for m, v in f["reference"].items() if m.startswith(FIGURES)
                }
    arms = [a for a in (REFERENCE, vs_arm, spec_arm) if out[a]]
    return arms, {a: out[a] for a in arms}


def build(record: StudyRecord):
    from .study_table import build_table

    arms, figures = per_fold(record)
    winners = {
        arm: {
            k: record.folds[f"{k}/{arm}"].get("winner") or {}
            for k in record.outer
            if f"{k}/{arm}" in record.folds and record.folds[f"{k}/{arm}"].get("winner")
        }
        for arm in record.arms
    }
    return build_table(
        record.name,
        arms,
        record.arms[0],
        record.arms[1],
        figures,
        winners,
        reference_arm=REFERENCE if REFERENCE in arms else None,
        n_classes=4,
    )


def timing_lines(record: StudyRecord) -> list[str]:
    secs = [f.get("seconds") for f in record.folds.values() if f.get("seconds")]
    if not secs:
        return []
    total = sum(secs)
    return [
        f"study wall time {record.wall_s:.0f} s; its {len(secs)} fold searches took {total:.0f} s "
        f"in all (sum), the longest {max(secs):.0f} s: wall / sum = {record.wall_s / total:.2f} "
        + (
            f"({record.parallel} fold searches at a time, each in a driver of its own)"
            if record.parallel > 1
            else "(fold searches one after the other on shared warm slots)"
        )
    ]


def write_report(
    record: StudyRecord,
    store: tracking.Store | None = None,
    log: Log = print,
    final: bool = True,
):
    """report.md, report.html and study.json into the study's folder and onto its MLflow run;
    print the Markdown table. ``final``: the study has ended (its run ends with it)."""
    from .study_table import to_dict, to_markdown, write_html

    table = build(record)
    out = output_dir(record.name)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(table)
    extra = timing_lines(record)
    ref = next(
        (f.get("reference_model") for f in record.folds.values() if f.get("reference_model")), ""
    )
    notes = ([f"Reference: {ref}."] if ref else []) + extra
    md_full = md + ("\n\n" + "\n\n".join(notes) if notes else "") + "\n"
    (out / "report.md").write_text(md_full)
    html = write_html(table, out / "report.html")
    (out / "study.json").write_text(
        json.dumps(
            {"record": json.loads(record.model_dump_json()), "table": to_dict(table)}, indent=2
        )
    )
    log("")
    log(md_full)
    log(f"[sertune] study report: {out / 'report.md'}, {html}")
    store = store or tracking.Store(record.tracking_uri)
    if record.run_id:
        metrics = _table_metrics(table)
        store.log_run_metrics(record.run_id, metrics)
        store.log_run_artifacts(
            record.run_id, [out / "report.md", out / "report.html", out / "study.json"], "study"
        )
        store.set_run_tags(
            record.run_id,
            {
                "mlflow.note.content": md_full[:60000],
                tracking.TAG_STATUS: record.status,
            },
        )
        if final:
            store.end_run(record.run_id, "FINISHED" if record.status == "finished" else "FAILED")
    return out


def _table_metrics(table: Any) -> dict[str, float]:
    """Each arm's mean and each paired difference per condition, as the study run's metrics:
    ``<arm>/<metric>`` and ``<spec>-<vs>/<metric>`` (with ``_low``/``_high``, its interval)."""
    out: dict[str, float] = {}
    for row in table.rows:
        for arm, cell in row.cells.items():
            if cell is not None:
                out[f"{arm}/{row.metric}"] = float(cell.mean)
        for c in (row.vs, row.reference):
            if c is None:
                continue
            out[f"{c.a}-{c.b}/{row.metric}"] = float(c.diff)
            if c.low is not None and c.high is not None:
                out[f"{c.a}-{c.b}/{row.metric}_low"] = float(c.low)
                out[f"{c.a}-{c.b}/{row.metric}_high"] = float(c.high)
    return out


# -- removing ------------------------------------------------------------------------------------


def remove_study(name: str, mlflow_runs: bool = False) -> list[str]:
    """Remove a study's fold searches (their folders, records and, with ``mlflow_runs``, runs),
    its slots' folder, its report folder, its record and its MLflow run."""
    import shutil

    from .remove import remove_search
    from .storage import exists, remove_dir

    record = load_study(name)
    if study_status(record) == "running":
        raise UsageError(
            f"study {name!r} is running (pid {record.driver.get('pid')}); stop it first"
        )
    done: list[str] = []
    for _, _, sname in record.searches():
        try:
            load_record(sname)
        except NotFound:
            continue
        done += remove_search(sname, mlflow_runs=mlflow_runs)
    slots = records.experiment_path(name)
    if exists(slots):
        remove_dir(slots)
        done.append(f"removed {slots}")
    out = output_dir(name)
    if out.exists():
        shutil.rmtree(out)
        done.append(f"removed {out}")
    if mlflow_runs and record.run_id:
        store = tracking.Store(record.tracking_uri)
        n = store.delete_runs(store.runs_of(name))
        done.append(f"deleted {n} MLflow run(s) of study {name!r}")
    for path in (record_path(name), records.log_path(name)):
        path.unlink(missing_ok=True)
    done.append(f"removed the record of study {name!r}")
    return done


# -- promotion -----------------------------------------------------------------------------------


def supported_fold(
    record: StudyRecord, margin: Callable[[int, dict[str, Any]], float] | None = None
) -> tuple[int, dict[str, Any], str]:
    """Which of the spec arm's fold champions a study promotes, and why (one line).

    The configuration the study supports is the **most frequent fold winner**: the searched
    parameters' values that won the most outer folds (each fold's winner was chosen on its own
    validation speakers; no outer fold's test figure enters). A continuous search space rarely
    repeats a winner: then every fold winner ties at one fold, and so do the folds of a repeated
    winner. Ties go to the winner that won its own fold most clearly: its inner objective's
    margin over the median of that fold search's trials, in units of their sd (``margin``, by
    default read from each fold search's saved state). Inner objectives are never compared raw
    across folds: that would favour the fold with the easiest validation speakers. The model
    registered is that fold search's champion, trained without the outer fold's speakers."""
    spec_arm = record.arms[0]
    finished = {
        k: f
        for k in record.outer
        if (f := record.folds.get(f"{k}/{spec_arm}") or {}).get("status") == "finished"
        and f.get("search")
    }
    if not finished:
        raise NotFound(f"study {record.name!r}: no finished fold search of {spec_arm!r} yet")

    def config(f: dict[str, Any]) -> str:
        return json.dumps(f.get("winner") or {}, sort_keys=True, default=str)

    wins: dict[str, list[int]] = {}
    for k, f in finished.items():
        wins.setdefault(config(f), []).append(k)
    most = max(len(v) for v in wins.values())
    tied = [k for ks in wins.values() if len(ks) == most for k in ks]
    margin = margin or (lambda k, f: _fold_margin(record, f))
    margins = {k: margin(k, finished[k]) for k in tied}
    best = max(tied, key=lambda k: (margins[k], -k))
    n = len(finished)
    if most > 1:
        why = f"the configuration that won {most} of {n} outer folds ({wins[config(finished[best])]})"
    else:
        why = f"no configuration won more than one of {n} outer folds"
    if len(tied) > 1:
        why += (
            f"; of the {len(tied)} tied fold champions, fold {best}'s won its own fold most "
            f"clearly ({margins[best]:+.2f} sd over its fold's median trial)"
        )
    return best, finished[best], why


def _fold_margin(record: StudyRecord, entry: dict[str, Any]) -> float:
    """A fold champion's inner objective over the median of its fold search's trials, in units
    of their sd (positive: better; 0 when the search has fewer than two figures)."""
    import statistics

    from .leaderboard import from_saved_state

    metric = (entry.get("objective") or {}).get("metric")
    value = (entry.get("objective") or {}).get("value")
    try:
        srec = load_record(entry["search"])
        rows = from_saved_state(entry["search"], srec.spec).rows
    except Exception:  # noqa: BLE001 - a fold search whose state is gone: no margin
        return 0.0
    values = [
        float(r[metric])
        for r in rows
        if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])
    ]
    if len(values) < 2 or not isinstance(value, (int, float)):
        return 0.0
    sd = statistics.stdev(values)
    sign = 1.0 if record.spec.metrics[0].mode == "max" else -1.0
    return sign * (value - statistics.median(values)) / sd if sd > 0 else 0.0
