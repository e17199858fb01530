"""The shared suite every trainable must pass (like Optuna's sampler suites).

``tests/test_trainables_contract.py`` runs it for each registered trainable (``mtl_aug`` and the
test-only ``linear``), so a new trainable gets these checks by registering itself. Every hook the
control plane calls is exercised here; a trainable that passes can be searched, promoted, served,
reported on and benchmarked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from sertune.errors import DataError
from sertune.sessions import LocalSession
from sertune.trainable import EPOCHS_DONE, Trainable, TrialStopped

ROBUSTNESS = {
    "snrs_db": [10],
    "noises": ["white"],
    "fgsm_eps": [0.005],
    "pgd_eps": [],
    "max_utterances": 8,
}
SMALL = {"n_speakers": 4, "per_class": 3, "seed": 0}


def check_interface(t: Trainable) -> None:
    assert t.name and isinstance(t.name, str)
    assert t.epoch_metrics and all(isinstance(m, str) for m in t.epoch_metrics)
    assert "val_uar" in t.epoch_metrics and set(t.final_metrics) >= {"test_uar"}
    names = t.param_names()
    assert names and all(isinstance(n, str) for n in names)
    assert "synthetic" in t.corpora()
    metrics = t.metric_names(ROBUSTNESS, ["other"])
    assert {"robust/uar_snr10_white", "robust/uar_fgsm0.005", "robust/uar_cross_other"} <= metrics
    # the selection twins, on the validation speakers (none for a cross corpus)
    assert {"val_robust/uar_snr10_white", "val_robust/uar_fgsm0.005"} <= metrics
    assert "val_robust/uar_cross_other" not in metrics
    for name, params in t.baselines().items():
        assert isinstance(name, str) and set(params) <= names
        t.validate_params(params)
    t.validate_params(t.smoke_params())


def check_rejects_unknown_params(t: Trainable) -> None:
    with pytest.raises(ValueError, match="no_such_param"):
        t.validate_params({"no_such_section.no_such_param": 1})


def check_data_hooks(t: Trainable, tmp_path: Path) -> dict[str, Any]:
    manifest = t.synthesise_corpus(str(tmp_path / "synth"), n_speakers=3, per_class=2, seed=1)
    assert manifest.is_file() and len(manifest.read_text().splitlines()) == 1 + 3 * 4 * 2
    cache = t.cache_corpus("manifest", str(manifest), str(tmp_path / "cache"))
    assert (
        cache.utterances == 24 and cache.fingerprint and "24/24 files used" in cache.report_summary
    )
    wav = next((tmp_path / "synth" / "wav").rglob("*.wav"))
    x = t.read_audio(str(wav), 16000)
    assert x.ndim == 1 and x.dtype == np.float32 and len(x) == sf.info(wav).frames
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(DataError, match="unreadable"):
        t.read_audio(str(tmp_path / "bad.wav"), 16000)
    data = t.prepare_data(
        {"corpus": "synthetic", "root": str(tmp_path / "corpus"), "synthetic": SMALL},
        str(tmp_path / "cache"),
        progress=lambda m: None,
    )
    assert data["fingerprint"] and data["report"]["used"] == 4 * 4 * 3
    return data


def check_trains_reports_and_serves(t: Trainable, tmp_path: Path, params: dict[str, Any]) -> None:
    """train → every epoch reported → best/ model predicts, reports, re-evaluates; resume; stop."""
    data = check_data_hooks(t, tmp_path)
    config = {
        "params": {**params, "optim.epochs": 2},
        "data": data,
        "run": {
            "device": "cpu",
            "max_steps_per_epoch": 2,
            "robustness": ROBUSTNESS,
            "title": "suite",
        },
    }
    session = LocalSession(device="cpu", keep_checkpoints=str(tmp_path / "ckpt"))
    history = t.train(config, session)
    assert [h[EPOCHS_DONE] for h in history] == [1, 2]
    for h in history:
        missing = set(t.epoch_metrics) - set(h)
        assert not missing, f"epoch metrics not reported: {missing}"
    last = history[-1]
    assert set(t.final_metrics) <= set(last) and "robust/uar_snr10_white" in last
    assert "val_robust/uar_snr10_white" in last  # what a search may select on
    ckpt = Path(session.history[-1]["checkpoint"])
    best = ckpt / "best"
    assert (best / "robustness" / "robustness.json").is_file()
    val = json.loads((best / "robustness_val" / "robustness.json").read_text())
    assert val["data"]["split"] == "val"
    assert val["metrics"]["val_robust/uar_snr10_white"] == last["val_robust/uar_snr10_white"]

    p = t.load_predictor(best)
    probs = p.predict_proba(
        [
            np.zeros(p.sample_rate, dtype=np.float32),
            np.full(800, 0.1, np.float32),
            np.random.default_rng(0).normal(0, 0.1, 5 * p.sample_rate),
        ]
    )
    assert probs.shape == (3, len(p.label_names)) and np.allclose(probs.sum(1), 1.0, atol=1e-5)

    report = t.robustness_report(
        best, data, ROBUSTNESS, tmp_path / "report", split="all", title="x"
    )
    assert report["data"]["split"] == "all" and (tmp_path / "report" / "robustness.json").is_file()

    again = t.evaluate_checkpoint(str(ckpt), data, config["run"], "cpu")
    assert again["test_uar"] == pytest.approx(last["test_uar"])
    assert "val_robust/uar_snr10_white" in again  # a stopped trial gets its twins too

    resumed = LocalSession(device="cpu", checkpoint_dir=session.history[0]["checkpoint"])
    assert [h[EPOCHS_DONE] for h in t.train(config, resumed)] == [2]  # only what was missing

    class Stopping(LocalSession):
        def poll(self) -> None:
            raise TrialStopped("stopped by the scheduler")

    with pytest.raises(TrialStopped):
        t.train(config, Stopping(device="cpu"))


def check_bench_train(t: Trainable) -> None:
    r = t.bench_train(device="cpu", batch=4, steps=2, rounds=1, log=lambda *a: None)
    assert r.ceiling > 0 and r.pipeline > 0 and r.params > 0 and r.ratio > 0
