"""``sertune bench search``: what a Tune trial that launches a Ray Train run costs around its
training, and what packing several trials onto one device buys.

Per configuration it runs N short trials one after another (smoke model, 1 epoch, few steps) and
prints, per trial, wall time (Tune trial start → complete, measured on the driver) minus the
time spent inside the training loop (data load, steps, validation) = the fixed overhead. The
configurations differ only in the knobs sertune sets (DESIGN.md):

  defaults        Ray's defaults: Train controller polls every 2 s, no actor reuse
  poll 0.1 s      RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 (what single-objective searches use)
  poll + reuse    ... plus Tune actor reuse (what FIFO / multi-objective searches use)

Then it packs K trials concurrently (1/K GPU each on a GPU, 1 CPU each otherwise) and compares
their aggregate training samples/s with one trial alone.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .search import FAST_ENV, build_tuner, init_ray
from .spec import load_spec, validate_spec


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
    home: Path, name: str, trials: int, concurrency: int, steps: int, multi: bool, gpus: float
):
    import search_spaces

    raw = load_spec(Path(search_spaces.__file__).parent / "smoke.yaml").model_dump()
    raw.pop("source")
    raw.update(name=name, robustness=None, seed=0)
    raw["budget"].update(
        trials=trials,
        concurrency=concurrency,
        max_epochs=1,
        grace_epochs=1,
        max_steps_per_epoch=steps,
    )
    raw["resources"] = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": gpus}
    raw["device"] = "cuda" if gpus else "cpu"
    raw["data"]["root"] = str(home / "data" / "synthetic-bench")
    if multi:
        raw["objective"] = {
            "metrics": [
                {"metric": "val_uar", "mode": "max"},
                {"metric": "val_uar_noisy", "mode": "max"},
            ]
        }
    return validate_spec(raw, "<bench>")


def _run(
    spec: Any, fast: bool, num_cpus: int | None, gpus: float, home: Path
) -> tuple[TrialClock, float]:
    import ray

    from .trainable import get_trainable

    for k in FAST_ENV:
        os.environ.pop(k, None)
    os.environ["SERTUNE_FAST_TRIALS"] = "1" if fast else "0"
    data = get_trainable(spec.trainable).prepare_data(
        spec.data.model_dump(), str(home / "cache"), progress=lambda m: None
    )
    if ray.is_initialized():
        ray.shutdown()
    init_ray(num_cpus=num_cpus, fast=fast)
    clock = TrialClock()
    tuner = build_tuner(spec, spec.name, data, callbacks=[clock])
    t0 = time.monotonic()
    tuner.fit()
    wall = time.monotonic() - t0
    ray.shutdown()
    return clock, wall


def run_search_bench(trials: int = 4, gpus: float = 0.0, num_cpus: int | None = None) -> int:
    import torch

    home = Path(tempfile.mkdtemp(prefix="sertune-bench-"))
    os.environ["SERTUNE_HOME"] = str(home)
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "2"
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    has_gpu = torch.cuda.is_available()
    gpu_frac = gpus if (gpus and has_gpu) else 0.0
    print(
        f"bench search: {trials} sequential short trials per configuration, "
        f"{'GPU' if gpu_frac else 'CPU'} workers (torch {torch.__version__})"
    )
    rows = []
    configs = [
        ("defaults", False, False),
        ("poll 0.1 s", True, False),
        ("poll + reuse", True, True),
    ]
    for label, fast, multi in configs:
        spec = _spec(home, f"bench-{len(rows)}", trials, 1, 2, multi, 1.0 if gpu_frac else 0.0)
        clock, wall = _run(spec, fast, num_cpus, gpu_frac, home)
        over, loop, before, after = [], [], [], []
        for tid, start in clock.start.items():
            if tid in clock.end and tid in clock.last:
                last = clock.last[tid]
                lt = float(last.get("loop_time_s", 0.0))
                loop.append(lt)
                over.append(clock.end[tid] - start - lt)
                before.append(float(last.get("loop_started_at", start)) - start)
                after.append(over[-1] - before[-1])
        med = statistics.median(over) if over else float("nan")
        per_trial = wall / max(1, len(over))
        rows.append((label, med, statistics.median(loop) if loop else float("nan"), per_trial))
        print(
            f"  {label:13}  fixed overhead/trial {med:5.1f} s (median; {statistics.median(before):4.1f} s"
            f" before the loop starts, {statistics.median(after):4.1f} s after it ends)   training loop"
            f" {rows[-1][2]:4.1f} s   wall/trial {per_trial:5.1f} s -> {3600 / per_trial:5.0f} trials/hour"
        )
    base = rows[0][1]
    for label, med, _, _ in rows[1:]:
        print(
            f"overhead {label} / defaults: {med / base:.2f}  ({base:.1f} s -> {med:.1f} s per trial)"
        )

    # Packing: K concurrent trials vs one alone, aggregate training samples/s.
    k = 4 if gpu_frac else max(2, min(4, (num_cpus or os.cpu_count() or 2)))
    frac = (1.0 / k) if gpu_frac else 0.0
    alone = _spec(home, "pack-1", 1, 1, 30, True, frac)
    clock1, _ = _run(alone, True, num_cpus, frac, home)
    packed = _spec(home, f"pack-{k}", k, k, 30, True, frac)
    clockk, _ = _run(packed, True, num_cpus, frac, home)
    one = sum(r.get("train_samples_per_s", 0.0) for r in clock1.last.values())
    agg = sum(r.get("train_samples_per_s", 0.0) for r in clockk.last.values())
    what = f"{frac:.2f} GPU each" if gpu_frac else "1 CPU each"
    print(
        f"packing: 1 trial alone {one:,.0f} samples/s; {k} concurrent trials ({what}) {agg:,.0f} samples/s"
    )
    print(f"packed/alone: {agg / one:.2f}")
    return 0
