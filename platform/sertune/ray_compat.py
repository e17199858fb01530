"""Every place sertune works around Ray 2.60 behaviour, in one module.

Each workaround names its cause, the symptom it prevents and the Ray version it was written
against. Those that reach into Ray internals warn (never skip silently) when the internal has
moved, and ``tests/test_architecture.py`` fails on a Ray upgrade that moves any of them
(:func:`missing_internals`). docs/architecture.md lists them with their reasons.

| workaround                              | why                                                              |
|-----------------------------------------|------------------------------------------------------------------|
| :data:`FAST_ENV`                        | Train V2's controller polls workers every 2 s: +4 s per trial   |
| :func:`wait_until_reports_are_handed_over` | per-trial mode: a trial thread returning early deadlocks Tune |
| :func:`seed_optuna_study`               | ``OptunaSearch(evaluated_rewards=)`` refuses define-by-run spaces |
| :func:`set_restored_callbacks`          | ``Tuner.restore`` keeps the pickled callbacks, not ours          |
| :func:`strict_metric_checking`          | end-of-trial objectives are absent from epoch results           |
| :func:`keep_credentials_out_of_runtime_envs` | Tune copies ``AWS_*`` secrets into trial actors' runtime env (logged) |
| :func:`tune_logs_to`                    | Tune prints every failed trial's traceback on the console (ERROR)|
| :func:`quiet`                           | banners, hints and per-trial chatter on the console (Tune's new |
|                                         | output engine ignores verbose=0; the raylet's worker-pool notice)|
|                                         | and a task error nobody collected (a trial cut short by a stop) |
|                                         | printed with its whole remote traceback: one line instead       |
| :func:`atomic_experiment_state`         | Tune writes ``experiment_state-*.json`` in place: a full disk or |
|                                         | a kill mid-write leaves half a file and a resume loses trials   |
| :func:`atomic_local_uploads`            | Tune syncs that folder to local storage in place (half a copy)  |
| :func:`tolerant_trial_errors`           | an empty ``error.pkl`` (full disk) makes ``tuner.fit()`` raise  |
| dashboard on (``sertune.cluster``)      | Train's placement-group cleaner needs the state API             |
| explicit ``RAY_ADDRESS`` (``sertune.cluster``) | that cleaner auto-detects "the" cluster and dies beside a second one |
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

RAY_VERSION = "2.60"

# Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s):
# a per-trial TorchTrainer waits ~2 polls to start and ~2 to end, and each worker's one-slot
# result queue caps reports at one per poll. 0.1 s costs nothing measurable.
FAST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}

_log = logging.getLogger("sertune")


def _moved(what: str) -> None:
    warnings.warn(
        f"sertune: Ray internal {what} is not where Ray {RAY_VERSION} had it; the workaround that "
        "uses it is off (see sertune/ray_compat.py)",
        RuntimeWarning,
        stacklevel=3,
    )


def ray_private_worker() -> Any:
    """``ray._private.worker`` (the driver's node handle lives there), or None if it moved."""
    found = _internal("ray._private", "worker")
    return found[1] if found else None


def _internal(module: str, attr: str) -> tuple[Any, Any] | None:
    """``(module, module.attr)`` of a Ray internal, or None after a warning that it moved."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        _moved(module)
        return None
    if not hasattr(mod, attr):
        _moved(f"{module}.{attr}")
        return None
    return mod, getattr(mod, attr)


def wait_until_reports_are_handed_over(timeout_s: float = 60.0) -> None:
    """Return only after Tune took the last Train report (per-trial mode; Ray 2.60 deadlock).

    TuneReportCallback passes each Train report through a one-slot actor queue that the trial's
    main thread drains into a one-slot thread queue. If the trial's training thread returns while
    the main thread holds the last report, Tune's end-of-trial marker takes the thread queue's
    slot first and the main thread blocks on it forever: the search hangs with the trial RUNNING
    (seen in CI against a slow MLflow server). Waiting until both queues are empty, twice,
    closes that window.
    """
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        actor_queue = getattr(session, "_inter_actor_queue", None)
        thread_queue = session.result_queue
    except (ImportError, AttributeError):
        _moved("ray.train._internal.session.get_session().result_queue")
        return
    deadline = time.monotonic() + timeout_s
    quiet_polls = 0
    while time.monotonic() < deadline and quiet_polls < 2:
        empty = thread_queue.empty() and (actor_queue is None or actor_queue.empty())
        quiet_polls = quiet_polls + 1 if empty else 0
        time.sleep(0.2)


def seed_optuna_study(searcher: Any, trials: list[Any]) -> int:
    """Add completed Optuna trials (a warm start) to the study Ray Tune's ``OptunaSearch`` made.
    Its own ``evaluated_rewards`` refuses a define-by-run space, which every sertune search
    uses; the study is created in the constructor when metric and mode are given (Ray 2.60)."""
    study = getattr(searcher, "_ot_study", None)
    if study is None:
        _moved("OptunaSearch._ot_study")
        return 0
    study.add_trials(trials)
    return len(trials)


def optuna_trial(searcher: Any, trial_id: str) -> Any:
    """The Optuna trial Ray Tune's ``OptunaSearch`` asked for a Tune trial (None if unknown)."""
    trials = getattr(searcher, "_ot_trials", None)
    if trials is None:
        _moved("OptunaSearch._ot_trials")
        return None
    return trials.get(trial_id)


def set_restored_callbacks(tuner: Any, callbacks: list[Any]) -> None:
    """``Tuner.restore`` runs with the callbacks pickled at the first start; ours carry live
    state (the MLflow journal, the console), so put them back in."""
    try:
        tuner._local_tuner._run_config.callbacks = callbacks
    except AttributeError:
        _moved("Tuner._local_tuner._run_config")


@contextlib.contextmanager
def strict_metric_checking(enabled: bool) -> Iterator[None]:
    """Tune checks that every result carries the searcher's metrics. A multi-objective search on
    end-of-trial metrics (``val_robust/*``) has them in the last result only, so the check is off for
    that search, and back to what it was afterwards."""
    key = "TUNE_DISABLE_STRICT_METRIC_CHECKING"
    old = os.environ.get(key)
    if not enabled:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


CREDENTIAL_PREFIXES = ("AWS_ACCESS_KEY", "AWS_SECRET", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def keep_credentials_out_of_runtime_envs() -> None:
    """Tune (``ray.tune.execution.class_cache``) copies the driver's ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY`` and session tokens into every trial actor's ``runtime_env``, which
    Ray's runtime-env agent writes to its log in plain text. Every node has its own credential
    chain (instance role, its own environment, ``~/.aws``), so drop them from the list."""
    found = _internal("ray.tune.execution.class_cache", "ENV_VARS_TO_PROPAGATE")
    if found is None:
        return
    class_cache, names = found
    class_cache.ENV_VARS_TO_PROPAGATE = {n for n in names if not n.startswith(CREDENTIAL_PREFIXES)}


def propagate_to_trials(names: tuple[str, ...]) -> None:
    """Add variables to those Tune copies from the driver into trial actors (``RAY_ADDRESS``)."""
    found = _internal("ray.tune.execution.class_cache", "ENV_VARS_TO_PROPAGATE")
    if found is None:
        return
    class_cache, current = found
    class_cache.ENV_VARS_TO_PROPAGATE = set(current) | set(names)


class _DropRestoreHint(logging.Filter):
    """Tune prints ``Tuner.restore(...)`` after an interrupt; sertune prints its own resume
    command (``sertune search resume NAME``) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Tuner.restore(" not in msg and "Trials did not complete" not in msg


class _OneLineUnhandled(logging.Filter):
    """Ray logs a task error no one collected (``Unhandled error ...``) with the whole remote
    traceback - a trial actor's failed step that Tune dropped while the search stopped, a full
    disk's failed checkpoint upload. The console gets its innermost error line only."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Unhandled error"):
            lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
            frames = ("File ", "^", "~", "Traceback", "The above exception", "During handling")
            last = next((ln for ln in reversed(lines) if not ln.startswith(frames)), lines[-1])
            record.msg = f"[sertune] a Ray task's error that nothing collected: {last[:300]}"
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


QUIET_LOGGERS = (
    "ray",
    "ray.tune",
    "ray.train",
    "ray._private.authentication",
    "ray._private.worker",
    "mlflow",
    "alembic",
)


def quiet(verbose: bool = False) -> None:
    """Keep the console to sertune's own lines unless ``--verbose``: no Ray banner, token-auth
    notice, TensorBoard hint, MLflow's per-model ``Validating input example`` chatter."""
    for name in ("ray.tune.tune", "ray.tune.impl.tuner_internal"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRestoreHint) for f in logger.filters):
            logger.addFilter(_DropRestoreHint())
    worker = logging.getLogger("ray._private.worker")
    if not any(isinstance(f, _OneLineUnhandled) for f in worker.filters):
        worker.addFilter(_OneLineUnhandled())
    if verbose:
        return
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Tune's new output engine prints its experiment table and a TensorBoard hint whatever the
    # verbosity (Ray 2.60); the legacy one honours verbose=0.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # store creation, input validation
    warnings.filterwarnings("ignore", module="ray")
    _drop_worker_pool_notices()


class _QuietFileHandler(logging.FileHandler):
    """The search log's handler: a message it cannot write (a full disk) is dropped, and one
    line on stderr says so, instead of logging's traceback for every message."""

    failed = False

    def _dropped(self, why: BaseException | None) -> None:
        if not self.failed:
            self.failed = True
            import sys

            print(
                f"[sertune] cannot write Tune's messages to {self.baseFilename} ({why}); "
                "they are dropped until the search ends",
                file=sys.stderr,
                flush=True,
            )

    def flush(self) -> None:
        try:
            super().flush()
        except OSError as e:
            self._dropped(e)

    def close(self) -> None:
        try:
            super().close()
        except OSError as e:  # the search's end must not fail on its log
            self._dropped(e)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        import sys

        self._dropped(sys.exc_info()[1])


@contextlib.contextmanager
def tune_logs_to(path: Any, verbose: bool = False) -> Iterator[None]:
    """Ray Tune logs each failed trial's whole traceback at ERROR (``Trial task failed for
    trial ...``), ~25 lines a trial, on the console. Within this block Tune's messages go to
    ``path`` instead (the console keeps sertune's one line per failed trial); ``--verbose`` keeps
    them on the console as well."""
    logger = logging.getLogger("ray.tune")
    handler = _QuietFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    old_propagate, old_level = logger.propagate, logger.level
    logger.addHandler(handler)
    if not verbose:
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.propagate, logger.level = old_propagate, old_level


_WORKER_POOL_NOTICE = "PYTHON worker processes have been started on node"


def _drop_worker_pool_notices() -> None:
    """The raylet tells the driver each time more than 4 x min(CPUs, startup concurrency) worker
    processes start at once; warm slots start ~5 processes each by design, so a search would
    print it again and again. The driver prints these through one function; filter that one."""
    found = _internal("ray._private.worker", "print_to_stdstream")
    if found is None:
        return
    worker, original = found
    if getattr(original, "_sertune_filtered", False):
        return

    def print_to_stdstream(data, ignore_prefix: bool):
        lines = [ln for ln in data.get("lines", []) if _WORKER_POOL_NOTICE not in str(ln)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    print_to_stdstream._sertune_filtered = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = print_to_stdstream


def atomic_experiment_state() -> None:
    """Tune 2.60's ``TuneController.save_to_dir`` opens ``experiment_state-*.json`` for writing
    and dumps into it: a full disk (or a kill) mid-write leaves half a file, and a resume then
    restores fewer trials than had finished. Write the same content to a temporary file and
    rename it over the old one (atomic on POSIX): the old state survives a failed save. Once."""
    try:
        from ray.tune.execution.tune_controller import TuneController
    except ImportError:
        return _moved("ray.tune.execution.tune_controller.TuneController")
    if getattr(TuneController.save_to_dir, "_sertune_atomic", False):
        return
    if "experiment_state_file_name" not in TuneController.save_to_dir.__code__.co_names:
        return _moved("TuneController.save_to_dir")

    def save_to_dir(self) -> None:
        import json
        from pathlib import Path

        from ray.tune.utils.serialization import TuneFunctionEncoder

        runner_state = {
            "trial_data": list(self._get_trial_checkpoints().values()),
            "runner_data": self.__getstate__(),
            "stats": {"start_time": self._start_time},
        }
        staging = self._storage.experiment_driver_staging_path
        os.makedirs(staging, exist_ok=True)
        final = Path(staging, self.experiment_state_file_name)
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "w") as f:
            json.dump(runner_state, f, cls=TuneFunctionEncoder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._search_alg.save_to_dir(staging, session_str=self._session_str)
        self._callbacks.save_to_dir(staging, session_str=self._session_str)

    save_to_dir._sertune_atomic = True  # type: ignore[attr-defined]
    TuneController.save_to_dir = save_to_dir


def atomic_local_uploads() -> None:
    """Tune's driver syncs its experiment folder (``experiment_state-*.json``, the searcher's
    state, ``tuner.pkl``, each trial's results) from a staging folder with pyarrow's
    ``copy_files``, which writes in place: on a full local disk a copy is cut short and a resume
    restores from half a file (or starts over). To a local destination, each file is copied to a
    temporary name beside it and renamed over the old one, so a failed copy leaves the last whole
    file. S3 uploads are whole objects already and go through Ray as before. Once."""
    found = _internal("ray.train._internal.storage", "_upload_to_fs_path")
    if found is None or getattr(found[1], "_sertune_atomic", False):
        return
    storage, original = found

    def upload(local_path: str, fs: Any, fs_path: str, exclude: list[str] | None = None) -> None:
        import fnmatch
        import shutil
        from pathlib import Path

        import pyarrow.fs as pafs

        if not isinstance(fs, pafs.LocalFileSystem):
            return original(local_path, fs, fs_path, exclude)
        src = Path(local_path)
        if src.is_file():
            pairs = [(src, Path(fs_path))]
        else:
            pairs = []
            for f in sorted(src.rglob("*")):
                rel = f.relative_to(src).as_posix()
                if f.is_file() and not any(fnmatch.fnmatch(rel, x) for x in exclude or []):
                    pairs.append((f, Path(fs_path, rel)))
            Path(fs_path).mkdir(parents=True, exist_ok=True)
        for f, dest in pairs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.sertune-partial")
            try:
                shutil.copyfile(f, tmp)
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    upload._sertune_atomic = True  # type: ignore[attr-defined]
    storage._upload_to_fs_path = upload


def tolerant_trial_errors() -> None:
    """Tune reads each failed trial's ``error.pkl`` when it builds the results: written on a
    full disk it is empty, and ``cloudpickle.loads`` raises out of ``tuner.fit()`` - the search
    then ends with a traceback instead of its record. An unreadable one counts as absent (Tune
    falls back to ``error.txt``). Once."""
    try:
        from ray.tune.experiment.trial import Trial
    except ImportError:
        return _moved("ray.tune.experiment.trial.Trial")
    original = getattr(Trial, "get_pickled_error", None)
    if original is None:
        return _moved("Trial.get_pickled_error")
    if getattr(original, "_sertune_tolerant", False):
        return

    def get_pickled_error(self: Any) -> Any:
        try:
            return original(self)
        except Exception:  # noqa: BLE001 - an empty or cut file; the text error stays
            return None

    get_pickled_error._sertune_tolerant = True  # type: ignore[attr-defined]
    Trial.get_pickled_error = get_pickled_error


def _absent(module: str, dotted: str = "") -> str | None:
    """``module.dotted`` when that Ray internal is not there (the module, or an attribute on the
    way), else None."""
    import importlib

    try:
        obj = importlib.import_module(module)
    except ImportError:
        return module
    for part in filter(None, dotted.split(".")):
        if not hasattr(obj, part):
            return f"{module}.{dotted}"
        obj = getattr(obj, part)
    return None


def missing_internals() -> list[str]:
    """The Ray internals the workarounds above rely on that this Ray does not have."""
    missing = [
        gap
        for gap in (
            _absent("ray.train._internal.session", "get_session"),
            _absent("ray.tune.execution.class_cache", "ENV_VARS_TO_PROPAGATE"),
            _absent("ray._private.worker", "print_to_stdstream"),
            _absent("ray._private.worker", "_global_node"),  # cluster reaps its leftovers
            _absent("ray.train._internal.storage", "_upload_to_fs_path"),
            _absent("ray.tune.experiment.trial", "Trial.get_pickled_error"),
        )
        if gap
    ]
    # the workarounds that read a function's code need the names it uses (or have replaced it)
    for module, dotted, name in (
        ("ray.tune.impl.tuner_internal", "TunerInternal.__init__", "_run_config"),
        ("ray.tune.search.optuna", "OptunaSearch.__init__", "_ot_study"),
        (
            "ray.tune.execution.tune_controller",
            "TuneController.save_to_dir",
            "experiment_state_file_name",
        ),
    ):
        gap = _absent(module, dotted)
        fn = None if gap else _attr(module, dotted)
        if gap or (not getattr(fn, "_sertune_atomic", False) and name not in fn.__code__.co_names):
            missing.append(gap or f"{dotted.rsplit('.', 1)[0]}.{name}")
    try:
        from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR

        if HEALTH_CHECK_INTERVAL_S_ENV_VAR not in FAST_ENV:
            missing.append("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    except ImportError:
        missing.append("ray.train.v2._internal.constants")
    return missing


def _attr(module: str, dotted: str) -> Any:
    """``module.dotted``, imported (it is there: :func:`_absent` said so)."""
    import importlib

    obj: Any = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
