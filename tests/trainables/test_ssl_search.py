"""A search end to end on local Ray (2 CPUs) with a self-supervised encoder: the smoke spec with
``--set params.model.encoder=ssl``, a tiny WavLM built here, MLflow on SQLite; its champion
promoted (the encoder packaged) and predicting in a fresh process with the checkpoint gone."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("ray_2cpu")  # ~50 s on 2 CPUs: in `make test`


def test_a_smoke_search_on_an_ssl_encoder_logs_the_layer_weights(home, ssl_checkpoints, tmp_path):
    from mlflow import MlflowClient

    from sertune import settings
    from sertune.search import run_search
    from sertune.spec import load_spec
    from sertune.tracking import get_experiment_id

    ckpt = shutil.copytree(ssl_checkpoints["wavlm"], tmp_path / "wavlm")  # moved away below
    sets = [
        "params.model.encoder=ssl",
        f"params.model.ssl.checkpoint={ckpt}",
        "space.model.ssl.finetune_top={type: choice, values: [0, 1]}",
    ]
    spec = load_spec("smoke", sets=sets, smoke=True)
    lines: list[str] = []
    result = run_search(spec, log=lines.append)
    assert len(result.rows) == 2 and result.errors == 0, lines[-20:]
    assert any("loaded from disk" in ln for ln in lines), lines
    c = MlflowClient(settings.tracking_uri())
    runs = c.search_runs([get_experiment_id(c)], "tags.`sertune.search` = 'smoke'")
    trials = [r for r in runs if r.data.tags.get("sertune.kind") == "trial"]
    assert len(trials) == 2
    for r in trials:
        assert "model.ssl.finetune_top" in r.data.params
        arts = {a.path for a in c.list_artifacts(r.info.run_id, "robustness")}
        assert {"robustness/layer_weights.png", "robustness/layer_weights.json"} <= arts
        assert "robust/uar_fgsm0.005" in r.data.metrics  # through the frozen encoder

    # each trial's model keeps the encoder outside (path + hash): a few heads, not the encoder
    from sertune.inference import data_dir, model_dir
    from sertune.registry import promote

    trial_model = data_dir(model_dir(trials[0].data.tags["sertune.model_uri"]))
    meta = json.loads((trial_model / "model.json").read_text())
    assert meta["ssl"]["encoder_weights"] == "external"
    # promotion registers a packaged copy (logged once on the trial's run, reused after)
    v = promote("smoke", model_name="ser-ssl")
    again = promote("smoke", model_name="ser-ssl")
    assert again["version"] == v["version"] and again["reused"]
    run = c.get_run(v["model_run_id"])
    packaged = run.data.tags["sertune.packaged_model_uri"]
    assert c.get_model_version("ser-ssl", v["version"]).tags["sertune.model_uri"] == packaged
    assert run.info.status == "FINISHED"  # packaging did not leave the run open
    registered = data_dir(model_dir("models:/ser-ssl@champion"))
    assert json.loads((registered / "model.json").read_text())["ssl"]["encoder_weights"] == (
        "packaged"
    )
    # the checkpoint moved away: the registered model predicts in a fresh process; the trial's
    # own model names what is missing
    shutil.move(str(ckpt), str(tmp_path / "elsewhere"))
    wav = tmp_path / "clip.wav"
    sf.write(wav, (0.1 * np.random.default_rng(0).standard_normal(24000)).astype("float32"), 16000)
    env = dict(os.environ)
    out = subprocess.run(
        [str(Path(sys.executable).parent / "sertune"), "predict", "models:/ser-ssl@champion", str(wav),
         "--format", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert len(rows) == 1 and abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-4, rows
    out = subprocess.run(
        [str(Path(sys.executable).parent / "sertune"), "predict", trials[0].data.tags["sertune.model_uri"],
         str(wav)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode != 0
    assert f"its encoder's weights are in {ckpt.resolve()}, which is missing" in out.stderr
    assert "the local copy is removed" not in out.stderr  # the download is whole: kept
