"""Shared fixtures: real local components only (Ray sized for 2 CPUs, MLflow on SQLite or a real
server, moto's S3 server over HTTP), tiny models and corpora through the users' own config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A second trainable, registered for the whole test session (Ray workers inherit the variable).
os.environ["SERTUNE_TRAINABLES"] = "linear=tests.linear_trainable:TRAINABLE"

# A tiny MTL-AUG: seconds per epoch on one CPU core.
TINY = {
    "model.conv_channels": [8, 16],
    "model.lstm_hidden": 24,
    "model.attn_dim": 16,
    "features.n_mels": 32,
    "features.segment_s": 1.0,
    "optim.batch_size": 16,
}


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    """The same test on the CPU here and on a GPU where one is present."""
    import torch

    return torch.device(request.param)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An isolated SERTUNE_HOME (searches, caches, MLflow store) per test."""
    h = tmp_path / "home"
    monkeypatch.setenv("SERTUNE_HOME", str(h))
    for key in ("MLFLOW_TRACKING_URI", "SERTUNE_STORAGE"):
        monkeypatch.setenv(key, "")  # recorded, so whatever the test sets is undone after it
        monkeypatch.delenv(key)
    return h


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory):
    """8 speakers × 4 emotions × 10 utterances (+16 unlabelled), decoded into a cache."""
    from trainables.data.cache import build_cache
    from trainables.data.synth import synthesise_corpus

    root = tmp_path_factory.mktemp("synth")
    manifest = synthesise_corpus(
        root / "corpus", n_speakers=8, per_class=10, n_unlabelled=16, seed=0
    )
    cache = build_cache("manifest", manifest, root / "cache", progress=lambda m: None)
    return {"root": root / "corpus", "manifest": manifest, "cache": cache}


@pytest.fixture(scope="module")
def ray_2cpu():
    """Local Ray with 2 CPUs for one test module, shut down after it (its own cluster only)."""
    from sertune.cluster import init_ray, shutdown_ray

    shutdown_ray()
    init_ray(num_cpus=2)
    yield
    shutdown_ray()


@pytest.fixture
def tiny():
    """The tiny model's parameters (dotted names, as in a spec's ``params``)."""
    return dict(TINY)
