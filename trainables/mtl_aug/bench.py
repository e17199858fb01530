"""``sertune bench train``: is the on-device pipeline as fast as the model step it feeds?

(a) ceiling: fwd + bwd + optimiser step on log-mel features already on the device;
(b) pipeline: waveform crops → augmentation bank → log-mel → the same step, all on the device.
The last line printed is ``pipeline/ceiling: 0.NN`` (target on a GPU: >= 0.85, see
docs/architecture.md, "Measured figures").
Both run in the same process, interleaved in rounds, so a noisy machine hurts both alike.

Then (c), :func:`eval_bench`: one small trial (the demo's corpus and model) on the same device,
its epoch time beside its end-of-trial evaluation (test figures, the robustness report on the
test and validation speakers with the full default conditions): ``eval = X.X epochs`` (target:
<= 2).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sertune.trainable import TrainBench
from trainables.common.utterances import Utterances

from .augment import AugmentationBank
from .config import MTLAugConfig
from .model import MTLAugModel, count_parameters, mtl_aug_loss


class _SyntheticSource:
    """Speech-like utterances held on the device, cropped like the real loop does."""

    def __init__(self, n: int, seconds: float, device: torch.device, seed: int = 0):
        from trainables.data.synth import make_speakers, synth_utterance

        rng = np.random.default_rng(seed)
        spk = make_speakers(4, rng)
        emos = ("angry", "happy", "neutral", "sad")
        waves = []
        for i in range(n):
            w = synth_utterance(spk[i % 4], emos[i % 4], rng)
            reps = int(np.ceil(seconds * 16000 / len(w))) + 1
            waves.append(np.tile(w, reps)[: int(seconds * 16000 * 1.2)])
        self.data = Utterances.from_waveforms(waves, device, labels=np.arange(n) % 4)
        self.n = n


def run_bench(
    device: str = "auto",
    batch: int | None = None,
    steps: int = 20,
    rounds: int = 3,
    cfg: MTLAugConfig | None = None,
    log=print,
) -> TrainBench:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    batch = batch or (256 if dev.type == "cuda" else 32)
    cfg = cfg or MTLAugConfig()
    torch.manual_seed(0)
    model = MTLAugModel(cfg.model, cfg.features.n_mels).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    bank = AugmentationBank(cfg.aug, cfg.features).to(dev)
    src = _SyntheticSource(max(64, batch), cfg.features.segment_s, dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    log(
        f"device={dev} batch={batch} model={count_parameters(model) / 1e6:.2f}M params "
        f"segment={cfg.features.segment_s}s n_mels={cfg.features.n_mels} torch={torch.__version__}"
    )

    idx_all = torch.arange(src.n, device=dev)

    def draw() -> tuple[torch.Tensor, torch.Tensor]:
        sel = idx_all[torch.randint(0, src.n, (batch,), generator=gen, device=dev)]
        return src.data.crops(sel, bank.crop_length, gen)[0], src.data.labels[sel]

    def step(feats: torch.Tensor, y: torch.Tensor, aug: torch.Tensor) -> None:
        out = model(feats)
        loss = mtl_aug_loss(out, y, aug, cfg.loss).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    wav, y = draw()
    fixed_feats, fixed_aug = bank(wav, gen)  # features already on the device for (a)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn, n: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return n * batch / (time.perf_counter() - t0)

    def ceiling_step() -> None:
        step(fixed_feats, y, fixed_aug)

    def pipeline_step() -> None:
        w, yy = draw()
        f, a = bank(w, gen)
        step(f, yy, a)

    timed(ceiling_step, 3)  # warm-up (cuDNN autotune, allocator)
    timed(pipeline_step, 3)
    ceil_runs, pipe_runs = [], []
    for r in range(rounds):
        ceil_runs.append(timed(ceiling_step, steps))
        pipe_runs.append(timed(pipeline_step, steps))
        log(
            f"round {r + 1}/{rounds}: ceiling {ceil_runs[-1]:,.0f}/s  pipeline {pipe_runs[-1]:,.0f}/s"
        )
    eval_bench(device=str(dev), log=log)
    return TrainBench(
        float(np.median(ceil_runs)), float(np.median(pipe_runs)), count_parameters(model)
    )


# what the demo search trains (search_spaces/demo.yaml): its corpus, model and the full default
# robustness conditions of mtl_aug.yaml
EVAL_CORPUS = {"n_speakers": 8, "per_class": 10, "n_unlabelled": 64, "seed": 0}
EVAL_PARAMS = {
    "model.conv_channels": [8, 16, 32],
    "model.lstm_hidden": 32,
    "model.attn_dim": 16,
    "features.n_mels": 32,
    "features.segment_s": 1.5,
    "optim.batch_size": 32,
    "optim.lr": 0.003,
}


class _TrialSession:
    """The in-process session a bench trial runs under (``sertune.sessions.LocalSession``'s part
    that ``train`` uses; this layer does not import the control plane): world size 1, the time
    of each report, the kept model of the last epoch."""

    rank, world_size = 0, 1

    def __init__(self, device: torch.device, last_epoch: int):
        self.device, self.last_epoch = device, last_epoch
        self.store: dict[str, Any] = {}  # the corpus stays resident from training to evaluation
        self.stamps: list[float] = []
        self.kept = None  # the last epoch's best/ model (EmotionPredictor)

    def torch_device(self) -> torch.device:
        return self.device

    def cache(self) -> dict[str, Any]:
        return self.store

    def get_checkpoint_dir(self) -> None:
        return None

    def wrap_model(self, model):
        return model

    def poll(self) -> None:
        return None

    def all_reduce_sum(self, t):
        return t

    def placement(self) -> dict[str, str]:
        return {}

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.stamps.append(time.perf_counter())
        if metrics["epoch"] == self.last_epoch and checkpoint_dir:
            from .export import load_model
            from .train import BEST

            self.kept = load_model(Path(checkpoint_dir) / BEST)


def eval_bench(
    device: str = "auto", epochs: int = 3, options: dict[str, Any] | None = None, log=print
) -> dict[str, float]:
    """Seconds of one epoch (training, validation, checkpoint; the median of the epochs after the
    first) and of the end-of-trial evaluation of the kept model (``final_evaluation``, as a
    trial's last epoch runs it), in one small trial in this process, on ``device``. Returns
    ``{"epoch_s", "train_s", "eval_s", "epochs"}``."""
    from trainables.common.robustness import DEFAULTS
    from trainables.data.cache import build_cache, load_cache, speaker_independent_split
    from trainables.data.synth import synthesise_corpus

    from .train import Resident, final_evaluation, train

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    options = {**DEFAULTS, "max_utterances": 400, **(options or {})}
    tmp = Path(tempfile.mkdtemp(prefix="sertune-bench-eval-"))
    try:
        manifest = synthesise_corpus(tmp / "corpus", **EVAL_CORPUS)
        cache = build_cache(
            "manifest", manifest, tmp / "cache", progress=lambda m: None, workers=1,
            executor="process",
        )  # fmt: skip
        split = speaker_independent_split(load_cache(cache), 0)
        session = _TrialSession(dev, epochs - 1)
        data = {"cache": str(cache), "fold": 0}
        t0 = time.perf_counter()
        history = train(
            {"params": {**EVAL_PARAMS, "optim.epochs": epochs}, "data": data, "run": {}}, session
        )
        walls = np.diff([t0, *session.stamps]).tolist()
        trains = np.diff([0.0, *(h["train_time_s"] for h in history)]).tolist()
        model = session.kept.model.to(dev)
        import matplotlib.pyplot  # noqa: F401  loaded once per process (a warm slot), not per trial

        def timed_eval(opts: dict[str, Any], out: str) -> float:
            t1 = time.perf_counter()
            final_evaluation(
                model,
                session.kept.cfg,
                data,
                {"robustness": opts},
                Resident(session.store, dev),
                tmp / out,
            )
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter() - t1

        # robustness.validation: selection (the default) with an objective that reads no
        # val_robust figure (val_uar: the demo's, mtl_aug.yaml's), then validation: all
        eval_s = timed_eval({**options, "validation_metrics": []}, "eval")
        eval_all_s = timed_eval(options, "eval_all")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    epoch_s = statistics.median(walls[1:] or walls)
    train_s = statistics.median(trains[1:] or trains)
    log(
        f"(c) epoch vs end-of-trial evaluation, one small trial on {dev} ({len(split['train'])} "
        f"training, {len(split['val'])} validation, {len(split['test'])} test clips; demo model):"
    )
    log(
        f"    epoch {epoch_s:.2f}s (training {train_s:.2f}s)  |  end-of-trial evaluation "
        f"{eval_s:.2f}s  |  eval = {eval_s / epoch_s:.1f} epochs"
    )
    log(
        f"    (evaluation: test figures + the robustness report on <= "
        f"{options['max_utterances']} test clips: clean, "
        f"{len(options['noises']) * len(options['snrs_db'])} noisy, "
        f"FGSM x{len(options['fgsm_eps'])}, PGD x{len(options['pgd_eps'])} of "
        f"{options['pgd_steps']} steps; robustness.validation: selection, an objective on val_uar)"
    )
    log(
        f"    with robustness.validation: all (every val_robust/* twin too): "
        f"{eval_all_s:.2f}s  |  eval = {eval_all_s / epoch_s:.1f} epochs"
    )
    return {
        "epoch_s": epoch_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "epochs": eval_s / epoch_s,
        "eval_all_s": eval_all_s,
        "epochs_all": eval_all_s / epoch_s,
    }
