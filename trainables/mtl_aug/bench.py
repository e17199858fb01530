"""``sertune bench train``: is the on-device pipeline as fast as the model step it feeds?

(a) ceiling: fwd + bwd + optimiser step on log-mel features already on the device;
(b) pipeline: waveform crops → augmentation bank → log-mel → the same step, all on the device.
The last line printed is ``pipeline/ceiling: 0.NN`` (target on a GPU: >= 0.85, see
docs/architecture.md, "Measured figures").
Both run in the same process, interleaved in rounds, so a noisy machine hurts both alike.
"""

from __future__ import annotations

import time

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
    return TrainBench(
        float(np.median(ceil_runs)), float(np.median(pipe_runs)), count_parameters(model)
    )
