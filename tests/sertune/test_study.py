"""The study (``sertune study``): nested speaker-independent cross-validation of a spec against its
single-task twin and the reference baseline, killed and resumed, its table on disk and in MLflow;
and the refusals that come before anything runs."""

from __future__ import annotations

import json
import re

import pytest

from sertune.cli import main


def test_a_study_killed_after_its_first_outer_fold_resumes_without_rerunning_it():
    """3 outer folds x 2 arms x 2 trials on the synthetic corpus, the driver SIGKILLed as outer
    fold 1 starts, then `sertune study resume`: fold 0's searches are kept (none of their trials
    starts again), the study finishes, its Markdown and HTML reports are written, the MLflow
    study run is FINISHED with the 6 fold searches as its children; the table pairs the arms
    and has the reference column, the per-fold table and the winners."""
    from sertune.bench.faults import Drill, kill_study

    d = Drill("kill_study")
    try:
        lost, detail = kill_study(d)
        report = d.home / "state" / "studies" / "drill-study"
        md = (report / "report.md").read_text()
        html = (report / "report.html").read_text()
        saved = json.loads((report / "study.json").read_text())
        promoted = d.cli("promote", "--study", "drill-study", "--name", "ser-study")
    finally:
        d.clean()
    assert lost == 0, detail
    # promotion from the study: the spec arm's best fold champion (on validation), the table as
    # the registered version's description
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "champion of 'st'" in promoted.stdout
    from mlflow import MlflowClient

    uri = f"sqlite:///{d.home / 'mlflow.db'}"
    c = MlflowClient(uri, registry_uri=uri)  # not the process's registry an earlier test set
    version = c.get_model_version_by_alias("ser-study", "champion")
    assert "Promoted from study drill-study" in version.description
    assert "| condition |" in version.description
    # the paired table: reference, the single-task twin, the spec, and both differences
    header = next(ln for ln in md.splitlines() if ln.startswith("| condition"))
    assert "reference" in header and "stl_baseline" in header and "st - stl_baseline" in header
    assert "st - reference" in header
    assert re.search(r"\| clean UAR \| 0\.\d{3} ± 0\.\d{3} \|", md)
    assert "white noise 10 dB" in md and "FGSM ε=0.005" in md
    assert "## Per outer fold" in md and "## Winning configurations" in md
    for k in (0, 1, 2):
        assert re.search(rf"^\| {k} \| st \|", md, re.M)
    assert "data:image/png;base64," in html and "<script" not in html
    table = saved["table"]
    assert table["folds"] == [0, 1, 2]
    assert set(table["per_fold"]) == {"reference", "stl_baseline", "st"}
    # the reference has no adversarial figure: n/a, said so
    fgsm = next(r for r in table["rows"] if r["metric"] == "robust/uar_fgsm0.005")
    assert fgsm["cells"]["reference"] is None
    d.remove()


def test_the_report_interval_is_the_statistics_module_paired_interval(home):
    """The study's difference and its interval are ``sertune.stats.paired_difference`` over the
    outer folds' numbers: computed here from the per-fold figures, compared exactly."""
    from sertune import stats
    from sertune.spec import load_spec
    from sertune.study import StudyRecord, build

    spec = load_spec("smoke")
    folds = {}
    spec_uar = {0: 0.61, 1: 0.55, 2: 0.70, 3: 0.58}
    vs_uar = {0: 0.57, 1: 0.56, 2: 0.62, 3: 0.51}
    ref_uar = {0: 0.50, 1: 0.49, 2: 0.58, 3: 0.47}
    for k in range(4):
        folds[f"{k}/{spec.name}"] = {
            "status": "finished",
            "metrics": {"test_uar": spec_uar[k]},
            "reference": {"test_uar": ref_uar[k]},
        }
        folds[f"{k}/stl_baseline"] = {"status": "finished", "metrics": {"test_uar": vs_uar[k]}}
    record = StudyRecord(
        name="s",
        spec=spec,
        vs="stl_baseline",
        vs_spec=spec,
        arms=[spec.name, "stl_baseline"],
        n_outer=4,
        outer=[0, 1, 2, 3],
        folds=folds,
    )
    row = build(record).row("test_uar")
    want = stats.paired_difference(
        {f"fold{k}": spec_uar[k] for k in range(4)}, {f"fold{k}": vs_uar[k] for k in range(4)}
    )
    assert (row.vs.diff, row.vs.low, row.vs.high, row.vs.n) == (
        want.diff,
        want.low,
        want.high,
        want.n,
    )
    want = stats.paired_difference(
        {f"fold{k}": spec_uar[k] for k in range(4)}, {f"fold{k}": ref_uar[k] for k in range(4)}
    )
    assert (row.reference.diff, row.reference.low, row.reference.high) == (
        want.diff,
        want.low,
        want.high,
    )


def test_promotion_supports_the_most_frequent_fold_winner_never_the_best_raw_fold(home):
    """``promote --study``: the configuration that won the most outer folds, even when another
    fold's champion has the higher inner objective (its validation speakers may just be easier);
    ties go to the clearest win of its own fold (margin over the fold's median trial, in sd)."""
    from sertune.spec import load_spec
    from sertune.study import StudyRecord, supported_fold

    spec = load_spec("smoke")

    def record(winners: dict[int, dict], values: dict[int, float]) -> StudyRecord:
        folds = {
            f"{k}/{spec.name}": {
                "status": "finished",
                "search": f"s.fold{k}.{spec.name}",
                "winner": w,
                "objective": {"metric": "val_uar", "value": values[k]},
            }
            for k, w in winners.items()
        }
        return StudyRecord(
            name="s", spec=spec, vs="stl_baseline", vs_spec=spec,
            arms=[spec.name, "stl_baseline"], n_outer=4, outer=sorted(winners), folds=folds,
        )  # fmt: skip

    a, b = {"optim.lr": 0.01}, {"optim.lr": 0.003}
    margins = {0: 0.5, 1: 1.4, 2: 3.0, 3: 0.2}
    # fold 2 has the best raw objective and the clearest win, but b won folds 1 and 3
    rec = record({0: a, 1: b, 2: {"optim.lr": 0.05}, 3: b}, {0: 0.6, 1: 0.55, 2: 0.9, 3: 0.5})
    fold, entry, why = supported_fold(rec, margin=lambda k, f: margins[k])
    assert entry["winner"] == b and fold == 1  # of b's folds, 1 won its own more clearly
    assert "won 2 of 4 outer folds ([1, 3])" in why and "fold 1's won its own fold" in why
    # all different (a continuous space): the clearest win, not the best raw objective (fold 0)
    rec = record({0: a, 1: b, 2: {"optim.lr": 0.05}}, {0: 0.95, 1: 0.55, 2: 0.6})
    fold, _, why = supported_fold(rec, margin=lambda k, f: margins[k])
    assert fold == 2 and "no configuration won more than one of 3" in why and "+3.00 sd" in why


@pytest.mark.parametrize(
    "sets, outer, says",
    [
        # 6 speaker groups in 4 outer folds leave at most 5 outside a test fold: 6-fold inner CV
        # cannot be dealt from them
        (["objective.cv.folds=6"], "4", "too few speaker groups"),
        ([], "9", "the corpus has 6 speaker groups"),
        ([], "0,7", "outside 0..5"),
    ],
)
def test_a_study_whose_folds_cannot_be_dealt_is_refused_before_anything_runs(
    home, capsys, sets, outer, says
):
    argv = ["study", "run", "smoke", "--vs", "stl_baseline", "--outer", outer, "--name", "bad"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err, err
    state = home / "state"
    assert not (state / "studies" / "bad.json").exists()
    assert not list((state / "searches").glob("bad.*")) if (state / "searches").exists() else True
    import ray

    assert not ray.is_initialized()  # nothing started


def test_vs_names_a_baseline_or_a_spec_on_the_same_data(home):
    from sertune.errors import UsageError
    from sertune.spec import SpecError, load_spec
    from sertune.study import arms_of

    spec = load_spec("smoke")
    vspec, label = arms_of(spec, "stl_baseline")
    assert label == "stl_baseline"
    assert vspec.params["loss.w_aug"] == 0.0 and "loss.w_aug" not in vspec.space
    with pytest.raises(UsageError, match="neither a baseline"):
        arms_of(spec, "no_such_thing")
    with pytest.raises(SpecError, match="same data"):
        arms_of(spec, "demo")  # another spec, on other data (synthetic-demo)


@pytest.mark.slow
def test_a_study_runs_fold_searches_in_drivers_of_their_own_at_once():
    """``--parallel 2``: two fold searches at a time, each a `sertune study fold` driver on the
    study's Ray cluster (their MLflow runs overlap in time), their lines prefixed by their name;
    the study ends with every fold's figures."""
    from sertune.bench.faults import Drill, study_sized

    d = Drill("parallel_study")
    try:
        spec = d.spec("pst", study_sized)
        args = ("study", "run", str(spec), "--vs", "stl_baseline", "--outer", "0,1")
        out = d.cli(*args, "--parallel", "2", "--name", "ps", "--set", "reference=null")
        runs = {r.data.tags.get("sertune.search"): r for r in d.runs_by_kind("search")}
    finally:
        d.clean()
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-2000:]
    assert "2 at a time, each in a driver of its own" in text
    assert re.search(r"^\[ps\.fold0\.pst\] \[sertune\] search 'ps\.fold0\.pst'", text, re.M)
    names = [f"ps.fold{k}.{arm}" for k in (0, 1) for arm in ("pst", "stl_baseline")]
    assert set(names) <= set(runs), sorted(runs)
    spans = sorted((runs[n].info.start_time, runs[n].info.end_time) for n in names)
    overlaps = sum(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
    assert overlaps >= 1, spans  # at least two fold searches ran at the same time
    assert all(runs[n].info.status == "FINISHED" for n in names)
    d.remove()
