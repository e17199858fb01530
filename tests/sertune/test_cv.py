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

    runs = {r.trial: r for r in tracking.Store().runs_of("cv3", "trial")}
    store = tracking.Store()
    for row in result.rows:
        run = runs[row["trial"]]
        # what the scheduler and the leaderboard saw is the mean of the folds MLflow holds
        folds = [run.metrics[f"fold{k}/val_uar"] for k in range(3)]
        assert row["val_uar"] == pytest.approx(sum(folds) / 3)
        assert row["val_uar_se"] == pytest.approx(run.metrics["val_uar_se"])
        history = store.metric_steps(run.run_id, "fold1/val_uar")
        assert len(history) == row["epochs"]
        if row["state"] == "finished":  # the test report: each fold's best model, mean ± se
            assert "test_uar_se" in row and "fold2/test_uar" in run.metrics
            assert "robust/uar_snr10_white_se" in run.metrics
            assert run.tags["sertune.model_fold"].startswith("fold ")
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
