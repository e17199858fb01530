"""Each augmentation does what it claims, on the device the tests run on."""

import math

import pytest
import torch

from trainables.mtl_aug.augment import (
    BABBLE,
    CLEAN,
    FILE_NOISE,
    REVERB,
    SPECAUG,
    SPEED,
    WHITE,
    AugmentationBank,
    add_noise_at_snr,
    reverberate,
    spec_augment,
    speed_perturb,
    synthetic_rir,
)
from trainables.mtl_aug.config import AUG_TYPES, AugConfig, FeatureConfig

FEAT = FeatureConfig(n_mels=32, segment_s=1.0)
SEG = 16000


def speechlike(b, n, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.arange(n, device=device) / 16000
    f0 = 100 + 100 * torch.rand(b, 1, generator=g, device=device)
    env = 0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t)
    return 0.2 * torch.sin(2 * math.pi * f0 * t) * env + 0.01 * torch.randn(
        b, n, generator=g, device=device
    )


def snr_db(clean, noisy):
    noise = noisy - clean
    return 10 * torch.log10(clean.pow(2).mean(-1) / noise.pow(2).mean(-1))


def only(kind: str, **kw) -> AugConfig:
    return AugConfig(**{f"p_{t}": (1.0 if t == kind else 0.0) for t in AUG_TYPES}, **kw)


@pytest.mark.parametrize("target", [0.0, 5.0, 10.0, 20.0])
def test_add_noise_hits_target_snr(device, target):
    x = speechlike(16, SEG, device)
    n = torch.randn(16, SEG, device=device)
    y = add_noise_at_snr(x, n, torch.full((16,), target, device=device))
    assert torch.all((snr_db(x, y) - target).abs() < 0.5)


@pytest.mark.parametrize(
    "kind, code", [("white_noise", WHITE), ("babble_noise", BABBLE), ("file_noise", FILE_NOISE)]
)
def test_bank_noise_types_measure_within_half_db(device, kind, code):
    bank_audio = torch.randn(48000, device=device) * 0.1
    aug = only(kind, snr_db_low=7.0, snr_db_high=7.0)
    bank = AugmentationBank(aug, FEAT, noise_bank=bank_audio if kind == "file_noise" else None).to(
        device
    )
    wav = speechlike(8, SEG, device)
    g = torch.Generator(device=device).manual_seed(1)
    types = torch.full((8,), code, device=device)
    noisy = bank.augment_waveform(wav, types, g)
    _, labels = bank(wav, g, types=types)
    assert torch.equal(labels, types)
    measured = snr_db(wav, noisy)
    assert torch.all((measured - 7.0).abs() < 0.5), measured


@pytest.mark.parametrize("factor", [0.8, 0.9, 1.1, 1.25])
def test_speed_changes_length_by_the_factor(device, factor):
    x = speechlike(3, SEG, device)
    y = speed_perturb(x, factor)
    assert y.shape == (3, round(SEG / factor))


def test_speed_shifts_pitch_by_the_factor(device):
    t = torch.arange(SEG, device=device) / 16000
    x = torch.sin(2 * math.pi * 200 * t).unsqueeze(0)
    y = speed_perturb(x, 1.25)
    spec = torch.fft.rfft(y[0]).abs()
    peak_hz = spec.argmax().item() * 16000 / y.shape[-1]
    assert abs(peak_hz - 250) < 5


def test_labels_match_what_was_applied(device):
    aug = AugConfig(speed_factors=(1.25,))  # the default mix: every type but file noise
    bank = AugmentationBank(aug, FEAT).to(device)
    wav = speechlike(64, bank.crop_length, device)
    g = torch.Generator(device=device).manual_seed(3)
    feats, types = bank(wav, g)
    clean_feats = bank.logmel(wav[:, :SEG])
    same = (feats - clean_feats).abs().flatten(1).max(1).values < 1e-4
    assert set(types.tolist()) >= {CLEAN, SPEED, WHITE, BABBLE, SPECAUG, REVERB}
    # clean rows are untouched; every augmented row differs from its clean features
    assert torch.all(same[types == CLEAN])
    assert not torch.any(same[types != CLEAN])


def test_specaugment_masks_only_within_widths(device):
    f = torch.randn(4, 32, 100, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    out = spec_augment(f, freq_width=5, time_width=10, n_masks=1, generator=g)
    changed = out != f
    rows = changed.any(2).sum(1)  # masked mel bands (a time mask touches all bands)
    cols = changed.any(1).sum(1)
    assert torch.all((rows <= 5) | (rows == 32)) and torch.all((cols <= 10) | (cols == 100))


def test_reverb_keeps_level_and_spreads_energy(device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.zeros(2, SEG, device=device)
    x[:, 100] = 1.0  # an impulse
    rir = synthetic_rir(torch.tensor([0.3, 0.6], device=device), 16000, g)
    y = reverberate(x, rir)
    assert torch.allclose(y.pow(2).mean(-1).sqrt(), x.pow(2).mean(-1).sqrt(), rtol=1e-3)
    tail = y[:, 100 + 1600 :].pow(2).sum(-1)  # energy 100 ms after the impulse
    assert tail[1] > tail[0] > 0  # longer rt60, longer tail


def test_bank_is_deterministic_under_a_seed(device):
    bank = AugmentationBank(AugConfig(), FEAT).to(device)
    wav = speechlike(16, bank.crop_length, device)
    runs = []
    for _ in range(2):
        g = torch.Generator(device=device).manual_seed(42)
        runs.append(bank(wav, g))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_file_noise_needs_files():
    with pytest.raises(ValueError, match="noise_files"):
        AugmentationBank(only("file_noise"), FEAT)


def test_every_type_of_the_mix_is_one_registered_function_at_one_stage():
    from trainables.mtl_aug.augment import AUGMENTATIONS, STAGES, augmentation

    assert set(AUGMENTATIONS) == set(AUG_TYPES) - {"clean"}
    assert {a.stage for a in AUGMENTATIONS.values()} == set(STAGES)
    with pytest.raises(ValueError, match="AugConfig has no field p_gain"):
        augmentation("gain", "room")
    with pytest.raises(ValueError, match="stage must be one of"):
        augmentation("reverb", "afterwards")


def test_logmel_is_torchaudios_and_its_own_backward_is_autograds():
    """LogMel equals torchaudio's MelSpectrogram (+ log), and under a gradient its written
    backward (_PowerSpectrum, what the attacks differentiate) gives autograd-through-stft's
    gradient to float rounding; gradcheck in float64 on a small transform."""
    import torchaudio

    from trainables.mtl_aug.augment import LogMel, _PowerSpectrum

    lm = LogMel(FEAT)
    wav = speechlike(3, 16000 + 77, "cpu")  # not a whole number of hops
    ref = torch.log(lm.mel(wav) + 1e-6)
    assert torch.allclose(lm(wav), ref, atol=1e-5)
    w = torch.randn_like(ref)
    x1 = wav.clone().requires_grad_(True)
    (torch.log(lm.mel(x1) + 1e-6) * w).sum().backward()  # torchaudio, autograd through stft
    x2 = wav.clone().requires_grad_(True)
    out = lm(x2)
    assert torch.allclose(out, ref, atol=1e-5)
    (out * w).sum().backward()
    assert x2.grad.abs().max() > 0
    rel = (x1.grad - x2.grad).abs().max() / x1.grad.abs().max()
    assert rel < 1e-4, rel
    assert (x1.grad.sign() == x2.grad.sign()).float().mean() > 0.999  # what FGSM/PGD read
    # the backward itself, exactly, on a small odd-sized transform (n_fft not a multiple of hop)
    for n_fft, hop in ((16, 5), (12, 4)):
        win = torch.hann_window(n_fft, dtype=torch.float64)
        x = torch.randn(2, 41, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda v, n=n_fft, h=hop, wn=win: _PowerSpectrum.apply(v, wn, n, h), (x,)
        )
        stft = torchaudio.functional.spectrogram(
            x.detach(), 0, win, n_fft, hop, n_fft, 2.0, False, center=True, pad_mode="reflect"
        )
        assert torch.allclose(_PowerSpectrum.apply(x.detach(), win, n_fft, hop), stft)
