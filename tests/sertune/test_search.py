"""Searches end to end on local Ray (2 CPUs): Ray Tune + Optuna over Ray Train trials, MLflow."""

import json
from pathlib import Path

import pytest
import yaml

from sertune.records import load_record
from sertune.search import run_search
from sertune.spec import load_spec
from sertune.status import search_status
from sertune.trainable import EPOCHS_DONE

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "search_spaces" / "smoke.yaml"

pytestmark = pytest.mark.usefixtures("ray_2cpu")


def spec_file(tmp_path, edit=None):
    raw = yaml.safe_load(SMOKE.read_text())
    if edit:
        edit(raw)
    p = tmp_path / f"{raw['name']}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def mlflow_runs(name):
    from mlflow import MlflowClient

    from sertune import settings
    from sertune.tracking import get_experiment_id

    c = MlflowClient(settings.tracking_uri())
    runs = c.search_runs([get_experiment_id(c)], f"tags.`sertune.search` = '{name}'")
    parent = [r for r in runs if r.data.tags.get("sertune.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("sertune.kind") == "trial"]
    return c, parent, children


def test_smoke_single_objective(home, tmp_path):
    spec = load_spec(spec_file(tmp_path))
    result = run_search(spec, log=lambda *a: None)
    assert len(result.rows) == 2 and result.errors == 0
    assert all(r["state"] in ("finished", "stopped") for r in result.rows)
    uars = [r["val_uar"] for r in result.rows]
    assert uars == sorted(uars, reverse=True)  # best first
    # the leaderboard shows test figures for stopped trials too (evaluated after the search)
    assert all(isinstance(r.get("test_uar"), float) for r in result.rows), result.rows
    assert load_record("smoke").status == "finished"
    status = search_status("smoke")
    assert sum(status["trials"].values()) == 2 and "best" in status
    assert set(status["trials"]) <= {"finished", "stopped early"}

    c, parent, children = mlflow_runs("smoke")
    assert len(parent) == 1 and len(children) == 2
    p = parent[0]
    assert p.info.status == "FINISHED"
    arts = {a.path for a in c.list_artifacts(p.info.run_id, "search")}
    assert {"search/spec.yaml", "search/data_report.json"} <= arts
    summary = {a.path for a in c.list_artifacts(p.info.run_id, "summary")}
    assert {"summary/leaderboard.csv", "summary/optimisation_history.png"} <= summary
    for ch in children:
        assert ch.data.tags["mlflow.parentRunId"] == p.info.run_id
        assert ch.data.tags["sertune.status"] in ("finished", "stopped_early")
        assert {"loss.w_aug", "loss.w_rec", "aug.p_white_noise"} <= set(ch.data.params)
        assert ch.data.tags["sertune.data_mode"].endswith(" resident")  # it fits the budget
        hist = c.get_metric_history(ch.info.run_id, "train_loss_rec")
        # one point per epoch, the step being the trial's real epoch
        assert [m.step for m in hist] == list(range(1, int(ch.data.metrics[EPOCHS_DONE]) + 1))
        # every trial, stopped early or not, gets its best epoch's test and robustness figures
        assert "test_uar" in ch.data.metrics and "robust/uar_snr10_white" in ch.data.metrics
        robust = {a.path for a in c.list_artifacts(ch.info.run_id, "robustness")}
        assert {
            "robustness/robustness.json",
            "robustness/uar_vs_snr.png",
            "robustness/uar_vs_eps.png",
        } <= robust
    # the reference baseline on the same split: a row under the leaderboard, figures on the
    # parent run, the same metric names as a trial's (no adversarial figure: n/a)
    ref = load_record("smoke").reference
    assert ref and ref["metrics"]["test_uar"] > 0.25 and "robust/uar_snr10_white" in ref["metrics"]
    assert not any("fgsm" in k or "pgd" in k for k in ref["metrics"])
    assert p.data.metrics["reference/test_uar"] == pytest.approx(ref["metrics"]["test_uar"])
    assert p.data.tags["sertune.reference"].startswith("eGeMAPSv02 functionals (opensmile")
    from sertune.leaderboard import format_table

    row = next(ln for ln in format_table(result).splitlines() if " reference " in ln)
    assert "eGeMAPS + linear" in row and f"{ref['metrics']['val_uar']:.3f}" in row


@pytest.mark.slow  # moved to the slow tier: keeps make test under 30 min in CI
def test_reference_null_turns_the_reference_row_off(home, tmp_path):
    from sertune.leaderboard import format_table

    spec = load_spec(spec_file(tmp_path), sets=["reference=null", "budget.trials=1"])
    result = run_search(spec, log=lambda *a: None)
    assert load_record("smoke").reference is None and result.reference is None
    assert " reference " not in format_table(result)
    _, parent, _ = mlflow_runs("smoke")
    assert not any(k.startswith("reference/") for k in parent[0].data.metrics)


@pytest.mark.slow  # moved to the slow tier: keeps make test under 30 min in CI
def test_a_search_streams_a_corpus_larger_than_its_slots_budget(home, tmp_path):
    """``resources.corpus_budget_mb`` below the corpus size: each slot says once that it streams
    the corpus from host memory, the trials train, and each trial run records the mode."""

    def edit(raw):
        raw["name"] = "streamed"
        raw["resources"]["corpus_budget_mb"] = 0.5  # the smoke corpus is ~9 MB as int16
        raw["budget"].update(max_epochs=1, grace_epochs=1)
        raw.pop("robustness")

    lines: list[str] = []
    result = run_search(load_spec(spec_file(tmp_path, edit)), log=lines.append)
    assert result.errors == 0 and len(result.rows) == 2
    said = [ln for ln in lines if "streamed from host memory" in ln]
    assert 1 <= len(said) <= 2, lines  # once per slot (two slots at most)
    assert (
        "> what is left of the slot's budget of 0.50 MB, set by resources.corpus_budget_mb"
        in (said[0])
    )
    _, _, children = mlflow_runs("streamed")
    assert len(children) == 2
    for ch in children:
        assert ch.data.tags["sertune.data_mode"].endswith(" streamed"), ch.data.tags


def test_smoke_multi_objective_has_a_pareto_front(home, tmp_path):
    def edit(raw):
        raw["name"] = "smoke-mo"
        raw["objective"] = {
            "metrics": [
                {"metric": "val_uar", "mode": "max"},
                {"metric": "val_robust/uar_snr0_white", "mode": "max"},
            ]
        }

    spec = load_spec(spec_file(tmp_path, edit))
    assert spec.objective.multi
    result = run_search(spec, log=lambda *a: None)
    assert len(result.rows) == 2 and result.errors == 0
    assert all(r["epochs"] == spec.budget.max_epochs for r in result.rows)  # FIFO: no early stop
    c, parent, _ = mlflow_runs("smoke-mo")
    local = c.download_artifacts(parent[0].info.run_id, "summary", str(tmp_path / "dl"))
    front = json.loads((Path(local) / "pareto_front.json").read_text())
    assert 1 <= len(front) <= 2 and "val_robust/uar_snr0_white" in front[0]


def test_a_diverging_trial_fails_with_its_reason_and_the_search_goes_on(home, tmp_path):
    (tmp_path / "nan_space.py").write_text((Path(__file__).with_name("nan_space.py")).read_text())

    def edit(raw):
        raw["name"] = "smoke-nan"
        raw["budget"].update(trials=2, concurrency=1)
        raw["define_by_run"] = "nan_space.py:space"
        raw["robustness"] = None  # not checked here

    result = run_search(load_spec(spec_file(tmp_path, edit)), log=lambda *a: None)
    assert len(result.rows) == 2 and result.errors == 1
    failed = [r for r in result.rows if r["state"] == "failed"][0]
    assert "loss became" in failed["error"] and failed["status"].startswith("failed: ")
    assert [r for r in result.rows if r["state"] != "failed"][0]["val_uar"] is not None
    _, _, children = mlflow_runs("smoke-nan")
    bad = [ch for ch in children if ch.data.tags["sertune.status"] == "failed"]
    assert len(bad) == 1 and "loss became" in bad[0].data.tags["sertune.failure_reason"]
    assert bad[0].info.status == "FAILED"


@pytest.mark.slow  # moved to the slow tier: keeps make test under 30 min in CI
def test_per_trial_execution_trains_each_trial_in_its_own_train_run(home, tmp_path):
    """``execution: per_trial`` (no warm slots): every trial is its own TorchTrainer; a trial the
    scheduler stopped is evaluated by a Ray task; the records match warm mode's."""
    from tests.linear_trainable import linear_spec

    raw = linear_spec(
        home,
        "per-trial",
        execution="per_trial",
        budget={"trials": 3, "concurrency": 1, "max_epochs": 3, "grace_epochs": 1},
        space={"optim.lr": {"type": "float", "low": 0.0005, "high": 0.5, "log": True}},
    )
    p = tmp_path / "per-trial.yaml"
    p.write_text(yaml.safe_dump(raw))
    result = run_search(load_spec(p), log=lambda *m: None)
    assert result.errors == 0 and len(result.rows) == 3
    assert {r["state"] for r in result.rows} <= {"finished", "stopped_early"}
    _, parent, children = mlflow_runs("per-trial")
    assert len(parent) == 1 and len(children) == 3
    for ch in children:  # every trial, stopped or not, has its test figures
        assert "test_uar" in ch.data.metrics, ch.data.tags
    assert load_record("per-trial").status == "finished"
