"""The augmentation bank and log-mel features, batched on the training device.

Why on the device (docs/architecture.md, "Measured figures"): augmentation + features on one CPU
thread manage ~500 samples/s while the GPU model step eats ~8,700/s. Every sample of a batch draws one augmentation
type from the mix; that type index is the label of the augmentation-type auxiliary task.

All randomness comes from the ``generator`` argument, so a batch is a pure function of
(waveforms, generator state): deterministic under a seed.

The types are a registry (:data:`AUGMENTATIONS`): each is one function registered with
:func:`augmentation` at one stage of the pipeline, and its share of the mix and its strengths are
fields of :class:`~trainables.mtl_aug.config.AugConfig` (``p_<name>`` and its own). Adding a type is
that function plus its ``p_<name>`` field; the aux head grows with it (append only: the index is
part of a trained model's contract).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio

from trainables.common.noise import add_noise_at_snr

from .config import AUG_TYPES, AugConfig, FeatureConfig

CLEAN, SPEED, WHITE, BABBLE, FILE_NOISE, SPECAUG, REVERB = (
    AUG_TYPES.index(t)
    for t in (
        "clean",
        "speed",
        "white_noise",
        "babble_noise",
        "file_noise",
        "specaugment",
        "reverb",
    )
)


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


def spec_augment_waveform(
    wav: torch.Tensor,
    freq_width: int,
    time_width: int,
    n_masks: int,
    features: FeatureConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """SpecAugment's masks on waveforms (B, L), for encoders that take waveforms (``model.encoder:
    ssl``): each time mask (up to ``time_width`` log-mel frames) silences those hops; each
    frequency mask (up to ``freq_width`` mel bands) removes those bands' frequencies (FFT bins
    between the bands' edges zeroed over the whole clip). The same widths as :func:`spec_augment`
    on the log-mel of the same features."""
    b, n = wav.shape
    dev, hop, m = wav.device, features.hop_length, features.n_mels
    # mel band i spans mel points i..i+2 of n_mels + 2 points evenly spaced from 0 to Nyquist
    mel_max = 2595.0 * math.log10(1.0 + (features.sample_rate / 2) / 700.0)
    edges = 700.0 * (10.0 ** (torch.linspace(0.0, mel_max, m + 2, device=dev) / 2595.0) - 1.0)
    spec = torch.fft.rfft(wav, dim=-1)
    hz = torch.fft.rfftfreq(n, 1.0 / features.sample_rate).to(dev)  # (F,)
    drop = torch.zeros(b, hz.numel(), dtype=torch.bool, device=dev)
    for _ in range(n_masks):
        w = (torch.rand(b, generator=generator, device=dev) * (freq_width + 1)).long().clamp(max=m)
        start = (torch.rand(b, generator=generator, device=dev) * (m - w + 1)).long()
        lo, hi = edges[start], edges[(start + w + 1).clamp(max=m + 1)]
        drop |= (hz >= lo.unsqueeze(1)) & (hz < hi.unsqueeze(1)) & (w > 0).unsqueeze(1)
    out = torch.fft.irfft(spec.masked_fill(drop, 0), n=n, dim=-1)
    frames = n // hop + 1
    ar = torch.arange(n, device=dev).unsqueeze(0)
    for _ in range(n_masks):
        w = (torch.rand(b, generator=generator, device=dev) * (time_width + 1)).long()
        w = w.clamp(max=frames)
        start = (torch.rand(b, generator=generator, device=dev) * (frames - w + 1)).long()
        lo, hi = (start * hop).unsqueeze(1), ((start + w) * hop).unsqueeze(1)
        out = out.masked_fill((ar >= lo) & (ar < hi), 0.0)
    return out


# -- the registry: one function per augmentation type ---------------------------------------------

# The pipeline's stages, in order: resample the crop to one segment, add noise at a drawn SNR,
# put it in a room, then (after log-mel) mask the spectrum.
STAGES = ("resample", "noise", "room", "spectrum")


@dataclass
class Batch:
    """What an augmentation sees: the batch's crops, the segment being built, the valid mask."""

    crops: torch.Tensor  # (B, Lc) input crops (longer than a segment for speed factors < 1)
    out: torch.Tensor  # (B, seg) the augmented waveforms so far (log-mel for "spectrum")
    valid: torch.Tensor | None  # (B, seg) real samples of zero-padded short clips
    valid_crop: torch.Tensor | None  # (B, Lc)
    aug: AugConfig
    generator: torch.Generator
    sample_rate: int
    noise_bank: torch.Tensor
    features: FeatureConfig | None = None


@dataclass(frozen=True)
class Augmentation:
    """One type: at ``stage``, ``apply(batch, rows)`` changes ``batch.out[rows]`` (the "noise"
    stage returns the noise for those rows instead; the stage mixes it in at the SNR).

    A "spectrum" type may also have ``on_waveform`` (:func:`waveform_variant`): its equivalent on
    the augmented waveform, for an encoder that takes waveforms (``model.encoder: ssl``)."""

    name: str
    stage: str
    apply: Callable[[Batch, torch.Tensor], torch.Tensor | None]
    on_waveform: Callable[[Batch, torch.Tensor], None] | None = None


AUGMENTATIONS: dict[str, Augmentation] = {}


def augmentation(name: str, stage: str):
    """Register ``fn`` as augmentation type ``name`` (``AugConfig.p_<name>`` is its share)."""
    if name not in AUG_TYPES:
        raise ValueError(f"augmentation {name!r}: AugConfig has no field p_{name}")
    if stage not in STAGES:
        raise ValueError(f"augmentation {name!r}: stage must be one of {STAGES}, got {stage!r}")

    def register(fn):
        AUGMENTATIONS[name] = Augmentation(name, stage, fn)
        return fn

    return register


def waveform_variant(name: str):
    """Register ``fn`` as spectrum-stage type ``name``'s equivalent on waveforms."""

    def register(fn):
        aug = AUGMENTATIONS[name]
        if aug.stage != "spectrum":
            raise ValueError(f"augmentation {name!r}: only spectrum types need a waveform variant")
        AUGMENTATIONS[name] = dataclasses.replace(aug, on_waveform=fn)
        return fn

    return register


@augmentation("speed", "resample")
def _speed(b: Batch, rows: torch.Tensor) -> None:
    """Groups of one factor, resampled together, then cut to one segment."""
    a, dev, seg = b.aug, b.crops.device, b.out.shape[-1]
    pick = torch.rand(b.crops.shape[0], generator=b.generator, device=dev) * len(a.speed_factors)
    pick = pick.long().clamp(max=len(a.speed_factors) - 1)
    is_speed = torch.zeros(b.crops.shape[0], dtype=torch.bool, device=dev)
    is_speed[rows] = True
    for i, fac in enumerate(a.speed_factors):
        group = torch.nonzero(is_speed & (pick == i)).squeeze(1)
        if group.numel():
            fast = speed_perturb(b.crops[group], fac)
            if fast.shape[-1] < seg:
                fast = F.pad(fast, (0, seg - fast.shape[-1]))
            b.out[group] = fast[:, :seg]
            if b.valid is not None:  # the clip's real samples move with the speed
                n_real = b.valid_crop[group].sum(-1).float().div(fac).round().long()
                b.valid[group] = torch.arange(seg, device=dev) < n_real.unsqueeze(1)


@augmentation("white_noise", "noise")
def _white(b: Batch, rows: torch.Tensor) -> torch.Tensor:
    return torch.randn(rows.numel(), b.out.shape[-1], generator=b.generator, device=b.out.device)


@augmentation("babble_noise", "noise")
def _babble(b: Batch, rows: torch.Tensor) -> torch.Tensor:
    """Other utterances of the batch summed (white noise for a batch of one)."""
    seg = b.out.shape[-1]
    if b.crops.shape[0] <= 1:
        return torch.randn_like(b.out[rows])
    babble = torch.zeros_like(b.out)
    for k in range(1, b.aug.babble_speakers + 1):
        babble += torch.roll(b.crops[:, :seg], shifts=k, dims=0)
    return babble[rows]


@augmentation("file_noise", "noise")
def _file_noise(b: Batch, rows: torch.Tensor) -> torch.Tensor:
    """Random spans of the noise files (``data.noise_files``)."""
    seg, dev = b.out.shape[-1], b.out.device
    span = max(1, b.noise_bank.numel() - seg)
    starts = (torch.rand(rows.numel(), generator=b.generator, device=dev) * span).long()
    idx = (starts.unsqueeze(1) + torch.arange(seg, device=dev)) % b.noise_bank.numel()
    return b.noise_bank[idx]


@augmentation("reverb", "room")
def _reverb(b: Batch, rows: torch.Tensor) -> None:
    """Synthetic room impulse responses of an RT60 drawn per sample."""
    a = b.aug
    rt60 = a.rt60_low + (a.rt60_high - a.rt60_low) * torch.rand(
        rows.numel(), generator=b.generator, device=b.out.device
    )
    b.out[rows] = reverberate(b.out[rows], synthetic_rir(rt60, b.sample_rate, b.generator))


@augmentation("specaugment", "spectrum")
def _specaugment(b: Batch, rows: torch.Tensor) -> None:
    a = b.aug
    b.out[rows] = spec_augment(
        b.out[rows], a.specaug_freq_width, a.specaug_time_width, a.specaug_masks, b.generator
    )


@waveform_variant("specaugment")
def _specaugment_waveform(b: Batch, rows: torch.Tensor) -> None:
    a = b.aug
    b.out[rows] = spec_augment_waveform(
        b.out[rows],
        a.specaug_freq_width,
        a.specaug_time_width,
        a.specaug_masks,
        b.features,
        b.generator,
    )


# "clean" has no function: its rows keep the first segment of their crop.
_MISSING = [t for t in AUG_TYPES if t != "clean" and t not in AUGMENTATIONS]
if _MISSING:
    raise ImportError(
        f"AugConfig has p_{_MISSING[0]} but no @augmentation({_MISSING[0]!r}) function"
    )


# -- the bank ----------------------------------------------------------------------------------


class _PowerSpectrum(torch.autograd.Function):
    """|STFT|² (B, n_fft // 2 + 1, T) of waveforms (B, L) — ``torch.stft``'s centred,
    reflect-padded, one-sided transform with ``window`` (length n_fft) — with a backward pass
    written for it: what the robustness report's attacks differentiate, 5 times per report.

    Autograd through ``torch.stft`` runs a complex-to-complex FFT and an ``index_add`` over every
    frame sample; here the gradient of |X|² is one inverse real FFT of g·X (the DC and Nyquist
    bins doubled: they appear once in the one-sided spectrum, the others twice), the frames'
    gradients overlap-added by ceil(n_fft / hop) shifted slice sums, and the reflect padding folded
    back. Same values forward (the same operations), the same gradient to float rounding
    (``tests/trainables/test_augment.py`` checks both, and ``gradcheck`` in float64); measured
    on the demo model, a gradient pass over the test windows is about 1.5x faster.
    """

    @staticmethod
    def forward(ctx, wav: torch.Tensor, window: torch.Tensor, n_fft: int, hop: int):
        pad = n_fft // 2
        padded = F.pad(wav.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        z = torch.fft.rfft(padded.unfold(-1, n_fft, hop) * window, n=n_fft)  # (B, T, K)
        ctx.save_for_backward(z, window)
        ctx.meta = (wav.shape[-1], n_fft, hop)
        return (z.real.square() + z.imag.square()).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, window = ctx.saved_tensors
        length, n_fft, hop = ctx.meta
        y = grad.transpose(1, 2) * z  # dL/dx_n = 2·Re(sum_k g_k X_k e^{2πikn/N}) · w_n
        y[..., 0] *= 2
        if n_fft % 2 == 0:
            y[..., -1] *= 2
        frames = torch.fft.irfft(y, n=n_fft) * (n_fft * window)  # (B, T, n_fft)
        b, t, _ = frames.shape
        r = -(-n_fft // hop)  # frames overlapping one hop
        frames = F.pad(frames, (0, r * hop - n_fft)).view(b, t, r, hop)
        acc = frames.new_zeros(b, t + r - 1, hop)
        for k in range(r):
            acc[:, k : k + t] += frames[:, :, k]
        pad = n_fft // 2
        padded = acc.view(b, -1)[:, : length + 2 * pad]  # the last frame may end before:
        padded = F.pad(padded, (0, length + 2 * pad - padded.shape[1]))  # zero gradient there
        gx = padded[:, pad : pad + length].clone()
        gx[:, 1 : pad + 1] += padded[:, :pad].flip(-1)  # reflect padding: x[pad-i] at i
        gx[:, length - 1 - pad : length - 1] += padded[:, pad + length :].flip(-1)
        return gx, None, None, None


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
        sp = self.mel.spectrogram
        # the configurations _PowerSpectrum is written for (ours: centred, reflect, one-sided)
        self._own_backward = (
            sp.center and sp.pad_mode == "reflect" and sp.onesided and not sp.normalized
            and sp.pad == 0 and sp.win_length == sp.n_fft
        )  # fmt: skip

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        # ``self.mel(wav)``, with the power spectrum as re² + im² of the complex STFT instead of
        # torchaudio's ``|z|.pow(2)`` (a square root and a square per bin: a quarter of the
        # transform's time on a CPU; equal up to float rounding)
        sp = self.mel.spectrogram
        if wav.requires_grad and torch.is_grad_enabled() and self._own_backward and wav.dim() == 2:
            power = _PowerSpectrum.apply(wav, sp.window, sp.n_fft, sp.hop_length)
            return torch.log(self.mel.mel_scale(power) + 1e-6)
        z = torchaudio.functional.spectrogram(
            wav, sp.pad, sp.window, sp.n_fft, sp.hop_length, sp.win_length, None,
            sp.normalized, center=sp.center, pad_mode=sp.pad_mode, onesided=sp.onesided,
        )  # fmt: skip
        return torch.log(self.mel.mel_scale(z.real.square() + z.imag.square()) + 1e-6)


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
        self.features = features
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
        b = self._batch(wav, generator, valid)
        b.out = self.logmel(self._wave(b, types))  # (B, M, T)
        self._stage("spectrum", b, types)
        return b.out, types

    def waveforms(
        self,
        wav: torch.Tensor,
        generator: torch.Generator,
        types: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For an encoder on waveforms: ``(augmented waveform (B, segment), its log-mel (B, M, T):
        the reconstruction target, aug_type (B,))``. Spectrum-stage types act on the waveform
        (SpecAugment: :func:`spec_augment_waveform`)."""
        if types is None:
            types = self.sample_types(wav.shape[0], generator)
        b = self._batch(wav, generator, valid)
        self._wave(b, types)
        for aug in AUGMENTATIONS.values():
            if aug.stage == "spectrum":
                rows = self._rows(aug.name, types)
                if rows.numel():
                    if aug.on_waveform is None:
                        raise ValueError(
                            f"aug.p_{aug.name} > 0: {aug.name} acts on the spectrum and has no "
                            "waveform variant for an encoder on waveforms (model.encoder: ssl)"
                        )
                    aug.on_waveform(b, rows)
        return b.out, self.logmel(b.out), types

    def augment_waveform(
        self,
        wav: torch.Tensor,
        types: torch.Tensor,
        generator: torch.Generator,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The waveform-domain part: (B, Lc) crops -> (B, segment) augmented waveforms."""
        return self._wave(self._batch(wav, generator, valid), types)

    def _batch(self, wav, generator, valid) -> Batch:
        seg = self.segment
        # every type but speed builds on the first segment of its crop
        return Batch(
            crops=wav,
            out=wav[:, :seg].clone(),
            valid=valid[:, :seg].clone() if valid is not None else None,
            valid_crop=valid,
            aug=self.aug,
            generator=generator,
            sample_rate=self.sample_rate,
            noise_bank=self.noise_bank,
            features=self.features,
        )

    def _rows(self, name: str, types: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(types == AUG_TYPES.index(name)).squeeze(1)

    def _stage(self, stage: str, b: Batch, types: torch.Tensor) -> None:
        for aug in AUGMENTATIONS.values():
            if aug.stage == stage:
                rows = self._rows(aug.name, types)
                if rows.numel():
                    aug.apply(b, rows)

    def _wave(self, b: Batch, types: torch.Tensor) -> torch.Tensor:
        self._stage("resample", b, types)
        # noise: every noise type at an SNR drawn per sample, over each clip's own samples
        a, n = self.aug, b.out.shape[0]
        snr = a.snr_db_low + (a.snr_db_high - a.snr_db_low) * torch.rand(
            n, generator=b.generator, device=b.out.device
        )
        noise = torch.zeros_like(b.out)
        noisy = torch.zeros(n, dtype=torch.bool, device=b.out.device)
        for aug in AUGMENTATIONS.values():
            if aug.stage == "noise":
                rows = self._rows(aug.name, types)
                if rows.numel():
                    noise[rows] = aug.apply(b, rows)
                    noisy[rows] = True
        if bool(noisy.any()):
            v = None if b.valid is None else b.valid[noisy]
            b.out[noisy] = add_noise_at_snr(b.out[noisy], noise[noisy], snr[noisy], v)
        self._stage("room", b, types)
        return b.out
