"""On a trained model, accuracy falls as the SNR drops and as the adversarial budget grows; the
served model sees clips exactly as the report does; SNR is measured over the clip's own samples."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from sertune.sessions import LocalSession
from trainables.common.noise import add_noise_flat
from trainables.common.robustness import evaluate_robustness, make_noise, write_report
from trainables.common.utterances import Utterances, Windowing, stratified_subset
from trainables.data.cache import build_cache, load_cache, speaker_independent_split
from trainables.mtl_aug.export import load_model
from trainables.mtl_aug.train import train
from trainables.mtl_aug.trainable import TRAINABLE

PARAMS = {
    "model.conv_channels": [8, 16, 32],
    "model.lstm_hidden": 32,
    "model.attn_dim": 16,
    "features.n_mels": 32,
    "features.segment_s": 1.5,
    "optim.epochs": 8,
    "optim.batch_size": 32,
    "optim.lr": 3e-3,
    "aug.p_white_noise": 0.0,
    "aug.p_babble_noise": 0.0,
}


@pytest.fixture(scope="module")
def trained(synth_corpus, tmp_path_factory):
    """A model trained on the synthetic corpus; its best epoch's saved model (``best/``)."""
    out = tmp_path_factory.mktemp("trained")
    cfg = {
        "params": PARAMS,
        "data": {"cache": str(synth_corpus["cache"]), "fold": 0},
        "run": {"device": "cpu", "threads": 2},
    }
    train(cfg, LocalSession(device="cpu", keep_checkpoints=str(out)))
    model_dir = out / "epoch_0007" / "best"
    return load_model(model_dir), model_dir, load_cache(synth_corpus["cache"])


def test_uar_falls_with_snr_and_epsilon(trained, tmp_path):
    predictor, _, corpus = trained
    test = speaker_independent_split(corpus, 0)["test"]
    utts = Utterances.from_corpus(corpus, torch.device("cpu")).select(test)
    options = {
        "snrs_db": [30, 10, 0, -10],
        "noises": ["white", "babble"],
        "fgsm_eps": [0.0005, 0.002, 0.01, 0.05],
        "pgd_eps": [0.002],
        "pgd_steps": 3,
    }
    report = evaluate_robustness(predictor.forward, utts, predictor.windowing, 4, options)
    clean = report["clean"]["uar"]
    assert clean >= 0.6, report["clean"]
    for kind in ("white", "babble"):
        by_snr = [r["uar"] for r in report["noise"] if r["type"] == kind]  # 30, 10, 0, -10 dB
        print(kind, [round(u, 3) for u in by_snr])
        assert by_snr[0] - by_snr[-1] >= 0.15  # clearly worse at -10 dB than at 30 dB
        assert all(b <= a + 0.05 for a, b in zip(by_snr, by_snr[1:], strict=False))
    fgsm = [r["uar"] for r in report["adversarial"] if r["attack"] == "fgsm"]
    print("fgsm", [round(u, 3) for u in fgsm])
    assert clean - fgsm[-1] >= 0.25
    pgd = [r for r in report["adversarial"] if r["attack"] == "pgd"][0]["uar"]
    assert pgd <= fgsm[1] + 0.05  # the iterative attack is at least as strong at the same ε

    write_report(report, tmp_path, title="trial abc", n_classes=4)
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["schema"] == "sertune.robustness/1"
    assert saved["metrics"]["robust/uar_snr10_white"] == pytest.approx(report["noise"][1]["uar"])
    for f in ("uar_vs_snr.png", "uar_vs_eps.png", "summary.md"):
        assert (tmp_path / f).stat().st_size > 0
    assert "chance is 0.250" in (tmp_path / "summary.md").read_text()


def test_cross_corpus_entries(trained):
    predictor, _, corpus = trained
    idx = np.nonzero(corpus.labels >= 0)[0][:12]
    utts = Utterances.from_corpus(corpus, torch.device("cpu")).select(idx)
    report = evaluate_robustness(
        predictor.forward,
        utts,
        predictor.windowing,
        4,
        {"noises": [], "fgsm_eps": [], "pgd_eps": []},
        cross=[("other", utts)],
    )
    assert report["cross_corpus"][0]["name"] == "other"
    assert report["metrics"]["robust/uar_cross_other"] == report["clean"]["uar"]


def test_fgsm_rising_with_eps_is_flagged_as_gradient_masking():
    from trainables.common.robustness import masking_warnings

    report = {
        "clean": {"uar": 0.8},
        "adversarial": [
            {"attack": "fgsm", "eps": 0.001, "uar": 0.4},
            {"attack": "fgsm", "eps": 0.01, "uar": 0.6},
            {"attack": "pgd", "eps": 0.01, "uar": 0.2},
        ],
    }
    (warning,) = masking_warnings(report)
    assert "gradient masking" in warning and "PGD" in warning


def test_snr_is_measured_over_the_clips_own_samples():
    """A 1.1 s clip and a 2.9 s clip: each gets exactly the SNR asked for over its samples,
    whatever a model later pads them to."""
    g = torch.Generator().manual_seed(0)
    clips = [0.2 * torch.randn(17600, generator=g), 0.05 * torch.randn(46400, generator=g)]
    utts = Utterances.from_waveforms([c.numpy() for c in clips])
    noise = make_noise("white", utts, torch.Generator().manual_seed(1), None)
    noisy = add_noise_flat(utts.audio, noise, utts.owner(), len(utts), 10.0)
    for i, c in enumerate(clips):
        o, n = int(utts.offsets[i]), int(utts.lengths[i])
        added = noisy[o : o + n] - utts.audio[o : o + n]
        snr = 10 * torch.log10(c.pow(2).mean() / added.pow(2).mean())
        assert abs(float(snr) - 10.0) < 0.01


def test_windows_cover_long_clips_and_pad_short_ones():
    w = Windowing.for_segment(16000)  # hop 8000
    owner, start = w.plan(torch.tensor([4000, 16000, 40000]))
    assert owner.tolist() == [0, 1, 2, 2, 2, 2]
    assert start.tolist() == [0, 0, 0, 8000, 16000, 24000]  # the last one ends at the clip's end
    utts = Utterances.from_waveforms([np.ones(4000), np.ones(16000), np.ones(40000)])
    x = w.gather(utts, torch.arange(3), owner, start)
    assert x.shape == (6, 16000) and float(x[0, 4000:].abs().sum()) == 0.0  # zero-padded


def test_stratified_subset_keeps_class_shares():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    pick = stratified_subset(labels, 20, seed=0)
    assert len(pick) == 20 and np.bincount(labels[pick]).tolist() == [12, 6, 2]
    assert (stratified_subset(labels, 20, seed=0) == pick).all()


def test_predict_and_the_report_agree_on_short_and_long_clips(trained, tmp_path):
    """The served model (predict_proba on raw files) and the robustness report see the same
    input: same files, same UAR, for clips shorter and longer than features.segment_s."""
    predictor, model_dir, corpus = trained
    test = speaker_independent_split(corpus, 0)["test"]
    rng = np.random.default_rng(0)
    rows, paths, labels = ["path,label,speaker"], [], []
    seg = int(predictor.cfg.features.segment_s * 16000)
    for n, i in enumerate(test[:24]):
        w = corpus.waveform(int(i))
        # alternate short (0.6 segment) and long (2.3 segments, the clip looped) versions
        length = int(seg * (0.6 if n % 2 else 2.3))
        clip = np.resize(w, length) if length > len(w) else w[:length]
        clip = (clip + 0.001 * rng.standard_normal(len(clip))).astype(np.float32)
        path = tmp_path / "clips" / f"c{n:02d}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(path, clip, 16000, subtype="PCM_16")  # what the cache stores, bit for bit
        label = corpus.label_names[int(corpus.labels[i])]
        rows.append(f"clips/{path.name},{label},s{n % 4}")
        paths.append(path)
        labels.append(int(corpus.labels[i]))
    assert any(sf.info(p).frames < seg for p in paths) and any(
        sf.info(p).frames > seg for p in paths
    )
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")

    probs = predictor.predict_proba([TRAINABLE.read_audio(str(p), 16000) for p in paths])
    pred = probs.argmax(1)
    recalls = [np.mean(pred[np.array(labels) == c] == c) for c in sorted(set(labels))]
    served_uar = float(np.mean(recalls))

    cache = build_cache("manifest", tmp_path, tmp_path / "cache", progress=lambda m: None)
    report = TRAINABLE.robustness_report(
        model_dir,
        {"cache": str(cache)},
        {"noises": [], "fgsm_eps": [], "pgd_eps": [], "max_utterances": None},
        tmp_path / "report",
        split="all",
    )
    assert report["data"]["utterances"] == 24
    assert report["clean"]["uar"] == pytest.approx(served_uar, abs=1e-9)
