"""Fixtures of the trainables' tests: tiny SSL encoders saved as Hugging Face folders."""

import pytest

from tests.trainables.ssl_models import save_tiny_encoder


@pytest.fixture(scope="session")
def ssl_checkpoints(tmp_path_factory):
    """{"wavlm": DIR, "hubert": DIR, "wav2vec2": DIR}: tiny encoders, loaded through the real
    local-path code."""
    root = tmp_path_factory.mktemp("ssl")
    return {kind: save_tiny_encoder(root / kind, kind) for kind in ("wavlm", "hubert", "wav2vec2")}
