"""Adapters read each corpus's real distributed layout (mimicked with tiny fake trees), and broken
files end up in the data report, never in an exception."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from trainables.data.cache import build_cache, load_cache, speaker_independent_split
from trainables.data.corpora import CorpusError, scan_corpus


def tone(path: Path, seconds=0.6, sr=16000, channels=1, freq=220.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t)
    sf.write(path, np.stack([x] * channels, axis=1) if channels > 1 else x, sr, subtype="PCM_16")


def test_iemocap_layout(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    for s in (1, 2):
        sess = root / f"Session{s}"
        dialog = f"Ses0{s}F_impro01"
        lines = []
        for i, (utt_sp, emo) in enumerate(
            [("F", "ang"), ("M", "exc"), ("F", "neu"), ("M", "sad"), ("F", "fru"), ("M", "hap")]
        ):
            utt = f"{dialog}_{utt_sp}{i:03d}"
            tone(sess / "sentences" / "wav" / dialog / f"{utt}.wav")
            lines.append(f"[{i}.0000 - {i}.9000]\t{utt}\t{emo}\t[2.5000, 2.5000, 2.5000]")
        evald = sess / "dialog" / "EmoEvaluation"
        evald.mkdir(parents=True)
        (evald / f"{dialog}.txt").write_text("% header\n\n" + "\n\n".join(lines) + "\n")
    items, excluded, _ = scan_corpus("iemocap", tmp_path)  # the parent folder works too
    assert len(items) == 10 and excluded == {"fru": 2}
    assert {i.label for i in items} == {"angry", "happy", "neutral", "sad"}  # exc and hap -> happy
    assert {i.group for i in items} == {"Session1", "Session2"}
    assert {i.speaker for i in items} == {"Ses01F", "Ses01M", "Ses02F", "Ses02M"}


def test_msp_improv_layout(tmp_path):
    lines = []
    for spk in ("F01", "M01", "F02"):
        for j, emo in enumerate("AHNSO"):
            stem = f"MSP-IMPROV-S0{j}A-{spk}-P-FM0{j}"
            tone(tmp_path / "Audio" / f"session{int(spk[1:])}" / f"S0{j}A" / "P" / f"{stem}.wav")
            lines.append(f"UTD-IMPROV-S0{j}A-{spk}-P-FM0{j}.avi; {emo}; A:3.0; V:3.0; D:3.0; N:5")
    (tmp_path / "Evalution.txt").write_text("\n".join(lines) + "\n")
    items, excluded, _ = scan_corpus("msp_improv", tmp_path)
    assert len(items) == 12 and excluded == {"O": 3}
    assert {i.group for i in items} == {"session1", "session2"}
    assert {i.speaker for i in items} == {"F01", "M01", "F02"}


def test_emodb_layout(tmp_path):
    for name in ("03a01Wa", "03a01Fa", "08b02Na", "10a05Tb", "11a01Lc", "12a01Ab"):
        tone(tmp_path / "wav" / f"{name}.wav")
    items, excluded, _ = scan_corpus("emodb", tmp_path)
    assert sorted((i.speaker, i.label) for i in items) == [
        ("03", "angry"),
        ("03", "happy"),
        ("08", "neutral"),
        ("10", "sad"),
    ]
    assert excluded == {"L": 1, "A": 1}  # boredom, fear: outside the 4 classes


def test_ravdess_layout(tmp_path):
    for actor in ("01", "02"):
        for emo in ("01", "02", "03", "04", "05"):
            tone(tmp_path / f"Actor_{actor}" / f"03-01-{emo}-01-01-01-{actor}.wav")
        tone(tmp_path / f"Actor_{actor}" / f"03-02-05-01-01-01-{actor}.wav")  # song
    items, excluded, _ = scan_corpus("ravdess", tmp_path)
    assert len(items) == 8
    assert excluded == {"02": 2, "modality03-channel02": 2}  # calm; song
    assert {i.speaker for i in items} == {"Actor_01", "Actor_02"}


def test_crema_d_layout(tmp_path):
    for actor in ("1001", "1002"):
        for emo in ("ANG", "HAP", "NEU", "SAD", "DIS", "FEA"):
            tone(tmp_path / "AudioWAV" / f"{actor}_DFA_{emo}_XX.wav")
    items, excluded, _ = scan_corpus("crema_d", tmp_path)
    assert len(items) == 8 and excluded == {"DIS": 2, "FEA": 2}


def test_manifest_with_unlabelled_rows_and_splits(tmp_path):
    for n in ("a", "b", "c"):
        tone(tmp_path / f"{n}.wav")
    (tmp_path / "manifest.csv").write_text(
        "path,label,speaker,split\na.wav,angry,s1,train\nb.wav,,s2,train\nc.wav,sad,s3,test\n"
    )
    items, _, _ = scan_corpus("manifest", tmp_path)
    assert [i.label for i in items] == ["angry", None, "sad"]
    assert [i.split for i in items] == ["train", "train", "test"]


@pytest.mark.parametrize(
    "corpus, content, match",
    [
        ("iemocap", None, "Session1..Session5"),
        ("emodb", None, "wav/"),
        ("manifest", "file,label\n", "missing column"),
        ("nope", None, "unknown corpus"),
    ],
)
def test_wrong_layouts_say_what_was_expected(tmp_path, corpus, content, match):
    if content:
        (tmp_path / "manifest.csv").write_text(content)
    with pytest.raises(CorpusError, match=match):
        scan_corpus(corpus, tmp_path)


def test_broken_files_yield_a_data_report_not_an_exception(tmp_path):
    rows = ["path,label,speaker"]
    ok = [
        ("ok1", 16000, 1),
        ("ok2", 16000, 1),
        ("stereo", 16000, 2),
        ("sr44k", 44100, 1),
        ("sr8k", 8000, 1),
    ]
    for i, (name, sr, ch) in enumerate(ok):
        tone(tmp_path / f"{name}.wav", sr=sr, channels=ch)
        rows.append(f"{name}.wav,{['angry', 'happy', 'neutral', 'sad', 'sad'][i]},s{i % 3}")
    (tmp_path / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    (tmp_path / "empty.wav").write_bytes(b"")
    sf.write(tmp_path / "zero.wav", np.zeros((0,)), 16000)
    tone(tmp_path / "short.wav", seconds=0.05)
    sf.write(tmp_path / "silent.wav", np.zeros(16000), 16000)
    rows += [
        f"{n}.wav,angry,s1" for n in ("garbage", "empty", "zero", "short", "silent", "missing")
    ]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")

    path = build_cache("manifest", tmp_path, tmp_path / "cache", progress=lambda m: None)
    report = load_cache(path).report
    d = report.to_dict()
    assert d["found"] == 11 and d["used"] == 5
    assert d["resampled"] == 2 and d["downmixed"] == 1
    assert d["skipped_counts"] == {"empty": 1, "silent": 1, "too_short": 1, "unreadable": 3}
    assert any("garbage.wav" in f for f in d["skipped"]["unreadable"])
    assert "skipped 3 unreadable" in report.summary()
    c = load_cache(path)
    assert c.sample_rate == 16000 and c.audio.dtype == np.int16
    sr44 = c.utt_ids.index("sr44k")
    assert abs(int(c.lengths[sr44]) - 0.6 * 16000) <= 2  # resampled to 16 kHz


def test_cache_is_reused_until_the_corpus_changes(tmp_path):
    for n in ("a", "b"):
        tone(tmp_path / f"{n}.wav")
    (tmp_path / "manifest.csv").write_text("path,label,speaker\na.wav,angry,s1\nb.wav,sad,s2\n")
    first = build_cache("manifest", tmp_path, tmp_path / "cache", progress=lambda m: None)
    mtime = (first / "audio.npy").stat().st_mtime_ns
    assert build_cache("manifest", tmp_path, tmp_path / "cache", progress=lambda m: None) == first
    assert (first / "audio.npy").stat().st_mtime_ns == mtime  # not decoded twice
    tone(tmp_path / "b.wav", seconds=0.9)  # an edited file: new fingerprint, new cache
    assert build_cache("manifest", tmp_path, tmp_path / "cache", progress=lambda m: None) != first


def test_splits_are_speaker_independent(synth_corpus):
    c = load_cache(synth_corpus["cache"])
    for fold in range(5):
        s = speaker_independent_split(c, fold)
        groups = {k: {c.groups[i] for i in v} for k, v in s.items() if k != "unlabelled"}
        assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
        assert not groups["val"] & groups["test"]
        assert all(c.labels[s["unlabelled"]] == -1)
    with pytest.raises(ValueError, match="data.fold"):
        speaker_independent_split(c, 9)


def test_label_fraction_keeps_a_speaker_stratified_share_of_training_labels(synth_corpus):
    c = load_cache(synth_corpus["cache"])
    full = speaker_independent_split(c, 0)
    part = speaker_independent_split(c, 0, label_fraction=0.2, label_seed=0)
    assert (part["val"] == full["val"]).all() and (part["test"] == full["test"]).all()
    assert set(part["train"]) | set(part["unlabelled"]) == set(full["train"]) | set(
        full["unlabelled"]
    )
    for spk in {c.speakers[i] for i in full["train"]}:
        n = sum(c.speakers[i] == spk for i in full["train"])
        kept = sum(c.speakers[i] == spk for i in part["train"])
        assert kept == max(1, round(0.2 * n))  # every training speaker keeps its share
    again = speaker_independent_split(c, 0, label_fraction=0.2, label_seed=0)
    assert (again["train"] == part["train"]).all()  # deterministic: same labels for every trial
