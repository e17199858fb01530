"""Search orchestration: one function builds the Tuner; run, resume, list and status use it.

Ray 2.60 pattern (Train V2): each Tune trial is a *function trainable* that launches a
``TorchTrainer``; the workers' metrics flow back to Tune through ``TuneReportCallback``. Optuna
(TPE, multi-objective when the spec lists several metrics) proposes configurations; ASHA stops
weak single-objective trials early; ``max_concurrent_trials`` bounds concurrency.

Per-trial fixed cost (DESIGN.md, measured): Tune actor reuse saves the trial process start and
imports, and ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1`` cuts the Train controller's polling
latency (4 s → 0.2 s per trial). Both are on by default here; ``SERTUNE_FAST_TRIALS=0`` turns
them off (``sertune bench search`` measures both).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import settings
from .spec import SearchSpec, load_define_by_run, validate_spec
from .trainable import get_trainable

RECORD = "search.json"
FAST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


# -- the searched space as an Optuna define-by-run function ----------------------------------------


class SpaceFunction:
    """Suggest every ``space`` entry, then call the user's define-by-run function if any.

    A picklable object (not a closure) so Tune can checkpoint the searcher and resume it.
    """

    def __init__(self, space: dict[str, dict[str, Any]], define_by_run: str | None, base: str):
        self.space, self.define_by_run, self.base = space, define_by_run, base

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        for name, p in self.space.items():
            if p["type"] == "choice":
                trial.suggest_categorical(name, p["values"])
            elif p["type"] == "int":
                step = int(p.get("step") or 1)
                trial.suggest_int(
                    name, int(p["low"]), int(p["high"]), step=step, log=bool(p.get("log"))
                )
            else:
                trial.suggest_float(
                    name,
                    float(p["low"]),
                    float(p["high"]),
                    step=p.get("step"),
                    log=bool(p.get("log")),
                )
        if self.define_by_run:
            fn = load_define_by_run(self.define_by_run, Path(self.base))
            return fn(trial)
        return None


# -- one trial ------------------------------------------------------------------------------------


def run_trial(config: dict[str, Any], fixed: dict[str, Any]) -> None:
    """A Tune function trainable: train one configuration with a Ray Train ``TorchTrainer``."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainable = get_trainable(fixed["trainable"])
    res = fixed["resources"]
    trial_id = ray.tune.get_context().get_trial_id()
    params = {**fixed["params"], **config}
    loop_config = {"params": params, "data": fixed["data"], "run": fixed["run"]}
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = res["gpus_per_worker"]
    from .storage import fs_and_path

    fs, train_path = fs_and_path(fixed["train_storage"])
    trainer = TorchTrainer(
        trainable.train_loop_per_worker(),
        train_loop_config=loop_config,
        # gloo when the spec pins the CPU (also with GPU resources reserved, e.g. fake GPUs in tests)
        torch_config=TorchConfig(backend="gloo") if fixed["run"]["device"] == "cpu" else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=trial_id,  # same name after a driver crash: Train V2 resumes its checkpoint
            storage_path=train_path,
            storage_filesystem=fs,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=fixed["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    _wait_until_reports_are_handed_over()


def _wait_until_reports_are_handed_over(timeout_s: float = 60.0) -> None:
    """Return only after Tune took the last Train report (works around a Ray 2.60 deadlock).

    TuneReportCallback passes each Train report through a one-slot actor queue that the trial's
    main thread drains into a one-slot thread queue. If this function (the trial's training
    thread) returns while the main thread holds the last report, Tune's end-of-trial marker takes
    the thread queue's slot first and the main thread blocks on it forever: the search hangs with
    the trial RUNNING (seen in CI, against a slow MLflow server). Waiting until both queues are
    empty, twice, closes that window.
    """
    try:
        from ray.train._internal.session import get_session

        session = get_session()
        actor_queue = getattr(session, "_inter_actor_queue", None)
        thread_queue = session.result_queue
    except Exception:  # internals moved: nothing to wait for
        return
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        empty = thread_queue.empty() and (actor_queue is None or actor_queue.empty())
        quiet = quiet + 1 if empty else 0
        time.sleep(0.2)


# -- records -------------------------------------------------------------------------------------


def _record_dir() -> Path:
    d = settings.local_state_dir() / "searches"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_record(name: str, record: dict[str, Any]) -> Path:
    path = _record_dir() / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


def load_record(name: str) -> dict[str, Any]:
    path = _record_dir() / f"{name}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in _record_dir().glob("*.json"))) or "none"
        raise KeyError(f"no search named {name!r} (known: {known}); see `sertune search list`")
    return json.loads(path.read_text())


def list_records() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(_record_dir().glob("*.json"))]


# -- building and running ------------------------------------------------------------------------


@dataclass
class SearchResult:
    name: str
    path: str
    rows: list[dict[str, Any]]  # one per trial, best first
    metrics: list[dict[str, str]]
    errors: int
    parent_run_id: str | None = None


def experiment_path(name: str) -> str:
    root = settings.storage_root()
    return f"{root.rstrip('/')}/{name}"


def init_ray(num_cpus: int | None = None, fast: bool = True) -> None:
    """Start local Ray, or join the cluster in ``RAY_ADDRESS`` (set by Ray Jobs)."""
    import ray

    if ray.is_initialized():
        return
    env = dict(FAST_ENV) if fast else {}
    # Where S3 lives is configuration every worker needs; credentials are not shipped (each node
    # uses its own AWS credential chain).
    for key in (
        "AWS_ENDPOINT_URL",
        "SERTUNE_S3_ENDPOINT",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
    ):
        if os.environ.get(key):
            env[key] = os.environ[key]
    for k, v in env.items():  # the local raylet's workers inherit the driver's environment
        os.environ.setdefault(k, v)
    # Worker stdout (Ray Train's own chatter) is off unless asked for; failures still surface
    # through each trial's error.
    worker_logs = os.environ.get("SERTUNE_WORKER_LOGS", "0") == "1"
    kwargs: dict[str, Any] = {"log_to_driver": worker_logs}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray Jobs for a job's driver
        # Inside a Ray Job (`sertune search submit`) the job's runtime env already carries these,
        # and Ray refuses to merge a second definition of the same variables.
        kwargs["runtime_env"] = {"env_vars": env}
    if not os.environ.get("RAY_ADDRESS"):
        cpus = num_cpus or int(os.environ.get("SERTUNE_RAY_NUM_CPUS", "0")) or None
        # The dashboard must run: Ray Train's placement-group cleaner asks its state API whether a
        # trial's controller died, and without it a stopped trial leaks its CPUs/GPUs for good.
        kwargs.update(num_cpus=cpus, include_dashboard=True)
    ray.init(**kwargs)


def fast_trials_enabled() -> bool:
    return os.environ.get("SERTUNE_FAST_TRIALS", "1") != "0"


def build_tuner(
    spec: SearchSpec,
    name: str,
    data: dict[str, Any],
    callbacks: list[Any] | None = None,
    restore: bool = False,
):
    """The one place that builds a Tuner (fresh or restored) from a validated spec."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    metrics = spec.objective.as_list()
    max_epochs = spec.budget.max_epochs
    fixed = {
        "trainable": spec.trainable,
        "params": {**spec.params, "optim.epochs": max_epochs, "seed": spec.seed},
        "data": {k: v for k, v in data.items() if k not in ("report",)},
        "run": {
            "device": spec.device,
            "threads": max(1, int(spec.resources.cpus_per_worker)),
            "max_steps_per_epoch": spec.budget.max_steps_per_epoch,
            "robustness": spec.robustness.model_dump() if spec.robustness else None,
        },
        "resources": spec.resources.model_dump(),
        "train_storage": f"{experiment_path(name)}/_train",
        "max_failures": spec.budget.trial_max_failures,
    }
    trainable = tune.with_parameters(run_trial, fixed=fixed)
    # The trial function only drives a TorchTrainer; the workers hold the CPUs and GPUs.
    # (a tiny memory request keeps the bundle non-empty without taking a CPU from the workers).
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 1 << 20})
    from .storage import fs_and_path

    if restore:
        fs, path = fs_and_path(experiment_path(name))
        return tune.Tuner.restore(
            path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            storage_filesystem=fs,
        )

    space = SpaceFunction(
        {k: v.model_dump() for k, v in spec.space.items()},
        spec.define_by_run,
        str(Path(spec.source).parent),
    )
    sampler = optuna.samplers.TPESampler(
        seed=spec.seed, n_startup_trials=min(10, max(2, spec.budget.trials // 3))
    )
    searcher = OptunaSearch(
        space=space,
        metric=[m.metric for m in metrics] if spec.objective.multi else metrics[0].metric,
        mode=[m.mode for m in metrics] if spec.objective.multi else metrics[0].mode,
        sampler=sampler,
    )
    if spec.objective.multi:
        scheduler = FIFOScheduler()  # ASHA ranks on one metric; a Pareto search runs trials out
    else:
        scheduler = ASHAScheduler(
            metric=metrics[0].metric,
            mode=metrics[0].mode,
            time_attr="training_iteration",
            max_t=max_epochs,
            grace_period=spec.budget.grace_epochs,
            reduction_factor=spec.budget.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=spec.budget.trials,
            max_concurrent_trials=spec.budget.concurrency,
            # Actor reuse saves a process start per trial, but in Ray 2.60 a trial that ASHA
            # stops early is still inside TorchTrainer.fit() when Tune resets its actor; the reset
            # times out and Tune fails the *next* trial. So reuse only where no scheduler stops
            # trials (FIFO: multi-objective searches); each stopped actor is killed, and the
            # Train controller and workers it owns die with it.
            reuse_actors=fast_trials_enabled() and spec.objective.multi,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=fs_and_path(settings.storage_root())[1],
            storage_filesystem=fs_and_path(settings.storage_root())[0],
            callbacks=callbacks or [],
            verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


def run_search(
    spec: SearchSpec,
    name: str | None = None,
    tracking_uri: str | None = None,
    num_cpus: int | None = None,
    log=print,
) -> SearchResult:
    """Prepare data, record the search, run it on Ray, return the leaderboard."""
    name = name or spec.name
    trainable = get_trainable(spec.trainable)
    log(
        f"[sertune] search {name!r}: {spec.budget.trials} trials of {spec.trainable} "
        f"on {spec.data.corpus} ({spec.source})"
    )
    data = trainable.prepare_data(spec.data.model_dump(), settings.cache_root(), progress=log)
    record = {
        "name": name,
        "spec": spec.model_dump(),
        "source": spec.source,
        "data": data,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "path": experiment_path(name),
        "tracking_uri": settings.tracking_uri(tracking_uri),
        "status": "running",
    }
    save_record(name, record)
    return _fit(name, spec, record, restore=False, num_cpus=num_cpus, log=log)


def resume_search(name: str, num_cpus: int | None = None, log=print) -> SearchResult:
    """Continue a stopped or crashed search; finished trials are kept, not re-run."""
    from ray import tune

    record = load_record(name)
    spec = validate_spec(
        {k: v for k, v in record["spec"].items() if k != "source"}, record["source"]
    )
    from .storage import fs_and_path

    fs, path = fs_and_path(record["path"])
    if not tune.Tuner.can_restore(path, storage_filesystem=fs):
        raise RuntimeError(f"{record['path']}: no saved search state to resume from")
    log(f"[sertune] resuming search {name!r} from {record['path']}")
    return _fit(name, spec, record, restore=True, num_cpus=num_cpus, log=log)


def _fit(
    name: str, spec: SearchSpec, record: dict, restore: bool, num_cpus: int | None, log
) -> SearchResult:
    from .progress import ProgressPrinter
    from .tracking import MLflowSearchLogger

    # Save the experiment state every 2 s (Tune's "auto" waits >= 10 s): a crashed driver then
    # loses at most 2 s of bookkeeping, and the state of a few dozen trials costs milliseconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    epoch_metrics = set(get_trainable(spec.trainable).epoch_metrics)
    if any(m.metric not in epoch_metrics for m in spec.objective.as_list()):
        # A multi-objective search on end-of-trial metrics (e.g. robust/uar_snr10_babble): they
        # appear in the final report only, which is the one Optuna reads (FIFO, no early stop).
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    init_ray(num_cpus, fast=fast_trials_enabled())
    tracker = MLflowSearchLogger(record, spec, log=log)
    callbacks = [ProgressPrinter(spec, log=log), tracker]
    tuner = build_tuner(spec, name, record["data"], callbacks=callbacks, restore=restore)
    if restore:  # Tuner.restore keeps the saved callbacks out; put ours back in
        tuner._local_tuner._run_config.callbacks = callbacks
    t0 = time.monotonic()
    grid = tuner.fit()
    result = summarise(name, spec, grid)
    tracker.finish(result, grid)
    record.update(
        status="finished",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
        wall_s=round(time.monotonic() - t0, 1),
        parent_run_id=tracker.parent_run_id,
    )
    save_record(name, record)
    result.parent_run_id = tracker.parent_run_id
    return result


def summarise(name: str, spec: SearchSpec, grid: Any) -> SearchResult:
    metrics = [m.model_dump() for m in spec.objective.as_list()]
    rows, errors = [], 0
    for r in grid:
        m = r.metrics or {}
        row = {
            "trial": m.get("trial_id") or _trial_id_from_path(r.path),
            "status": "error" if r.error else "done",
            "epochs": m.get("training_iteration", 0),
            "config": r.config,
            "checkpoint": m.get("checkpoint_path"),
            "error": _first_line(r.error) if r.error else None,
        }
        for k in ("val_uar", "val_war", "val_f1", "val_uar_noisy", "test_uar"):
            if k in m:
                row[k] = m[k]
        for mm in metrics:
            row[mm["metric"]] = m.get(mm["metric"])
        errors += bool(r.error)
        rows.append(row)
    key = metrics[0]
    sign = -1 if key["mode"] == "max" else 1

    def order(row: dict) -> tuple:
        v = row.get(key["metric"])
        return (v is None, sign * v if v is not None else 0)

    rows.sort(key=order)
    return SearchResult(
        name=name, path=experiment_path(name), rows=rows, metrics=metrics, errors=errors
    )


def _trial_id_from_path(path: str | None) -> str:
    m = re.search(r"run_trial_([0-9a-f]+)", path or "")
    return m.group(1) if m else "?"


def _first_line(err: BaseException) -> str:
    from .tracking import error_reason

    return error_reason(str(err)) if str(err).strip() else type(err).__name__


def format_table(result: SearchResult, top: int = 10) -> str:
    cols = [m["metric"] for m in result.metrics]
    cols += [c for c in ("val_uar", "val_uar_noisy", "test_uar") if c not in cols]
    header = ["#", "trial", "status", "epochs", *cols, "config"]
    lines = []
    for i, row in enumerate(result.rows[:top], start=1):
        cfg = ", ".join(f"{k}={_short(v)}" for k, v in sorted((row["config"] or {}).items()))
        vals = [f"{row[c]:.3f}" if isinstance(row.get(c), (int, float)) else "-" for c in cols]
        status = row["status"] if not row.get("error") else f"error: {row['error'][:40]}"
        lines.append([str(i), row["trial"], status, str(row["epochs"]), *vals, cfg])
    widths = [
        max(len(h), *(len(line[j]) for line in lines)) if lines else len(h)
        for j, h in enumerate(header)
    ]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=False))  # noqa: E731
    return "\n".join([fmt(header), *(fmt(line) for line in lines)])


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def search_status(name: str) -> dict[str, Any]:
    """How far a search got: trials per status and the best so far, read from saved state."""
    from ray.tune import ExperimentAnalysis

    record = load_record(name)
    spec = record["spec"]
    out = {
        "name": name,
        "path": record["path"],
        "status": record.get("status"),
        "created": record["created"],
        "budget": spec["budget"]["trials"],
        "trials": {},
    }
    from .storage import fs_and_path

    fs, path = fs_and_path(record["path"])
    try:
        ea = ExperimentAnalysis(path, storage_filesystem=fs)
    except Exception as e:  # nothing saved yet
        out["note"] = f"no trial state yet ({type(e).__name__})"
        return out
    counts: dict[str, int] = {}
    for t in ea.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    out["trials"] = counts
    first = spec["objective"]["metric"] or spec["objective"]["metrics"][0]["metric"]
    mode = (
        spec["objective"]["mode"]
        if spec["objective"]["metric"]
        else spec["objective"]["metrics"][0]["mode"]
    )
    best = None
    for t in ea.trials:
        v = (t.last_result or {}).get(first)
        if v is not None and (best is None or (v > best[1] if mode == "max" else v < best[1])):
            best = (t.trial_id, v, t.config)
    if best:
        out["best"] = {"trial": best[0], first: best[1], "config": best[2]}
    return out


def eprint(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)
