"""``sertune bench search``: what a trial costs around its training, per execution mode, measured
side by side in one run; and what packing several slots onto one device buys.

Per mode it runs N short trials one after another (smoke model, 1 epoch, 2 steps, no robustness)
and takes, per trial, its wall time on the driver (Tune trial start -> complete) minus the time
inside the training loop (corpus from the cache, steps, validation): the fixed cost.

  per-trial (Ray defaults)   one TorchTrainer per trial, Train polling every 2 s
  per-trial (tuned)          the same with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 (+ actor reuse)
  warm slots                 one long-lived TorchTrainer, trials through the job board (default)

Then it packs K warm slots (1/K GPU each on a GPU, 1 CPU each otherwise) and compares their
aggregate training samples/s with one slot alone.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ..cluster import init_ray, shutdown_ray
from ..ray_compat import FAST_ENV
from ..spec import load_spec, presets, validate_spec
from ..trainable import LOOP_STARTED_AT, get_trainable
from ..tuner import build_tuner, trial_plan


class TrialClock(Callback):
    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.last: dict[str, dict] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.start[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = dict(result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.end[trial.trial_id] = time.time()


def _spec(
    home: Path,
    name: str,
    trials: int,
    concurrency: int,
    steps: int,
    gpus: float,
    execution: str,
    params: dict[str, Any] | None = None,
) -> Any:
    raw = load_spec(presets()["smoke"]).model_dump()
    raw.pop("source")
    raw["params"] = {**raw["params"], **(params or {})}  # --set (e.g. an SSL encoder)
    raw.update(name=name, robustness=None, seed=0, execution=execution)
    raw["budget"].update(
        trials=trials,
        concurrency=concurrency,
        max_epochs=1,
        grace_epochs=1,
        max_steps_per_epoch=steps,
    )
    raw["objective"] = {
        "metrics": [
            {"metric": "val_uar", "mode": "max"},
            {"metric": "val_uar_noisy", "mode": "max"},
        ]
    }  # FIFO: no stops
    raw["resources"] = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": gpus}
    raw["device"] = "cuda" if gpus else "cpu"
    raw["data"]["root"] = str(home / "data" / "synthetic-bench")
    return validate_spec(raw, "<bench>")


def _run(
    spec: Any, fast: bool, num_cpus: int | None, home: Path
) -> tuple[TrialClock, float, float]:
    """One mode: (clock, wall of the trials, one-time start cost)."""
    from ..execution import Execution, WarmExecution

    for k in FAST_ENV:
        os.environ.pop(k, None)
    data = get_trainable(spec.trainable).prepare_data(
        spec.data.model_dump(), str(home / "cache"), progress=lambda m: None
    )
    shutdown_ray()
    init_ray(num_cpus=num_cpus, fast=fast)
    wall_start = time.time()
    execution = Execution.start(spec, spec.name, spec.budget.concurrency)
    clock = TrialClock()
    plan = trial_plan(spec, spec.name, data)
    fifo = True
    warm = isinstance(execution, WarmExecution)
    reuse = execution.reuse_actors(fifo) if (fast or warm) else False
    tuner = build_tuner(
        spec, spec.name, execution.tune_trainable(plan), callbacks=[clock], reuse_actors=reuse
    )
    t0 = time.monotonic()
    try:
        tuner.fit()
    finally:
        execution.close()
    wall = time.monotonic() - t0
    loops = [float(r[LOOP_STARTED_AT]) for r in clock.last.values() if LOOP_STARTED_AT in r]
    startup = (min(loops) - wall_start) if loops else float("nan")  # until the first loop ran
    shutdown_ray()
    return clock, wall, startup


def _fixed_costs(clock: TrialClock) -> tuple[list[float], list[float], list[float]]:
    over, loop, before = [], [], []
    for tid, start in clock.start.items():
        if tid in clock.end and tid in clock.last:
            last = clock.last[tid]
            lt = float(last.get("loop_time_s", 0.0))
            loop.append(lt)
            over.append(clock.end[tid] - start - lt)
            before.append(float(last.get(LOOP_STARTED_AT, start)) - start)
    return over, loop, before


def bench_params(sets: list[str] | None) -> dict[str, Any]:
    """``--set KEY=VALUE`` (``params.`` optional) as trainable parameters for every mode."""
    import yaml

    out: dict[str, Any] = {}
    for item in sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            from ..errors import UsageError

            raise UsageError(f"--set: expected KEY=VALUE, got {item!r}")
        out[key.removeprefix("params.")] = yaml.safe_load(value)
    return out


def run_search_bench(
    trials: int = 8,
    gpus: float = 0.0,
    num_cpus: int | None = None,
    sets: list[str] | None = None,
) -> int:
    import torch

    from ..ray_compat import quiet

    quiet()
    from ..search import state_save_period

    home = Path(tempfile.mkdtemp(prefix="sertune-bench-"))
    os.environ["SERTUNE_HOME"] = str(home)
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = state_save_period(trials)
    has_gpu = torch.cuda.is_available()
    gpu_frac = gpus if (gpus and has_gpu) else 0.0
    print(
        f"bench search: {trials} sequential short trials per mode, "
        f"{'GPU' if gpu_frac else 'CPU'} workers (torch {torch.__version__}, {os.cpu_count()} CPUs)"
    )
    params = bench_params(sets)
    if params:
        print("  parameters: " + ", ".join(f"{k}={v}" for k, v in sorted(params.items())))
    modes = [
        ("per-trial, Ray defaults", "per_trial", False),
        ("per-trial, tuned", "per_trial", True),
        ("warm slots", "warm", True),
    ]
    rows = []
    for i, (label, execution, fast) in enumerate(modes):
        spec = _spec(home, f"bench-{i}", trials, 1, 2, 1.0 if gpu_frac else 0.0, execution, params)
        clock, wall, startup = _run(spec, fast, num_cpus, home)
        over, loop, before = _fixed_costs(clock)
        med = statistics.median(over) if over else float("nan")
        per_trial = wall / max(1, len(over))
        rows.append((label, med, per_trial))
        print(
            f"  {label:24} fixed cost/trial {med:5.2f} s (median of {len(over)}; "
            f"{statistics.median(before) if before else float('nan'):4.2f} s before the loop)   "
            f"training loop {statistics.median(loop) if loop else float('nan'):4.2f} s   "
            f"wall/trial {per_trial:5.2f} s -> {3600 / per_trial:5.0f} trials/hour"
            + (
                f"   (slot start + first pickup, once: {startup:.1f} s)"
                if execution == "warm"
                else ""
            )
        )
    base = rows[0][1]
    for label, med, _ in rows[1:]:
        print(
            f"fixed cost {label} / per-trial defaults: {med / base:.2f}  ({base:.2f} s -> {med:.2f} s)"
        )
    print(f"fixed cost warm / per-trial tuned: {rows[2][1] / rows[1][1]:.2f}")

    # Packing: K warm slots at once vs one alone, aggregate training samples/s.
    k = 4 if gpu_frac else max(2, min(4, num_cpus or os.cpu_count() or 2))
    frac = (1.0 / k) if gpu_frac else 0.0
    rates = {}
    for n in (1, k):
        spec = _spec(home, f"pack-{n}", n * 2, n, 30, frac, "warm", params)
        clock, _, _ = _run(spec, True, num_cpus, home)
        per = [r.get("train_samples_per_s", 0.0) for r in clock.last.values()]
        rates[n] = statistics.median(per) * n if per else 0.0
        peaks = [r["peak_memory_mb"] for r in clock.last.values() if "peak_memory_mb" in r]
        if n == 1 and peaks:
            peak = max(peaks)
            if gpu_frac:
                total = torch.cuda.get_device_properties(0).total_memory / 2**20
                where = f"of the GPU's {total:,.0f} MiB (CUDA allocator peak)"
            else:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
                where = f"of the host's {total:,.0f} MiB (the slot process's peak resident set)"
            print(
                f"memory per slot: {peak:,.0f} MiB peak {where}: "
                f"{int(total // peak) if peak else 0} slots of this model fit by memory"
            )
    what = f"{frac:.2f} GPU each" if gpu_frac else "1 CPU each"
    print(
        f"packing: 1 slot alone {rates[1]:,.0f} samples/s; {k} packed slots ({what}) "
        f"{rates[k]:,.0f} samples/s"
    )
    print(f"packed/alone: {rates[k] / rates[1]:.2f}")
    shutil.rmtree(home, ignore_errors=True)
    return 0
