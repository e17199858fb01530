"""On a trained model, accuracy falls as the SNR drops and as the adversarial budget grows; the
served model sees clips exactly as the report does; SNR is measured over the clip's own samples."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from sertune.sessions import LocalSession
from trainables.common import robustness
from trainables.common.metrics import confusion, scores
from trainables.common.noise import add_noise_flat
from trainables.common.robustness import evaluate_robustness, make_noise, write_report
from trainables.common.utterances import (
    Utterances,
    Windowing,
    stratified_subset,
    utterance_logits,
)
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
        # falls with the SNR while above chance (0.25); at chance level a figure on these few
        # clips wanders by a few points either way
        pairs = zip(by_snr, by_snr[1:], strict=False)
        assert all(b <= a + 0.05 for a, b in pairs if a >= 0.35), by_snr
        assert by_snr[-1] <= 0.25 + 0.15, by_snr
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


# -- the batched report against a condition-by-condition one ----------------------------------------


def _reference_attack(forward, utts, windowing, eps, steps, batch_utts=32):
    """FGSM (steps=1) or PGD, one ε, 32 clips at a time through :func:`utterance_logits`: the
    report's attacks as they ran before they were batched."""
    out = utts.audio.detach().clone()
    alpha = eps if steps == 1 else 2.5 * eps / steps
    for i in range(0, len(utts), batch_utts):
        sub = utts.select(torch.arange(i, min(i + batch_utts, len(utts))))
        x0 = sub.audio.detach()
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            logits = utterance_logits(forward, sub.with_audio(x), windowing)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, sub.labels), x)
            x = x.detach() + alpha * grad.sign()
            x = (x0 + (x - x0).clamp(-eps, eps)).clamp(-1.0, 1.0)
        out[int(utts.offsets[i]) : int(utts.offsets[i]) + x.numel()] = x.detach()
    return utts.with_audio(out)


def _reference_report(forward, utts, windowing, options, seed):
    """Every condition on its own: one noisy or attacked copy, one pass, one figure."""
    base = utts.select(torch.arange(len(utts)))

    def score(u):
        with torch.no_grad():
            logits = utterance_logits(forward, u, windowing)
        return scores(confusion(logits.argmax(1), u.labels, 4))

    g = torch.Generator().manual_seed(seed)
    noise = []
    for kind in options["noises"]:
        n = make_noise(kind, base, g, None)
        for snr in options["snrs_db"]:
            noisy = add_noise_flat(base.audio, n, base.owner(), len(base), snr)
            noise.append({"type": kind, "snr_db": float(snr), **score(base.with_audio(noisy))})
    adversarial = [
        {
            "attack": a,
            "eps": float(e),
            "steps": s,
            **score(_reference_attack(forward, base, windowing, e, s)),
        }
        for a, eps_list, s in (
            ("fgsm", options["fgsm_eps"], 1),
            ("pgd", options["pgd_eps"], options["pgd_steps"]),
        )
        for e in eps_list
    ]
    return {"clean": score(base), "noise": noise, "adversarial": adversarial}


def test_the_batched_report_equals_one_pass_per_condition(trained):
    """Conditions batched through the model, one gradient for every FGSM ε, PGD's ε batched: the
    figures are those of one noisy or attacked copy per condition, each through the model alone."""
    predictor, _, corpus = trained
    test = speaker_independent_split(corpus, 0)["test"]
    utts = Utterances.from_corpus(corpus, torch.device("cpu")).select(test)
    options = {
        "snrs_db": [20, 5, 0],
        "noises": ["white", "babble"],
        "fgsm_eps": [0.001, 0.005, 0.02],
        "pgd_eps": [0.002, 0.005],
        "pgd_steps": 3,
    }
    report = evaluate_robustness(predictor.forward, utts, predictor.windowing, 4, options, seed=7)
    want = _reference_report(predictor.forward, utts, predictor.windowing, options, seed=7)
    assert report["clean"] == pytest.approx(want["clean"], abs=1e-6)
    assert len(report["noise"]) == 6 and len(report["adversarial"]) == 5
    for got, ref in zip(
        report["noise"] + report["adversarial"], want["noise"] + want["adversarial"], strict=True
    ):
        assert got == pytest.approx(ref, abs=1e-6), (got, ref)
    # the caller's clean logits are the clean figure, with no pass of its own
    logits = robustness.clip_logits(predictor.forward, utts, predictor.windowing)
    again = evaluate_robustness(
        predictor.forward, utts, predictor.windowing, 4, options, seed=7, clean_logits=logits
    )
    assert again["metrics"] == pytest.approx(report["metrics"], abs=1e-6)


def test_a_report_of_some_conditions_gives_the_full_reports_figures(trained):
    """``only``: the conditions its names need run (the others not), and each figure is the full
    report's (the noises are drawn in the same order whether used or not); a noise mean only
    when every noisy condition ran."""
    predictor, _, corpus = trained
    val = speaker_independent_split(corpus, 0)["val"]
    utts = Utterances.from_corpus(corpus, torch.device("cpu")).select(val)
    options = {
        "snrs_db": [10, 0],
        "noises": ["white", "babble"],
        "fgsm_eps": [0.001, 0.005],
        "pgd_eps": [0.005],
        "pgd_steps": 2,
    }
    args = (predictor.forward, utts, predictor.windowing, 4, options)
    full = evaluate_robustness(*args, split="val", seed=3)
    only = ["val_robust/uar_snr0_babble", "val_robust/uar_fgsm0.005"]
    calls = []
    part = evaluate_robustness(
        lambda x: calls.append(len(x)) or predictor.forward(x), *args[1:], split="val", seed=3,
        only=only,
    )  # fmt: skip
    assert set(part["metrics"]) == {*only, "val_robust/uar_clean"}
    for k, v in part["metrics"].items():
        assert v == pytest.approx(full["metrics"][k], abs=1e-6), k
    assert [(r["type"], r["snr_db"]) for r in part["noise"]] == [("babble", 0.0)]
    assert [(r["attack"], r["eps"]) for r in part["adversarial"]] == [("fgsm", 0.005)]
    assert "measured" in part
    # clean + gradient (one pass with the gradient's forward), babble 0 dB, FGSM 0.005: 2 passes
    # of windows besides the gradient pass's, where the full report runs 4 noisy + 3 attacked
    windows = sum(calls)
    n_windows = int(predictor.windowing.plan(utts.lengths)[0].numel())
    assert windows == 3 * n_windows
    mean = evaluate_robustness(*args, split="val", seed=3, only=["val_robust/uar_noise_mean"])
    assert mean["metrics"]["val_robust/uar_noise_mean"] == pytest.approx(
        full["metrics"]["val_robust/uar_noise_mean"], abs=1e-6
    )
    assert len(mean["noise"]) == 4 and not mean["adversarial"]
    none = evaluate_robustness(*args, split="val", seed=3, only=[])
    assert set(none["metrics"]) == {"val_robust/uar_clean"}


def test_fgsm_at_several_eps_from_one_gradient_equals_separate_runs(trained):
    """One gradient at the clean input serves every FGSM ε and every PGD first step, PGD's ε run
    together: the attacked clips are those of one attack at a time, and the gradient pass's
    forward is the clean logits."""
    predictor, _, corpus = trained
    test = speaker_independent_split(corpus, 0)["test"][:40]
    base = Utterances.from_corpus(corpus, torch.device("cpu")).select(test)
    attacks = [("fgsm", 0.001, 1), ("pgd", 0.004, 3), ("fgsm", 0.01, 1), ("pgd", 0.01, 3)]
    clean, audios = robustness._adversarial(predictor.forward, base, predictor.windowing, attacks)
    with torch.no_grad():
        assert torch.allclose(
            clean, utterance_logits(predictor.forward, base, predictor.windowing), atol=1e-5
        )
    for (_, eps, steps), got in zip(attacks, audios, strict=True):
        want = _reference_attack(predictor.forward, base, predictor.windowing, eps, steps).audio
        assert float((got - base.audio).abs().max()) <= eps + 1e-7
        # the same samples (here bit for bit; other rounding may flip a sign where the gradient
        # is ~0: a few samples at most)
        differ = float((got != want).float().mean())
        assert differ < 1e-4, (eps, steps, differ)


def test_the_batched_pieces_are_the_plain_ones_bit_for_bit():
    """Windows, noisy copies, babble and the clips' gradient as the plain code makes them."""
    g = torch.Generator().manual_seed(0)
    seg = 1600
    clips = [0.3 * torch.randn(n, generator=g) for n in (700, 1600, 2500, 4000, 1601)]
    utts = Utterances.from_waveforms([c.numpy() for c in clips], labels=[0, 1, 2, 3, 0])
    w = Windowing.for_segment(seg)
    owner, start = w.plan(utts.lengths)
    padded = F.pad(utts.audio, (0, seg))
    windows = robustness._windows(padded, utts, owner, start, seg)
    assert torch.equal(windows, w.gather(utts, torch.arange(len(utts)), owner, start))

    noise = make_noise("white", utts, g, None)
    babble = make_noise("babble", utts, g, None)
    noisy = list(robustness._noisy(utts, [(noise, [10.0, 0.0]), (babble, [5.0])]))
    for got, (n, snr) in zip(noisy, [(noise, 10.0), (noise, 0.0), (babble, 5.0)], strict=True):
        assert torch.equal(got, add_noise_flat(utts.audio, n, utts.owner(), len(utts), snr))
    owner_t = utts.owner()  # babble as the index arithmetic made it
    rel = torch.arange(owner_t.numel()) - utts.offsets[owner_t]
    want = torch.zeros_like(utts.audio)
    for k in (1, 2, 3):
        src = (owner_t + k) % len(utts)
        want += utts.audio[utts.offsets[src] + rel % utts.lengths[src]]
    assert torch.equal(babble, want)

    # logits and the gradient of the summed loss, batched across two copies, 3 windows a call
    weight = torch.randn(seg, 4, generator=g) / 40

    def forward(x):
        return torch.tanh(x @ weight)

    copies = [utts.audio, noisy[0]]
    got = list(robustness._pass(forward, utts, w, copies, grad=True, batch=3))
    for audio, (logits, grad) in zip(copies, got, strict=True):
        x = audio.clone().requires_grad_(True)
        want_logits = utterance_logits(forward, utts.with_audio(x), w)
        loss = F.cross_entropy(want_logits, utts.labels, reduction="sum")
        (want_grad,) = torch.autograd.grad(loss, x)
        assert torch.allclose(logits, want_logits.detach(), atol=1e-6)
        assert torch.allclose(grad, want_grad, atol=1e-7)


def test_a_trial_measures_the_validation_twins_its_search_reads(trained, synth_corpus, tmp_path):
    """``robustness.validation: selection`` (the spec's default) hands the trial the twins its
    objective and constraints read: those and the clean figure are measured on the validation
    speakers, none (and no robustness_val/) when it reads none; ``all`` measures every twin. The
    test speakers' report is complete either way."""
    from trainables.mtl_aug.train import Resident, final_evaluation

    predictor, _, _ = trained
    options = {"snrs_db": [10], "noises": ["white"], "fgsm_eps": [0.005], "pgd_eps": []}
    data = {"cache": str(synth_corpus["cache"]), "fold": 0}
    resident = Resident({}, torch.device("cpu"))

    def run(extra: dict, out: str) -> dict:
        run_cfg = {"robustness": {**options, "max_utterances": 24, **extra}}
        return final_evaluation(
            predictor.model, predictor.cfg, data, run_cfg, resident, tmp_path / out
        )

    reported = {"robust/uar_clean", "robust/uar_snr10_white", "robust/uar_fgsm0.005"}
    none = run({"validation_metrics": []}, "none")
    assert not [k for k in none if k.startswith("val_robust/")]
    assert reported <= set(none) and not (tmp_path / "none" / "robustness_val").exists()
    some = run({"validation_metrics": ["val_robust/uar_snr10_white"]}, "some")
    assert {k for k in some if k.startswith("val_robust/")} == {
        "val_robust/uar_clean",
        "val_robust/uar_snr10_white",
    }
    every = run({}, "all")
    assert {k for k in every if k.startswith("val_robust/")} == {
        "val_robust/uar_clean",
        "val_robust/uar_snr10_white",
        "val_robust/uar_fgsm0.005",
        "val_robust/uar_noise_mean",
    }
    assert some["val_robust/uar_snr10_white"] == every["val_robust/uar_snr10_white"]
    assert none["robust/uar_snr10_white"] == every["robust/uar_snr10_white"]
    # what a spec hands its trials
    from sertune.spec import load_spec

    def handed(objective: dict, robustness: dict) -> dict:
        spec = load_spec("demo", overrides={"objective": objective, "robustness": robustness})
        return spec.robustness_options()

    assert handed({"metric": "val_uar"}, options)["validation_metrics"] == []
    constrained = {"metric": "val_uar", "constraints": ["val_robust/uar_snr10_white >= 0.3"]}
    assert handed(constrained, options)["validation_metrics"] == ["val_robust/uar_snr10_white"]
    every_twin = handed({"metric": "val_uar"}, {**options, "validation": "all"})
    assert "validation_metrics" not in every_twin


def test_the_eval_bench_puts_a_trials_epoch_beside_its_end_of_trial_evaluation():
    """``sertune bench train`` (c): one small trial's epoch and its end-of-trial evaluation, with
    the default ``robustness.validation: selection`` and with ``all``, in epochs."""
    from trainables.mtl_aug.bench import eval_bench

    lines: list[str] = []
    small = {"snrs_db": [10], "noises": ["white"], "fgsm_eps": [0.005], "pgd_eps": []}
    r = eval_bench(device="cpu", epochs=2, options=small, log=lines.append)
    assert r["epoch_s"] > 0 and r["eval_s"] > 0 and r["eval_all_s"] > 0
    assert r["epochs"] == pytest.approx(r["eval_s"] / r["epoch_s"])
    assert "|  eval = " in lines[1] and "robustness.validation: all" in lines[3]
