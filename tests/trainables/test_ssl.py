"""MTL-AUG on a self-supervised encoder (``model.encoder: ssl``): tiny WavLM / wav2vec 2.0 models
built here and loaded through the real local-path code; nothing is downloaded."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sertune.sessions import LocalSession
from tests.conftest import TINY
from trainables.mtl_aug.augment import AugmentationBank, LogMel, spec_augment_waveform
from trainables.mtl_aug.config import AUG_TYPES, LossConfig, MTLAugConfig
from trainables.mtl_aug.model import mtl_aug_loss
from trainables.mtl_aug.train import train

REPO = Path(__file__).resolve().parents[2]
KINDS = ("wavlm", "hubert", "wav2vec2")


def ssl_params(checkpoint, **more):
    return {
        **TINY,
        "model.encoder": "ssl",
        "model.ssl.checkpoint": str(checkpoint),
        "model.dropout": 0.0,
        **more,
    }


def build(checkpoint, cache=None, **more):
    from trainables.mtl_aug.export import new_model

    cfg = MTLAugConfig.from_dict(ssl_params(checkpoint, **more))
    return new_model(cfg, {} if cache is None else cache), cfg


def loop_config(cache, checkpoint, **params):
    return {
        "params": ssl_params(checkpoint, **params),
        "data": {"cache": str(cache), "fold": 0},
        "run": {"device": "cpu", "threads": 2, "max_steps_per_epoch": 2},
    }


def a_batch(cfg, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    wav = 0.1 * torch.randn(b, 16000, generator=g)
    return wav, LogMel(cfg.features)(wav), torch.arange(b) % 4, torch.arange(b) % len(AUG_TYPES)


# -- (a) the model: what trains, what stays frozen ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top", [0, 1])
def test_frozen_and_top_layer_finetuning_train_only_what_they_say(ssl_checkpoints, kind, top):
    model, cfg = build(ssl_checkpoints[kind], **{"model.ssl.finetune_top": top})
    model.train()
    assert not model.encoder.training  # no layer drop / time masking in the encoder
    mix = model.layer_mix()
    assert mix.shape == (3,) and torch.allclose(mix.sum(), torch.tensor(1.0))  # 2 layers + input
    wav, target, y, aug = a_batch(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(
        [
            {"params": model.head_parameters()},
            {"params": model.encoder_parameters(), "lr": cfg.optim.encoder_lr},
        ],
        lr=1e-2,
    )
    out = model(wav, target)
    assert out["reconstruction"].shape == out["target"].shape == (4, cfg.features.n_mels, 100)
    losses = mtl_aug_loss(out, y, aug, LossConfig())
    losses.total.backward()
    top_layer = f"encoder.encoder.layers.{1}."
    # no other encoder parameter trains: a post-norm encoder's encoder.layer_norm acts on the
    # input embedding; a pre-norm one's (wav2vec2 here) only on last_hidden_state, which the
    # weighted sum of hidden states never reads (test_the_final_norm_of_a_pre_norm_encoder_...)
    final_norm = "-"
    for name, p in model.named_parameters():
        tuned = top and name.startswith((top_layer, final_norm))
        if name.startswith("encoder.") and not tuned:
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None and p.requires_grad, name
    assert model.layer_weights.grad.abs().sum() > 0
    assert (
        model.decoder[0].weight.grad.abs().sum() > 0 and model.aug_head.weight.grad.abs().sum() > 0
    )
    opt.step()
    for name, p in model.named_parameters():
        if name.startswith("encoder.") and not (top and name.startswith((top_layer, final_norm))):
            assert torch.equal(p, before[name]), name  # bit-identical
    if top:
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert any(n.startswith(top_layer) for n in moved)
        assert not any(n.startswith("encoder.encoder.layers.0.") for n in moved)


def test_the_final_norm_of_a_pre_norm_encoder_never_reaches_the_heads(ssl_checkpoints):
    """transformers collects hidden states before a pre-norm encoder's final layer norm (it acts
    on last_hidden_state alone): fine-tuning the top layers has no norm to train with them."""
    model, _ = build(ssl_checkpoints["wav2vec2"], **{"model.ssl.finetune_top": 1})
    wav = 0.1 * torch.randn(1, 16000)
    out = model.encoder(wav, output_hidden_states=True)
    norm = model.encoder.encoder.layer_norm
    assert torch.allclose(norm(out.hidden_states[-1]), out.last_hidden_state)
    assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)


def test_a_training_step_and_an_input_gradient_on_the_device(ssl_checkpoints, device):
    """On a GPU the encoder runs under bf16 autocast; the heads and the loss stay float32."""
    model, cfg = build(ssl_checkpoints["wav2vec2"], **{"model.ssl.finetune_top": 1})
    model = model.to(device).train()
    wav, target, y, aug = (t.to(device) for t in a_batch(cfg))
    out = model(wav, target)
    assert out["emotion"].dtype == torch.float32
    losses = mtl_aug_loss(out, y, aug, LossConfig())
    assert torch.isfinite(losses.total)
    losses.total.backward()
    model.eval()
    x = wav.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x)["emotion"].sum(), x)
    assert g.abs().sum() > 0


def test_layer_choices_and_the_frozen_encoder_runs_without_a_graph(ssl_checkpoints):
    last, _ = build(ssl_checkpoints["wavlm"], **{"model.ssl.layers": "last"})
    assert last.layer_ids == (2,)
    picked, cfg = build(ssl_checkpoints["wavlm"], **{"model.ssl.layers": [0, 2]})
    assert picked.layer_ids == (0, 2)
    wav, *_ = a_batch(cfg)
    h = picked.encode(wav)  # frozen, the input needs no gradient: only the layer mix has one
    assert h.shape == (4, 50, 32) and h.requires_grad
    (g,) = torch.autograd.grad(h.sum(), picked.layer_weights)
    assert g.shape == (2,)


def test_spec_augment_on_the_waveform_masks_time_spans_and_bands(ssl_checkpoints):
    cfg = MTLAugConfig.from_dict(ssl_params(ssl_checkpoints["wavlm"]))
    t = torch.arange(16000) / 16000
    wav = torch.stack([torch.sin(2 * torch.pi * 440 * t), torch.sin(2 * torch.pi * 3000 * t)])
    g = torch.Generator().manual_seed(1)
    out = spec_augment_waveform(wav, 8, 20, 2, cfg.features, g)
    assert out.shape == wav.shape and not torch.equal(out, wav)
    # every type, specaugment included, gives an augmented waveform and its log-mel
    bank = AugmentationBank(cfg.aug, cfg.features)
    types = torch.tensor([AUG_TYPES.index("specaugment")] * 2 + [0, 1])
    crops = 0.1 * torch.randn(4, bank.crop_length, generator=g)
    aug, logmel, got = bank.waveforms(crops, g, types=types)
    assert aug.shape == (4, bank.segment) and torch.equal(got, types)
    assert logmel.shape == (4, cfg.features.n_mels, bank.segment // 160 + 1)
    assert torch.equal(aug[2], crops[2, : bank.segment])  # clean rows untouched
    assert (aug[:2] == 0).sum() > 0  # silenced spans


# -- (b) the real loop ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wavlm", "wav2vec2"])  # HuBERT: the same code (above, doctor)
def test_the_loop_trains_an_ssl_model_with_both_auxiliary_losses(
    synth_corpus, ssl_checkpoints, kind, tmp_path
):
    cfg = loop_config(
        synth_corpus["cache"],
        ssl_checkpoints[kind],
        **{"optim.epochs": 1, "model.ssl.finetune_top": 1, "aug.p_specaugment": 0.5},
    )
    cfg["run"]["robustness"] = {
        "snrs_db": [10],
        "noises": ["white"],
        "fgsm_eps": [0.01],
        "pgd_eps": [],
        "max_utterances": 8,
    }
    history = train(cfg, LocalSession(device="cpu", keep_checkpoints=str(tmp_path)))
    last = history[-1]
    for key in ("train_loss_aug", "train_loss_rec", "train_loss_emo"):
        assert np.isfinite(last[key]) and last[key] > 0, (key, last[key])
    assert 0 <= last["test_uar"] <= 1 and "robust/uar_fgsm0.01" in last
    # the layer weights next to the robustness report (what reaches MLflow as robustness/*)
    report = tmp_path / "epoch_0000" / "best" / "robustness"
    weights = json.loads((report / "layer_weights.json").read_text())
    assert weights["layers"] == [0, 1, 2] and sum(weights["weights"]) == pytest.approx(1.0)
    assert (report / "layer_weights.png").stat().st_size > 0
    meta = json.loads((tmp_path / "epoch_0000" / "best" / "model.json").read_text())
    assert meta["ssl"]["config"]["model_type"] == kind and len(meta["ssl"]["sha256"]) == 64


# -- (c) resident in a warm slot --------------------------------------------------------------------


def test_two_trials_on_one_slot_load_the_encoder_once_and_start_from_pristine_weights(
    synth_corpus, ssl_checkpoints, tmp_path
):
    from safetensors.torch import load_file

    from trainables.mtl_aug import ssl_encoder

    ckpt = shutil.copytree(ssl_checkpoints["wavlm"], tmp_path / "wavlm")  # a path of its own
    cfg = loop_config(
        synth_corpus["cache"], ckpt, **{"optim.epochs": 1, "model.ssl.finetune_top": 1}
    )
    cfg["params"]["optim.encoder_lr"] = 1e-2  # the fine-tuned layer moves visibly
    slot: dict = {}  # the warm slot's cache
    first = train(cfg, LocalSession(device="cpu", store=slot))
    second = train(cfg, LocalSession(device="cpu", store=slot))
    assert ssl_encoder.LOADS[str(ckpt.resolve())] == 1
    assert "loaded from disk" in first[0]["slot_note"] and "slot_note" not in second[0]
    # the second trial trained from the pristine weights, not the first one's fine-tuned copy
    for key in ("train_loss", "train_loss_rec", "val_uar", "val_loss_emo"):
        assert first[-1][key] == second[-1][key], key
    ((pristine, info),) = slot[ssl_encoder.CACHE_KEY].values()
    on_disk = load_file(str(ckpt / "model.safetensors"))
    state = pristine.state_dict()
    for name, t in on_disk.items():
        assert torch.equal(state[name], t), name
    assert info["sha256"] and info["checkpoint"] == str(ckpt.resolve())


# -- (d) packaging: a saved model needs no checkpoint ----------------------------------------------


def test_a_trial_model_keeps_its_encoder_outside_and_a_packaged_one_predicts_without_it(
    synth_corpus, ssl_checkpoints, tmp_path
):
    """A trial's saved model stores what training changed plus the checkpoint's path and hash
    (a few heads, not the encoder); without the checkpoint it names the missing folder. The
    packaged copy (what promotion registers) predicts in a fresh process with the checkpoint
    gone, the same probabilities."""
    from safetensors.torch import load_file

    from sertune.errors import ModelError
    from trainables.mtl_aug.export import load_model, package_model

    ckpt = shutil.copytree(ssl_checkpoints["wav2vec2"], tmp_path / "w2v")
    cfg = loop_config(synth_corpus["cache"], ckpt, **{"optim.epochs": 1})
    train(cfg, LocalSession(device="cpu", keep_checkpoints=str(tmp_path / "ck")))
    model_dir = tmp_path / "ck" / "epoch_0000" / "best"
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["ssl"]["encoder_weights"] == "external"
    assert meta["ssl"]["checkpoint"] == str(ckpt.resolve()) and len(meta["ssl"]["sha256"]) == 64
    stored = load_file(str(model_dir / "model.safetensors"))
    assert not [k for k in stored if k.startswith("encoder.")]  # frozen: none of it stored
    assert "layer_weights" in stored and "emotion_head.3.weight" in stored
    rng = np.random.default_rng(0)
    waves = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (12000, 20000)]
    here = load_model(model_dir).predict_proba(waves)
    packaged = tmp_path / "packaged"
    assert package_model(model_dir, packaged)
    assert (
        json.loads((packaged / "model.json").read_text())["ssl"]["encoder_weights"] == "packaged"
    )
    assert any(k.startswith("encoder.") for k in load_file(str(packaged / "model.safetensors")))
    assert (packaged / "metrics.json").is_file()  # the rest of the folder comes along
    assert not package_model(packaged, tmp_path / "again")  # self-contained: nothing to do
    np.save(tmp_path / "waves.npy", np.stack([np.pad(w, (0, 20000 - len(w))) for w in waves]))
    shutil.rmtree(ckpt)
    with pytest.raises(ModelError, match=f"its encoder's weights are in {ckpt.resolve()}"):
        load_model(model_dir)
    code = (
        "import sys, numpy as np; from trainables.mtl_aug.export import load_model;"
        f"w = np.load({str(tmp_path / 'waves.npy')!r}); waves = [w[0][:12000], w[1]];"
        f"p = load_model({str(packaged)!r}).predict_proba(waves);"
        "print(repr(p.tolist()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    there = np.array(eval(out.stdout.strip().splitlines()[-1]))
    assert there.shape == (2, 4) and np.allclose(there.sum(1), 1.0, atol=1e-5)
    assert np.allclose(there, here, atol=1e-5)
    # a served copy (mlflow models serve) installs transformers too
    from sertune.serving import requirements

    assert any(r.startswith("transformers==") for r in requirements(packaged))
    assert not any(r.startswith("transformers") for r in requirements())


def test_a_trial_model_on_other_encoder_weights_is_refused(
    synth_corpus, ssl_checkpoints, tmp_path
):
    """The checkpoint at the recorded path now holds other weights: refused, both hashes named."""
    from sertune.errors import ModelError
    from tests.trainables.ssl_models import save_tiny_encoder
    from trainables.mtl_aug.export import load_model

    ckpt = shutil.copytree(ssl_checkpoints["wavlm"], tmp_path / "wavlm")
    cfg = loop_config(synth_corpus["cache"], ckpt, **{"optim.epochs": 1})
    train(cfg, LocalSession(device="cpu", keep_checkpoints=str(tmp_path / "ck")))
    save_tiny_encoder(ckpt, "wavlm", seed=1)  # other weights, same place
    with pytest.raises(ModelError, match="trained on the encoder of SHA-256"):
        load_model(tmp_path / "ck" / "epoch_0000" / "best")


# -- (e) refused before anything runs ----------------------------------------------------------------


def test_a_missing_checkpoint_is_refused_by_spec_validation_naming_the_path(home, capsys):
    from sertune.cli import main

    code = main(
        [
            "search",
            "validate",
            "smoke",
            "--set",
            "params.model.encoder=ssl",
            "--set",
            "params.model.ssl.checkpoint=/nonexistent/wavlm",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "params.model.ssl.checkpoint" in lines[0]
    assert "/nonexistent/wavlm does not exist" in lines[0] and "never downloads" in lines[0]
    # a model id that is not in the local Hugging Face cache: where it looked
    code = main(
        [
            "search",
            "validate",
            "smoke",
            "--set",
            "params.model.encoder=ssl",
            "--set",
            "params.model.ssl.checkpoint=nobody/no-such-encoder",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "models--nobody--no-such-encoder" in err


def test_an_existing_checkpoint_validates_and_out_of_range_layers_are_refused(
    home, ssl_checkpoints, monkeypatch
):
    from sertune.spec import SpecError, load_spec

    ckpt = ssl_checkpoints["wavlm"]
    sets = ["params.model.encoder=ssl", f"params.model.ssl.checkpoint={ckpt}"]
    spec = load_spec("smoke", sets=sets)
    assert spec.params["model.ssl.checkpoint"] == str(ckpt)
    with pytest.raises(SpecError, match=r"model\.ssl\.finetune_top: 3 > the 2 layers"):
        load_spec("smoke", sets=[*sets, "params.model.ssl.finetune_top=3"])
    with pytest.raises(SpecError, match=r"model\.ssl\.layers: \[0, 5\]"):
        load_spec("smoke", sets=[*sets, "params.model.ssl.layers=[0, 5]"])
    monkeypatch.chdir(ckpt.parent)  # a relative path: the trials run elsewhere
    with pytest.raises(SpecError, match="is a relative path; give it absolute"):
        load_spec("smoke", sets=[sets[0], f"params.model.ssl.checkpoint={ckpt.name}"])


def test_a_model_id_resolves_from_the_local_hugging_face_cache_only(
    ssl_checkpoints, tmp_path, monkeypatch
):
    """``org/name`` in the hub cache (refs/main -> snapshots/REV) is found without the network."""
    from huggingface_hub import constants

    from trainables.mtl_aug.config import ConfigError
    from trainables.mtl_aug.ssl_checkpoint import resolve

    repo = tmp_path / "hub" / "models--tiny-org--tiny-wavlm"
    shutil.copytree(ssl_checkpoints["wavlm"], repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert resolve("tiny-org/tiny-wavlm") == (repo / "snapshots" / "abc123").resolve()
    with pytest.raises(ConfigError, match="models--tiny-org--other"):
        resolve("tiny-org/other")


# -- (f) attacks reach the waveform through a frozen encoder ---------------------------------------


def test_fgsm_through_a_frozen_ssl_encoder_changes_the_waveform(ssl_checkpoints):
    from trainables.common.robustness import _adversarial
    from trainables.common.utterances import Utterances
    from trainables.mtl_aug.export import forward_fn, windowing_for

    model, cfg = build(ssl_checkpoints["wavlm"])
    model.eval()
    rng = np.random.default_rng(0)
    utts = Utterances.from_waveforms(
        [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000, 24000)], labels=[0, 1]
    )
    fwd = forward_fn(model, LogMel(cfg.features))
    _, adversarial = _adversarial(fwd, utts, windowing_for(cfg), [("fgsm", 0.01, 1)])
    (x,) = list(adversarial)
    delta = (x - utts.audio).abs()
    assert delta.max() > 0 and delta.max() <= 0.01 + 1e-6  # moved, within the L-inf budget
    assert all(p.grad is None for p in model.encoder.parameters())  # no parameter gradients


# -- resume: a frozen encoder is not in state.pt ------------------------------------------------------


def test_resume_of_an_ssl_trial_reproduces_the_next_epoch_and_needs_the_same_encoder(
    synth_corpus, ssl_checkpoints, tmp_path
):
    from tests.trainables.ssl_models import save_tiny_encoder
    from trainables.mtl_aug.train import load_state

    cfg = loop_config(synth_corpus["cache"], ssl_checkpoints["wavlm"], **{"optim.epochs": 2})
    full = LocalSession(device="cpu", keep_checkpoints=str(tmp_path / "full"))
    train(cfg, full)
    state = load_state(tmp_path / "full" / "epoch_0000")
    assert state["frozen_encoder"] and not any(k.startswith("encoder.") for k in state["model"])
    assert "layer_weights" in state["model"]
    resumed = LocalSession(
        device="cpu",
        checkpoint_dir=str(tmp_path / "full" / "epoch_0000"),
        keep_checkpoints=str(tmp_path / "resumed"),
    )
    train(cfg, resumed)
    assert [h["epoch"] for h in resumed.history] == [1]
    for key in ("train_loss", "train_loss_rec", "val_uar", "val_loss_emo", "test_uar"):
        assert full.history[-1][key] == resumed.history[-1][key], key
    # another encoder under the same architecture: refused, not silently mixed
    other = save_tiny_encoder(tmp_path / "other", "wavlm", seed=1)
    cfg["params"]["model.ssl.checkpoint"] = str(other)
    again = LocalSession(device="cpu", checkpoint_dir=str(tmp_path / "full" / "epoch_0000"))
    with pytest.raises(ValueError, match="resume with the same checkpoint"):
        train(cfg, again)


def test_the_encoder_bench_measures_each_size_and_mode(capsys):
    """``sertune bench encoder`` on the tiny size (what a CPU runs): one line per mode with the
    train step's rate, the slot's peak memory and the fixed cost warm vs from disk; a size it
    does not know is refused in one line."""
    from sertune.cli import main
    from trainables.mtl_aug.bench_ssl import run

    lines: list[str] = []
    rows = run(sizes=["tiny"], device="cpu", steps=1, rounds=1, log=lines.append)
    assert [(r["size"], r["mode"]) for r in rows] == [("tiny", "frozen"), ("tiny", "top2")]
    for r in rows:
        assert r["samples_per_s"] > 0 and r["peak_mb"] > 0 and r["warm_s"] > 0 and r["cold_s"] > 0
    assert rows[1]["trained_params_m"] > rows[0]["trained_params_m"]  # the top layers train
    assert len(lines) == 3 and "fixed cost per trial: warm" in lines[1] and "samples/s" in lines[2]
    assert main(["bench", "encoder", "--sizes", "huge"]) == 2
    assert "unknown size 'huge'" in capsys.readouterr().err


def test_doctor_with_a_spec_loads_its_checkpoint_and_runs_it(ssl_checkpoints, tmp_path, capsys):
    """``sertune doctor SPEC``: the environment, then the spec's encoder loaded the way a slot
    loads it and one second of audio through it; a checkpoint whose weights are damaged fails,
    named, exit 2."""
    from sertune.cli import main

    sets = ["--set", "model.encoder=ssl"]
    ok = main(
        ["doctor", "smoke", *sets, "--set", f"model.ssl.checkpoint={ssl_checkpoints['hubert']}"]
    )
    out = capsys.readouterr().out
    assert ok == 0, out
    assert "spec smoke: valid (mtl_aug)" in out
    assert "ok    model" in out and "hubert, 2 layers, hidden 32" in out and "-> 50 frames" in out
    broken = shutil.copytree(ssl_checkpoints["wavlm"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    code = main(["doctor", "smoke", *sets, "--set", f"model.ssl.checkpoint={broken}"])
    captured = capsys.readouterr()
    assert code == 2
    assert f"FAIL  model        {broken.resolve()}: does not load" in captured.out
    assert main(["doctor", "smoke", "--set", "model.encoder=ssl"]) == 2  # no checkpoint: refused
    assert "model.ssl.checkpoint" in capsys.readouterr().err
