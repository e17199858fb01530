"""The shared suite every registered trainable must pass (like Optuna's sampler suites).

``tests/test_trainables_contract.py`` runs it for each entry of the ``sertune.trainables``
registry, so a new trainable gets these checks by registering itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sertune.trainable import Trainable


def check_interface(t: Trainable) -> None:
    assert t.name and isinstance(t.name, str)
    assert t.epoch_metrics and all(isinstance(m, str) for m in t.epoch_metrics)
    names = t.param_names()
    assert names and all("." in n or n == "seed" for n in names)
    assert "synthetic" in t.corpora() or t.corpora()


def check_rejects_unknown_params(t: Trainable) -> None:
    with pytest.raises(ValueError, match="no_such_param"):
        t.validate_params({"no_such_section.no_such_param": 1})


def check_trains_reports_and_serves(t: Trainable, tmp_path: Path, params: dict[str, Any]) -> None:
    """prepare_data → run_local reports every epoch metric → the saved model predicts."""
    data = t.prepare_data(
        {
            "corpus": "synthetic",
            "root": str(tmp_path / "corpus"),
            "synthetic": {"n_speakers": 4, "per_class": 3, "seed": 0},
        },
        str(tmp_path / "cache"),
        progress=lambda m: None,
    )
    assert data["fingerprint"] and data["report"]["used"] > 0
    history = t.run_local(
        {
            "params": {**params, "optim.epochs": 1},
            "data": data,
            "run": {"device": "cpu", "max_steps_per_epoch": 1},
        }
    )
    assert len(history) == 1
    missing = set(t.epoch_metrics) - set(history[0])
    assert not missing, f"epoch metrics not reported: {missing}"
    assert set(t.final_metrics) <= set(history[-1])


def check_load_predictor(t: Trainable, model_dir: Path) -> None:
    p = t.load_predictor(model_dir)
    probs = p.predict_proba(
        [np.zeros(p.sample_rate, dtype=np.float32), np.ones(800, dtype=np.float32) * 0.1]
    )
    assert probs.shape == (2, len(p.label_names))
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
