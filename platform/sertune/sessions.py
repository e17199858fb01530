"""Where a training loop runs: the sessions the control plane hands to ``Trainable.train``.

* :class:`LocalSession` - this process, world size 1 (tests, ``run_local``, benchmarks);
* :class:`RayTrainSession` - a Ray Train worker (Train V2) of a per-trial ``TorchTrainer``;
* ``sertune.slots.SlotSession`` - a worker of a warm slot that trains trial after trial.

All follow :class:`sertune.trainable.Session`. torch and Ray are imported lazily so this module
costs nothing to import.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROCESS_CACHE: dict[str, Any] = {}  # survives trials in one worker process (warm slots)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class LocalSession:
    """Run the loop in this process: world size 1, reports kept in ``history``."""

    device: str = "auto"
    checkpoint_dir: str | None = None  # resume from here
    keep_checkpoints: str | None = None  # copy each epoch's checkpoint under this folder
    on_report: Callable[[dict[str, Any], str | None], None] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1

    def torch_device(self):
        return resolve_device(self.device)

    def all_reduce_sum(self, t):
        return t

    def wrap_model(self, model):
        return model

    def get_checkpoint_dir(self) -> str | None:
        return self.checkpoint_dir

    def poll(self) -> None:
        return None

    def cache(self) -> dict[str, Any]:
        return PROCESS_CACHE

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        kept = None
        if checkpoint_dir and self.keep_checkpoints:
            kept = str(Path(self.keep_checkpoints) / f"epoch_{metrics['epoch']:04d}")
            shutil.copytree(checkpoint_dir, kept, dirs_exist_ok=True)
        self.history.append(dict(metrics, checkpoint=kept))
        if self.on_report:
            self.on_report(metrics, kept or checkpoint_dir)


class RayTrainSession:
    """The same contract inside a Ray Train worker (Train V2)."""

    def __init__(self, device: str = "auto"):
        import ray.train
        import ray.train.torch

        self._ctx = ray.train.get_context()
        self.rank = self._ctx.get_world_rank()
        self.world_size = self._ctx.get_world_size()
        self._device = ray.train.torch.get_device() if device == "auto" else resolve_device(device)

    def torch_device(self):
        return self._device

    def placement(self) -> dict[str, str]:
        """Where this worker runs (node, assigned GPU ids): checks that packing did what was asked."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "placement/node": ctx.get_node_id(),
            "placement/gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
        }

    def all_reduce_sum(self, t):
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def wrap_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=self._device)

    def get_checkpoint_dir(self) -> str | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        return None if ckpt is None else ckpt.to_directory()

    def poll(self) -> None:
        return None

    def cache(self) -> dict[str, Any]:
        return PROCESS_CACHE

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)
