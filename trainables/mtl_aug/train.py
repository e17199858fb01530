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

import contextlib
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

from sertune.trainable import (
    BEST_EPOCH,
    DATA_MODE,
    EPOCHS_DONE,
    LOOP_STARTED_AT,
    SLOT_NOTE,
    KeptModel,
    TrialDiverged,
)
from trainables.common.batches import TrainBatches
from trainables.common.metrics import confusion, scores
from trainables.common.noise import add_noise_flat
from trainables.common.robustness import (
    clip_logits,
    evaluate_robustness,
    make_noise,
    write_report,
    write_validation_report,
)
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
from .export import forward_fn, load_model, new_model, save_model, takes_waveform, windowing_for
from .model import UNLABELLED, folded_for_evaluation, mtl_aug_loss
from .ssl_encoder import LOADS as ENCODER_LOADS

STATE_FILE = "state.pt"
BEST = "best"
NOISY_VAL_SNR_DB = 10.0
DEFAULT_SELECT = {"metric": "val_uar", "mode": "max"}


def peak_memory_mb(device: torch.device) -> float:
    """This worker's peak memory so far: the CUDA allocator's peak on a GPU, else the process's
    peak resident set (a warm slot is one process: its corpus, model and encoder)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def seed_for(seed: int, rank: int, epoch: int) -> int:
    return (seed * 1_000_003 + rank * 7919 + epoch * 104_729) % (2**31 - 1)


# -- data on the device, resident across the trials of a worker ------------------------------------


class Resident:
    """Corpora and the noise bank on one device, kept in the session's cache across trials.

    A warm slot trains trial after trial on the same data fingerprint: the corpus is decoded,
    copied to the device and indexed once, not once per trial. What a slot keeps is bounded in
    bytes (:func:`trainables.common.placement.slot_budget`): a corpus that fits what is left of
    the budget is resident on the device; one that does not is streamed from the host (its
    memory map shared by every slot of the node), and entries no trial of this Resident uses are
    evicted, oldest first, to make room. ``notes`` says what was decided, and why, for each
    corpus this slot loaded for the first time.
    """

    KEY = "mtl_aug.resident"

    def __init__(self, cache: dict[str, Any], device: torch.device, placement: dict | None = None):
        from trainables.common.placement import slot_budget

        self.cache, self.device = cache, device
        self.options = dict(placement or {})
        self.budget, self.budget_why = slot_budget(device, self.options)
        self.used: set[str] = set()  # entries this trial holds: never evicted under it
        self.notes: list[str] = []
        self.modes: dict[str, str] = {}  # corpus name -> "resident" | "streamed"

    def _store(self) -> dict[str, tuple[Any, int]]:
        return self.cache.setdefault(self.KEY, {})

    def held_bytes(self) -> int:
        return sum(n for _, n in self._store().values())

    def _full(self, key: str) -> str:
        return f"{self.device}|{key}"

    def _get(self, key: str, build):
        store = self._store()
        full = self._full(key)
        if full in store:
            store[full] = store.pop(full)  # most recently used last
        else:
            value, n = build()
            self._make_room(n)
            store[full] = (value, n)
        self.used.add(full)
        return store[full][0]

    def _make_room(self, n: int) -> None:
        store = self._store()
        for k in [k for k in store if k not in self.used]:  # oldest first
            if self.held_bytes() + n <= self.budget:
                break
            store.pop(k)

    def _free_for(self, n: int) -> bool:
        """Would ``n`` more bytes fit the budget once entries no trial here uses are gone?"""
        held = sum(b for k, (_, b) in self._store().items() if k in self.used)
        return held + n <= self.budget

    def corpus(self, path: str) -> tuple[DecodedCorpus, Utterances]:
        kept = self._store().get(self._full(f"corpus:{path}"))
        if kept and not self._still_right(*kept):  # another trial's placement rules here now
            self._store().pop(self._full(f"corpus:{path}"))

        def build():
            c = load_cache(path)
            size = int(c.audio.nbytes)
            mode = self.options.get("corpus_on_device", "auto")
            if mode == "always" or (mode == "auto" and self._free_for(size)):
                why = "corpus_on_device: always" if mode == "always" else (
                    f"{_mb(size)} fits the slot's budget of {_mb(self.budget)}, {self.budget_why}"
                )  # fmt: skip
                utts, n = Utterances.from_corpus(c, self.device), size
            else:
                why = "corpus_on_device: never" if mode == "never" else (
                    f"{_mb(size)} > what is left of the slot's budget of {_mb(self.budget)}, "
                    f"{self.budget_why}"
                )  # fmt: skip
                window = max(min(self.budget // 4, 256 << 20), 1 << 20)
                utts = Utterances.from_corpus(c, self.device, streamed=True, window_bytes=window)
                n = int(c.offsets.nbytes * 3)  # only the per-utterance arrays are on the device
            kind = "streamed from host memory" if utts.streamed else f"resident on {self.device}"
            self.notes.append(f"corpus {c.path.name} ({_mb(size)}) {kind}: {why}")
            return (c, utts), n

        c, utts = self._get(f"corpus:{path}", build)
        self.modes[c.path.name] = "streamed" if utts.streamed else "resident"
        return c, utts

    def _still_right(self, entry: tuple[DecodedCorpus, Utterances], n: int) -> bool:
        mode = self.options.get("corpus_on_device", "auto")
        if mode != "auto":
            return entry[1].streamed == (mode == "never")
        return entry[1].streamed or n <= self.budget

    def noise_bank(self, files: list[str], sample_rate: int) -> torch.Tensor | None:
        if not files:
            return None

        def build():
            bank = torch.from_numpy(np.concatenate([read_audio(f, sample_rate) for f in files]))
            return bank, int(bank.nbytes)

        return self._get(f"noise:{sample_rate}:{'|'.join(files)}", build)

    def mode(self) -> str:
        """What the trial's corpora are, in one word per corpus (recorded on the trial run)."""
        return ", ".join(f"{name} {m}" for name, m in self.modes.items())


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e6:.2f} MB"


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
    trials a scheduler stopped (``MTLAugTrainable.evaluate_checkpoint``).

    The same robustness conditions are also measured on the validation speakers (the trial's own,
    its cross-validation fold's with ``data["cv"]``): ``val_robust/*``, the figures a search may
    select on (``out/robustness_val/robustness.json``); ``robust/*`` are reported only. With
    ``robustness.validation_metrics`` (``robustness.validation: selection``) only the twins the
    search reads are measured, none when it reads none."""
    was_training = model.training
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # the attacks want the input's gradient only: no weight gradients
        p.requires_grad_(False)
    try:
        return _final_evaluation(model, cfg, data_cfg, run_cfg, resident, out)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)


def _final_evaluation(
    model: torch.nn.Module,
    cfg: MTLAugConfig,
    data_cfg: dict[str, Any],
    run_cfg: dict[str, Any],
    resident: Resident,
    out: Path,
) -> dict[str, float]:
    corpus, utts = resident.corpus(data_cfg["cache"])
    split = speaker_independent_split(
        corpus,
        data_cfg.get("fold", 0),
        data_cfg.get("n_folds"),
        cv=data_cfg.get("cv"),
        dealing=data_cfg.get("dealing", "balanced"),  # data.dealing
    )
    windowing = windowing_for(cfg)
    # conv + BatchNorm folded: the report's many passes (a backward per attack step) skip them
    fwd = forward_fn(folded_for_evaluation(model), LogMel(cfg.features).to(resident.device))
    metrics: dict[str, float] = {}
    options = run_cfg.get("robustness")
    test = split["test"]
    cap = (options or {}).get("max_utterances")
    rows = stratified_subset(corpus.labels[test], cap, cfg.seed)
    # when the report reads every test clip, its clean pass (the attacks' gradient pass) is the
    # test pass: the test figures are its clean row, no pass of their own
    whole = bool(options) and len(rows) == len(test)
    if not whole:
        logits = clip_logits(fwd, utts, windowing, test)
        labels = utts.labels[torch.as_tensor(test, device=utts.device)]
        res = scores(confusion(logits.argmax(1), labels, cfg.model.n_emotions).cpu())
        metrics.update({f"test_{k}": v for k, v in res.items()})
    if options:
        pick = test[rows]
        bank = resident.noise_bank(data_cfg.get("noise_files") or [], cfg.features.sample_rate)
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
            bank,
            cross,
            corpus_name=corpus.path.name,
            seed=cfg.seed,
            # no second pass over clips the test pass read
            clean_logits=None if whole else logits[torch.as_tensor(rows, device=logits.device)],
        )
        if whole:
            metrics.update({f"test_{k}": v for k, v in report["clean"].items()})
        write_report(report, out / "robustness", run_cfg.get("title", ""), cfg.model.n_emotions)
        metrics.update(report["metrics"])
        # the selection twins: the same conditions on the validation speakers (no cross corpus);
        # with robustness.validation: selection only those the search reads
        wanted = options.get("validation_metrics")
        if wanted is None or wanted:
            val = split["val"]
            vpick = val[stratified_subset(corpus.labels[val], cap, cfg.seed)]
            vreport = evaluate_robustness(
                fwd,
                utts.select(vpick),
                windowing,
                cfg.model.n_emotions,
                options,
                bank,
                corpus_name=corpus.path.name,
                split="val",
                seed=cfg.seed,
                only=wanted,
            )
            write_validation_report(vreport, out / "robustness_val")
            metrics.update(vreport["metrics"])
    if hasattr(model, "layer_report"):  # an ssl encoder's layer weights, beside the report
        from .ssl_encoder import write_layer_weights

        write_layer_weights(model, out / "robustness", run_cfg.get("title", ""))
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
    """state.pt (resume, weights only, no pickle of objects) and best/ (serve).

    A frozen ssl encoder's weights are not in state.pt (its content hash is: a resume rebuilds
    them from the same checkpoint); best/ holds the whole model, encoder included."""
    core = getattr(model, "module", model)
    weights = core.state_dict()
    frozen = core.frozen_state_keys() if hasattr(core, "frozen_state_keys") else set()
    state = {
        "model": {k: v for k, v in weights.items() if k not in frozen},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "rng": {"torch_cpu": torch.get_rng_state(), "seed": cfg.seed},
        "config": cfg.to_json(),
        "best": json.dumps({k: v for k, v in best.items() if k != "state"}),
    }
    if frozen:
        state["frozen_encoder"] = core.info.get("sha256") or ""
    torch.save(state, directory / STATE_FILE)
    save_model(directory / BEST, core, cfg, label_names, state=best["state"])
    (directory / BEST / "metrics.json").write_text(json.dumps(best["metrics"]))


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
    select = run_cfg.get("select") or DEFAULT_SELECT
    if run_cfg.get("threads"):
        torch.set_num_threads(int(run_cfg["threads"]))
    device = session.torch_device()
    rank, world = session.rank, session.world_size
    if device.type == "cuda":
        torch.cuda.set_device(device)

    # [2] Data on the device (resident across trials); speaker-independent split
    resident = Resident(session.cache(), device, run_cfg.get("data_placement"))
    corpus, utts = resident.corpus(data_cfg["cache"])
    split = speaker_independent_split(
        corpus,
        data_cfg.get("fold", 0),
        data_cfg.get("n_folds"),
        data_cfg.get("label_fraction", 1.0),
        data_cfg.get("label_seed", 0),
        data_cfg.get("cv"),  # fold k of a cross-validated objective (objective.cv)
        data_cfg.get("dealing", "balanced"),  # how speaker groups are dealt (data.dealing)
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
    n_train = len(train_idx) + n_extra

    # [3] Model, augmentation bank, optimiser; resume
    bank = AugmentationBank(
        cfg.aug,
        cfg.features,
        resident.noise_bank(data_cfg.get("noise_files") or [], cfg.features.sample_rate),
    ).to(device)
    windowing = windowing_for(cfg)
    loads = sum(ENCODER_LOADS.values())
    core = new_model(cfg, session.cache()).to(device)  # identical initial weights on every rank
    if sum(ENCODER_LOADS.values()) > loads:  # this slot's first trial on this encoder
        resident.notes.append(f"encoder {cfg.model.ssl.checkpoint} loaded from disk")
    optimizer = torch.optim.AdamW(
        _param_groups(core, cfg), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    on_waveform = takes_waveform(core)
    frozen_copies: dict[str, torch.Tensor] = {}  # a frozen encoder's weights, copied once
    start_epoch = 0
    best: dict[str, Any] = {
        "epoch": None,
        "value": None,
        "metrics": {},
        "state": None,
        "curve": [],  # the select metric per epoch: the kept epoch is chosen on it, smoothed
    }
    states: dict[int, Any] = {}
    ckpt = session.get_checkpoint_dir()
    if ckpt:
        state = load_state(ckpt)
        _load_trained(core, state, ckpt)
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        best.update(json.loads(state["best"]))
        best["state"] = load_model(Path(ckpt) / BEST).model.state_dict()
        states = {int(state["epoch"]): _snapshot(core, frozen_copies)}
        if best["epoch"] is not None:
            states[int(best["epoch"])] = best["state"]
    # the model a trial keeps: the best epoch of its smoothed select curve (KeptModel)
    keeper = KeptModel(select["metric"], select.get("mode", "max"), best["curve"], states)
    val_of: dict[int, dict[str, Any]] = {}  # the val_* figures of the epochs keeper may keep
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
    batches = TrainBatches(utts, extra, train_idx, train_labels, bank.crop_length)
    history: list[dict[str, Any]] = []
    train_time = 0.0

    # [4] Epochs
    for epoch in range(start_epoch, cfg.optim.epochs):
        torch.manual_seed(seed_for(cfg.seed, rank, epoch))  # dropout
        gen = torch.Generator(device=device).manual_seed(seed_for(cfg.seed, rank, epoch))
        order = torch.randperm(
            n_train, generator=torch.Generator().manual_seed(seed_for(cfg.seed, 0, epoch))
        )
        model.train()
        sums = torch.zeros(5, dtype=torch.float64, device=device)  # total, emo, aug, rec, n
        t0 = time.perf_counter()
        steps_pos = [_step_positions(order, step, world, rank, bs) for step in range(steps)]
        # closed however the epoch ends (a stopped trial raises in poll): its loader thread stops
        with contextlib.closing(batches.epoch(steps_pos, seed_for(cfg.seed, rank, epoch))) as it:
            for step in range(steps):
                session.poll()  # a stopped trial stops here, not at the end of the epoch
                wav, valid, y = next(it)
                if on_waveform:  # the encoder takes the augmented waveform; its log-mel is the
                    wav_aug, target, aug_type = bank.waveforms(wav, gen, valid=valid)  # target
                    out = model(wav_aug, target)
                else:
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
                n = y.numel()
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
            # a slot's peak memory so far (bench search: how many slots of a model fit a device)
            "peak_memory_mb": peak_memory_mb(device),
            # data load + epochs so far, and when the loop started (bench search)
            "loop_time_s": time.perf_counter() - loop_t0,
            LOOP_STARTED_AT: loop_started_at,
        }
        value = metrics.get(select["metric"], metrics["val_uar"])
        val_of[epoch] = {k: v for k, v in metrics.items() if k.startswith("val_")}
        kept = keeper.add(value, _snapshot(core, frozen_copies))
        if keeper.epoch != best["epoch"]:
            best.update(epoch=keeper.epoch, metrics=val_of.get(keeper.epoch, best["metrics"]))
        best.update(value=keeper.value, state=kept, curve=keeper.curve)
        val_of = {e: m for e, m in val_of.items() if e in keeper.states}
        metrics[BEST_EPOCH] = best["epoch"]
        if epoch == start_epoch:
            metrics.update(session.placement())
            metrics[DATA_MODE] = resident.mode()  # recorded on the trial run
            if resident.notes:  # this slot's first trial on these corpora: said once
                metrics[SLOT_NOTE] = "; ".join(resident.notes)

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
        model,
        predictor.cfg,
        data_cfg,
        run_cfg,
        Resident(cache, dev, run_cfg.get("data_placement")),
        Path(checkpoint_dir) / BEST,
    )


def _param_groups(core: torch.nn.Module, cfg: MTLAugConfig) -> list[dict[str, Any]]:
    """One group at ``optim.lr``; an ssl model's fine-tuned encoder layers at ``optim.encoder_lr``
    (a frozen encoder's parameters are in no group)."""
    if not hasattr(core, "encoder_parameters"):
        return [{"params": list(core.parameters())}]
    groups = [{"params": core.head_parameters()}]
    if core.encoder_parameters():
        groups.append({"params": core.encoder_parameters(), "lr": cfg.optim.encoder_lr})
    return groups


def _load_trained(core: torch.nn.Module, state: dict[str, Any], ckpt: str) -> None:
    """Load a checkpoint's weights; one without a frozen encoder's keeps the pristine ones, which
    must be those of the encoder it was trained on (the same content hash)."""
    if "frozen_encoder" not in state:
        core.load_state_dict(state["model"])
        return
    have = core.info.get("sha256") if hasattr(core, "info") else None
    if state["frozen_encoder"] != have:
        raise ValueError(
            f"{ckpt}: trained on the encoder of SHA-256 {state['frozen_encoder'][:12]}, but "
            f"model.ssl.checkpoint now holds {str(have)[:12]}: resume with the same checkpoint"
        )
    missing, unexpected = core.load_state_dict(state["model"], strict=False)
    left = set(missing) - core.frozen_state_keys()
    if left or unexpected:
        raise ValueError(
            f"{ckpt}: weights do not fit the model (missing {sorted(left)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )


def _snapshot(core: torch.nn.Module, frozen: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU copy of ``core``'s state that training no longer changes. A frozen encoder's weights
    never change: they are copied once per trial (``frozen``) and shared by every snapshot."""
    keys = core.frozen_state_keys() if hasattr(core, "frozen_state_keys") else ()
    out = {}
    for k, v in core.state_dict().items():
        if k in keys:
            if k not in frozen:
                frozen[k] = v.detach().cpu().clone()
            out[k] = frozen[k]
        else:
            out[k] = v.detach().cpu().clone()
    return out


def _step_positions(
    order: torch.Tensor, step: int, world: int, rank: int, bs: int
) -> torch.Tensor:
    """Rank ``rank``'s pool positions at ``step`` of an epoch in ``order`` (a CPU tensor)."""
    pos = order[(step * world + rank) * bs : (step * world + rank + 1) * bs]
    return order[:bs] if pos.numel() < 2 else pos
