"""A warm slot: one long-lived ``TorchTrainer`` whose workers take trial after trial from the
board (``run_slot`` is the Ray task holding it; ``slot_loop`` its train loop)."""

from __future__ import annotations

import os
import tempfile
import traceback
import uuid
from pathlib import Path
from typing import Any

import ray

from ..sessions import SlotSession
from ..trainable import CheckpointEvaluation, TrialDiverged, TrialStopped, get_trainable
from .board import Job, JobKind


def slot_loop(config: dict[str, Any]) -> None:
    """``TorchTrainer``'s loop in a warm slot: take a job, train it, report, take the next."""
    import ray.train

    board, slot, device = config["board"], config["slot"], config["device"]
    if config.get("threads"):
        os.environ.setdefault("OMP_NUM_THREADS", str(config["threads"]))
        import torch

        torch.set_num_threads(int(config["threads"]))
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    while True:
        job = None
        if rank == 0:
            while job is None:
                job = ray.get(board.take.remote(slot, 30.0))
        if world > 1:
            import torch.distributed as dist

            box = [job]
            dist.broadcast_object_list(box, src=0)
            job = box[0]
        if job.kind == JobKind.SHUTDOWN:
            return
        if job.kind == JobKind.EVALUATE:
            if rank == 0:
                _evaluate(job, board)
            continue
        _run_job(job, board, device)


def _run_job(job: Job, board: Any, device: str) -> None:
    trainable = get_trainable(job.trainable)
    session = SlotSession(job.key, job.checkpoints, board, device)
    diverged = False
    try:
        trainable.train(job.config, session)
        outcome, reason = "done", ""
    except TrialStopped:
        outcome, reason = "stopped", ""
    except TrialDiverged as e:  # its configuration's fault: the proxy raises it again
        outcome, diverged = "failed", True
        reason = f"{TrialDiverged.__name__}: {e}"  # by that name, also for a subclass (failfast)
        if session.rank == 0:
            print(traceback.format_exc(), flush=True)
    except Exception as e:  # the trial's own failure: it fails alone, the slot goes on
        outcome = "failed"
        reason = f"{type(e).__name__}: {e}"
        if session.rank == 0:
            print(traceback.format_exc(), flush=True)
    finally:
        session.close()
    if session.rank == 0:
        ray.get(board.finish.remote(job.key, outcome, reason, diverged=diverged))


def _evaluate(job: Job, board: Any) -> None:
    from ..storage import download_dir

    try:
        trainable = get_trainable(job.trainable)
        with tempfile.TemporaryDirectory(prefix="sertune-eval-") as tmp:
            local = download_dir(job.checkpoint, Path(tmp) / "ckpt")
            metrics = trainable.evaluate_checkpoint(
                str(local), job.config["data"], job.config["run"], job.device
            )
            report = local / "best" / "robustness"
            files = {p.name: p.read_bytes() for p in report.iterdir()} if report.is_dir() else {}
        outcome = CheckpointEvaluation(metrics=metrics, files=files)
        ray.get(board.finish.remote(job.key, "done", "", outcome))
    except Exception as e:
        ray.get(board.finish.remote(job.key, "failed", f"{type(e).__name__}: {e}"))


def run_slot(
    slot: int,
    board: Any,
    spec_resources: dict[str, Any],
    device: str,
    threads: int,
    storage: str,
    max_restarts: int,
) -> str:
    """A Ray task holding one slot's ``TorchTrainer`` until the board closes."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ..storage import fs_and_path

    use_gpu = spec_resources["gpus_per_worker"] > 0
    per_worker = {"CPU": spec_resources["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = spec_resources["gpus_per_worker"]
    fs, path = fs_and_path(storage)
    trainer = TorchTrainer(
        slot_loop,
        train_loop_config={"board": board, "slot": slot, "device": device, "threads": threads},
        torch_config=TorchConfig(backend="gloo") if device == "cpu" else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec_resources["workers"], use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=f"slot-{slot}-{uuid.uuid4().hex[:6]}",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_restarts),
        ),
    )
    result = trainer.fit()
    return "ok" if result.error is None else f"{type(result.error).__name__}: {result.error}"
