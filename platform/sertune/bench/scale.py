"""``sertune bench scale``: what the control plane costs per trial as a search grows.

A local multi-node Ray cluster with fake GPUs (``ray.cluster_utils.Cluster``), warm slots, MLflow
logging on (SQLite), and a probe trainable whose trials only sleep (``sertune.bench.probe``) run
100 -> 300 -> 1,000 trials through the real machinery: Optuna proposes, ASHA stops, the journal
writes every epoch to MLflow. For each size it prints

* driver CPU per trial - Tune's loop, Optuna, the journal, all in the driver process;
* MLflow write time per trial - time inside MLflow calls (the journal's thread);
* overhead per trial - slot time not spent in a trial's own epochs once the slots are up (from
  the first trial's training to the last trial's end), as a share of a trial of the measured
  length and of a 10 s trial; the slots' one-time start is printed apart.

Flat numbers from 100 to 1,000 mean the cost grows linearly with the search.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..cluster import shutdown_ray
from ..spec import validate_spec
from .probe import ENTRY, NAME


def _spec(n: int, slots: int, epochs: int, trial_seconds: float):
    raw = {
        "name": f"scale-{n}",
        "trainable": NAME,
        "data": {"corpus": "synthetic", "root": "unused"},
        "objective": {"metric": "val_uar", "mode": "max"},
        "budget": {
            "trials": n,
            "concurrency": slots,
            "max_epochs": epochs,
            "grace_epochs": 1,
            "reduction_factor": 3,
        },
        "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 1},
        "params": {"probe.epoch_s": trial_seconds / epochs},
        "space": {
            "probe.x": {"type": "float", "low": 0, "high": 1},
            "probe.y": {"type": "float", "low": 0, "high": 1},
        },
        "robustness": None,
        "device": "cpu",
    }
    return validate_spec(raw, "<bench scale>", check_paths=False)


def run_scale_bench(
    sizes: list[int], trial_seconds: float = 2.0, epochs: int = 4, slots: int = 8
) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from ..ray_compat import quiet
    from ..search import run_search

    quiet()
    home = Path(tempfile.mkdtemp(prefix="sertune-scale-"))
    os.environ["SERTUNE_HOME"] = str(home)
    os.environ["SERTUNE_TRAINABLES"] = ",".join(
        filter(None, [os.environ.get("SERTUNE_TRAINABLES", ""), ENTRY])
    )
    os.environ.setdefault("RAY_worker_maximum_startup_concurrency", "8")
    gpus_per_node = 4
    nodes = math.ceil(slots / gpus_per_node)
    shutdown_ray()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True}
    )
    for _ in range(nodes):
        cluster.add_node(num_cpus=gpus_per_node, num_gpus=gpus_per_node)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    print(
        f"bench scale: {nodes} nodes x {gpus_per_node} fake GPUs, {slots} warm slots, trials of "
        f"{epochs} x {trial_seconds / epochs:.2f} s, MLflow on SQLite, ASHA on; driver pid {os.getpid()}"
    )
    print(f"{'trials':>7} {'wall s':>7} {'driver CPU/trial':>17} {'MLflow/trial':>13} "
          f"{'MLflow calls/trial':>19} {'overhead/trial':>15} {'of a trial':>11} {'of a 10 s trial':>16}")  # fmt: skip
    rows = []
    try:
        for n in sizes:
            spec = _spec(n, slots, epochs, trial_seconds)
            cpu0, t0 = time.process_time(), time.monotonic()
            result = run_search(spec, log=lambda *a: None, replace=True)
            wall = time.monotonic() - t0
            cpu = time.process_time() - cpu0
            starts = [r["started"] for r in result.rows if r.get("started")]
            loops = [float(r["loop_started_at"]) for r in result.rows if r.get("loop_started_at")]
            ends = [r["ended"] for r in result.rows if r.get("ended")]
            window = max(ends) - min(loops)  # slots up (first training) -> last trial end
            slot_start = min(loops) - min(starts)
            trained = sum(r["epochs"] for r in result.rows) * trial_seconds / epochs
            mean_trial = trained / n
            overhead = (window * slots - trained) / n
            s = result.stats
            rows.append((n, cpu / n, s["mlflow_write_s"] / n, overhead))
            print(f"{n:>7} {wall:>7.0f} {1000 * cpu / n:>14.1f} ms {1000 * s['mlflow_write_s'] / n:>10.1f} ms "
                  f"{s['mlflow_calls'] / n:>19.1f} {overhead:>13.2f} s {overhead / mean_trial:>10.1%} "
                  f"{overhead / 10:>15.1%}   (slots up after {slot_start:.0f} s)", flush=True)  # fmt: skip
    finally:
        shutdown_ray()
        cluster.shutdown()
        ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)  # a thousand trials' files: nothing to keep
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(f"growth {first[0]} -> {last[0]} trials: driver CPU/trial x{last[1] / first[1]:.2f}, "
              f"MLflow/trial x{last[2] / max(first[2], 1e-9):.2f}, overhead/trial x{last[3] / max(first[3], 1e-9):.2f}")  # fmt: skip
        cpu_ms = last[1] * 1000  # the biggest search: what a long-running driver settles at
        per_core = 1000 / cpu_ms  # trials a second one driver core keeps up with
        print(
            f"one driver core keeps up with ~{per_core:.1f} trials/s ({cpu_ms:.0f} ms per trial): "
            f"~{per_core * 10:.0f} concurrent slots of 10 s trials"
        )
        for per_gpu in (1, 4):  # 64 GPUs, one slot each or four packed (gpus_per_worker 0.25)
            rate = 64 * per_gpu / 10
            print(f"extrapolated to 64 GPUs x {per_gpu} slot{'s' * (per_gpu > 1)} of 10 s trials "
                  f"({rate:.1f} trials/s): the driver needs ~{rate * cpu_ms / 10:.0f}% of one core")  # fmt: skip
    return 0
