"""On a trained model, accuracy falls as the SNR drops and as the adversarial budget grows."""

import json

import numpy as np
import pytest
import torch

from trainables.data.cache import load_cache, speaker_independent_split
from trainables.mtl_aug.augment import LogMel
from trainables.mtl_aug.config import MTLAugConfig
from trainables.mtl_aug.model import MTLAugModel
from trainables.mtl_aug.robustness import (
    center_crops,
    evaluate_robustness,
    logits_fn_for,
    write_report,
)
from trainables.mtl_aug.train import LocalSession, load_state, train

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
    out = tmp_path_factory.mktemp("trained")
    cfg = {
        "params": PARAMS,
        "data": {"cache": str(synth_corpus["cache"]), "fold": 0},
        "run": {"device": "cpu", "threads": 2},
    }
    train(cfg, LocalSession(device="cpu", keep_checkpoints=str(out)))
    state = load_state(out / "epoch_0007")
    mcfg = MTLAugConfig.from_json(state["config"])
    model = MTLAugModel(mcfg.model, mcfg.features.n_mels)
    model.load_state_dict(state["model"])
    return model.eval(), mcfg, load_cache(synth_corpus["cache"])


def test_uar_falls_with_snr_and_epsilon(trained, tmp_path):
    model, cfg, corpus = trained
    test = speaker_independent_split(corpus, 0)["test"]
    wav, y = center_crops(corpus, test, 24000, torch.device("cpu"))
    options = {
        "snrs_db": [30, 10, 0, -10],
        "noises": ["white", "babble"],
        "fgsm_eps": [0.0005, 0.002, 0.01, 0.05],
        "pgd_eps": [0.002],
        "pgd_steps": 3,
    }
    report = evaluate_robustness(logits_fn_for(model, LogMel(cfg.features)), wav, y, 4, options)
    clean = report["clean"]["uar"]
    assert clean >= 0.6, report["clean"]
    for kind in ("white", "babble"):
        by_snr = [r["uar"] for r in report["noise"] if r["type"] == kind]  # 30, 10, 0, -10 dB
        print(kind, [round(u, 3) for u in by_snr])
        assert by_snr[0] - by_snr[-1] >= 0.15  # clearly worse at -10 dB than at 30 dB
        assert all(
            b <= a + 0.05 for a, b in zip(by_snr, by_snr[1:], strict=False)
        )  # (near-)monotone
    fgsm = [r["uar"] for r in report["adversarial"] if r["attack"] == "fgsm"]
    print("fgsm", [round(u, 3) for u in fgsm])
    assert clean - fgsm[-1] >= 0.25
    assert all(b <= a + 0.05 for a, b in zip([clean, *fgsm], fgsm, strict=False))
    pgd = [r for r in report["adversarial"] if r["attack"] == "pgd"][0]["uar"]
    fgsm_same_eps = fgsm[1]
    assert pgd <= fgsm_same_eps + 0.05  # the iterative attack is at least as strong

    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "robustness.json").read_text())
    assert saved["schema"] == "sertune.robustness/1"
    assert saved["metrics"]["robust/uar_snr10_white"] == pytest.approx(report["noise"][1]["uar"])
    for f in ("uar_vs_snr.png", "uar_vs_eps.png", "summary.md"):
        assert (tmp_path / f).stat().st_size > 0


def test_cross_corpus_entries(trained):
    model, cfg, corpus = trained
    idx = np.nonzero(corpus.labels >= 0)[0][:12]
    wav, y = center_crops(corpus, idx, 24000, torch.device("cpu"))
    report = evaluate_robustness(
        logits_fn_for(model, LogMel(cfg.features)),
        wav,
        y,
        4,
        {"noises": [], "fgsm_eps": [], "pgd_eps": []},
        cross=[("other", wav, y)],
    )
    assert report["cross_corpus"][0]["name"] == "other"
    assert report["metrics"]["robust/uar_cross_other"] == report["clean"]["uar"]
