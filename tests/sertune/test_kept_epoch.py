"""One epoch per trial: the best of the smoothed validation curve is the model a trial keeps and
the figure it is ranked on (``sertune.stats.kept_epoch``); the platform computes it from the curve
it relays (the fold means under cross-validation), the trainables keep that epoch's model."""

import math

import pytest
import yaml

from sertune import stats


def _plan(tmp_path, kept=(("val_uar", "max"),)):
    from sertune.tuner import TrialPlan

    return TrialPlan(
        trainable="linear",
        params={},
        data={},
        run={"select": {"metric": "val_uar", "mode": "max"}},
        resources={},
        max_epochs=10,
        train_storage=str(tmp_path / "_train"),
        max_failures=0,
        kept=kept,
    )


def test_the_relay_reads_each_epoch_at_the_smoothed_curves_best(tmp_path):
    from sertune.trainable import EPOCHS_DONE, KEPT_EPOCH, objective_value
    from sertune.tuner import KeptCurves

    curve = [0.60, 0.91, 0.70, 0.80, 0.84, 0.82, 0.65]  # a lone peak at epoch 1
    curves = KeptCurves(_plan(tmp_path), "t1")
    got = [curves.add({EPOCHS_DONE: e + 1, "val_uar": v}) for e, v in enumerate(curve)]
    for e, out in enumerate(got):  # each epoch: the rule on the curve so far
        k, v = stats.kept_epoch(curve[: e + 1], "max")
        assert out[KEPT_EPOCH] == k and out["kept/val_uar"] == pytest.approx(v)
        assert out["raw_best/val_uar"] == max(curve[: e + 1])
    last = got[-1]
    assert (
        last[KEPT_EPOCH] == 4
    )  # (0.80 + 0.84 + 0.82) / 3 beats the lone peak's (0.60+0.91+0.70)/3
    assert last["kept/val_uar"] == pytest.approx(0.82)
    result = {"val_uar": curve[-1], **last}
    assert objective_value(result, "val_uar") == pytest.approx(0.82)  # not 0.65, not 0.91
    assert objective_value({"val_uar": 0.5}, "val_uar") == 0.5  # no curve: the raw figure

    # a resumed driver: the curve relayed before comes back from the search's storage
    again = KeptCurves(_plan(tmp_path), "t1")
    assert again.add({EPOCHS_DONE: 8, "val_uar": 0.66})[KEPT_EPOCH] == 4
    # a refit keeps its last epoch: no kept figure is added
    assert KeptCurves(_plan(tmp_path, kept=()), "t2").add({EPOCHS_DONE: 1, "val_uar": 1}) == {}


def test_a_nan_epoch_is_never_kept_and_other_objectives_follow_the_select_epoch(tmp_path):
    from sertune.trainable import EPOCHS_DONE, KEPT_EPOCH
    from sertune.tuner import KeptCurves

    curves = KeptCurves(_plan(tmp_path, (("val_uar", "max"), ("val_f1", "max"))), "t")
    out = {}
    for e, (u, f) in enumerate([(0.5, 0.4), (0.8, 0.6), (math.nan, 0.9), (0.7, 0.5)]):
        out = curves.add({EPOCHS_DONE: e + 1, "val_uar": u, "val_f1": f})
    assert out[KEPT_EPOCH] != 2
    assert out["kept/val_f1"] == pytest.approx(
        stats.smoothed([0.4, 0.6, 0.9, 0.5])[out[KEPT_EPOCH]]
    )


def test_a_cv_trials_kept_epoch_is_the_fold_mean_curves_and_its_se_is_the_designs():
    from sertune.trainable import BEST_EPOCH, EPOCHS_DONE, kept_figures
    from sertune.warm.proxy import fold_mean

    # four folds, each best at another epoch (3, 11, 12, 19 of 20): the mean curve peaks late
    folds = []
    for peak in (3, 11, 12, 19):
        folds.append([0.6 + 0.25 * math.exp(-((e - peak) ** 2) / 8) + 0.01 * e for e in range(20)])
    mean_curve = {}
    for e in range(20):
        reports = [
            {EPOCHS_DONE: e + 1, BEST_EPOCH: stats.kept_epoch(f[: e + 1])[0], "val_uar": f[e]}
            for f in folds
        ]
        m = fold_mean(reports, "val_uar")
        mean_curve[e] = m["val_uar"]
    out = kept_figures({"val_uar": mean_curve}, {"val_uar": "max"})
    k, v = stats.kept_epoch([mean_curve[e] for e in range(20)])
    assert out["kept_epoch"] == k and out["kept/val_uar"] == pytest.approx(v)
    # the representative fold's own best epoch (what a refit used to train for) is another
    assert m[BEST_EPOCH] != k

    # K folds x R repeats: repeats averaged in each fold first, se over the K fold means
    labels = ["fold0.rep0", "fold0.rep1", "fold1.rep0", "fold1.rep1", "fold2.rep0", "fold2.rep1"]
    values = [0.50, 0.54, 0.70, 0.66, 0.60, 0.64]
    m = fold_mean([{"val_uar": x} for x in values], "val_uar", labels)
    assert m["val_uar_se"] == pytest.approx(stats.summary([0.52, 0.68, 0.62]).se)
    assert m["val_uar_se"] != pytest.approx(stats.summary(values).se)


def test_the_kept_model_is_that_epochs_even_when_a_later_epoch_moves_it_back():
    from sertune.trainable import EPOCHS_DONE, KeptModel

    curve = [0.5, 0.8, 0.82, 0.79, 0.9, 0.3, 0.6, 0.55]
    keeper = KeptModel("val_uar", "max")
    for e, v in enumerate(curve):
        state = keeper.add(v, f"state of epoch {e}")
        k, s = stats.kept_epoch(curve[: e + 1], "max")
        assert (keeper.epoch, state) == (k, f"state of epoch {k}")
        assert keeper.value == pytest.approx(s)
        assert len(keeper.states) <= 2  # the newest and the best settled one: one extra copy
    # epoch 4 was kept while newest (0.79, 0.9, -): epoch 5's 0.3 sends it back to epoch 2
    refit = KeptModel(EPOCHS_DONE, "max")
    for e in range(3):
        refit.add(e + 1, e)
    assert refit.epoch == 2  # a refit keeps its last epoch


def test_the_leaderboard_ranks_on_the_kept_figure_and_says_where_it_was_read():
    from sertune.leaderboard import Columns, format_table, kept_note, trial_row
    from sertune.spec import MetricSpec

    columns = Columns(
        objectives=(MetricSpec(metric="val_uar", mode="max"),),
        shown=(),
        kept=frozenset({"val_uar", "test_uar"}),
    )
    metrics = {
        "epochs_done": 30,
        "val_uar": 0.856,
        "kept/val_uar": 0.870,
        "raw_best/val_uar": 0.906,
        "kept_epoch": 14,
        "best_epoch": 14,
        "test_uar": 0.703,
    }
    row = trial_row("t1", metrics, {"optim.lr": 0.01}, 30, columns)
    assert row["val_uar"] == 0.870 and row["kept_epoch"] == 14
    assert kept_note(row, "val_uar") == " (epoch 15; raw best 0.906, last 0.856)"
    raw = trial_row("t2", {"epochs_done": 30, "val_uar": 0.5}, {}, 30, columns)
    assert raw["val_uar"] == 0.5 and kept_note(raw, "val_uar") == ""

    from sertune.leaderboard import SearchResult

    table = format_table(SearchResult("s", "p", [row, raw], columns, 0))
    assert "0.870 (epoch 15; raw best 0.906, last 0.856)" in table


@pytest.mark.slow  # moved to the slow tier: keeps make test under 30 min in CI
@pytest.mark.usefixtures("ray_2cpu")
def test_a_search_ranks_each_trial_on_its_smoothed_curve_and_keeps_that_epochs_model(
    home, tmp_path, capsys
):
    from ray.tune import ExperimentAnalysis

    from sertune import tracking
    from sertune.leaderboard import format_table
    from sertune.search import run_search
    from sertune.spec import load_spec
    from sertune.storage import fs_and_path
    from tests.linear_trainable import linear_spec

    curve = [0.40, 0.90, 0.45, 0.74, 0.78, 0.62]  # a lone raw peak at epoch 1, kept: epoch 4
    raw = linear_spec(
        home,
        "kept",
        budget={"trials": 2, "concurrency": 2, "max_epochs": 6, "grace_epochs": 6},
        params={"features.n_mels": 16, "probe.curve": ",".join(map(str, curve))},
        space={"probe.offset": {"type": "float", "low": 0.0, "high": 0.05}},
    )
    (tmp_path / "kept.yaml").write_text(yaml.safe_dump(raw))
    result = run_search(load_spec(tmp_path / "kept.yaml"), log=lambda *a: None)
    assert result.errors == 0 and result.completed == 2
    k, s = stats.kept_epoch(curve)
    assert k == 4
    print(format_table(result))
    for row in result.rows:
        off = row["config"]["probe.offset"]
        assert row["kept_epoch"] == k and row["best_epoch"] == k  # the model is the kept epoch's
        assert row["val_uar"] == pytest.approx(s + off)  # the objective: smoothed, at epoch 4
        assert row["val_uar_raw_last"] == pytest.approx(curve[-1] + off)
        assert row["val_uar_raw_best"] == pytest.approx(max(curve) + off)
    offsets = [r["config"]["probe.offset"] for r in result.rows]
    assert offsets == sorted(offsets, reverse=True)  # ranked on it
    fs, local = fs_and_path(result.path)
    for t in ExperimentAnalysis(local, storage_filesystem=fs).trials:  # what Optuna was told
        off = t.config["probe.offset"]
        assert t.last_result["kept/val_uar"] == pytest.approx(s + off)
        assert t.last_result["kept_epoch"] == k
    runs = tracking.Store().runs_of("kept", "trial")
    assert len(runs) == 2
    for r in runs:  # MLflow: the kept figure and epoch on the run, the model's epoch in its tag
        assert r.metrics["kept_epoch"] == k and "kept/val_uar" in r.metrics
        assert r.tags["sertune.best_epoch"] == str(k + 1)
