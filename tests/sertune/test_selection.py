"""Selection never sees the test speakers: objectives, constraints (what the sampler receives)
and choosing promotion gates use ``val_*`` / ``val_robust/*`` figures (the validation speakers);
``robust/*``, ``test_*`` and cross-corpus figures are reported of the chosen model only."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.linear_trainable import linear_spec
from tests.sertune.test_confirm import _model_dir
from tests.sertune.test_constraints import ROBUST

REPO = Path(__file__).resolve().parents[2]
NOTE = "reported on the test speakers; it did not choose the champion"


def _validate(*sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "sertune.cli", "search", "validate", "mtl_aug"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_a_test_speaker_constraint_is_refused_naming_its_validation_twin(home):
    p = _validate('objective.constraints=["robust/uar_snr10_white >= 0.5"]')
    assert p.returncode == 2, p.stdout + p.stderr
    assert "objective.constraints.0" in p.stderr and "test speakers" in p.stderr
    assert "'val_robust/uar_snr10_white'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = _validate('objective.constraints=["val_robust/uar_snr10_white >= 0.5"]')
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok" in p.stdout


def _problems(tmp_path, home, **fields) -> list[tuple[str, str]]:
    from sertune.spec import SpecError, load_spec

    path = tmp_path / "sel.yaml"
    path.write_text(yaml.safe_dump(linear_spec(home, "sel", robustness=ROBUST, **fields)))
    try:
        load_spec(path)
    except SpecError as e:
        return e.problems
    return []


def test_reported_figures_are_refused_as_objectives_and_constraints(home, tmp_path):
    space = {"optim.lr": {"type": "float", "low": 0.01, "high": 0.1}}
    pareto = {"metrics": [{"metric": "val_uar"}, {"metric": "robust/uar_snr10_white"}]}
    problems = _problems(tmp_path, home, objective=pareto, space=space)
    assert len(problems) == 1 and problems[0][0] == "objective.metrics.1.metric", problems
    assert "'val_robust/uar_snr10_white'" in problems[0][1]
    # the Pareto front of a selection figure and its validation twin is fine
    pareto = {"metrics": [{"metric": "val_uar"}, {"metric": "val_robust/uar_snr10_white"}]}
    assert _problems(tmp_path, home, objective=pareto, space=space) == []
    # test_* keeps its refusal, and no longer suggests robust/*
    problems = _problems(
        tmp_path, home, objective={"metric": "val_uar", "constraints": ["test_uar >= 0.3"]}
    )
    assert problems and "never select on the test speakers" in problems[0][1]
    assert "val_robust/*" in problems[0][1] and " robust/*" not in problems[0][1]
    # a cross-corpus figure has no twin: reported only
    data = linear_spec(home, "sel")["data"]
    data["cross_corpus"] = [
        {"corpus": "synthetic", "root": str(home / "data" / "x"), "name": "other"}
    ]
    problems = _problems(
        tmp_path,
        home,
        data=data,
        objective={"metric": "val_uar", "constraints": ["robust/uar_cross_other >= 0.3"]},
    )
    assert problems and problems[0][0] == "objective.constraints.0", problems
    assert "cross-corpus" in problems[0][1] and "held-out dev part" in problems[0][1]


def test_every_robust_figure_has_a_validation_twin_but_cross_corpus():
    from trainables.common.robustness import robust_metric_names

    names = robust_metric_names(ROBUST, ["other"])
    robust = {n for n in names if n.startswith("robust/")}
    twins = {n for n in names if n.startswith("val_robust/")}
    assert "robust/uar_cross_other" in robust
    assert twins == {"val_" + n for n in robust - {"robust/uar_cross_other"}}
    assert "val_robust/uar_snr10_white" in twins and "val_robust/uar_noise_mean" in twins


@pytest.mark.usefixtures("ray_2cpu")
def test_the_sampler_of_a_constrained_search_sees_validation_figures_only(home, tmp_path):
    from sertune import tracking
    from sertune.records import experiment_path
    from sertune.search import run_search
    from sertune.spec import load_spec
    from sertune.tuner import ConstrainedOptunaSearch

    path = tmp_path / "sel.yaml"
    raw = linear_spec(
        home,
        "sel",
        objective={"metric": "val_uar", "constraints": ["val_robust/uar_clean >= 0.4"]},
        budget={"trials": 2, "concurrency": 2, "max_epochs": 2, "grace_epochs": 2},
        params={"features.n_mels": 16},
        robustness=ROBUST,
        space={"optim.lr": {"type": "float", "low": 0.001, "high": 0.3, "log": True}},
        search={"sampler": "tpe"},
    )
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(path)
    result = run_search(spec, log=lambda *a: None)
    assert result.completed == 2
    # the figures reported at trial end: both the validation twins and the test report
    runs = tracking.Store().runs_of("sel", "trial")
    assert len(runs) == 2
    for run in runs:
        assert {"val_robust/uar_clean", "val_robust/uar_snr10_white"} <= set(run.metrics)
        assert {"robust/uar_clean", "robust/uar_snr10_white", "test_uar"} <= set(run.metrics)
        clean = run.metrics["val_robust/uar_clean"]
        assert run.tags["sertune.feasible"] == str(clean >= 0.4).lower()
    for row in result.rows:
        assert result.columns.feasible(row) == (row["val_robust/uar_clean"] >= 0.4)
    # what the sampler received: constraint values of the val_robust figure, nothing else
    searcher = ConstrainedOptunaSearch(conditions=spec.objective.conditions())
    searcher.restore_from_dir(experiment_path("sel"))
    trials = searcher._ot_study.trials
    assert len(trials) == 2
    assert all(list(t.constraints) == ["val_robust/uar_clean >= 0.4"] for t in trials)
    seen = sorted(t.constraints["val_robust/uar_clean >= 0.4"] for t in trials)
    assert seen == pytest.approx(sorted(0.4 - r.metrics["val_robust/uar_clean"] for r in runs))
    for t in trials:
        for key in [*t.constraints, *t.user_attrs, *t.params]:
            assert not key.startswith(("robust/", "test_")), key


def test_a_reported_gate_reports_on_the_champion_and_never_passes_over(home, tmp_path, capsys):
    """Trial A wins on val_uar but is fragile on the test speakers; B is robust everywhere. A
    ``robust/*`` gate only reports on A: pass or refuse, never B in A's place. A ``val_robust/*``
    gate chooses: it passes A over for B."""
    from mlflow import MlflowClient

    from sertune import tracking
    from sertune.cli import main
    from sertune.errors import GateFailed, UsageError
    from sertune.records import SearchRecord, save_record
    from sertune.registry import promote
    from sertune.spec import load_spec
    from sertune.tracking import log_pyfunc_model

    spec = load_spec(REPO / "search_spaces" / "smoke.yaml")
    uri = tracking.ensure_store()
    save_record(
        "sel",
        SearchRecord(
            name="sel", spec=spec, data={"fingerprint": "f"}, tracking_uri=uri, path=str(home)
        ),
    )
    c = MlflowClient(uri)
    exp = tracking.get_experiment_id(c)
    parent = c.create_run(exp, tags={"sertune.search": "sel", "sertune.kind": "search"})
    model, runs = _model_dir(tmp_path), {}
    for tid, figures in {
        "A": {"val_uar": 0.9, "val_robust/uar_snr10_white": 0.7, "robust/uar_snr10_white": 0.3},
        "B": {"val_uar": 0.8, "val_robust/uar_snr10_white": 0.8, "robust/uar_snr10_white": 0.9},
    }.items():
        tags = {
            "sertune.search": "sel",
            "sertune.kind": "trial",
            "sertune.trial_id": tid,
            "sertune.status": "finished",
            "mlflow.parentRunId": parent.info.run_id,
        }
        r = c.create_run(exp, tags=tags).info.run_id
        for k, v in figures.items():
            c.log_metric(r, k, v)
        c.set_tag(r, "sertune.model_uri", log_pyfunc_model(r, model, "mtl_aug", uri))
        runs[tid] = r

    # a failing report-only gate refuses to register A, and does not pass over to B
    with pytest.raises(GateFailed) as failed:
        promote("sel", gates=["robust/uar_snr10_white>=0.5"], model_name="sel")
    text = str(failed.value)
    assert "refusing to promote trial A" in text and "FAIL" in text and NOTE in text
    assert "trial B" not in text
    assert not c.search_registered_models(filter_string="name='sel'")

    # a passing one is printed as reported, on the champion the objective chose
    assert main(["promote", "sel", "--gate", "robust/uar_snr10_white>=0.2", "--name", "sel"]) == 0
    out = capsys.readouterr().out
    assert f"robust/uar_snr10_white >= 0.2: 0.3000 pass ({NOTE})" in out
    assert "passed over" not in out
    v = promote("sel", gates=["robust/uar_snr10_white>=0.2"], model_name="sel")
    assert v["run_id"] == runs["A"] and v["passed_over"] == []
    description = c.get_model_version("sel", v["version"]).description
    assert f"`robust/uar_snr10_white >= 0.2` (0.3000, {NOTE})" in description

    # a validation gate chooses: A is passed over for B, named
    w = promote("sel", gates=["val_robust/uar_snr10_white>=0.75"], model_name="sel")
    assert w["run_id"] == runs["B"]
    assert [p["failed"] for p in w["passed_over"]] == [["val_robust/uar_snr10_white"]]
    assert w["reported"] == []

    # nor does promotion rank by a test-speaker figure
    with pytest.raises(UsageError, match="val_robust/uar_snr10_white"):
        promote("sel", objective="robust/uar_snr10_white", model_name="sel")
    # a twin no trial measured (robustness.validation: selection) is refused, saying how to get it
    with pytest.raises(UsageError, match="robustness.validation: all") as unmeasured:
        promote("sel", gates=["val_robust/uar_snr0_babble>=0.3"], model_name="sel")
    assert "no trial measured val_robust/uar_snr0_babble" in str(unmeasured.value)
