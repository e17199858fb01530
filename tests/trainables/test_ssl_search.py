"""A search end to end on local Ray (2 CPUs) with a self-supervised encoder: the smoke spec with
``--set params.model.encoder=ssl``, a tiny WavLM built here, MLflow on SQLite."""

import pytest

pytestmark = pytest.mark.usefixtures("ray_2cpu")  # ~50 s on 2 CPUs: in `make test`


def test_a_smoke_search_on_an_ssl_encoder_logs_the_layer_weights(home, ssl_checkpoints):
    from mlflow import MlflowClient

    from sertune import settings
    from sertune.search import run_search
    from sertune.spec import load_spec
    from sertune.tracking import get_experiment_id

    sets = [
        "params.model.encoder=ssl",
        f"params.model.ssl.checkpoint={ssl_checkpoints['wavlm']}",
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
