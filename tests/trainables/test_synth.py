"""The synthetic corpus is deterministic and its emotions differ in prosody as documented."""

import numpy as np
import soundfile as sf

from trainables.data.synth import make_speakers, synth_utterance, synthesise_corpus


def test_same_seed_same_bytes(tmp_path):
    a = synthesise_corpus(tmp_path / "a", n_speakers=2, per_class=1, seed=3)
    b = synthesise_corpus(tmp_path / "b", n_speakers=2, per_class=1, seed=3)
    assert a.read_text() == b.read_text()
    for wav in sorted((tmp_path / "a" / "wav").rglob("*.wav")):
        assert wav.read_bytes() == (tmp_path / "b" / wav.relative_to(tmp_path / "a")).read_bytes()


def test_manifest_lists_labelled_and_unlabelled(tmp_path):
    m = synthesise_corpus(tmp_path, n_speakers=2, per_class=2, n_unlabelled=3, seed=0)
    rows = m.read_text().splitlines()
    assert rows[0] == "path,label,speaker,gender" and len(rows) == 1 + 2 * 4 * 2 + 3
    assert sum(1 for r in rows[1:] if r.split(",")[1] == "") == 3
    x, sr = sf.read(tmp_path / rows[1].split(",")[0])
    assert sr == 16000 and 1.0 < len(x) / sr < 4.0


def test_emotions_differ_in_loudness_and_tempo():
    rng = np.random.default_rng(0)
    spk = make_speakers(2, rng)
    rms = {
        e: np.mean(
            [np.sqrt(np.mean(synth_utterance(s, e, rng) ** 2)) for s in spk for _ in range(5)]
        )
        for e in ("angry", "sad")
    }
    dur = {
        e: np.mean([len(synth_utterance(s, e, rng)) for s in spk for _ in range(5)])
        for e in ("angry", "sad")
    }
    assert rms["angry"] > 2 * rms["sad"]
    assert dur["sad"] > dur["angry"]  # slower speech, longer utterances
