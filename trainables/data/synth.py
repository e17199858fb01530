"""A synthetic emotional-speech corpus: what tests and the demo train on, since real SER corpora are
licensed.

Each utterance is a string of syllables: a glottal pulse train (the voice source) shaped by three
formant resonators (the vowel), with short noise bursts for consonants. Speakers differ in pitch
(a male or female register) and vocal-tract length (formant scale). Emotions differ in prosody the
way acted emotional speech does — pitch level and range, tempo, loudness, voice brightness:

| emotion | pitch level | pitch range | syllables/s | loudness | brightness |
|---------|-------------|-------------|-------------|----------|------------|
| angry   | high        | wide        | fast        | loud     | bright     |
| happy   | high        | widest      | fast        | medium   | medium     |
| neutral | speaker's   | narrow      | medium      | medium   | medium     |
| sad     | low         | flat        | slow        | soft     | dark       |

Per-utterance jitter in every factor makes the classes overlap, and speakers' own registers
overlap the emotion cues, so a model has to hear more than absolute pitch. Deterministic under a
seed. Written as 16 kHz wav files plus ``manifest.csv`` (path,label,speaker,gender) — the
generic manifest adapter reads it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

from .corpora import EMOTIONS_4

SR = 16000


@dataclass(frozen=True)
class Prosody:
    pitch: float  # multiplier on the speaker's base f0
    pitch_range: float  # relative f0 excursion within a syllable
    rate: float  # syllables per second
    loudness: float  # linear amplitude
    brightness: float  # 0 dark .. 1 bright (spectral tilt of the source)


PROSODY = {
    "angry": Prosody(pitch=1.30, pitch_range=0.25, rate=5.5, loudness=0.50, brightness=0.95),
    "happy": Prosody(pitch=1.25, pitch_range=0.45, rate=5.0, loudness=0.32, brightness=0.65),
    "neutral": Prosody(pitch=1.00, pitch_range=0.08, rate=4.0, loudness=0.22, brightness=0.5),
    "sad": Prosody(pitch=0.85, pitch_range=0.04, rate=2.7, loudness=0.10, brightness=0.2),
}

VOWELS = np.array(  # F1, F2, F3 (Hz) of /a e i o u/ for an adult male vocal tract
    [[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410], [300, 870, 2240]],
    dtype=np.float64,
)


@dataclass(frozen=True)
class Speaker:
    name: str
    f0: float  # base pitch (Hz)
    formant_scale: float  # shorter vocal tract -> higher formants
    gender: str = "male"  # "female" or "male": the register, and what speaker folds balance on


def make_speakers(n: int, rng: np.random.Generator) -> list[Speaker]:
    out = []
    for i in range(n):
        female = i % 2 == 1
        f0 = rng.uniform(185, 235) if female else rng.uniform(95, 135)
        scale = rng.uniform(1.1, 1.2) if female else rng.uniform(0.95, 1.05)
        gender = "female" if female else "male"
        out.append(Speaker(f"spk{i:02d}{'F' if female else 'M'}", f0, scale, gender))
    return out


def _resonator(x: np.ndarray, freq: float, bw: float) -> np.ndarray:
    r = np.exp(-np.pi * bw / SR)
    theta = 2 * np.pi * freq / SR
    a = [1.0, -2 * r * np.cos(theta), r * r]
    return lfilter([1.0 - r], a, x)


def synth_utterance(speaker: Speaker, emotion: str, rng: np.random.Generator) -> np.ndarray:
    """One utterance (float32, 16 kHz) of ``speaker`` in ``emotion``; about 1.5–3 s long."""
    p = PROSODY[emotion]
    jit = lambda s: float(np.exp(rng.normal(0.0, s)))  # noqa: E731 - multiplicative jitter
    rate = p.rate * jit(0.12)
    n_syl = int(rng.integers(5, 9))
    f0_base = speaker.f0 * p.pitch * jit(0.06)
    loud = p.loudness * jit(0.25)
    bright = float(np.clip(p.brightness + rng.normal(0, 0.1), 0.05, 1.0))
    pieces = [np.zeros(int(SR * rng.uniform(0.05, 0.15)))]
    for _ in range(n_syl):
        dur = rng.uniform(0.55, 0.95) / rate
        n = int(dur * SR)
        t = np.arange(n) / SR
        # f0 contour: a rise-fall across the syllable scaled by the emotion's range, plus drift
        shape = np.sin(np.pi * t / dur) * rng.uniform(-0.3, 1.0)
        f0 = (
            f0_base
            * (1 + p.pitch_range * shape)
            * (1 + 0.01 * rng.normal(size=n).cumsum() / np.sqrt(n))
        )
        phase = np.cumsum(f0 / SR)
        saw = 2 * (phase % 1.0) - 1.0  # glottal pulse train (bright)
        # spectral tilt: a one-pole low-pass whose cutoff follows brightness
        pole = 0.97 - 0.6 * bright
        source = lfilter([1 - pole], [1, -pole], saw)
        source += 0.02 * rng.normal(size=n)  # aspiration
        formants = VOWELS[rng.integers(len(VOWELS))] * speaker.formant_scale
        voiced = sum(_resonator(source, f, 60 + 0.05 * f) for f in formants)
        env = np.sin(np.pi * np.minimum(1.0, t / dur)) ** 0.6  # syllable envelope
        syl = voiced * env
        syl = syl / (np.abs(syl).max() + 1e-9) * loud * jit(0.15)
        burst = rng.normal(size=int(SR * 0.03)) * loud * 0.15  # consonant
        gap = np.zeros(int(SR * rng.uniform(0.02, 0.12) / (rate / 4)))
        pieces += [burst, syl, gap]
    x = np.concatenate(pieces)
    x += rng.normal(size=x.size) * 1e-3  # recording floor
    return np.clip(x, -0.99, 0.99).astype(np.float32)


def synthesise_corpus(
    out: str | Path,
    n_speakers: int = 8,
    per_class: int = 12,
    n_unlabelled: int = 0,
    seed: int = 0,
) -> Path:
    """Write ``n_speakers × 4 × per_class`` labelled wavs (+ unlabelled ones) and ``manifest.csv``.

    Unlabelled utterances come from the same speakers with a random emotion and an empty label.
    Returns the manifest path. Same seed, same bytes.
    """
    out = Path(out).expanduser()
    rng = np.random.default_rng(seed)
    speakers = make_speakers(n_speakers, rng)
    rows = []
    for spk in speakers:
        d = out / "wav" / spk.name
        d.mkdir(parents=True, exist_ok=True)
        for emo in EMOTIONS_4:
            for k in range(per_class):
                path = d / f"{spk.name}_{emo}_{k:03d}.wav"
                sf.write(path, synth_utterance(spk, emo, rng), SR, subtype="PCM_16")
                rows.append((path.relative_to(out).as_posix(), emo, spk.name, spk.gender))
    for k in range(n_unlabelled):
        spk = speakers[k % len(speakers)]
        emo = EMOTIONS_4[int(rng.integers(4))]
        d = out / "unlabelled" / spk.name
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{spk.name}_u{k:04d}.wav"
        sf.write(path, synth_utterance(spk, emo, rng), SR, subtype="PCM_16")
        rows.append((path.relative_to(out).as_posix(), "", spk.name, spk.gender))
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "speaker", "gender"])
        w.writerows(rows)
    return manifest
