"""The trainable contract is complete: a second, linear trainable (tests/linear_trainable.py,
registered only in tests) runs a smoke search, is promoted behind a robustness gate, predicts and
is reported on - through the same control plane, which imports neither trainable."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

pytestmark = pytest.mark.usefixtures("ray_2cpu")


def test_linear_trainable_search_promote_predict_report(home, tmp_path):
    from sertune.inference import predict_files, report_model
    from sertune.registry import promote
    from sertune.search import run_search
    from sertune.spec import load_spec
    from tests.linear_trainable import linear_spec

    raw = linear_spec(
        home,
        "linear-smoke",
        budget={"trials": 2, "concurrency": 2, "max_epochs": 2, "grace_epochs": 2},
        params={"features.n_mels": 16},
        space={"optim.lr": {"type": "float", "low": 0.01, "high": 0.1, "log": True}},
        robustness={
            "snrs_db": [10],
            "noises": ["white"],
            "fgsm_eps": [0.005],
            "pgd_eps": [],
            "max_utterances": 16,
        },
    )
    spec_path = tmp_path / "linear.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    result = run_search(load_spec(spec_path), log=lambda *a: None)
    assert result.errors == 0 and result.completed == 2
    assert all("robust/uar_snr10_white" in r and "test_uar" in r for r in result.rows)

    v = promote("linear-smoke", gates=["robust/uar_snr10_white>=0"], model_name="ser-linear")
    wav = next((home / "data" / "lin" / "wav").rglob("*.wav"))
    rows = predict_files("models:/ser-linear@champion", [str(wav)])
    assert v["version"] == "1" and rows[0]["emotion"] in ("angry", "happy", "neutral", "sad")
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5

    out = report_model(
        "models:/ser-linear@champion",
        "synthetic",
        str(home / "data" / "lin"),
        str(tmp_path / "report"),
        max_utterances=8,
        split="all",
    )
    assert (Path(out) / "robustness.json").is_file() and (Path(out) / "uar_vs_snr.png").is_file()
    x, _ = sf.read(wav)
    assert np.isfinite(x).all()
