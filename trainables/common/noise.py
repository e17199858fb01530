"""Additive noise at a target SNR, measured over the speech's own samples.

The literature defines SNR over the utterance, not over a padded window: a 2.2 s clip padded to
3 s with zeros would otherwise get noise ~1.3 dB weaker than its nominal SNR. Both forms here
measure signal and noise power only where the utterance has samples, and add noise only there.
"""

from __future__ import annotations

import torch


def add_noise_at_snr(
    wav: torch.Tensor,
    noise: torch.Tensor,
    snr_db: torch.Tensor,
    valid: torch.Tensor | None = None,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Mix ``noise`` into ``wav`` (both (B, L)) so that 10·log10(P_signal / P_noise) = ``snr_db`` (B,).

    ``valid`` (B, L) bool marks each row's real samples (a padded crop has zeros after them):
    powers are measured there and noise is added only there. Silent rows stay silent.
    """
    if valid is None:
        p_sig = wav.pow(2).mean(dim=-1)
        p_noise = noise.pow(2).mean(dim=-1).clamp_min(eps)
    else:
        noise = noise * valid
        n = valid.sum(dim=-1).clamp_min(1)
        p_sig = (wav * valid).pow(2).sum(dim=-1) / n
        p_noise = noise.pow(2).sum(dim=-1).div(n).clamp_min(eps)
    scale = torch.sqrt(p_sig / (p_noise * torch.pow(10.0, snr_db / 10.0)))
    return wav + noise * scale.unsqueeze(-1)


def add_noise_flat(
    audio: torch.Tensor,
    noise: torch.Tensor,
    owner: torch.Tensor,
    n_utts: int,
    snr_db: float,
    eps: float = 1e-10,
) -> torch.Tensor:
    """The same for utterances stored back to back: ``audio``/``noise`` (T,), ``owner`` (T,) the
    utterance index of each sample. Each utterance gets its own scale from its own samples."""
    ones = torch.ones_like(audio)
    n = torch.zeros(n_utts, device=audio.device).index_add_(0, owner, ones).clamp_min(1)
    p_sig = torch.zeros(n_utts, device=audio.device).index_add_(0, owner, audio.pow(2)) / n
    p_noise = torch.zeros(n_utts, device=audio.device).index_add_(0, owner, noise.pow(2)) / n
    scale = torch.sqrt(p_sig / (p_noise.clamp_min(eps) * 10.0 ** (snr_db / 10.0)))
    return audio + noise * scale[owner]
