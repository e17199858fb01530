"""The MTL-AUG training loop: one function for every place a trial runs.

``train(config, session)`` is the loop; the *session* (``sertune.sessions``: in-process, a Ray
Train worker, a warm slot) supplies rank, world size, device, cross-worker sums, reporting, the
checkpoint to resume from and a cache that outlives the trial. Rank 0 reports metrics aggregated
over every worker.

The loop config (a plain dict, so it pickles to workers)::

    {"params": {...MTLAugConfig, nested or dotted keys...},
     "data": {"cache": DIR, "unlabelled_cache": DIR | None, "fold": 0, "n_folds": None,
              "label_fraction": 1.0, "label_seed": 0, "noise_files": [...],
              "cross_corpus": [{"name": .., "cache": DIR}], "fingerprint": ..},
     "run": {"device": "auto", "max_steps_per_epoch": None, "threads": None,
             "select": {"metric": "val_uar", "mode": "max"}, "robustness": {...} | None,
             "title": "trial id"}}

Every epoch's checkpoint holds ``state.pt`` (resume: weights, optimiser, epoch, the best epoch so
far) and ``best/`` (the best-validation model so far: ``model.safetensors``, ``model.json``,
``metrics.json``). The last epoch evaluates ``best/`` on the test speakers and for robustness;
that model is what MLflow logs and the registry serves.

Determinism: the batch order of epoch e depends only on (seed, e); augmentation and dropout of
rank r in epoch e only on (seed, r, e). Checkpoints are taken at epoch ends, so resuming one
reproduces the following steps exactly.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sertune.trainable import BEST_EPOCH, EPOCHS_DONE, LOOP_STARTED_AT, TrialDiverged
from trainables.common.metrics import confusion, scores
from trainables.common.noise import add_noise_flat
from trainables.common.robustness import evaluate_robustness, make_noise, write_report
from trainables.common.utterances import (
    Utterances,
    Windowing,
    stratified_subset,
    utterance_logits,
)
from trainables.data.audio import read_audio
from trainables.data.cache import DecodedCorpus, load_cache, speaker_independent_split

from .augment import AugmentationBank, LogMel
from .config import MTLAugConfig
from .export import forward_fn, load_model, save_model, windowing_for
from .model import UNLABELLED, MTLAugModel, mtl_aug_loss

STATE_FILE = "state.pt"
BEST = "best"
NOISY_VAL_SNR_DB = 10.0
DEFAULT_SELECT = {"metric": "val_uar", "mode": "max"}


def seed_for(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + epoch * 104_729) % (2**31 - 1)


# -- data on the device, resident across the trials of a worker ------------------------------------


class Resident:
    """Corpora and the noise bank on one device, kept in the session's cache across trials.

    A warm slot trains trial after trial on the same data fingerprint: the corpus is decoded,
    copied to the device and indexed once, not once per trial.
    """

    MAX_ENTRIES = 4

    def __init__(self, cache: dict[str, Any], device: torch.device):
        self.cache, self.device = cache, device

    def _get(self, key: str, build):
        store = self.cache.setdefault("mtl_aug.resident", {})
        full = f"{self.device}|{key}"
        if full not in store:
            while len(store) >= self.MAX_ENTRIES:
                store.pop(next(iter(store)))
            store[full] = build()
        return store[full]

    def corpus(self, path: str) -> tuple[DecodedCorpus, Utterances]:
        def build():
            c = load_cache(path)
            return c, Utterances.from_corpus(c, self.device)

        return self._get(f"corpus:{path}", build)

    def noise_bank(self, files: list[str], sample_rate: int) -> torch.Tensor | None:
        if not files:
            return None
        return self._get(
            f"noise:{sample_rate}:{'|'.join(files)}",
            lambda: torch.from_numpy(np.concatenate([read_audio(f, sample_rate) for f in files])),
        )


# -- evaluation ------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    forward,
    utts: Utterances,
    indices: np.ndarray,
    windowing: Windowing,
    n_classes: int,
    session: Any,
    noise_snr_db: float | None = None,
    seed: int = 12345,
) -> dict[str, float]:
    """UAR/WAR/F1 and emotion loss of clips ``indices`` (this rank's share), summed over workers.

    ``noise_snr_db`` adds white noise at that SNR over each clip's own samples first (the same
    noise every epoch).
    """
    mine = torch.as_tensor(
        np.asarray(indices)[session.rank :: session.world_size], device=utts.device
    )
    cm = torch.zeros(n_classes, n_classes, dtype=torch.long, device=utts.device)
    loss = torch.zeros(2, dtype=torch.float64, device=utts.device)
    if mine.numel():
        sub = utts.select(mine)
        if noise_snr_db is not None:
            g = torch.Generator(device=utts.device).manual_seed(seed + int(mine[0]))
            noise = make_noise("white", sub, g, None)
            sub = sub.with_audio(
                add_noise_flat(sub.audio, noise, sub.owner(), len(sub), noise_snr_db)
            )
        logits = utterance_logits(forward, sub, windowing)
        cm += confusion(logits.argmax(1), sub.labels, n_classes)
        loss[0] += torch.nn.functional.cross_entropy(logits, sub.labels, reduction="sum").double()
        loss[1] += mine.numel()
    cm = session.all_reduce_sum(cm)
    loss = session.all_reduce_sum(loss)
    res = scores(cm.cpu())
    res["loss_emo"] = float(loss[0] / loss[1].clamp_min(1))
    return res


def final_evaluation(
    model: torch.nn.Module,
    cfg: MTLAugConfig,
    data_cfg: dict[str, Any],
    run_cfg: dict[str, Any],
    resident: Resident,
    out: Path,
) -> dict[str, float]:
    """Test and robustness figures of ``model`` (the best-validation one); the robustness report
    goes to ``out/robustness``. One process, whole sets: used at a trial's last epoch and for
    trials a scheduler stopped (``MTLAugTrainable.evaluate_checkpoint``)."""
    corpus, utts = resident.corpus(data_cfg["cache"])
    split = speaker_independent_split(corpus, data_cfg.get("fold", 0), data_cfg.get("n_folds"))
    windowing = windowing_for(cfg)
    logmel = LogMel(cfg.features).to(resident.device)
    was_training = model.training
    model.eval()
    fwd = forward_fn(model, logmel)
    metrics: dict[str, float] = {}
    with torch.no_grad():
        test = utts.select(split["test"])
        logits = utterance_logits(fwd, test, windowing)
        res = scores(confusion(logits.argmax(1), test.labels, cfg.model.n_emotions).cpu())
    metrics.update({f"test_{k}": v for k, v in res.items()})
    options = run_cfg.get("robustness")
    if options:
        cap = options.get("max_utterances")
        pick = split["test"][stratified_subset(corpus.labels[split["test"]], cap, cfg.seed)]
        cross = []
        for c in data_cfg.get("cross_corpus") or []:
            cc, cu = resident.corpus(c["cache"])
            lab = np.nonzero(cc.labels >= 0)[0]  # the whole corpus: every labelled clip
            cross.append((c["name"], cu.select(lab[stratified_subset(cc.labels[lab], cap, 0)])))
        report = evaluate_robustness(
            fwd,
            utts.select(pick),
            windowing,
            cfg.model.n_emotions,
            options,
            resident.noise_bank(data_cfg.get("noise_files") or [], cfg.features.sample_rate),
            cross,
            corpus_name=corpus.path.name,
            seed=cfg.seed,
        )
        write_report(report, out / "robustness", run_cfg.get("title", ""), cfg.model.n_emotions)
        metrics.update(report["metrics"])
    model.train(was_training)
    return metrics


# -- checkpoints ------------------------------------------------------------------------------------


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    cfg: MTLAugConfig,
    best: dict[str, Any],
    label_names: tuple[str, ...],
) -> None:
    """state.pt (resume, weights only, no pickle of objects) and best/ (serve)."""
    core = getattr(model, "module", model)
    state = {
        "model": core.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "rng": {"torch_cpu": torch.get_rng_state(), "seed": cfg.seed},
        "config": cfg.to_json(),
        "best": json.dumps({k: v for k, v in best.items() if k != "state"}),
    }
    torch.save(state, directory / STATE_FILE)
    best_model = MTLAugModel(cfg.model, cfg.features.n_mels)
    best_model.load_state_dict(best["state"])
    save_model(directory / BEST, best_model, cfg, label_names)
    (directory / BEST / "metrics.json").write_text(json.dumps(best["metrics"]))


def load_state(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def _better(value: float, than: float | None, mode: str) -> bool:
    if than is None:
        return True
    return value > than if mode == "max" else value < than


# -- the loop ------------------------------------------------------------------------------------------


def train(config: dict[str, Any], session: Any) -> list[dict[str, Any]]:
    """Train MTL-AUG as ``config`` says, reporting after every epoch through ``session``."""
    # [1] Config, device, threads
    loop_t0 = time.perf_counter()
    loop_started_at = time.time()  # wall clock, so a driver can split a trial's fixed cost
    cfg = MTLAugConfig.from_dict(config.get("params", {}))
    data_cfg = config["data"]
    run_cfg = config.get("run", {})
    select = run_cfg.get("select") or DEFAULT_SELECT
    if run_cfg.get("threads"):
        torch.set_num_threads(int(run_cfg["threads"]))
    device = session.torch_device()
    rank, world = session.rank, session.world_size
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # [2] Data on the device (resident across trials); speaker-independent split
    resident = Resident(session.cache(), device)
    corpus, utts = resident.corpus(data_cfg["cache"])
    split = speaker_independent_split(
        corpus,
        data_cfg.get("fold", 0),
        data_cfg.get("n_folds"),
        data_cfg.get("label_fraction", 1.0),
        data_cfg.get("label_seed", 0),
        data_cfg.get("cv"),  # fold k of a cross-validated objective (objective.cv)
    )
    n_labels = len(corpus.label_names)
    if cfg.model.n_emotions != n_labels:
        raise ValueError(
            f"model.n_emotions ({cfg.model.n_emotions}) != classes in data ({n_labels})"
        )
    train_idx = np.concatenate([split["train"], split["unlabelled"]])
    train_labels = utts.labels.clone()  # this trial's view: demoted clips lose their labels
    train_labels[torch.as_tensor(split["unlabelled"], device=device)] = UNLABELLED
    extra = None
    if data_cfg.get("unlabelled_cache"):  # a separate unlabelled pool: auxiliary losses only
        extra = resident.corpus(data_cfg["unlabelled_cache"])[1]
    n_extra = 0 if extra is None else len(extra)
    train_idx_t = torch.from_numpy(train_idx).to(device)
    n_train = len(train_idx) + n_extra

    # [3] Model, augmentation bank, optimiser; resume
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    bank = AugmentationBank(
        cfg.aug,
        cfg.features,
        resident.noise_bank(data_cfg.get("noise_files") or [], cfg.features.sample_rate),
    ).to(device)
    windowing = windowing_for(cfg)
    core = MTLAugModel(cfg.model, cfg.features.n_mels).to(device)
    optimizer = torch.optim.AdamW(
        core.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    start_epoch = 0
    best: dict[str, Any] = {"epoch": None, "value": None, "metrics": {}, "state": None}
    ckpt = session.get_checkpoint_dir()
    if ckpt:
        state = load_state(ckpt)
        core.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        best.update(json.loads(state["best"]))
        best["state"] = load_model(Path(ckpt) / BEST).model.state_dict()
    model = session.wrap_model(core)
    if ckpt and start_epoch >= cfg.optim.epochs:
        # Resumed after the last epoch (the driver died before it recorded the end): report the
        # saved final metrics again so the trial ends with its real result instead of none.
        final = json.loads((Path(ckpt) / "metrics.json").read_text())
        with tempfile.TemporaryDirectory(prefix="sertune-ckpt-") as tmp:
            shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
            session.report(final, tmp if rank == 0 else None)
        return [final]

    # A small corpus gets a smaller batch rather than one step per epoch.
    bs = max(2, min(cfg.optim.batch_size, n_train // (cfg.optim.min_steps_per_epoch * world)))
    steps = max(1, math.ceil(n_train / (bs * world)))
    if run_cfg.get("max_steps_per_epoch"):
        steps = min(steps, int(run_cfg["max_steps_per_epoch"]))
    fwd = forward_fn(model, bank.logmel)
    history: list[dict[str, Any]] = []
    train_time = 0.0

    # [4] Epochs
    for epoch in range(start_epoch, cfg.optim.epochs):
        torch.manual_seed(seed_for(cfg.seed, rank, epoch))  # dropout
        gen = torch.Generator(device=device).manual_seed(seed_for(cfg.seed, rank, epoch))
        order = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(seed_for(cfg.seed, 0, epoch))
        ).to(device)
        model.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # total, emo, aug, rec, n
        t0 = time.perf_counter()
        for step in range(steps):
            session.poll()  # a stopped trial stops here, not at the end of the epoch
            pos = order[(step * world + rank) * bs : (step * world + rank + 1) * bs]
            if pos.numel() < 2:
                pos = order[:bs]
            wav, valid, y = _gather(utts, extra, train_idx_t, train_labels, pos, bank, gen)
            feats, aug_type = bank(wav, gen, valid=valid)  # (B, M, T), (B,)
            out = model(feats)
            losses = mtl_aug_loss(out, y, aug_type, cfg.loss)
            if not torch.isfinite(losses.total):
                raise TrialDiverged(
                    f"loss became {float(losses.total.detach())} at epoch {epoch} step {step} "
                    f"(emo={float(losses.emotion.detach()):.4g}, aug={float(losses.aug.detach()):.4g}, "
                    f"rec={float(losses.reconstruction.detach()):.4g}); lr={cfg.optim.lr}"
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
        model.eval()
        val = evaluate(fwd, utts, split["val"], windowing, n_labels, session)
        noisy = evaluate(
            fwd, utts, split["val"], windowing, n_labels, session, noise_snr_db=NOISY_VAL_SNR_DB
        )
        metrics: dict[str, Any] = {
            "epoch": epoch,
            EPOCHS_DONE: epoch + 1,  # what schedulers and MLflow steps count
            "val_uar": val["uar"],
            "val_war": val["war"],
            "val_f1": val["f1"],
            "val_loss_emo": val["loss_emo"],
            "val_uar_noisy": noisy["uar"],
            "train_loss": float(sums[0]) / n_seen,
            "train_loss_emo": float(sums[1]) / n_seen,
            "train_loss_aug": float(sums[2]) / n_seen,
            "train_loss_rec": float(sums[3]) / n_seen,
            "train_batch": bs,
            "train_samples": int(n_seen),  # summed over every worker
            "train_samples_per_s": n_seen / max(epoch_time, 1e-9),
            "train_time_s": train_time,
            # data load + epochs so far, and when the loop started (bench search)
            "loop_time_s": time.perf_counter() - loop_t0,
            LOOP_STARTED_AT: loop_started_at,
        }
        value = metrics.get(select["metric"], metrics["val_uar"])
        if _better(value, best["value"], select.get("mode", "max")):
            best.update(
                epoch=epoch,
                value=value,
                metrics={k: v for k, v in metrics.items() if k.startswith("val_")},
                state={k: v.detach().cpu().clone() for k, v in core.state_dict().items()},
            )
        metrics[BEST_EPOCH] = best["epoch"]
        if epoch == start_epoch:
            metrics.update(session.placement())

        # [6] Checkpoint (rank 0 writes) and report (every rank calls; rank 0's metrics count)
        with tempfile.TemporaryDirectory(prefix="sertune-ckpt-") as tmp:
            ckpt_dir = None
            if rank == 0:
                save_checkpoint(Path(tmp), model, optimizer, epoch, cfg, best, corpus.label_names)
                if epoch == cfg.optim.epochs - 1:  # the best model, on the test speakers
                    best_model = copy.deepcopy(core)
                    best_model.load_state_dict(best["state"])
                    metrics.update(
                        final_evaluation(
                            best_model, cfg, data_cfg, run_cfg, resident, Path(tmp) / BEST
                        )
                    )
                (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
                ckpt_dir = tmp
            session.report(metrics, ckpt_dir)
        history.append(metrics)
    return history


def evaluate_checkpoint(
    checkpoint_dir: str, data_cfg: dict[str, Any], run_cfg: dict[str, Any], device: str, cache
) -> dict[str, float]:
    """Test and robustness figures of a checkpoint's ``best/`` model (a stopped trial's result)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    predictor = load_model(Path(checkpoint_dir) / BEST)
    model = predictor.model.to(dev)
    return final_evaluation(
        model, predictor.cfg, data_cfg, run_cfg, Resident(cache, dev), Path(checkpoint_dir) / BEST
    )


def _gather(
    utts: Utterances,
    extra: Utterances | None,
    train_idx: torch.Tensor,
    train_labels: torch.Tensor,
    pos: torch.Tensor,
    bank: AugmentationBank,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions in the training pool -> (crops, valid mask, emotion labels or -1)."""
    length = bank.crop_length
    n_main = train_idx.numel()
    if extra is None:
        idx = train_idx[pos]
        wav, valid = utts.crops(idx, length, gen)
        return wav, valid, train_labels[idx]
    in_main = pos < n_main
    wav = torch.zeros(pos.numel(), length, device=utts.device)
    valid = torch.zeros(pos.numel(), length, dtype=torch.bool, device=utts.device)
    y = torch.full((pos.numel(),), UNLABELLED, dtype=torch.long, device=utts.device)
    if bool(in_main.any()):
        idx = train_idx[pos[in_main]]
        wav[in_main], valid[in_main] = utts.crops(idx, length, gen)
        y[in_main] = train_labels[idx]
    if bool((~in_main).any()):
        wav[~in_main], valid[~in_main] = extra.crops(pos[~in_main] - n_main, length, gen)
    return wav, valid, y
