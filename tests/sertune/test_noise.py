"""How much of a figure is the configuration: the reliability estimate (no Ray) and
``sertune bench noise`` end to end on the linear trainable, whose probe figure has a spread
between configurations and a seed noise known by construction."""

import json
import random
import statistics

import pytest
import yaml

from sertune.bench.noise import reliability
from sertune.stats import max_gain_threshold, t_quantile


def _groups(rng, configs, seeds, between, within, unbalanced=False):
    out = []
    for _ in range(configs):
        mu = rng.gauss(0.5, between)
        n = seeds - (rng.random() < 0.3 if unbalanced else 0)
        out.append([mu + rng.gauss(0, within) for _ in range(n)])
    return out


@pytest.mark.parametrize(
    ("between", "within", "unbalanced"),
    [(0.2, 0.1, False), (0.1, 0.1, False), (0.05, 0.15, True), (0.0, 0.1, False)],
)
def test_the_reliability_estimate_recovers_a_known_between_and_within_spread(
    between, within, unbalanced
):
    rng = random.Random(7)
    r = reliability("m", _groups(rng, 400, 4, between, within, unbalanced))
    icc = between**2 / (between**2 + within**2)
    assert r.configs == 400 and r.runs <= 1600
    assert r.within_sd == pytest.approx(within, rel=0.05)
    assert r.between_sd == pytest.approx(between, abs=0.02)
    assert r.icc == pytest.approx(icc, abs=0.05)
    df = r.runs - r.configs  # one-way: the within df
    assert r.resolvable == pytest.approx(t_quantile(df) * 2**0.5 * r.within_sd, rel=1e-4)
    # Spearman-Brown: a mean of K runs is more reliable, and K=1 is the run itself
    assert r.icc_of_mean(1) == pytest.approx(r.icc)
    assert r.icc == 0 or r.icc_of_mean(3) > r.icc


def test_too_little_to_estimate_is_none_and_non_finite_runs_are_left_out():
    assert reliability("m", [[0.5, 0.6]]) is None  # one configuration
    assert reliability("m", [[0.5], [0.6]]) is None  # no seed repeated
    r = reliability("m", [[0.5, 0.7, float("nan")], [0.2, 0.4]])
    assert r.runs == 4 and r.within_sd == pytest.approx(0.1414, abs=1e-3)


@pytest.mark.slow  # moved to the slow tier: keeps make test under 30 min in CI
@pytest.mark.usefixtures("ray_2cpu")
def test_bench_noise_prints_the_reliability_its_construction_implies(home, tmp_path):
    """10 configurations x 3 seeds of the linear trainable; its ``val_probe`` is the searched
    offset (uniform on [0, 1]) plus 0.1443 x N(0, 1) per run: the ICC it prints must match the
    one the drawn offsets and that noise imply (0.80 in expectation)."""
    from sertune import tracking
    from sertune.bench.noise import run_noise_bench
    from tests.linear_trainable import linear_spec

    raw = linear_spec(
        home,
        "noisy",
        objective={"metric": "val_probe", "mode": "max"},
        budget={"trials": 2, "concurrency": 2, "max_epochs": 1, "grace_epochs": 1},
        params={"features.n_mels": 16, "probe.noise_sd": 0.1443},
        space={"probe.offset": {"type": "float", "low": 0.0, "high": 1.0}},
    )
    spec = tmp_path / "noisy.yaml"
    spec.write_text(yaml.safe_dump(raw))
    lines = []
    table = run_noise_bench(
        str(spec), configs=10, seeds=3, out=str(tmp_path / "out"), log=lines.append
    )
    text = "\n".join(lines)
    probe = next(r for r in table if r.metric == "val_probe")
    saved = json.loads((tmp_path / "out" / "bench_noise.json").read_text())
    # the construction, for the 10 offsets this search drew: their spread between, 0.1443 within
    offsets = [r["config"]["probe.offset"] for r in saved["runs"]]
    between = statistics.stdev(offsets)
    assert probe.configs == 10 and probe.runs == 30
    assert probe.within_sd == pytest.approx(0.1443, rel=0.35)
    assert probe.between_sd == pytest.approx(between, abs=0.08)
    assert probe.icc == pytest.approx(between**2 / (between**2 + 0.1443**2), abs=0.12)
    # the printed table carries the same figures, the objective first
    assert "10 random configurations of linear x 3 seeds" in text
    table_text = next(ln for ln in lines if ln.startswith("metric"))
    first = table_text.splitlines()[1]
    assert first.split()[0] == "val_probe" and f"{probe.icc:.2f}" in first.split()
    # every run's value is kept, grouped by configuration, and the run is in MLflow
    assert len(saved["runs"]) == 10 and all(
        len(r["values"]["val_probe"]) == 3 for r in saved["runs"]
    )
    assert (tmp_path / "out" / "bench_noise.png").stat().st_size > 0
    bench = tracking.Store().run(text.split("plot: MLflow run ")[1].split()[0])
    assert bench.kind == "bench" and bench.params["configs"] == "10"
    assert bench.metrics["icc/val_probe"] == pytest.approx(probe.icc, abs=1e-6)


# -- the stop rules (search.stop) ------------------------------------------------------------


def _write(tmp_path, home, **fields):
    from tests.linear_trainable import linear_spec

    raw = linear_spec(home, "flat", **fields)
    path = tmp_path / "flat.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("stop", "extra", "field", "words"),
    [
        ({"noise_sd": 0.05}, {}, "search.stop", "terminator: true"),
        ({"patience": 3}, {}, "search.stop.noise_sd", "sertune bench noise flat"),
        (
            {"patience": 3, "noise_sd": 0.05},
            {"objective": {"metrics": [{"metric": "val_uar"}, {"metric": "val_f1"}]}},
            "search.stop",
            "single objective",
        ),
        (
            {"terminator": True, "noise_sd": 0.05},
            {"search": {"scheduler": "pbt"}},
            "search.stop",
            "population",
        ),
        ({"terminator": True, "noise_sd": 0.05, "min_trials": 50}, {}, "search.stop.min", "never"),
    ],
)
def test_a_stop_rule_it_cannot_serve_is_refused_before_anything_runs(
    home, tmp_path, stop, extra, field, words
):
    from sertune.spec import SpecError, load_spec

    search = {**extra.pop("search", {}), "stop": stop}
    path = _write(
        tmp_path,
        home,
        search=search,
        budget={"trials": 20, "concurrency": 1, "max_epochs": 1, "grace_epochs": 1},
        space={"optim.lr": {"type": "float", "low": 0.01, "high": 0.1}},
        **extra,
    )
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert any(f.startswith(field) and words in msg for f, msg in e.value.problems), str(e.value)


def _rule(**stop):
    from sertune.spec import ParamSpec, StopSpec
    from sertune.stoprule import NoiseStop

    space = {"x": ParamSpec(type="float", low=0.0, high=1.0)}
    return NoiseStop("t", StopSpec(**stop), "m", "max", space, budget=40)


def _feed(rule, slope, noise, n, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        x = rng.random()
        rule.observe({"x": x}, 0.5 + slope * x + rng.gauss(0, noise), started=i + 2)
        if rule.tripped:
            return i + 1
    return None


def test_the_terminator_stops_a_flat_objective_and_not_one_with_signal():
    flat = _rule(terminator=True, noise_sd=0.05, min_trials=6)
    at = _feed(flat, slope=0.0, noise=0.05, n=20)
    assert at is not None and at >= 6
    assert flat.tripped.startswith("stopped by the terminator")
    bound = float(flat.tripped.split("at most ")[1].split()[0])
    assert bound < 0.05 and f"{at + 1} of 40 trials run, {40 - at - 1} saved" in flat.tripped
    signal = _rule(terminator=True, noise_sd=0.02, min_trials=6)
    assert _feed(signal, slope=0.5, noise=0.02, n=14) is None  # 0.5 of range vs 0.02 of noise
    assert signal.regret_bound() > 0.02


def test_patience_counts_trials_whose_best_does_not_beat_the_best_before_them():
    rule = _rule(patience=4, noise_sd=0.05, min_trials=2)
    for v in [0.50, 0.60, 0.70, 0.75, 0.80, 0.82]:
        rule.observe({"x": 0.5}, v)
        assert rule.tripped is None  # the last 4's best (0.82) beats 0.60 by 0.22 > threshold
    rule.observe({"x": 0.5}, 0.70)  # best before the last 4 is now 0.70: 0.82 is +0.12 only
    threshold = max_gain_threshold(3, 4) * 0.05
    assert 0.12 > threshold  # ... which the corrected threshold still calls a gain
    assert rule.tripped is None
    rule.observe({"x": 0.5}, 0.70)
    assert rule.tripped is None  # the last 4 hold 0.82: +0.07 over the 0.75 before them
    rule.observe({"x": 0.5}, 0.71)  # now 0.82 vs the 0.80 before it: +0.02 is luck
    assert rule.tripped and "best of the last 4 trials" in rule.tripped
    assert "(0.8000)" in rule.tripped and "noise_sd 0.05" in rule.tripped
    steady = _rule(patience=3, noise_sd=0.01, min_trials=2)
    for i in range(12):
        steady.observe({"x": 0.5}, 0.1 * i)  # every trial beats the best by 0.1
    assert steady.tripped is None


@pytest.mark.slow  # moved to the slow tier: keeps make test under 30 min in CI
@pytest.mark.usefixtures("ray_2cpu")
def test_a_search_on_a_flat_objective_is_ended_by_the_terminator(home, tmp_path):
    """The objective (the linear trainable's probe) does not depend on the searched learning
    rate: only its run-to-run noise (sd 0.05) moves it. The search stops long before its budget,
    says so, and records it."""
    from sertune import tracking
    from sertune.leaderboard import format_result
    from sertune.records import load_record
    from sertune.search import run_search
    from sertune.spec import load_spec
    from sertune.status import format_status, search_status

    path = _write(
        tmp_path,
        home,
        objective={"metric": "val_probe", "mode": "max"},
        budget={"trials": 30, "concurrency": 1, "max_epochs": 1, "grace_epochs": 1},
        params={"features.n_mels": 16, "probe.offset": 0.5, "probe.noise_sd": 0.05},
        space={"optim.lr": {"type": "float", "low": 0.01, "high": 0.1}},
        search={"stop": {"terminator": True, "noise_sd": 0.05, "min_trials": 6}},
    )
    lines = []
    result = run_search(load_spec(path), log=lines.append)
    said = [ln for ln in lines if "ended early" in ln]
    assert len(said) == 1 and said[0].startswith("[sertune] search 'flat' ended early, stopped by")
    assert result.stopped_by and "the terminator" in result.stopped_by
    assert 6 <= len(result.rows) < 30 and f"of 30 trials run, {30 - len(result.rows)}" in said[0]
    assert result.completed >= 6
    assert "the search ended early, stopped by the terminator" in format_result(result, "x")
    assert load_record("flat").stopped_by == result.stopped_by
    status = format_status(search_status("flat"), load_record("flat"))
    assert "finished" in status.splitlines()[0] and "ended early, stopped by" in status
    parent = tracking.Store().runs_of("flat", "search")[0]
    assert parent.tags["sertune.stopped_by"] == result.stopped_by


@pytest.mark.slow  # moved to the slow tier: keeps make test under 30 min in CI
@pytest.mark.usefixtures("ray_2cpu")
def test_bench_sampler_measures_a_sampler_on_the_users_own_spec(home, tmp_path):
    """``sertune bench sampler SPEC``: any spec (here the linear trainable on its own corpus)
    instead of the demo, the spec's confirmation left out of the measured searches."""
    from sertune.bench.sampler import run_sampler_bench

    path = _write(
        tmp_path,
        home,
        params={"features.n_mels": 16},
        space={"optim.lr": {"type": "float", "low": 0.01, "high": 0.1}},
        confirm={"top_k": 1, "seeds": 2},
    )
    lines = []
    run_sampler_bench(
        ["random", "tpe"], spec=str(path), trials=2, seeds=1, epochs=1, log=lines.append
    )
    text = "\n".join(lines)
    assert "spec 'flat' on synthetic" in lines[0]
    assert text.count("after 2 trials") == 2  # one search per sampler, no confirmation trials
    assert "tpe vs random at 2 trials" in text and "plot: MLflow run" in text


def test_cross_validated_the_noise_is_never_the_folds_standard_error(home, tmp_path):
    """The folds' se is mostly which speakers fall in a fold (shared by every trial): a
    cross-validated spec without noise_sd or repeats is refused; with repeats the search
    measures its own seed noise."""
    from sertune.spec import SpecError, load_spec

    space = {"optim.lr": {"type": "float", "low": 0.01, "high": 0.1}}
    budget = {"trials": 20, "concurrency": 3, "max_epochs": 1, "grace_epochs": 1}
    path = _write(
        tmp_path,
        home,
        objective={"metric": "val_uar", "cv": {"folds": 3}},
        budget=budget,
        space=space,
        search={"stop": {"terminator": True}},
    )
    with pytest.raises(SpecError) as e:
        load_spec(path)
    (msg,) = [m for f, m in e.value.problems if f == "search.stop.noise_sd"]
    assert "--set objective.cv.folds=3" in msg and "not that noise" in msg
    path = _write(
        tmp_path,
        home,
        objective={"metric": "val_uar", "cv": {"folds": 3}, "repeats": 2},
        budget=budget,
        space=space,
        search={"stop": {"terminator": True}},
    )
    assert load_spec(path).search.stop.noise_sd is None
    rule = _rule(patience=2, min_trials=2)
    jobs = {"fold0.rep0": 0.5, "fold0.rep1": 0.52, "fold1.rep0": 0.7, "fold1.rep1": 0.7}
    rule.observe({"x": 0.5}, 0.605, jobs=jobs)
    assert rule.noise is None  # 2 degrees of freedom: too few to act on
    rule.observe({"x": 0.4}, 0.605, jobs=jobs)  # 4 now: the pooled seed sd / √(K·R)
    assert rule.noise == pytest.approx(((0.02**2 / 2) / 2) ** 0.5 / 2, rel=1e-6)
