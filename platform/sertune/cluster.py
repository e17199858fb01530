"""The Ray cluster a search runs on: start or join it, address it explicitly, check it can run
one trial before anything starts.

* Local (default): Ray starts in this process with the CPUs asked for (``--num-cpus``) and its
  dashboard (Ray Train's placement-group cleaner needs the state API behind it).
* Joined: ``RAY_ADDRESS`` names a cluster (``ray start`` head, KubeRay, a Ray Job's own cluster).

Either way, once connected this process and every trial address *this* cluster through
``RAY_ADDRESS``: Ray helpers that auto-detect "the" local cluster die when a second Ray instance
runs on the host (another user's search, a notebook, the remains of a killed driver).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from . import ray_compat
from .errors import ResourceError

# Settings every worker needs to reach S3; credentials are never among them (each node uses its
# own AWS credential chain).
STORAGE_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "SERTUNE_S3_ENDPOINT",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)
SCALE_UP_TIMEOUT_ENV = "SERTUNE_SCALE_UP_TIMEOUT_S"
DEFAULT_SCALE_UP_TIMEOUT_S = 600.0

_started_here = False
_connected_here = False  # this module set RAY_ADDRESS and must put the old value back
_saved_address: str | None = None


def in_ray_job() -> bool:
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # set by Ray Jobs for a job's driver


def worker_env(fast: bool = True) -> dict[str, str]:
    """Environment for the cluster's workers: Train's polling knob and where S3 lives."""
    env = dict(ray_compat.FAST_ENV) if fast else {}
    for key in STORAGE_SETTINGS:
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def init_ray(num_cpus: int | None = None, fast: bool = True, verbose: bool = False) -> str:
    """Start local Ray, or join the cluster in ``RAY_ADDRESS``; return the cluster's address."""
    import ray

    global _started_here, _saved_address, _connected_here
    ray_compat.keep_credentials_out_of_runtime_envs()
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    env = worker_env(fast)
    for k, v in env.items():  # the local raylet's workers inherit the driver's environment
        os.environ.setdefault(k, v)
    worker_logs = verbose or os.environ.get("SERTUNE_WORKER_LOGS", "0") == "1"
    kwargs: dict[str, Any] = {
        "log_to_driver": worker_logs,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    if not in_ray_job():
        # Inside a Ray Job (`sertune search submit`) the job's runtime env already carries these,
        # and Ray refuses to merge a second definition of the same variables.
        kwargs["runtime_env"] = {"env_vars": env}
    _saved_address = os.environ.get("RAY_ADDRESS")
    if not _saved_address:
        # The raylet warns once more than 4 x this many workers start at once; warm slots start
        # ~5 processes each by design (proxy, slot task, controller, worker, cleaner).
        os.environ.setdefault(
            "RAY_worker_maximum_startup_concurrency", str(max(4, os.cpu_count() or 1))
        )
        cpus = num_cpus or int(os.environ.get("SERTUNE_RAY_NUM_CPUS", "0")) or None
        kwargs.update(num_cpus=cpus, include_dashboard=True)
        if os.environ.get(
            "SERTUNE_RAY_TEMP_DIR"
        ):  # a private session folder (tests, shared hosts)
            kwargs["_temp_dir"] = os.environ["SERTUNE_RAY_TEMP_DIR"]
        _started_here = True
    else:
        _started_here = False
    ray.init(**kwargs)
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    _connected_here = True
    ray_compat.propagate_to_trials(("RAY_ADDRESS",))
    return address


def shutdown_ray() -> None:
    """Disconnect (and stop a cluster started here); forget the explicit address."""
    import ray

    global _started_here, _connected_here, _saved_address
    if ray.is_initialized():
        ours = _ray_descendants() if _started_here else {}
        ray.shutdown()
        _reap(ours)
    if _connected_here:
        if _saved_address:
            os.environ["RAY_ADDRESS"] = _saved_address
        else:
            os.environ.pop("RAY_ADDRESS", None)
    _started_here = _connected_here = False
    _saved_address = None


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, None if it is gone or a zombie."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def _ray_descendants() -> dict[int, str]:
    """The local cluster this process started - its GCS, raylet, dashboard and every process
    below them (workers, actors): pid -> start time. Nothing else this process started."""
    node = getattr(
        getattr(ray_compat.ray_private_worker(), "_global_node", None), "all_processes", None
    )
    if not node or not os.path.isdir("/proc"):
        return {}
    roots = {
        info.process.pid
        for infos in node.values()
        for info in infos
        if getattr(info, "process", None) is not None
    }
    parent: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _proc_stat(int(name))):
            parent[int(name)] = st
    mine = {pid: parent[pid][1] for pid in roots if pid in parent}
    frontier = set(mine)
    while frontier:
        frontier = {pid for pid, (ppid, _) in parent.items() if ppid in frontier} - set(mine)
        mine.update({pid: parent[pid][1] for pid in frontier})
    return mine


def _reap(pids: dict[int, str], grace_s: float = 5.0) -> None:
    """After ``ray.shutdown()``: SIGKILL any of the cluster's processes still alive after
    ``grace_s`` (an actor stuck in a thread - seen with Train's controller - outlives its raylet
    and would linger, reparented, holding memory). Only processes this one started, same start
    time (pid reuse), are touched."""
    import signal

    def alive() -> list[int]:
        return [p for p, start in pids.items() if (st := _proc_stat(p)) and st[1] == start]

    deadline = time.monotonic() + grace_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in alive():
        try:
            os.kill(pid, signal.SIGKILL)
            logging.getLogger(__name__).info("stopped leftover Ray process %d after shutdown", pid)
        except OSError:
            pass


def started_here() -> bool:
    return _started_here


# -- can the cluster run one trial? --------------------------------------------------------------------


def trial_bundles(resources: dict[str, Any]) -> list[dict[str, float]]:
    """What one trial asks Ray for: one bundle per Train worker."""
    bundle = {"CPU": float(resources["cpus_per_worker"])}
    if resources.get("gpus_per_worker"):
        bundle["GPU"] = float(resources["gpus_per_worker"])
    return [dict(bundle) for _ in range(int(resources["workers"]))]


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def how_many_fit(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> int:
    """How many trials of ``bundles`` the nodes hold at once (first-fit, largest bundles first)."""
    free = [dict(n) for n in nodes]
    count = 0
    while True:
        for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0), -b["CPU"])):
            node = next(
                (f for f in free if all(f.get(k, 0.0) + 1e-9 >= v for k, v in b.items())), None
            )
            if node is None:
                return count
            for k, v in b.items():
                node[k] = node.get(k, 0.0) - v
        count += 1
        if count >= 10_000:
            return count


def _describe(nodes: list[dict[str, float]]) -> str:
    if not nodes:
        return "no alive nodes"
    big = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
    cpu = sum(n.get("CPU", 0) for n in nodes)
    gpu = sum(n.get("GPU", 0) for n in nodes)
    return (
        f"the largest node has {big.get('CPU', 0):g} CPU, {big.get('GPU', 0):g} GPU "
        f"({len(nodes)} node(s), {cpu:g} CPU and {gpu:g} GPU in all)"
    )


def check_resources(spec: Any, log: Callable[[str], None] = print) -> int:
    """Refuse a search whose trial can never be placed; return how many trials fit at once.

    A cluster started here cannot grow: refuse at once (exit 2, naming ``resources.*``). A joined
    cluster may be autoscaling: wait for a node that fits, saying what is awaited, up to
    ``$SERTUNE_SCALE_UP_TIMEOUT_S`` (default 600 s), then refuse.
    """
    r = spec.resources.model_dump()
    bundles = trial_bundles(r)
    need = f"one trial needs {r['workers']} worker(s) × {r['cpus_per_worker']:g} CPU" + (
        f" + {r['gpus_per_worker']:g} GPU" if r["gpus_per_worker"] else ""
    )
    field = "resources.gpus_per_worker" if r["gpus_per_worker"] else "resources.cpus_per_worker"
    nodes = _alive_nodes()
    fit = how_many_fit(bundles, nodes)
    if fit:
        return fit
    if started_here():
        raise ResourceError(f"{spec.source}: {field}: {need}; {_describe(nodes)} (local Ray)")
    timeout = float(os.environ.get(SCALE_UP_TIMEOUT_ENV, DEFAULT_SCALE_UP_TIMEOUT_S))
    t0 = last = time.monotonic()
    log(
        f"[sertune] waiting up to {timeout:.0f}s for the cluster to scale up: {need}; {_describe(nodes)}"
    )
    while time.monotonic() - t0 < timeout:
        time.sleep(2.0)
        nodes = _alive_nodes()
        fit = how_many_fit(bundles, nodes)
        if fit:
            log(f"[sertune] the cluster can place a trial now ({_describe(nodes)})")
            return fit
        if time.monotonic() - last > 30:
            last = time.monotonic()
            log(f"[sertune] still waiting ({time.monotonic() - t0:.0f}s): {_describe(nodes)}")
    raise ResourceError(
        f"{spec.source}: {field}: {need}; after {timeout:.0f}s {_describe(nodes)} "
        f"(set {SCALE_UP_TIMEOUT_ENV} to wait longer)"
    )


# -- can every node run one trial? ------------------------------------------------------------------

# Versions that must agree between the driver and every node (checkpoints, pickles, Ray's protocol).
SAME_EVERYWHERE = ("torch", "torchaudio", "ray", "mlflow", "optuna", "numpy")
NODE_CHECK_TIMEOUT_S = 180.0


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in SAME_EVERYWHERE:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _node_report() -> dict[str, Any]:
    from .doctor import node_report

    return {**node_report(), "versions": _versions()}


def concurrent_slots(spec: Any, log: Callable[[str], None] = print) -> int:
    """How many trials of ``spec`` run at once on the cluster Ray is connected to: its
    ``budget.concurrency``, or fewer when fewer fit (said once). Refuses a search that cannot
    run here at all (:func:`check_resources`, :func:`check_nodes`)."""
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
    return n_slots


def check_nodes(force: bool = False) -> str:
    """Run ``sertune doctor``'s checks on every alive node of the cluster, in parallel; refuse
    (exit 2) naming each node that fails or whose versions differ from the driver's. A cluster
    started here runs this very interpreter, which the driver checked already: skipped unless
    ``force``. Returns a one-line summary."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .errors import EnvironmentProblem

    if started_here() and not force:
        return ""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    task = ray.remote(num_cpus=0, max_retries=0)(_node_report)
    refs = {
        task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(): n
        for n in nodes
    }
    ready, waiting = ray.wait(list(refs), num_returns=len(refs), timeout=NODE_CHECK_TIMEOUT_S)
    mine = _versions()
    problems = []
    for ref, node in refs.items():
        where = f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:8]})"
        if ref in waiting:
            problems.append(
                f"{where}: no answer to the environment check in {NODE_CHECK_TIMEOUT_S:.0f}s"
            )
            continue
        try:
            report = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the check itself could not run there
            problems.append(
                f"{where}: the environment check failed ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[-1][:200]})"
            )
            continue
        where = f"node {node.get('NodeManagerAddress')} ({report['host']})"
        problems += [f"{where}: {line}" for line in report["failed"]]
        differ = [
            f"{k} {v} (driver {mine[k]})"
            for k, v in report["versions"].items()
            if v != mine.get(k)
        ]
        if differ and not report["failed"]:
            problems.append(
                f"{where}: versions differ from the driver's: {', '.join(differ)}; "
                "fix: build the image from requirements.lock (infra/Dockerfile)"
            )
    if problems:
        for ref in waiting:
            ray.cancel(ref, force=True)
        raise EnvironmentProblem("\n".join(problems))
    return f"{len(nodes)} node(s) pass the environment check"
