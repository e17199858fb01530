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


# -- corpora larger than a slot's budget: streamed batches ----------------------------------------


def test_streamed_and_resident_batches_are_bit_identical_for_a_seed(synth_corpus):
    """The same pool, positions and seed: the crops, masks and labels a model sees are the same
    bits whether the corpus is on the device or read from the cache's memory map by the loader
    thread; an unlabelled pool beside it too (each source in the other mode)."""
    import numpy as np

    from trainables.common.batches import TrainBatches
    from trainables.common.utterances import Utterances
    from trainables.data.cache import load_cache

    c = load_cache(synth_corpus["cache"])
    dev = torch.device("cpu")
    train_idx = np.arange(0, len(c), 2)
    labels = torch.from_numpy(np.asarray(c.labels))
    order = torch.randperm(len(train_idx) + len(c), generator=torch.Generator().manual_seed(3))
    steps = [order[i : i + 16] for i in range(0, 160, 16)]

    def batches(main_streamed: bool, extra_streamed: bool):
        main = Utterances.from_corpus(c, dev, streamed=main_streamed, window_bytes=1 << 20)
        extra = Utterances.from_corpus(c, dev, streamed=extra_streamed, window_bytes=1 << 20)
        tb = TrainBatches(main, extra, train_idx, labels, length=24000)
        assert tb.streamed == (main_streamed or extra_streamed)
        return list(tb.epoch(steps, seed=11))

    resident = batches(False, False)
    for mode in ((True, True), (True, False), (False, True)):
        for (wa, va, ya), (wb, vb, yb) in zip(resident, batches(*mode), strict=True):
            assert torch.equal(wa, wb) and torch.equal(va, vb) and torch.equal(ya, yb), mode
    # short clips are padded with zeros, and the unlabelled pool's rows carry no label
    wav, valid, y = resident[0]
    assert (wav[~valid] == 0).all() and (y == -1).any() and (y >= 0).any()


def test_a_slot_streams_a_corpus_larger_than_its_budget_and_trains_the_same(synth_corpus):
    """A forced budget below the corpus size: the slot streams it, says so once, records the mode
    on every report's first epoch, and trains to exactly the metrics of the resident run."""
    from trainables.data.cache import load_cache

    size_mb = load_cache(synth_corpus["cache"]).audio.nbytes / 1e6
    runs = {}
    for name, placement in {
        "resident": {},
        "streamed": {"corpus_budget_mb": size_mb / 2},
    }.items():
        cfg = loop_config(synth_corpus["cache"], **{"optim.epochs": 2})
        cfg["run"]["max_steps_per_epoch"] = 3
        cfg["run"]["data_placement"] = placement
        session = LocalSession(device="cpu", store={})
        runs[name] = (train(cfg, session), session)
    (res, _), (stream, session) = runs["resident"], runs["streamed"]
    assert "resident" in res[0]["data_mode"] and "streamed" in stream[0]["data_mode"]
    assert "resident on cpu" in res[0]["slot_note"]
    note = stream[0]["slot_note"]
    assert "streamed from host memory" in note and "set by resources.corpus_budget_mb" in note
    for key in ("train_loss", "val_uar", "val_loss_emo", "test_uar"):
        assert res[-1][key] == stream[-1][key], key
    # a second trial in the same slot reuses the streamed corpus and says nothing new
    cfg["run"]["data_placement"] = {"corpus_budget_mb": size_mb / 2}
    again = train(cfg, LocalSession(device="cpu", store=session.cache()))
    assert "slot_note" not in again[0] and "streamed" in again[0]["data_mode"]


def test_the_resident_store_is_a_byte_budget(synth_corpus, tmp_path):
    """Entries a trial no longer uses are evicted, oldest first, when a new corpus needs the room;
    what the current trial holds never is; a corpus that cannot fit is streamed, not evicting."""
    from trainables.data.cache import load_cache
    from trainables.mtl_aug.train import Resident

    size = load_cache(synth_corpus["cache"]).audio.nbytes
    cache: dict = {}
    dev = torch.device("cpu")
    budget = {"corpus_budget_mb": size * 1.5 / 1e6}
    first = Resident(cache, dev, budget)
    assert not first.corpus(str(synth_corpus["cache"]))[1].streamed
    other = tmp_path / "copy"
    import shutil

    shutil.copytree(synth_corpus["cache"], other)
    # the same trial asks for a second corpus: no room left, and the first is in use -> streamed
    assert first.corpus(str(other))[1].streamed
    # the next trial wants only the copy on the device: the first is evicted for it
    nxt = Resident(
        cache, dev, {"corpus_budget_mb": size * 1.5 / 1e6, "corpus_on_device": "always"}
    )
    assert not nxt.corpus(str(other))[1].streamed
    keys = list(cache[Resident.KEY])
    assert len(keys) == 1 and keys[0].endswith(str(other)), keys
    assert nxt.held_bytes() == size
    never = Resident({}, dev, {"corpus_on_device": "never"})
    assert never.corpus(str(other))[1].streamed
