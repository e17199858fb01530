"""``sertune bench encoder``: MTL-AUG on a self-supervised encoder, per encoder size and mode.

For each size (``tiny``, ``base``: WavLM Base's config, ``large``: WavLM Large's) a WavLM of that
config is built with random weights (nothing is downloaded: the speed and memory of a model do not
depend on its weights) and saved with ``save_pretrained`` into a temporary folder, then loaded
through the real checkpoint path. For each mode (``frozen``: ``finetune_top: 0``; ``top2``:
``finetune_top: 2``):

* **train step**: waveform -> augmentation -> encoder (bf16 autocast on CUDA) -> the heads, both
  auxiliary losses, backward, AdamW: samples/s on clips of ``--seconds``, median of rounds;
* **peak memory per slot**: the CUDA allocator's peak for that step (a GPU), or the process's
  peak resident set (a CPU, cumulative), and how many such slots fit the device;
* **fixed cost per trial**: building a trial's model from the slot's resident encoder (warm: a
  copy) against loading the checkpoint from disk first (one Train run per trial).

One line per size and mode; every figure is measured here, in this process, on this device.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Hugging Face WavLM configs (the Base and Large checkpoints' config.json), without the weights
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "conv_dim": (16, 16, 16),
        "conv_kernel": (10, 8, 4),
        "conv_stride": (5, 8, 8),
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
    },
    "base": {},  # WavLMConfig()'s defaults are WavLM Base's
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "feat_extract_norm": "layer",
        "do_stable_layer_norm": True,
        "conv_bias": True,
    },
}
MODES = {"frozen": 0, "top2": 2}


def _save(size: str, out: Path) -> Path:
    from transformers import AutoModel, WavLMConfig
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    try:
        AutoModel.from_config(WavLMConfig(**SIZES[size])).save_pretrained(str(out))
    finally:
        hf_logging.enable_progress_bar()
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _measure(
    ckpt: Path, top: int, dev: torch.device, batch: int, seconds: float, steps: int, rounds: int
) -> dict[str, Any]:
    """One size and mode: fixed cost per trial (from disk, then warm), the train step's rate and
    the slot's peak memory."""
    from . import ssl_checkpoint, ssl_encoder
    from .augment import AugmentationBank
    from .config import MTLAugConfig
    from .model import mtl_aug_loss
    from .train import _param_groups, peak_memory_mb

    cfg = MTLAugConfig.from_dict(
        {
            "model.encoder": "ssl",
            "model.ssl.checkpoint": str(ckpt),
            "model.ssl.finetune_top": top,
            "features.segment_s": seconds,
        }
    )
    # fixed cost per trial: from disk (cold: what one Train run per trial pays), then from the
    # slot's resident encoder (warm: a copy)
    slot: dict[str, Any] = {}
    ssl_checkpoint._digest.cache_clear()  # a fresh process hashes the checkpoint again
    t0 = time.perf_counter()
    model = ssl_encoder.build_ssl_model(cfg.model, cfg.features, slot, 0).to(dev)
    _sync(dev)
    cold = time.perf_counter() - t0
    del model
    t0 = time.perf_counter()
    model = ssl_encoder.build_ssl_model(cfg.model, cfg.features, slot, 0).to(dev)
    _sync(dev)
    warm = time.perf_counter() - t0
    bank = AugmentationBank(cfg.aug, cfg.features).to(dev)
    opt = torch.optim.AdamW(_param_groups(model, cfg), lr=1e-4)
    gen = torch.Generator(device=dev).manual_seed(0)
    wav = 0.1 * torch.randn(batch, bank.crop_length, device=dev, generator=gen)
    y = torch.randint(0, cfg.model.n_emotions, (batch,), device=dev, generator=gen)
    model.train()

    def step() -> None:
        wav_aug, target, aug_type = bank.waveforms(wav, gen)
        loss = mtl_aug_loss(model(wav_aug, target), y, aug_type, cfg.loss).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    step()  # warm-up (allocator, kernels)
    step()
    rates = []
    for _ in range(rounds):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        rates.append(steps * batch / (time.perf_counter() - t0))
    return {
        "encoder_params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6,
        "trained_params_m": sum(p.numel() for g in opt.param_groups for p in g["params"]) / 1e6,
        "samples_per_s": statistics.median(rates),
        "peak_mb": peak_memory_mb(dev),
        "cold_s": cold,
        "warm_s": warm,
    }


def run(
    sizes: list[str] | None = None,
    modes: list[str] | None = None,
    device: str = "auto",
    batch: int | None = None,
    seconds: float = 3.0,
    steps: int = 5,
    rounds: int = 3,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    sizes = sizes or (["base", "large"] if dev.type == "cuda" else ["tiny"])
    modes = modes or list(MODES)
    for s in sizes:
        if s not in SIZES:
            raise ValueError(f"--sizes: unknown size {s!r} (known: {', '.join(SIZES)})")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r} (known: {', '.join(MODES)})")
    batch = batch or (16 if dev.type == "cuda" else 2)
    gpu = dev.type == "cuda"
    total_mb = torch.cuda.get_device_properties(dev).total_memory / 2**20 if gpu else None
    log(
        f"device={dev}{' (' + torch.cuda.get_device_name(dev) + ')' if gpu else ''} "
        f"batch={batch} clips of {seconds:g} s, bf16 autocast={'on' if gpu else 'off'}, "
        f"torch={torch.__version__}"
    )
    rows: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="sertune-bench-encoder-"))
    try:
        for size in sizes:
            ckpt = _save(size, tmp / size)
            for mode in modes:
                row = {"size": size, "mode": mode}
                row.update(_measure(ckpt, MODES[mode], dev, batch, seconds, steps, rounds))
                peak = row["peak_mb"]
                row["slots"] = int(0.9 * total_mb // peak) if total_mb and peak > 0 else None
                rows.append(row)
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
                slots = f", {row['slots']} fit 90 % of the GPU" if row["slots"] is not None else ""
                log(
                    f"{size:>5} {mode:>6}: encoder {row['encoder_params_m']:.1f} M params "
                    f"({row['trained_params_m']:.2f} M trained) | train step "
                    f"{row['samples_per_s']:,.1f} samples/s | peak {'GPU' if gpu else 'RSS'} "
                    f"{peak:,.0f} MiB per slot{slots} | fixed cost per trial: warm "
                    f"{row['warm_s']:.2f} s vs from disk {row['cold_s']:.2f} s "
                    f"({row['cold_s'] / max(row['warm_s'], 1e-9):.0f}x)"
                )
            shutil.rmtree(ckpt, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows
