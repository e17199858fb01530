"""Tiny self-supervised speech encoders built here (never downloaded): a WavLM, a HuBERT (both
post-norm, as the Base models) and a wav2vec 2.0 (its pre-norm "large" variant: layer-norm
feature encoder, stable layer norm) of 2 layers, hidden size 32, saved with ``save_pretrained``.
The conv front end keeps the standard total stride of 320 samples (50 frames per second)."""

from __future__ import annotations

from pathlib import Path

TINY_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (16, 16, 16),
    "conv_kernel": (10, 8, 4),
    "conv_stride": (5, 8, 8),  # 320 samples per frame, as the real ones
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}


def save_tiny_encoder(out: Path, kind: str = "wavlm", seed: int = 0) -> Path:
    """A tiny ``kind`` encoder (``wavlm`` | ``hubert`` | ``wav2vec2``) saved into ``out``."""
    import torch
    from transformers import AutoModel, HubertConfig, Wav2Vec2Config, WavLMConfig

    torch.manual_seed(seed)
    if kind == "wavlm":
        config = WavLMConfig(**TINY_ENCODER)
    elif kind == "hubert":
        config = HubertConfig(**TINY_ENCODER)
    elif kind == "wav2vec2":
        config = Wav2Vec2Config(
            **TINY_ENCODER, feat_extract_norm="layer", do_stable_layer_norm=True
        )
    else:
        raise ValueError(kind)
    AutoModel.from_config(config).save_pretrained(str(out))
    return Path(out)
