"""The training loop in-process: it learns, it resumes exactly, it fails loudly on NaN."""

import pytest
import torch

from sertune.sessions import LocalSession
from sertune.trainable import TrialDiverged
from tests.conftest import TINY
from trainables.mtl_aug.train import load_state, train


def loop_config(cache, **params):
    return {
        "params": {**TINY, **params},
        "data": {"cache": str(cache), "fold": 0},
        "run": {"device": "cpu", "threads": 2},
    }


def test_mtl_aug_learns_emotion_on_held_out_speakers(synth_corpus):
    """4 classes (chance 0.25), speaker-independent split, nothing tuned on the test speakers."""
    cfg = loop_config(
        synth_corpus["cache"],
        **{
            "model.conv_channels": [8, 16, 32],
            "model.lstm_hidden": 32,
            "features.segment_s": 1.5,
            "optim.epochs": 8,
            "optim.batch_size": 32,
            "optim.lr": 3e-3,
            "loss.w_aug": 0.3,
            "loss.w_rec": 0.3,
        },
    )
    history = train(cfg, LocalSession(device="cpu"))
    last = history[-1]
    print({k: round(v, 3) for k, v in last.items() if isinstance(v, float)})
    assert last["test_uar"] >= 0.60, last
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for key in (
        "val_uar",
        "val_war",
        "val_f1",
        "train_loss_emo",
        "train_loss_aug",
        "train_loss_rec",
    ):
        assert key in last


def test_resume_reproduces_the_next_epoch_exactly(synth_corpus, tmp_path):
    cfg = loop_config(synth_corpus["cache"], **{"optim.epochs": 2})
    cfg["run"]["max_steps_per_epoch"] = 3
    full = LocalSession(device="cpu", keep_checkpoints=str(tmp_path / "full"))
    train(cfg, full)
    resumed = LocalSession(
        device="cpu",
        checkpoint_dir=str(tmp_path / "full" / "epoch_0000"),
        keep_checkpoints=str(tmp_path / "resumed"),
    )
    train(cfg, resumed)
    assert [h["epoch"] for h in resumed.history] == [1]  # only the missing epoch ran
    a, b = full.history[-1], resumed.history[-1]
    for key in (
        "train_loss",
        "train_loss_emo",
        "train_loss_aug",
        "train_loss_rec",
        "val_uar",
        "val_loss_emo",
    ):
        assert a[key] == b[key], key
    sa = load_state(tmp_path / "full" / "epoch_0001")
    sb = load_state(tmp_path / "resumed" / "epoch_0001")
    for name, t in sa["model"].items():
        assert torch.equal(t, sb["model"][name]), name
    assert sa["epoch"] == sb["epoch"] == 1
    assert "optimizer" in sa and "rng" in sa


def test_checkpoint_loads_with_weights_only(synth_corpus, tmp_path):
    cfg = loop_config(synth_corpus["cache"], **{"optim.epochs": 1})
    cfg["run"]["max_steps_per_epoch"] = 1
    s = LocalSession(device="cpu", keep_checkpoints=str(tmp_path))
    train(cfg, s)
    state = torch.load(tmp_path / "epoch_0000" / "state.pt", weights_only=True)
    assert state["epoch"] == 0


def test_nan_loss_fails_with_the_reason(synth_corpus):
    cfg = loop_config(
        synth_corpus["cache"], **{"optim.epochs": 3, "optim.lr": 1e20, "optim.grad_clip": 0.0}
    )
    with pytest.raises(TrialDiverged, match=r"loss became (nan|inf)"):
        train(cfg, LocalSession(device="cpu"))
