"""The augmentation bank and log-mel features, batched on the training device.

Why on the device (docs/architecture.md, "Measured figures"): augmentation + features on one CPU
thread manage ~500 samples/s while the GPU model step eats ~8,700/s. Every sample of a batch draws one augmentation
type from the mix; that type index is the label of the augmentation-type auxiliary task.

All randomness comes from the ``generator`` argument, so a batch is a pure function of
(waveforms, generator state): deterministic under a seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio

from trainables.common.noise import add_noise_at_snr

from .config import AUG_TYPES, AugConfig, FeatureConfig

CLEAN, SPEED, WHITE, BABBLE, FILE_NOISE, SPECAUG, REVERB = range(len(AUG_TYPES))


# -- primitives: each does one thing and is tested on its own --------------------------------


def speed_perturb(wav: torch.Tensor, factor: float) -> torch.Tensor:
    """Play ``wav`` (B, L) ``factor`` times faster: the output has round(L / factor) samples.

    Like sox ``speed``: tempo and pitch change together (linear-interpolation resampling).
    """
    n_out = max(1, round(wav.shape[-1] / factor))
    return F.interpolate(wav.unsqueeze(1), size=n_out, mode="linear", align_corners=False).squeeze(
        1
    )


def synthetic_rir(
    rt60: torch.Tensor, sample_rate: int, generator: torch.Generator, max_s: float = 1.0
) -> torch.Tensor:
    """Exponentially decaying noise room impulse responses, one per rt60 (B,) -> (B, R).

    Energy falls 60 dB over rt60 seconds; tap 0 is the direct path. Unit energy.
    """
    n = int(min(max_s, float(rt60.max())) * sample_rate) + 1
    t = torch.arange(n, device=rt60.device, dtype=torch.float32) / sample_rate
    decay = torch.exp(-6.9078 * t.unsqueeze(0) / rt60.unsqueeze(1))  # (B, R): ln(1000) = 6.9078
    taps = torch.randn(rt60.shape[0], n, generator=generator, device=rt60.device) * decay
    taps[:, 0] = 1.0
    return taps / taps.norm(dim=1, keepdim=True)


def reverberate(wav: torch.Tensor, rir: torch.Tensor) -> torch.Tensor:
    """Convolve (B, L) with (B, R) through the FFT, keep the first L samples and the input RMS."""
    n = wav.shape[-1] + rir.shape[-1] - 1
    n_fft = 1 << (n - 1).bit_length()
    out = torch.fft.irfft(torch.fft.rfft(wav, n_fft) * torch.fft.rfft(rir, n_fft), n_fft)
    out = out[..., : wav.shape[-1]]
    rms_in = wav.pow(2).mean(-1, keepdim=True).sqrt()
    rms_out = out.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8)
    return out * (rms_in / rms_out)


def spec_augment(
    feats: torch.Tensor, freq_width: int, time_width: int, n_masks: int, generator: torch.Generator
) -> torch.Tensor:
    """SpecAugment on (B, M, T): ``n_masks`` frequency and time masks, filled with each row's mean."""
    b, m, t = feats.shape
    dev = feats.device
    keep = torch.ones(b, m, t, dtype=torch.bool, device=dev)
    for size, width, axis in ((m, freq_width, 1), (t, time_width, 2)):
        ar = torch.arange(size, device=dev).unsqueeze(0)  # (1, size)
        for _ in range(n_masks):
            w = (
                (torch.rand(b, generator=generator, device=dev) * (width + 1))
                .long()
                .clamp(max=size)
            )
            start = (torch.rand(b, generator=generator, device=dev) * (size - w + 1)).long()
            hit = (ar >= start.unsqueeze(1)) & (ar < (start + w).unsqueeze(1))  # (B, size)
            keep &= ~(hit.unsqueeze(2) if axis == 1 else hit.unsqueeze(1))
    fill = feats.mean(dim=(1, 2), keepdim=True)
    return torch.where(keep, feats, fill)


# -- the bank ----------------------------------------------------------------------------------


class LogMel(torch.nn.Module):
    """Waveform (B, L) -> log-mel (B, n_mels, T), T = 1 + L // hop."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            n_mels=cfg.n_mels,
            power=2.0,
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(wav) + 1e-6)


class AugmentationBank(torch.nn.Module):
    """Draw an augmentation type per sample from the mix, apply it, return features and labels.

    ``forward(wav)`` takes crops (B, Lc) that may be longer than one segment (speed perturbation
    needs the extra input for factors < 1) and returns ``(log-mel (B, M, T), aug_type (B,))`` of
    exactly one segment each.
    """

    def __init__(
        self,
        aug: AugConfig,
        features: FeatureConfig,
        noise_bank: torch.Tensor | None = None,
    ):
        super().__init__()
        self.aug = aug
        self.sample_rate = features.sample_rate
        self.segment = int(round(features.segment_s * features.sample_rate))
        self.logmel = LogMel(features)
        mix = aug.mix()
        if mix["file_noise"] > 0 and (noise_bank is None or noise_bank.numel() == 0):
            raise ValueError(
                "aug.p_file_noise > 0 but no noise files were given (data.noise_files)"
            )
        self.register_buffer("probs", torch.tensor([mix[t] for t in AUG_TYPES]), persistent=False)
        self.register_buffer(
            "noise_bank",
            noise_bank if noise_bank is not None else torch.zeros(0),
            persistent=False,
        )

    @property
    def crop_length(self) -> int:
        """Input samples needed so every speed factor still fills one segment."""
        return int(math.ceil(self.segment * max(1.0, max(self.aug.speed_factors))))

    def sample_types(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.probs.expand(n, -1), 1, generator=generator).squeeze(1)

    def forward(
        self,
        wav: torch.Tensor,
        generator: torch.Generator,
        types: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``valid`` (B, Lc) marks real samples of zero-padded short clips (noise goes there)."""
        if types is None:
            types = self.sample_types(wav.shape[0], generator)
        feats = self.logmel(self.augment_waveform(wav, types, generator, valid))  # (B, M, T)
        is_spec = types == SPECAUG
        if bool(is_spec.any()):
            a = self.aug
            feats[is_spec] = spec_augment(
                feats[is_spec],
                a.specaug_freq_width,
                a.specaug_time_width,
                a.specaug_masks,
                generator,
            )
        return feats, types

    def augment_waveform(
        self,
        wav: torch.Tensor,
        types: torch.Tensor,
        generator: torch.Generator,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The waveform-domain part: (B, Lc) crops -> (B, segment) augmented waveforms."""
        a, dev = self.aug, wav.device
        b = wav.shape[0]
        seg = self.segment
        out = wav[:, :seg].clone()  # (B, seg): every type but speed uses the first segment
        valid_crop = valid
        valid = valid[:, :seg].clone() if valid is not None else None

        # Speed: groups of one factor, resampled together, then cut to one segment.
        is_speed = types == SPEED
        if bool(is_speed.any()):
            factors = torch.tensor(a.speed_factors, device=dev)
            pick = (torch.rand(b, generator=generator, device=dev) * len(factors)).long()
            pick = pick.clamp(max=len(factors) - 1)
            for i, fac in enumerate(a.speed_factors):
                rows = torch.nonzero(is_speed & (pick == i)).squeeze(1)
                if rows.numel():
                    fast = speed_perturb(wav[rows], fac)
                    if fast.shape[-1] < seg:
                        fast = F.pad(fast, (0, seg - fast.shape[-1]))
                    out[rows] = fast[:, :seg]
                    if valid is not None:  # the clip's real samples move with the speed
                        n_real = valid_crop[rows].sum(-1).float().div(fac).round().long()
                        valid[rows] = torch.arange(seg, device=dev) < n_real.unsqueeze(1)

        # Additive noise (white, babble, file) at a per-sample SNR.
        snr = a.snr_db_low + (a.snr_db_high - a.snr_db_low) * torch.rand(
            b, generator=generator, device=dev
        )
        noise = torch.zeros_like(out)
        is_white = types == WHITE
        noise[is_white] = torch.randn(int(is_white.sum()), seg, generator=generator, device=dev)
        is_babble = types == BABBLE
        if bool(is_babble.any()):
            babble = torch.zeros_like(out)
            for k in range(1, a.babble_speakers + 1):
                babble += torch.roll(wav[:, :seg], shifts=k, dims=0)  # other utterances
            noise[is_babble] = babble[is_babble] if b > 1 else torch.randn_like(out[is_babble])
        is_file = types == FILE_NOISE
        if bool(is_file.any()):
            n_file = int(is_file.sum())
            span = max(1, self.noise_bank.numel() - seg)
            starts = (torch.rand(n_file, generator=generator, device=dev) * span).long()
            idx = (starts.unsqueeze(1) + torch.arange(seg, device=dev)) % self.noise_bank.numel()
            noise[is_file] = self.noise_bank[idx]
        noisy = is_white | is_babble | is_file
        if bool(noisy.any()):  # SNR over each clip's own samples, not its padding
            out[noisy] = add_noise_at_snr(
                out[noisy], noise[noisy], snr[noisy], None if valid is None else valid[noisy]
            )

        # Reverb: synthetic room impulse responses.
        is_rev = types == REVERB
        if bool(is_rev.any()):
            n_rev = int(is_rev.sum())
            rt60 = a.rt60_low + (a.rt60_high - a.rt60_low) * torch.rand(
                n_rev, generator=generator, device=dev
            )
            out[is_rev] = reverberate(
                out[is_rev], synthetic_rir(rt60, self.sample_rate, generator)
            )
        return out
