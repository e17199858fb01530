"""The reference baseline (eGeMAPS functionals + a class-balanced logistic regression): it learns
the synthetic corpus, reports a trial's figure names, reuses its cached features, and its noisy
test clips are sample-identical to the ones a model's robustness report scores."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from trainables.common import reference as ref
from trainables.common.robustness import evaluate_robustness, robust_metric_names
from trainables.common.utterances import Utterances, Windowing, stratified_subset
from trainables.data.cache import load_cache, speaker_independent_split

# "file" between the others: its draw from the generator shifts what every later type gets
OPTIONS = {
    "snrs_db": [10.0, 0.0],
    "noises": ["white", "file", "babble"],
    "fgsm_eps": [0.005],
    "pgd_eps": [0.005],
    "pgd_steps": 2,
    "max_utterances": 24,
}
SEED = 3


@pytest.fixture(scope="module")
def setting(synth_corpus, tmp_path_factory):
    """The split of the shared synthetic corpus as ``prepare_data`` gives it, a noise file, the
    corpus again as a cross corpus, and the first (cold) reference report."""
    tmp = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(1)
    noise = tmp / "hum.wav"
    t = np.arange(24000) / 16000
    sf.write(noise, 0.1 * np.sin(2 * np.pi * 50 * t) + 0.02 * rng.normal(size=t.size), 16000)
    data = {
        "cache": str(synth_corpus["cache"]),
        "fold": 0,
        "n_folds": None,
        "label_fraction": 1.0,
        "label_seed": 0,
        "dealing": "balanced",
        "noise_files": [str(noise)],
        "cross_corpus": [{"name": "again", "cache": str(synth_corpus["cache"])}],
    }
    cache_root = tmp / "cache"
    said: list[str] = []
    report = ref.reference_report(data, OPTIONS, SEED, str(cache_root), said.append)
    return SimpleNamespace(data=data, cache_root=cache_root, report=report, said=said)


def test_the_reference_learns_the_synthetic_corpus_and_reports_a_trials_names(setting):
    r = setting.report
    json.dumps(r)  # plain JSON
    assert r["schema"] == "sertune.reference/1" and r["name"] == "egemaps_lr"
    assert r["features"]["set"] == "eGeMAPSv02" and r["features"]["level"] == "Functionals"
    assert r["features"]["dim"] == 88 and r["features"]["opensmile"]
    assert r["C"] in r["C_grid"]
    m = r["metrics"]
    # chance is 0.25 (4 classes); eGeMAPS separates the synthetic prosody well (~0.9 measured)
    assert m["test_uar"] >= 0.7 and m["val_uar"] >= 0.7, m
    assert m["val_uar"] == max(r["val_uar_by_C"].values())
    assert {"test_uar", "test_war", "test_f1", "val_uar"} <= set(m)
    robust = robust_metric_names(OPTIONS, ["again"], validation=False)
    robust = {n for n in robust if "fgsm" not in n and "pgd" not in n}
    assert {k for k in m if k.startswith("robust/")} == robust
    assert "n/a" in r["adversarial"] and not any("fgsm" in k or "pgd" in k for k in m)
    noisy = [v for k, v in m.items() if k.startswith("robust/uar_snr")]
    assert m["robust/uar_noise_mean"] == pytest.approx(np.mean(noisy))
    assert 0.0 <= min(noisy) and m["robust/uar_snr0_white"] < m["robust/uar_clean"]
    assert r["cache"]["misses"] >= 1 + 2 * 3 and r["notes"] == []
    assert "eGeMAPSv02 functionals of" in setting.said[0] and "(cached: 0)" in setting.said[0]
    assert "val UAR" in setting.said[-1] and "test UAR" in setting.said[-1]


def test_a_second_call_through_the_trainable_reuses_the_cached_features(setting, monkeypatch):
    from trainables.mtl_aug.trainable import MTLAugTrainable

    def no_extraction(self, waves):
        raise AssertionError("features extracted again")

    monkeypatch.setattr(ref.Extractor, "__call__", no_extraction)
    said: list[str] = []
    again = MTLAugTrainable().reference(
        setting.data, OPTIONS, SEED, str(setting.cache_root), said.append
    )
    first = setting.report
    assert again["cache"]["misses"] == 0
    assert again["cache"]["hits"] == first["cache"]["hits"] + first["cache"]["misses"]
    assert again["metrics"] == first["metrics"] and again["C"] == first["C"]
    assert "(cached: 0)" not in said[0]
    fingerprint = load_cache(setting.data["cache"]).fingerprint
    files = sorted(p.name for p in (setting.cache_root / "reference").rglob("*.npz"))
    assert files == sorted(
        p.name for p in (setting.cache_root / "reference" / fingerprint).glob("egemaps_v02-*.npz")
    )
    assert "egemaps_v02-clean-all-" in " ".join(files)
    assert sum(n.startswith("egemaps_v02-white-snr10-") for n in files) == 1


def test_the_noisy_clips_are_the_model_reports_sample_for_sample(setting):
    """What ``evaluate_robustness`` feeds a model (one window per clip, recorded) against what the
    reference extracts its noisy features from."""
    from trainables.mtl_aug.train import Resident

    data = setting.data
    corpus = load_cache(data["cache"])
    test = speaker_independent_split(corpus, 0, None)["test"]
    pick = test[stratified_subset(corpus.labels[test], OPTIONS["max_utterances"], SEED)]
    utts = Utterances.from_corpus(corpus, torch.device("cpu")).select(pick)
    bank = Resident({}, torch.device("cpu")).noise_bank(data["noise_files"], 16000)
    seen: list[torch.Tensor] = []

    def forward(windows):
        seen.append(windows.clone())
        return torch.zeros(windows.shape[0], 4)

    longest = int(utts.lengths.max())
    options = {**OPTIONS, "fgsm_eps": [], "pgd_eps": []}
    model = evaluate_robustness(
        forward, utts, Windowing(longest, longest), 4, options, bank, seed=SEED
    )
    windows = torch.cat(seen)
    n = len(pick)
    ours = list(
        ref.noisy_conditions(utts, OPTIONS, SEED, ref.noise_bank(data["noise_files"], 16000))
    )
    assert [(r["type"], r["snr_db"]) for r in model["noise"]] == [(k, s) for k, s, _ in ours]
    assert windows.shape[0] == n * (1 + len(ours))
    lengths = utts.lengths.tolist()
    for c, (_, _, noisy) in enumerate(ours, start=1):
        for i, wave in enumerate(ref._clip_waves(noisy)):
            assert torch.equal(windows[c * n + i, : lengths[i]], torch.from_numpy(wave))
    # ... and the cached noisy features are those clips' features
    kind, snr, noisy = ours[2]
    cond = ref.condition_name(kind, snr)
    (path,) = (setting.cache_root / "reference" / corpus.fingerprint).glob(f"*-{cond}-*.npz")
    extractor = ref.Extractor(corpus.sample_rate, workers=1)
    with np.load(path) as z:
        assert np.array_equal(z["indices"], pick)
        cached = z["features"][:2]
    np.testing.assert_allclose(extractor(ref._clip_waves(noisy)[:2]), cached, rtol=1e-6)


def test_a_class_missing_from_training_is_a_clear_error(tmp_path):
    corpus = SimpleNamespace(
        path=tmp_path / "cache-x",
        labels=np.array([0, 1, 0, 1, 2, 0, 1, 2]),
        label_names=("angry", "happy", "neutral", "sad"),
    )
    split = {"train": np.arange(4), "val": np.array([4, 5]), "test": np.array([6, 7])}
    with pytest.raises(ValueError, match=r"cache-x.*neutral.*missing from the training"):
        ref._check_classes(corpus, split)
    with pytest.raises(ValueError, match="no test clips"):
        ref._check_classes(corpus, {**split, "test": np.arange(0)})
