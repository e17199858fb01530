"""Where a training loop runs: the sessions the control plane hands to ``Trainable.train``.

* :class:`LocalSession` - this process, world size 1 (tests, ``run_local``, benchmarks);
* :class:`RayTrainSession` - a Ray Train worker (Train V2) of a per-trial ``TorchTrainer``;
* :class:`SlotSession` - a worker of a warm slot (``sertune.warm``) that trains trial after
  trial, reporting to the job board.

All follow :class:`sertune.trainable.Session`. torch and Ray are imported lazily so this module
costs nothing to import.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .storage import download_dir, exists, list_dirs, remove_dir, upload_dir, write_text
from .trainable import CHECKPOINT_PATH, SLOT_NOTE, TrialStopped

PROCESS_CACHE: dict[str, Any] = {}  # survives trials in one worker process (warm slots)
CHECKPOINT_PREFIX = "checkpoint_"  # a warm slot's epoch checkpoints: checkpoint_000003
KEEP_CHECKPOINTS = 2


def checkpoint_manifest(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint folder, by relative path."""
    import hashlib

    root, out = Path(folder), {}
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "COMPLETE"):
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[str(f.relative_to(root))] = h.hexdigest()
    return out


def damaged_file(folder: Path) -> str | None:
    """The first file of a downloaded checkpoint that does not match the manifest its COMPLETE
    marker holds (missing counts), or None (intact). One saved before manifests were kept is
    checked file by file for what its format can tell (:func:`_unreadable_file`)."""
    marker = folder / "COMPLETE"
    try:
        want = json.loads(marker.read_text() or "{}")
    except (OSError, ValueError):
        return "COMPLETE"
    if not want:
        return _unreadable_file(folder)
    got = checkpoint_manifest(folder)
    return next((name for name, digest in want.items() if got.get(name) != digest), None)


def _unreadable_file(folder: Path) -> str | None:
    """A checkpoint saved before manifests were kept has no digests to compare: its files are
    checked by their own structure instead - ``torch.save``'s zip archives by their CRC-32s,
    safetensors by their header and length, JSON by parsing. The first that fails, or None."""
    import struct
    import zipfile

    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "COMPLETE"):
        name = str(f.relative_to(folder))
        try:
            if f.suffix in (".pt", ".pth"):
                with zipfile.ZipFile(f) as z:
                    if z.testzip() is not None:
                        return name
            elif f.suffix == ".safetensors":
                with f.open("rb") as fh:
                    (n,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(n))
                ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
                if f.stat().st_size != 8 + n + max(ends, default=0):
                    return name
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error,
                zipfile.BadZipFile, RuntimeError, EOFError):  # fmt: skip
            return name
    return None


POLL_S = 0.25  # how often a slot's session asks the board whether its trial was cancelled


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
    store: dict[str, Any] | None = None  # what outlives the trial (default: this process's)

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
        return PROCESS_CACHE if self.store is None else self.store

    def placement(self) -> dict[str, str]:
        return {}  # this process: nothing to check

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


class SlotSession:
    """``sertune.trainable.Session`` for one trial inside a warm slot's Ray Train worker."""

    def __init__(self, key: str, storage: str, board: Any, device: str):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.board, self.key, self.storage = board, key, storage
        self._device = ray.train.torch.get_device() if device == "auto" else resolve_device(device)
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._polls = 0
        self._tmp: list[str] = []
        threading.Thread(target=self._watch, daemon=True, name="sertune-cancel").start()

    def _watch(self) -> None:
        import ray

        while not self._done.is_set():
            try:
                if ray.get(self.board.cancelled.remote(self.key), timeout=30):
                    self._cancel.set()
                    return
            except Exception:  # the board is gone: the driver stopped
                self._cancel.set()
                return
            self._done.wait(POLL_S)

    def close(self) -> None:
        self._done.set()
        for d in self._tmp:
            shutil.rmtree(d, ignore_errors=True)

    def torch_device(self):
        return self._device

    def all_reduce_sum(self, t):
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def wrap_model(self, model):
        if self.world_size > 1:
            import ray.train.torch

            return ray.train.torch.prepare_model(model, move_to_device=self._device)
        return model.to(self._device)

    def placement(self) -> dict[str, str]:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "placement/node": ctx.get_node_id(),
            "placement/gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
        }

    def cache(self) -> dict[str, Any]:
        return PROCESS_CACHE

    def _agreed_stop(self) -> bool:
        """Every rank stops at the same step (a lone rank would hang its peers' all-reduce)."""
        flag = self._cancel.is_set()
        if self.world_size > 1:
            import torch

            t = torch.tensor([1.0 if flag else 0.0], device=self._device)
            flag = bool(self.all_reduce_sum(t).item() > 0)
        return flag

    def poll(self) -> None:
        self._polls += 1
        if self.world_size > 1 and self._polls % 16:
            return  # an all-reduce every step would cost; every 16th is quick enough
        if self._agreed_stop():
            raise TrialStopped(self.key)

    def get_checkpoint_dir(self) -> str | None:
        """The trial's latest complete checkpoint (after a crash or a worker-group restart).

        Its epoch's report is sent again first: the driver may have died after the slot saved
        the checkpoint but before that report reached Tune and MLflow (the journal drops an epoch
        it already has)."""
        done = [
            d
            for d in list_dirs(self.storage)
            if d.startswith(CHECKPOINT_PREFIX) and exists(f"{self.storage}/{d}/COMPLETE")
        ]
        import ray

        tmp = tempfile.mkdtemp(prefix="sertune-resume-")
        self._tmp.append(tmp)
        local = None
        for name in reversed(done):  # the newest intact one; a damaged one is named, set aside
            got = download_dir(f"{self.storage}/{name}", Path(tmp) / name)
            damaged = damaged_file(got)
            if damaged is None:
                local, chosen = got, name
                break
            older = [d for d in done if d < name]
            signed = damaged == "COMPLETE" or bool((got / "COMPLETE").read_text().strip())
            self._note = (
                f"checkpoint {self.storage}/{name} is damaged ({damaged} "
                + ("does not match its SHA-256" if signed else "cannot be read")
                + "); "
                + (f"resumed from {older[-1]}" if older else "no intact one left: restarted")
            )
            print(f"[sertune] {self.key}: {self._note}", file=sys.stderr, flush=True)
            if self.rank == 0:
                remove_dir(f"{self.storage}/{name}")
        if local is None:
            return None
        done = [*[d for d in done if d < chosen], chosen]
        saved = local / "metrics.json"
        if self.rank == 0 and saved.exists():
            metrics = {
                **json.loads(saved.read_text()),
                CHECKPOINT_PATH: f"{self.storage}/{done[-1]}",
            }
            if ray.get(self.board.report.remote(self.key, metrics)):
                self._cancel.set()
        return str(local)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray

        if self.rank == 0:
            if getattr(self, "_note", None):  # said once, on the console with the next epoch
                said = "; ".join(n for n in (self._note, metrics.get(SLOT_NOTE)) if n)
                metrics, self._note = {**metrics, SLOT_NOTE: said}, None
            if checkpoint_dir:
                name = f"{CHECKPOINT_PREFIX}{int(metrics.get('epoch', 0)):06d}"
                uri = f"{self.storage}/{name}"
                upload_dir(checkpoint_dir, uri)
                # last: a half-copied checkpoint never counts; its files' SHA-256, so a damaged
                # one is found and passed over on resume
                write_text(f"{uri}/COMPLETE", json.dumps(checkpoint_manifest(checkpoint_dir)))
                metrics = {**metrics, CHECKPOINT_PATH: uri}
                self._prune()
            if ray.get(self.board.report.remote(self.key, metrics)):
                self._cancel.set()
        if self._agreed_stop():
            raise TrialStopped(self.key)

    def _prune(self) -> None:
        ckpts = [d for d in list_dirs(self.storage) if d.startswith(CHECKPOINT_PREFIX)]
        for old in ckpts[:-KEEP_CHECKPOINTS]:
            remove_dir(f"{self.storage}/{old}")
