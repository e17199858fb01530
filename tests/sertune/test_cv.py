"""A cross-validated objective (``objective.cv``): K speaker folds of the training speakers per
trial, as parallel jobs on the warm slots; the scheduler acts on their mean; each fold's figures
in MLflow; the test report as mean ± se."""

import pytest
import yaml

from tests.linear_trainable import linear_spec


def test_cv_folds_split_the_training_speakers_and_never_touch_the_test_set(synth_corpus):
    from trainables.data.cache import load_cache, speaker_independent_split

    corpus = load_cache(synth_corpus["cache"])
    plain = speaker_independent_split(corpus, 0)
    pool = set(plain["train"]) | set(plain["val"])
    vals = []
    for k in range(3):
        s = speaker_independent_split(corpus, 0, cv={"fold": k, "folds": 3})
        assert list(s["test"]) == list(plain["test"])  # the same test speakers for every fold
        assert set(s["train"]) | set(s["val"]) == pool and not set(s["train"]) & set(s["val"])
        assert not {corpus.groups[i] for i in s["train"]} & {corpus.groups[i] for i in s["val"]}
        vals.append(set(s["val"]))
    assert set().union(*vals) == pool and sum(len(v) for v in vals) == len(pool)  # a partition
    with pytest.raises(ValueError, match="needs >= 20 speaker groups"):
        speaker_independent_split(corpus, 0, cv={"fold": 0, "folds": 20})


def test_an_epoch_of_a_cv_trial_is_the_mean_of_its_folds():
    from sertune.trainable import BEST_EPOCH, CHECKPOINT_PATH, CV_FOLD, EPOCHS_DONE
    from sertune.warm.proxy import fold_mean

    reports = [
        {EPOCHS_DONE: 2, BEST_EPOCH: 1, CHECKPOINT_PATH: f"c{k}", "val_uar": v, "epoch": 1}
        for k, v in enumerate([0.5, 0.7, 0.62])
    ]
    m = fold_mean(reports, "val_uar")
    assert m["val_uar"] == pytest.approx(0.60667, abs=1e-4)
    assert m["val_uar_se"] == pytest.approx(0.1007 / 3**0.5, abs=1e-3)
    assert [m[f"fold{k}/val_uar"] for k in range(3)] == [0.5, 0.7, 0.62]
    assert m[CV_FOLD] == 2 and m[CHECKPOINT_PATH] == "c2"  # 0.62 is the closest to 0.607
    assert m[EPOCHS_DONE] == 2 and "epoch" not in m and "epoch_se" not in m

    # what the jobs' slots said: once when they all said the same, else each with its label
    from sertune.trainable import DATA_MODE, SLOT_NOTE

    same = [{**r, SLOT_NOTE: "corpus x resident", DATA_MODE: "x resident"} for r in reports]
    m = fold_mean(same, "val_uar")
    assert m[SLOT_NOTE] == "all 3 jobs: corpus x resident" and m[DATA_MODE] == "x resident"
    same[1][SLOT_NOTE] = "corpus x streamed"
    assert fold_mean(same, "val_uar")[SLOT_NOTE].startswith("fold0: corpus x resident; fold1:")


def test_a_cv_spec_the_platform_cannot_run_is_refused(home, tmp_path):
    from sertune.spec import SpecError, load_spec

    raw = linear_spec(
        home,
        "cv",
        objective={"metric": "val_uar", "cv": {"folds": 3}},
        execution="per_trial",
        space={"optim.lr": {"type": "float", "low": 0.01, "high": 0.1}},
    )
    (tmp_path / "cv.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "cv.yaml")
    assert ("objective.cv", "fold jobs run on warm slots: execution: warm") in e.value.problems


@pytest.mark.usefixtures("ray_2cpu")
def test_a_3_fold_cv_search_with_asha_acts_on_the_folds_mean(home, tmp_path):
    from sertune import tracking
    from sertune.comparison import compare, search_figures
    from sertune.leaderboard import format_table
    from sertune.records import load_record
    from sertune.search import run_search
    from sertune.spec import load_spec
    from sertune.status import format_status, search_status

    raw = linear_spec(
        home,
        "cv3",
        objective={"metric": "val_uar", "cv": {"folds": 3}},
        budget={
            "trials": 4,
            "concurrency": 3,  # jobs: one trial's three folds at once
            "max_epochs": 3,
            "grace_epochs": 1,
            "reduction_factor": 2,
        },
        resources={"cpus_per_worker": 0.5},
        params={"features.n_mels": 16},
        space={"optim.lr": {"type": "float", "low": 0.001, "high": 0.3, "log": True}},
        robustness={
            "snrs_db": [10],
            "noises": ["white"],
            "fgsm_eps": [],
            "pgd_eps": [],
            "max_utterances": 16,
        },
    )
    (tmp_path / "cv3.yaml").write_text(yaml.safe_dump(raw))
    lines = []
    result = run_search(load_spec(tmp_path / "cv3.yaml"), log=lines.append)
    assert result.errors == 0 and result.completed == 4
    started = [ln for ln in lines if " started (3 fold jobs)" in ln]
    assert len(started) == 4
    epochs = [ln for ln in lines if " epoch " in ln and "val_uar=" in ln]
    assert epochs and all(" ± " in ln and "(folds " in ln for ln in epochs)

    from mlflow import MlflowClient

    from sertune import settings
    from sertune.stats import kept_epoch

    client = MlflowClient(settings.tracking_uri())
    runs = {r.trial: r for r in tracking.Store().runs_of("cv3", "trial")}
    store = tracking.Store()
    for row in result.rows:
        run = runs[row["trial"]]
        # what the scheduler and the leaderboard saw is the mean of the folds MLflow holds
        folds = [run.metrics[f"fold{k}/val_uar"] for k in range(3)]
        assert row["val_uar_raw_last"] == pytest.approx(sum(folds) / 3)  # the last epoch's
        # the trial's objective: the fold-mean curve's smoothed value at its kept epoch
        per_fold = [
            [
                m.value
                for m in sorted(
                    client.get_metric_history(run.run_id, f"fold{k}/val_uar"), key=lambda m: m.step
                )
            ]
            for k in range(3)
        ]
        curve = [sum(f[e] for f in per_fold) / 3 for e in range(row["epochs"])]
        assert (row["kept_epoch"], row["val_uar"]) == pytest.approx(kept_epoch(curve))
        assert row["val_uar_se"] == pytest.approx(run.metrics["val_uar_se"], abs=1e-4)
        history = store.metric_steps(run.run_id, "fold1/val_uar")
        assert len(history) == row["epochs"]
        if row["state"] == "finished":  # the test report: each fold's best model, mean ± se
            assert "test_uar_se" in row and "fold2/test_uar" in run.metrics
            assert "robust/uar_snr10_white_se" in run.metrics
            assert run.tags["sertune.model_fold"].startswith("fold ")
        if row["state"] == "stopped":  # evaluated later: every fold's best model too
            assert "fold0/test_uar" in run.metrics, run.tags.get("sertune.evaluation_error")
            folds = [run.metrics[f"fold{k}/test_uar"] for k in range(3)]
            assert run.metrics["test_uar"] == pytest.approx(sum(folds) / 3)
            assert "test_uar_se" in run.metrics and "robust/uar_snr10_white_se" in run.metrics
    assert any(r["state"] == "stopped" for r in result.rows)  # ASHA stopped some on the mean
    table = format_table(result)
    assert " ± " in table.splitlines()[1]
    best = result.rows[0]
    status = format_status(search_status("cv3"), load_record("cv3"))
    assert f"val_uar={best['val_uar']:.3f} ± {best['val_uar_se']:.3f}" in status
    # compare pairs two cross-validated trials fold by fold (here the search with itself)
    figures = search_figures(store, "cv3")
    assert figures["source"] == "best trial, 3 cross-validation folds"
    (row,) = [r for r in compare(figures, figures)["rows"] if r["metric"] == "val_uar"]
    assert (
        row["paired"] and row["interval"] == [0.0, 0.0] and "paired over 3 folds" in row["verdict"]
    )


def test_replicas_of_a_trial_are_folds_times_repeats_with_their_own_seeds():
    from sertune.spec import ObjectiveSpec
    from sertune.tuner import TrialPlan, loop_config

    assert ObjectiveSpec(metric="val_uar").replicas == ()
    reps = ObjectiveSpec(metric="val_uar", repeats=3).replicas
    assert [r.label for r in reps] == ["rep0", "rep1", "rep2"]
    both = ObjectiveSpec(metric="val_uar", cv={"folds": 2}, repeats=2)
    assert [r.label for r in both.replicas] == [
        "fold0.rep0",
        "fold0.rep1",
        "fold1.rep0",
        "fold1.rep1",
    ]
    assert both.replica_kind == "fold x repeat"
    plan = TrialPlan(
        trainable="linear",
        params={"seed": 7, "optim.epochs": 2},
        data={"cache": "c"},
        run={},
        resources={},
        max_epochs=2,
        train_storage="s",
        max_failures=0,
        cv_folds=2,
        replicas=both.replicas,
    )
    cfgs = [loop_config(plan, {"optim.lr": 0.1}, "t1", replica=r) for r in both.replicas]
    assert [c["params"]["seed"] for c in cfgs] == [7, 108, 7, 108]  # seed + 101 * repeat
    assert [c["data"]["cv"]["fold"] for c in cfgs] == [0, 0, 1, 1]
    assert cfgs[3]["run"]["title"] == "trial t1 fold 1, repeat 1"


def test_a_refit_trains_on_every_fold_and_only_a_cv_search_may_ask_for_one(
    synth_corpus, home, tmp_path
):
    from sertune.spec import SpecError, load_spec
    from trainables.data.cache import load_cache, speaker_independent_split

    corpus = load_cache(synth_corpus["cache"])
    plain = speaker_independent_split(corpus, 0)
    refit = speaker_independent_split(corpus, 0, cv={"fold": 0, "folds": 3, "refit": True})
    assert set(refit["train"]) == set(plain["train"]) | set(plain["val"])
    assert list(refit["test"]) == list(plain["test"])
    raw = linear_spec(
        home, "rf", confirm={"seeds": 0, "refit": True}, objective={"metric": "val_uar"}
    )
    (tmp_path / "rf.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "rf.yaml")
    assert [f for f, _ in e.value.problems] == ["confirm.refit"]
    raw["confirm"] = {"seeds": 0}
    (tmp_path / "rf.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="confirm.seeds: 0 re-trains nothing"):
        load_spec(tmp_path / "rf.yaml")


def test_a_stopped_replicated_trial_is_evaluated_on_every_job_then_averaged():
    from types import SimpleNamespace

    from sertune.spec import ObjectiveSpec
    from sertune.trainable import CheckpointEvaluation
    from sertune.warm.proxy import BoardEvaluator

    reps = ObjectiveSpec(metric="val_uar", cv={"folds": 2}).replicas
    ev = BoardEvaluator(pool=None, plan=SimpleNamespace(replicas=reps))
    got = {
        "t.fold0": CheckpointEvaluation({"test_uar": 0.5}, {"report.md": b"zero"}),
        "t.fold1": CheckpointEvaluation({"test_uar": 0.7}, {"report.md": b"one"}),
    }
    out = ev._combine(["t.fold0", "t.fold1"], 1, got)
    assert out.metrics["test_uar"] == pytest.approx(0.6)
    assert out.metrics["test_uar_se"] == pytest.approx(0.1)
    assert out.metrics["fold1/test_uar"] == 0.7 and out.files == {"report.md": b"one"}
    bad = {**got, "t.fold1": CheckpointEvaluation(error="no best/")}
    assert ev._combine(["t.fold0", "t.fold1"], 0, bad).error == "fold1: no best/"


def test_the_parent_runs_plots_carry_error_bars_and_the_noise_caveat(tmp_path):
    from sertune.spec import ParamSpec
    from sertune.summary import _errors, _history, _noise_caveat, _slices

    rows = [
        {
            "trial": f"t{i}",
            "state": "finished",
            "config": {"lr": 0.01 * (i + 1)},
            "val_uar": 0.5 + 0.01 * i,
            "val_uar_se": 0.05,
            "started": i,
        }
        for i in range(4)
    ]
    assert _errors(rows, "val_uar") == [0.05] * 4
    assert "may rank noise" in _noise_caveat(rows, "val_uar")  # sd 0.013 < 2 x se 0.05
    assert _noise_caveat([{**r, "val_uar_se": 0.001} for r in rows], "val_uar") == ""
    _history(tmp_path, rows, "val_uar", "max", "s")
    _slices(tmp_path, rows, "val_uar", {"lr": ParamSpec(type="float", low=0.001, high=1.0)}, "s")
    assert (tmp_path / "optimisation_history.png").stat().st_size > 0
    assert (tmp_path / "slices.png").stat().st_size > 0


@pytest.mark.slow  # moved to the slow tier: keeps make test under 30 min in CI
@pytest.mark.usefixtures("ray_2cpu")
def test_a_repeated_cv_search_then_its_refit_is_what_promotion_registers(home, tmp_path):
    from sertune import tracking
    from sertune.registry import promote
    from sertune.search import run_search
    from sertune.spec import load_spec

    raw = linear_spec(
        home,
        "cvr",
        objective={"metric": "val_uar", "cv": {"folds": 2}, "repeats": 2},
        budget={"trials": 2, "concurrency": 2, "max_epochs": 4, "grace_epochs": 4},
        resources={"cpus_per_worker": 0.5},
        # fold 0 peaks at epoch 1, fold 1 at epoch 3: their mean curve's kept epoch is 2
        params={"features.n_mels": 16, "probe.curve": "0.5,0.9,0.5,0.5;0.5,0.5,0.5,0.9"},
        space={
            "optim.lr": {"type": "float", "low": 0.001, "high": 0.3, "log": True},
            "probe.offset": {"type": "float", "low": 0.0, "high": 0.05},  # no tie between trials
        },
        confirm={"seeds": 0, "refit": True},
    )
    (tmp_path / "cvr.yaml").write_text(yaml.safe_dump(raw))
    lines = []
    result = run_search(load_spec(tmp_path / "cvr.yaml"), log=lines.append)
    assert result.errors == 0
    assert sum(" started (4 fold x repeat jobs)" in ln for ln in lines) == 2
    assert any("(runs " in ln for ln in lines if " epoch " in ln)
    runs = tracking.Store().runs_of("cvr", "trial")
    trials = [r for r in runs if r.tags.get("sertune.phase") != "refit"]
    for run in trials:
        labels = ["fold0.rep0", "fold0.rep1", "fold1.rep0", "fold1.rep1"]
        values = [run.metrics[f"{lb}/val_uar"] for lb in labels]
        assert run.metrics["val_uar"] == pytest.approx(sum(values) / 4)
        # the repeats train with other seeds: their losses differ
        assert run.metrics["fold0.rep0/train_loss"] != run.metrics["fold0.rep1/train_loss"]
    (refit,) = [r for r in runs if r.tags.get("sertune.phase") == "refit"]
    best = result.rows[0]
    assert refit.tags["sertune.refit_of"] == best["trial"]
    # the refit trains to the fold-mean curve's kept epoch, not the representative fold's best
    assert best["kept_epoch"] == 2 and best["best_epoch"] in (0, 3)  # one fold's: 0 or 3
    assert int(refit.params["optim.epochs"]) == int(best["kept_epoch"]) + 1 == 3
    assert not any(k.startswith("fold0") for k in refit.metrics)  # one job, every fold's speakers
    assert any("re-training trial" in ln for ln in lines)
    v = promote("cvr", model_name="cvr-model")
    assert v["trial"] == best["trial"] and v["model_run_id"] == refit.run_id
    assert v["model_source"].startswith("re-trained on all training speakers")
