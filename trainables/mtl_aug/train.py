"""The MTL-AUG training loop: one function for Ray Train workers and for plain in-process runs.

``train(config, session)`` is the loop; a *session* supplies rank, world size, device,
cross-worker sums, reporting and the checkpoint to resume from. :class:`LocalSession` runs it in
this process (tests, ``sertune bench``); :func:`train_loop_per_worker` wraps it for
``ray.train.torch.TorchTrainer`` (1..N workers, DDP when N > 1, rank 0 reports metrics aggregated
over every worker).

The loop config (a plain dict, so it pickles to workers)::

    {"params": {...MTLAugConfig, nested or dotted keys...},
     "data": {"cache": DIR, "unlabelled_cache": DIR | None, "fold": 0, "n_folds": None,
              "noise_files": [...]},
     "run": {"device": "auto", "max_steps_per_epoch": None, "threads": None,
             "robustness": {...} | None}}

Determinism: the batch order of epoch e depends only on (seed, e); augmentation and dropout of
rank r in epoch e only on (seed, r, e). Checkpoints are taken at epoch ends, so resuming one
reproduces the following steps exactly.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables.data.audio import read_audio
from trainables.data.cache import DecodedCorpus, load_cache, speaker_independent_split

from .augment import AugmentationBank, LogMel, add_noise_at_snr
from .config import MTLAugConfig
from .metrics import confusion, scores
from .model import UNLABELLED, MTLAugModel, mtl_aug_loss

STATE_FILE = "state.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the trial fails with this reason."""


# -- sessions ----------------------------------------------------------------------------------


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

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def get_checkpoint_dir(self) -> str | None:
        return self.checkpoint_dir

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        kept = None
        if checkpoint_dir and self.keep_checkpoints:
            import shutil

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
        self._device = ray.train.torch.get_device() if device == "auto" else torch.device(device)

    def torch_device(self) -> torch.device:
        return self._device

    def placement(self) -> dict[str, str]:
        """Where this worker runs (node, assigned GPU ids): checks that packing did what was asked."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            "placement/node": ctx.get_node_id(),
            "placement/gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
        }

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=self._device)

    def get_checkpoint_dir(self) -> str | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return ckpt.to_directory()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_for(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + epoch * 104_729) % (2**31 - 1)


# -- data on the device --------------------------------------------------------------------------


class DeviceCorpus:
    """A decoded corpus moved onto the device once; crops batches by index arithmetic."""

    def __init__(self, corpus: DecodedCorpus, device: torch.device):
        self.audio = torch.from_numpy(np.array(corpus.audio)).to(device)  # int16 (N,), a copy
        self.offsets = torch.from_numpy(corpus.offsets).to(device)
        self.lengths = torch.from_numpy(corpus.lengths).to(device)
        self.labels = torch.from_numpy(corpus.labels).to(device)
        self.device = device

    def crops(
        self,
        idx: torch.Tensor,
        length: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """(B,) utterance indices -> (B, length) float waveforms.

        Random crops when a generator is given (training), centre crops otherwise; utterances
        shorter than ``length`` are zero-padded.
        """
        off, ln = self.offsets[idx], self.lengths[idx]
        slack = (ln - length).clamp_min(0)
        if generator is None:
            start = off + slack // 2
        else:
            r = torch.rand(idx.shape[0], generator=generator, device=self.device)
            start = off + (r * (slack + 1).float()).long().clamp_max(slack)
        ar = torch.arange(length, device=self.device)
        valid = ar.unsqueeze(0) < ln.unsqueeze(1)  # (B, length)
        pos = torch.where(valid, start.unsqueeze(1) + ar, torch.zeros_like(ar))
        return self.audio[pos].float().mul_(valid) / 32768.0


def load_noise_bank(files: list[str], sample_rate: int) -> torch.Tensor | None:
    if not files:
        return None
    return torch.from_numpy(np.concatenate([read_audio(f, sample_rate) for f in files]))


# -- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    logmel: LogMel,
    data: DeviceCorpus,
    indices: torch.Tensor,
    segment: int,
    n_classes: int,
    session: Any,
    batch_size: int = 128,
    transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """UAR/WAR/F1 of ``indices`` (this rank's share), summed over every worker.

    ``transform(wav, idx)`` perturbs the waveforms first (noise for robustness checks).
    """
    was_training = model.training
    model.eval()
    mine = indices[session.rank :: session.world_size]
    cm = torch.zeros(n_classes, n_classes, dtype=torch.long, device=data.device)
    emo_loss = torch.zeros(2, dtype=torch.float64, device=data.device)
    for i in range(0, mine.numel(), batch_size):
        idx = mine[i : i + batch_size]
        wav = data.crops(idx, segment)
        if transform is not None:
            wav = transform(wav, idx)
        out = model(logmel(wav))
        y = data.labels[idx]
        cm += confusion(out["emotion"].argmax(1), y, n_classes)
        emo_loss[0] += torch.nn.functional.cross_entropy(
            out["emotion"], y, reduction="sum"
        ).double()
        emo_loss[1] += idx.numel()
    cm = session.all_reduce_sum(cm)
    emo_loss = session.all_reduce_sum(emo_loss)
    model.train(was_training)
    res = scores(cm.cpu())
    res["loss_emo"] = float(emo_loss[0] / emo_loss[1].clamp_min(1))
    return res


def white_noise_transform(
    snr_db: float, seed: int
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A deterministic white-noise perturbation at one SNR (same noise for the same utterance)."""

    def apply(wav: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=wav.device).manual_seed(seed + int(idx[0]))
        noise = torch.randn(wav.shape, generator=g, device=wav.device)
        snr = torch.full((wav.shape[0],), float(snr_db), device=wav.device)
        return add_noise_at_snr(wav, noise, snr)

    return apply


# -- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    cfg: MTLAugConfig,
    label_names: tuple[str, ...],
) -> None:
    """Everything to resume (state.pt) and to serve (model.safetensors + model.json), no pickle."""
    from .export import save_model

    core = getattr(model, "module", model)
    state = {
        "model": core.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "rng": {"torch_cpu": torch.get_rng_state(), "seed": cfg.seed},
        "config": cfg.to_json(),
    }
    torch.save(state, directory / STATE_FILE)
    save_model(directory, core, cfg, label_names)


def load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


# -- the loop ------------------------------------------------------------------------------------------


def train(config: dict[str, Any], session: Any) -> list[dict[str, Any]]:
    """Train MTL-AUG as ``config`` says, reporting after every epoch through ``session``."""
    # [1] Config, device, threads
    loop_t0 = time.perf_counter()
    loop_started_at = time.time()  # wall clock, so a driver can split a trial's fixed cost
    cfg = MTLAugConfig.from_dict(config.get("params", {}))
    data_cfg = config["data"]
    run_cfg = config.get("run", {})
    if run_cfg.get("threads"):
        torch.set_num_threads(int(run_cfg["threads"]))
    device = session.torch_device()
    rank, world = session.rank, session.world_size
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # [2] Data onto the device once; speaker-independent split
    corpus = load_cache(data_cfg["cache"])
    split = speaker_independent_split(corpus, data_cfg.get("fold", 0), data_cfg.get("n_folds"))
    data = DeviceCorpus(corpus, device)
    train_idx = np.concatenate([split["train"], split["unlabelled"]])
    extra = None
    if data_cfg.get("unlabelled_cache"):  # a separate unlabelled pool: auxiliary losses only
        extra_corpus = load_cache(data_cfg["unlabelled_cache"])
        extra = DeviceCorpus(extra_corpus, device)
        extra.labels = torch.full_like(extra.labels, UNLABELLED)
    n_extra = 0 if extra is None else len(extra.offsets)
    n_labels = len(corpus.label_names)
    if cfg.model.n_emotions != n_labels:
        raise ValueError(
            f"model.n_emotions ({cfg.model.n_emotions}) != classes in data ({n_labels})"
        )
    val_idx = torch.from_numpy(split["val"]).to(device)
    test_idx = torch.from_numpy(split["test"]).to(device)
    train_idx_t = torch.from_numpy(train_idx).to(device)
    n_train = len(train_idx) + n_extra

    # [3] Model, augmentation bank, optimiser
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    bank = AugmentationBank(
        cfg.aug,
        cfg.features,
        load_noise_bank(data_cfg.get("noise_files") or [], cfg.features.sample_rate),
    ).to(device)
    logmel = bank.logmel
    core = MTLAugModel(cfg.model, cfg.features.n_mels).to(device)
    optimizer = torch.optim.AdamW(
        core.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    start_epoch = 0
    ckpt = session.get_checkpoint_dir()
    if ckpt:
        state = load_state(ckpt)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
    model = session.wrap_model(core)
    if ckpt and start_epoch >= cfg.optim.epochs:
        # Resumed after the last epoch (the driver died before it recorded the end): report the
        # saved final metrics again so the trial ends with its real result instead of none.
        final = json.loads((Path(ckpt) / "metrics.json").read_text())
        session.report(final, None)
        return [final]

    bs = cfg.optim.batch_size
    steps = max(1, n_train // (bs * world))
    if run_cfg.get("max_steps_per_epoch"):
        steps = min(steps, int(run_cfg["max_steps_per_epoch"]))
    segment = bank.segment
    history: list[dict[str, Any]] = []
    train_time = 0.0

    # [4] Epochs
    for epoch in range(start_epoch, cfg.optim.epochs):
        torch.manual_seed(seed_for(cfg.seed, rank, epoch))  # dropout
        gen = torch.Generator(device=device).manual_seed(seed_for(cfg.seed, rank, epoch))
        order = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(seed_for(cfg.seed, 0, epoch))
        )
        order = order.to(device)
        model.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # total, emo, aug, rec, n
        t0 = time.perf_counter()
        for step in range(steps):
            pos = order[(step * world + rank) * bs : (step * world + rank + 1) * bs]
            if pos.numel() < 2:
                pos = order[:bs]
            wav, y = _gather(data, extra, train_idx_t, pos, bank.crop_length, gen)
            feats, aug_type = bank(wav, gen)  # (B, M, T), (B,)
            out = model(feats)
            losses = mtl_aug_loss(out, y, aug_type, cfg.loss)
            if not torch.isfinite(losses.total):
                raise TrainingDiverged(
                    f"loss became {float(losses.total.detach())} at epoch {epoch} step {step} "
                    f"(emo={float(losses.emotion):.4g}, aug={float(losses.aug):.4g}, "
                    f"rec={float(losses.reconstruction):.4g}); lr={cfg.optim.lr}"
                )
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            n = pos.numel()
            sums += torch.stack(
                [
                    losses.total.detach() * n,
                    losses.emotion.detach() * n,
                    losses.aug.detach() * n,
                    losses.reconstruction.detach() * n,
                    torch.tensor(float(n), device=device),
                ]
            ).double()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        sums = session.all_reduce_sum(sums)
        n_seen = float(sums[4])

        # [5] Validation on held-out speakers (rank shares summed), clean and at 10 dB white noise
        val = evaluate(model, logmel, data, val_idx, segment, n_labels, session)
        noisy = evaluate(
            model,
            logmel,
            data,
            val_idx,
            segment,
            n_labels,
            session,
            transform=white_noise_transform(10.0, seed=12345),
        )
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "val_uar": val["uar"],
            "val_war": val["war"],
            "val_f1": val["f1"],
            "val_loss_emo": val["loss_emo"],
            "val_uar_noisy": noisy["uar"],
            "train_loss": float(sums[0]) / n_seen,
            "train_loss_emo": float(sums[1]) / n_seen,
            "train_loss_aug": float(sums[2]) / n_seen,
            "train_loss_rec": float(sums[3]) / n_seen,
            "train_samples": int(n_seen),  # summed over every worker
            "train_samples_per_s": n_seen / max(epoch_time, 1e-9),
            "train_time_s": train_time,
            # data load + epochs so far, and when the loop started (bench search)
            "loop_time_s": time.perf_counter() - loop_t0,
            "loop_started_at": loop_started_at,
        }
        if epoch == start_epoch and hasattr(session, "placement"):
            metrics.update(session.placement())
        last = epoch == cfg.optim.epochs - 1
        if last:  # the held-out test speakers: reported once, never optimised
            test = evaluate(model, logmel, data, test_idx, segment, n_labels, session)
            metrics.update({f"test_{k}": v for k, v in test.items() if k != "loss_emo"})
        robust = None
        if last and run_cfg.get("robustness") and rank == 0:
            from .robustness import trial_robustness

            robust = trial_robustness(
                core, cfg, corpus, split, data_cfg, run_cfg["robustness"], device
            )
            metrics.update(robust["metrics"])

        # [6] Checkpoint (rank 0 writes) and report (every rank calls; rank 0's metrics count)
        with tempfile.TemporaryDirectory(prefix="sertune-ckpt-") as tmp:
            ckpt_dir = None
            if rank == 0:
                save_checkpoint(Path(tmp), model, optimizer, epoch, cfg, corpus.label_names)
                (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
                if robust is not None:
                    from .robustness import write_report

                    write_report(robust, Path(tmp) / "robustness")
                ckpt_dir = tmp
            session.report(metrics, ckpt_dir)
        history.append(metrics)
    return history


def _gather(
    data: DeviceCorpus,
    extra: DeviceCorpus | None,
    train_idx: torch.Tensor,
    pos: torch.Tensor,
    length: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in the training pool -> (waveform crops, emotion labels or -1)."""
    n_main = train_idx.numel()
    if extra is None:
        idx = train_idx[pos]
        return data.crops(idx, length, gen), data.labels[idx]
    in_main = pos < n_main
    wav = torch.empty(pos.numel(), length, device=data.device)
    y = torch.full((pos.numel(),), UNLABELLED, dtype=torch.long, device=data.device)
    if bool(in_main.any()):
        idx = train_idx[pos[in_main]]
        wav[in_main] = data.crops(idx, length, gen)
        y[in_main] = data.labels[idx]
    if bool((~in_main).any()):
        wav[~in_main] = extra.crops(pos[~in_main] - n_main, length, gen)
    return wav, y


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for ``ray.train.torch.TorchTrainer(train_loop_per_worker=...)``."""
    run = config.get("run", {})
    threads = run.get("threads")
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    train(config, RayTrainSession(run.get("device", "auto")))
