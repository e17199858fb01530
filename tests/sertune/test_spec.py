"""Bad specs are refused before anything starts: one line naming the file and the field, exit 2."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sertune.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO / "search_spaces").glob("*.yaml"))
SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())


def write(tmp_path, edit) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(SMOKE))
    edit(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_validates(preset, home):
    ckpt = yaml.safe_load(preset.read_text()).get("params", {}).get("model.ssl.checkpoint")
    if ckpt:  # a placeholder: refused, naming the path, until an encoder is there
        where = ckpt.replace("${SERTUNE_HOME}", str(home.resolve()))
        with pytest.raises(SpecError, match=re.escape(f"{where} does not exist")):
            load_spec(preset)
        from tests.trainables.ssl_models import save_tiny_encoder

        save_tiny_encoder(Path(where))
    spec = load_spec(preset)
    assert spec.trainable == "mtl_aug" and spec.budget.trials >= 1
    smoke = load_spec(preset, smoke=True)
    assert smoke.budget.trials == 2 and smoke.device == "cpu"


CASES = [
    ("unknown top-level key", lambda r: r.update(bugdet={}), "bugdet", "unknown key"),
    ("unknown nested key", lambda r: r["budget"].update(trails=3), "budget.trails", "unknown key"),
    ("wrong type", lambda r: r["budget"].update(trials="many"), "budget.trials", "integer"),
    (
        "low > high",
        lambda r: r["space"].update({"loss.w_aug": {"type": "float", "low": 2.0, "high": 1.0}}),
        "space.loss.w_aug",
        r"low \(2.0\) > high \(1.0\)",
    ),
    (
        "empty choice",
        lambda r: r["space"].update({"model.dropout": {"type": "choice", "values": []}}),
        "space.model.dropout.values",
        "at least one value",
    ),
    (
        "log with low <= 0",
        lambda r: r["space"].update(
            {"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}
        ),
        "space.optim.lr.low",
        "log scale",
    ),
    (
        "unknown parameter",
        lambda r: r["space"].update({"loss.w_agu": {"type": "float", "low": 0, "high": 1}}),
        "space.loss.w_agu",
        "unknown parameter",
    ),
    (
        "unknown fixed parameter",
        lambda r: r["params"].update({"model.layers": 3}),
        "params.model.layers",
        "unknown parameter",
    ),
    (
        "unknown trainable",
        lambda r: r.update(trainable="resnet"),
        "trainable",
        "unknown trainable 'resnet'",
    ),
    (
        "unknown corpus",
        lambda r: r["data"].update(corpus="timit"),
        "data.corpus",
        "unknown corpus 'timit'",
    ),
    (
        "missing data root",
        lambda r: r["data"].update(corpus="emodb", root="/no/such/emodb"),
        "data.root",
        "does not exist",
    ),
    (
        "unknown metric",
        lambda r: r["objective"].update(metric="val_acc"),
        "objective.metric",
        "unknown metric",
    ),
    (
        "test-set objective",
        lambda r: r["objective"].update(metric="test_uar"),
        "objective.metric",
        "test speakers",
    ),
    ("bad mode", lambda r: r["objective"].update(mode="maximise"), "objective.mode", "max"),
    (
        "grace > epochs",
        lambda r: r["budget"].update(grace_epochs=9),
        "budget.grace_epochs",
        "max_epochs",
    ),
    (
        "fractional GPU above 1",
        lambda r: r["resources"].update(gpus_per_worker=1.5),
        "resources",
        "whole",
    ),
    (
        "a choice the trainable refuses, between two it accepts",
        lambda r: r["space"].update(
            {"optim.min_steps_per_epoch": {"type": "choice", "values": [4, 0, 8]}}
        ),
        "space.optim.min_steps_per_epoch",
        r"min_steps_per_epoch >= 1.*'optim.min_steps_per_epoch': 0",
    ),
    (
        "value the trainable refuses",
        lambda r: r["params"].update({"aug.snr_db_low": 40.0}),
        "params.aug.snr_db_low",
        r"snr_db_low \(40.0\) > aug.snr_db_high",
    ),
]


@pytest.mark.parametrize("case, edit, field, message", CASES, ids=[c[0] for c in CASES])
def test_each_class_of_spec_error(tmp_path, home, case, edit, field, message):
    path = write(tmp_path, edit)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    text = str(err.value)
    assert text.startswith(f"{path}: {field}"), text
    assert __import__("re").search(message, text), text
    assert "\n" not in text


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("budget: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_cli_exits_2_with_one_line_before_ray_starts(tmp_path, home):
    path = write(
        tmp_path,
        lambda r: r["space"].update({"loss.w_aug": {"type": "float", "low": 2.0, "high": 1.0}}),
    )
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "sertune.cli", "search", "run", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.strip() == f"sertune: error: {path}: space.loss.w_aug: low (2.0) > high (1.0)"
    assert "Ray" not in p.stdout + p.stderr
    assert time.monotonic() - t0 < 30


def test_set_overrides_and_define_by_run(tmp_path, home):
    spec = load_spec(
        REPO / "search_spaces" / "mtl_aug.yaml",
        sets=["budget.trials=5", "params.optim.grad_clip=1.0"],
        overrides=None,
    )
    assert spec.budget.trials == 5 and spec.params["optim.grad_clip"] == 1.0
    with pytest.raises(SpecError, match="both fixed"):
        load_spec(REPO / "search_spaces" / "mtl_aug.yaml", sets=["params.loss.w_rec=0"])
    bad = write(tmp_path, lambda r: r.update(define_by_run="nowhere.py:space"))
    with pytest.raises(SpecError, match="define_by_run"):
        load_spec(bad)


def test_the_baseline_preset_is_mtl_aug_with_the_aux_tasks_off(home):
    """A fair baseline: the same space, data, budget and seeds; only the auxiliary weights fixed."""
    from sertune.confirm import baseline_spec

    mtl, stl = load_spec("mtl_aug"), load_spec("stl_baseline")
    assert set(mtl.space) - set(stl.space) == {"loss.w_aug", "loss.w_rec"}
    assert {k: v for k, v in mtl.space.items() if k in stl.space} == stl.space
    assert stl.params == {**mtl.params, "loss.w_aug": 0.0, "loss.w_rec": 0.0}
    for field in (
        "data",
        "budget",
        "resources",
        "robustness",
        "confirm",
        "seed",
        "objective",
        "define_by_run",
        "execution",
    ):
        assert getattr(mtl, field) == getattr(stl, field), field
    derived = baseline_spec(load_spec("mtl_aug", sets=["baseline=stl_baseline"]))
    assert derived.name == "mtl-aug--stl_baseline"
    assert derived.space == stl.space and derived.params == stl.params


def test_presets_by_name_from_anywhere(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    assert load_spec("mtl_aug").name == "mtl-aug"
    assert load_spec("smoke.yaml").name == "smoke"
    with pytest.raises(SpecError, match="packaged presets: conditional|packaged presets: demo"):
        load_spec("nope")


def test_a_searched_parameter_knows_its_distribution_grid_domain_and_stored_values():
    """The one place a ``space`` entry is interpreted: Optuna, Ray Tune, grids, warm starts."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from sertune.spec import ParamSpec

    f = ParamSpec(type="float", low=0.0, high=1.0, step=0.25)
    i = ParamSpec(type="int", low=2, high=8, step=3, log=False)
    c = ParamSpec(type="choice", values=["a", 1, True])
    lg = ParamSpec(type="float", low=1e-4, high=1e-1, log=True)
    assert f.distribution() == FloatDistribution(0.0, 1.0, step=0.25)
    assert i.distribution() == IntDistribution(2, 8, step=3)
    assert c.distribution() == CategoricalDistribution(["a", 1, True])
    assert (f.grid_values(), i.grid_values(), lg.grid_values()) == (
        [0.0, 0.25, 0.5, 0.75, 1.0],
        [2, 5, 8],
        None,
    )
    assert (f.parse("0.5"), i.parse("5"), c.parse("True"), c.parse("1")) == (0.5, 5, True, 1)
    for p, raw in ((f, "1.5"), (i, "2.5"), (c, "b")):
        with pytest.raises(ValueError):
            p.parse(raw)
    assert 1e-4 <= lg.tune_domain().sample() <= 1e-1
    assert lg.bounds() == (1e-4, 1e-1) and c.bounds() is None
