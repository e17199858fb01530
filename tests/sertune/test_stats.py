"""The statistics module proven by simulation against known truth (no Ray, no MLflow).

Every interval sertune prints is checked for coverage over >= 2,000 simulated pairs whose true
difference is known; the stop rules' stop rates over 2,000 simulated searches; the ANOVA's
estimates over simulated configuration x seed tables. Each simulation is seeded: the figures are
the same on every run, and they are printed (``pytest -s``) for the record.
"""

import math
import random

import pytest

from sertune import stats

N = 2000


def _say(what: str, rate: float) -> None:
    print(f"[simulation] {what}: {rate:.3f}")


def _side(name, by_seed, design):
    return {
        "search": name,
        "objective": {"metric": "m", "mode": "max"},
        "headline": [],
        "fingerprint": "f",
        "split": {"fold": 0, "n_folds": None, "cv_folds": 0, "dealing": "balanced"},
        "design": design,
        "source": design,
        "configuration_of": name,
        "stats": {"m": stats.design_summary(by_seed).as_dict()},
        "by_seed": {"m": by_seed},
    }


def _covers(row, truth):
    lo, hi = row["interval"]
    return lo <= truth <= hi


def _kr(rng, k, r, mu, fold_fx, tau, sigma, label_reps=True):
    """One arm's K x R jobs: the fold's shared effect, this arm's fold interaction (tau) and the
    run's own noise (sigma)."""
    out = {}
    for f in range(k):
        inter = rng.gauss(0, tau)
        for rep in range(r):
            label = f"fold{f}.rep{rep}" if (label_reps and r > 1) else f"fold{f}"
            out[label] = mu + fold_fx[f] + inter + rng.gauss(0, sigma)
    return out


@pytest.mark.parametrize(
    ("k", "r"),
    [(2, 5), (3, 1), (5, 1), (3, 3)],
)
def test_compare_fold_intervals_cover_the_true_difference(k, r):
    """Paired fold by fold: the arms share each fold's speakers (a large shared fold effect,
    sd 0.08), each arm has its own fold interaction (sd 0.03) and seed noise (sd 0.02). With
    K=2 x R=5 the repeats are not 10 independent runs: t(1), not t(9)."""
    from sertune.comparison import compare

    rng = random.Random(100 * k + r)
    truth = 0.03
    hits = 0
    for _ in range(N):
        fold_fx = [rng.gauss(0, 0.08) for _ in range(k)]
        a = _kr(rng, k, r, 0.70 + truth, fold_fx, 0.03, 0.02)
        b = _kr(rng, k, r, 0.70, fold_fx, 0.03, 0.02)
        (row,) = compare(_side("a", a, "folds"), _side("b", b, "folds"))["rows"]
        assert row["paired"] and row["diff"] == pytest.approx(stats.paired_difference(a, b).diff)
        hits += _covers(row, truth)
    rate = hits / N
    _say(f"coverage, compare paired over K={k} folds x R={r}", rate)
    assert 0.93 <= rate <= 0.97


def test_counting_k_times_r_runs_as_independent_would_not_cover():
    """The finding this module fixes: K=2 x R=5 jobs as 10 independent pairs (t(9)) cover far
    less than 95 % when folds interact with the configuration."""
    rng = random.Random(7)
    hits = 0
    for _ in range(N):
        fold_fx = [rng.gauss(0, 0.08) for _ in range(2)]
        a = _kr(rng, 2, 5, 0.73, fold_fx, 0.03, 0.02)
        b = _kr(rng, 2, 5, 0.70, fold_fx, 0.03, 0.02)
        lo, hi = stats.mean_interval([a[x] - b[x] for x in a])  # the old, wrong analysis
        hits += lo <= 0.03 <= hi
    _say("coverage, K=2 x R=5 treated as 10 independent pairs (the old analysis)", hits / N)
    assert hits / N < 0.85


def test_compare_seed_paired_and_welch_intervals_cover_the_true_difference():
    from sertune.comparison import compare

    rng = random.Random(3)
    truth = -0.02
    paired = welch = 0
    for _ in range(N):
        # confirmed sides on the same 4 seeds: a seed effect shared by both arms (sd 0.05)
        seed_fx = {str(s): rng.gauss(0, 0.05) for s in range(4)}
        a = {s: 0.60 + truth + fx + rng.gauss(0, 0.02) for s, fx in seed_fx.items()}
        b = {s: 0.60 + fx + rng.gauss(0, 0.02) for s, fx in seed_fx.items()}
        (row,) = compare(_side("a", a, "seeds"), _side("b", b, "seeds"))["rows"]
        assert row["paired"]
        paired += _covers(row, truth)
        # different seeds on each side, unequal spreads and sizes: Welch
        a = {f"a{i}": 0.60 + truth + rng.gauss(0, 0.06) for i in range(5)}
        b = {f"b{i}": 0.60 + rng.gauss(0, 0.02) for i in range(8)}
        (row,) = compare(_side("a", a, "seeds"), _side("b", b, "seeds"))["rows"]
        assert not row["paired"]
        welch += _covers(row, truth)
    _say("coverage, compare paired over 4 seeds", paired / N)
    _say("coverage, compare Welch (5 vs 8 seeds, sd 0.06 vs 0.02)", welch / N)
    assert 0.93 <= paired / N <= 0.97
    assert 0.93 <= welch / N <= 0.97


@pytest.mark.parametrize(("k", "r"), [(2, 5), (3, 1), (5, 2)])
def test_gate_on_lower_bounds_the_true_mean_at_its_stated_rate(k, r):
    """``--gate-on lower``: the 95 % interval over the candidate's independent units (its K fold
    means) covers the true mean 93-97 % of the time; the gate ``m >= truth`` on the lower end
    passes (wrongly) at most ~2.5 % of the time."""
    from sertune.registry import _gate_table

    rng = random.Random(11 * k + r)
    truth = 0.65
    hits = passes = 0
    for _ in range(N):
        fold_fx = [rng.gauss(0, 0.05) for _ in range(k)]
        jobs = _kr(rng, k, r, truth, fold_fx, 0.0, 0.03)
        fold_means = list(stats.units(jobs).values())
        best = {
            "metrics": {"m": sum(fold_means) / k},
            "sd": {"m": stats.summary(fold_means).sd},
            "values": {"m": fold_means},
            "n": k,
            "label": "trial x",
        }
        rows, failed = _gate_table(best, [("m", ">=", truth)], "lower")
        shown = rows[0][2]
        lo, hi = (float(x) for x in shown.split("95 % CI ")[1].rstrip(")").split(" to "))
        hits += lo <= truth <= hi
        passes += not failed
    _say(f"coverage, --gate-on lower interval, K={k} x R={r}", hits / N)
    _say(f"rate a gate at the true mean passes on the lower bound, K={k} x R={r}", passes / N)
    assert 0.93 <= hits / N <= 0.97
    assert passes / N <= 0.04


def test_compare_refuses_to_pair_other_speakers_or_mixed_designs():
    from sertune.comparison import compare, format_comparison

    a = {"fold0": 0.7, "fold1": 0.6, "fold2": 0.65}
    b = {"fold0": 0.68, "fold1": 0.61, "fold2": 0.6}
    sa, sb = _side("a", a, "folds"), _side("b", b, "folds")
    sb["split"] = {**sb["split"], "fold": 1}
    c = compare(sa, sb)
    (row,) = c["rows"]
    assert (
        not row["paired"] and "unpaired: different speaker splits (fold 0 vs 1" in row["verdict"]
    )
    assert "not paired: different speaker splits" in format_comparison(c)
    seeds = _side("s", {"1": 0.7, "2": 0.71, "3": 0.69}, "seeds")
    (row,) = compare(seeds, _side("a", a, "folds"))["rows"]
    assert row["interval"] is None and row["verdict"].startswith("no interval")


# -- the stop rules ------------------------------------------------------------------------------
def _rule(**stop):
    from sertune.spec import ParamSpec, StopSpec
    from sertune.stoprule import NoiseStop

    space = {"x": ParamSpec(type="float", low=0.0, high=1.0)}
    return NoiseStop("sim", StopSpec(**stop), "m", "max", space, budget=100, log=lambda s: None)


def _stops(values, **stop):
    rule = _rule(**stop)
    for i, v in enumerate(values):
        rule.observe({"x": 0.5}, v, started=i + 1)
        if rule.tripped:
            return i + 1
    return None


def test_patience_rarely_stops_when_later_trials_are_truly_better():
    """8 equal trials, then 5 each truly 2 sd better: the rule (checked once all 13 ended)
    stops at most 10 % of the time. (The old rule, the maximum of the earlier runs + 1.96·√2·σ,
    stopped 88 % of the time.)"""
    rng = random.Random(5)
    stops = sum(
        _stops(
            [rng.gauss(0, 1) for _ in range(8)] + [rng.gauss(2, 1) for _ in range(5)],
            patience=5,
            noise_sd=1.0,
            min_trials=13,
        )
        is not None
        for _ in range(N)
    )
    _say("patience stops with 5 trials truly 2 sd better than the 8 before", stops / N)
    assert stops / N <= 0.10


def test_patience_stops_equal_trials_by_min_trials_plus_patience():
    rng = random.Random(6)
    by = [
        _stops([rng.gauss(0, 0.05) for _ in range(13)], patience=5, noise_sd=0.05, min_trials=8)
        for _ in range(N)
    ]
    rate = sum(x is not None and x <= 13 for x in by) / N
    _say("patience stops all-equal trials by min_trials + patience (8 + 5)", rate)
    assert rate >= 0.90


def test_without_a_noise_estimate_the_rules_wait_and_say_so_once():
    said = []
    rule = _rule(patience=2, terminator=True, min_trials=2)
    rule.log = said.append
    for v in [0.5, 0.4, 0.3, 0.2, 0.1]:
        rule.observe({"x": 0.5}, v)
    assert rule.tripped is None and rule.noise is None
    assert len(said) == 1 and "waits" in said[0]


def test_under_cross_validation_the_noise_is_the_seed_sd_of_the_fold_mean():
    """K=3 folds x R=2 repeats: folds differ a lot (sd 0.08: which speakers fall in them), seeds
    little (sd 0.015). The rule's noise is the seed sd of the 6-job mean (0.015/√6), nowhere
    near the folds' standard error; the terminator compares against it."""
    rng = random.Random(9)
    rule = _rule(terminator=True, min_trials=50)
    rule.folds = 3
    fold_se = []
    for _ in range(40):
        fold_fx = [rng.gauss(0, 0.08) for _ in range(3)]
        jobs = _kr(rng, 3, 2, 0.6, fold_fx, 0.0, 0.015)
        fold_se.append(stats.design_summary(jobs).se)
        rule.observe({"x": rng.random()}, sum(jobs.values()) / 6, jobs=jobs)
    assert rule.noise == pytest.approx(0.015 / math.sqrt(6), rel=0.2)
    assert sorted(fold_se)[20] > 5 * rule.noise
    assert "seed noise" in rule._noise_words()


# -- bench noise's ANOVA -----------------------------------------------------------------------
def test_the_crossed_anova_recovers_known_spreads_with_a_seed_main_effect():
    """Configurations x crossed seeds: a seed effect shared by every configuration (sd 0.06)
    must land in ``seed_sd``, not in ``within``; the nested (one-way) analysis puts it there."""
    from sertune.bench.noise import crossed_reliability, reliability

    rng = random.Random(21)
    between, within, seed = 0.05, 0.03, 0.06
    est_b, est_w, est_s, nested_w = [], [], [], []
    for _ in range(200):
        mus = [rng.gauss(0.6, between) for _ in range(12)]
        fx = [rng.gauss(0, seed) for _ in range(4)]
        table = [[mu + f + rng.gauss(0, within) for f in fx] for mu in mus]
        r = crossed_reliability("m", table)
        est_b.append(r.between_sd)
        est_w.append(r.within_sd)
        est_s.append(r.seed_sd)
        nested_w.append(reliability("m", table).within_sd)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    _say("crossed ANOVA, mean between sd (truth 0.05)", mean(est_b))
    _say("crossed ANOVA, mean within sd (truth 0.03)", mean(est_w))
    _say("crossed ANOVA, mean seed sd (truth 0.06)", mean(est_s))
    _say("nested ANOVA on the same tables, mean within sd", mean(nested_w))
    assert mean(est_b) == pytest.approx(between, abs=0.006)
    assert mean(est_w) == pytest.approx(within, abs=0.003)
    assert mean(est_s) == pytest.approx(seed, abs=0.01)
    assert mean(nested_w) > 0.055  # the seed effect inflates the nested "within"
    r = crossed_reliability("m", table)
    assert r.resolvable == pytest.approx(
        stats.t_quantile(r.configs * 0 + 33) * math.sqrt(2) * r.within_sd
    )  # t with (12-1)(4-1) = 33 df, not 1.96


def test_a_missing_run_falls_back_to_the_one_way_analysis():
    from sertune.bench.noise import crossed_reliability

    r = crossed_reliability("m", [[0.5, 0.6], [0.7, None], [0.4, 0.45]])
    assert r.design == "crossed" and r.configs == 2  # the complete configurations
    r = crossed_reliability("m", [[0.5, 0.6], [0.7, None]])
    assert r.design == "one-way" and r.runs == 3


# -- the kept epoch -------------------------------------------------------------------------------
def test_the_kept_epoch_is_the_peak_of_the_smoothed_curve_not_a_lone_spike():
    curve = [0.5, 0.6, 0.91, 0.6, 0.7, 0.8, 0.82, 0.8, 0.7]
    e, v = stats.kept_epoch(curve)
    assert e == 6 and v == pytest.approx((0.8 + 0.82 + 0.8) / 3)
    assert stats.kept_epoch([0.3, 0.2], mode="min") == (1, 0.25) or stats.kept_epoch(
        [0.3, 0.2], mode="min"
    ) == (0, 0.25)
    assert stats.kept_epoch([]) is None
    assert stats.kept_epoch([float("nan"), 0.4, 0.5])[0] in (1, 2)


def test_smoothing_lowers_the_winners_curse():
    """Flat true curves with noise: the raw maximum overstates the truth far more than the
    smoothed curve's maximum does."""
    rng = random.Random(2)
    raw, smooth = [], []
    for _ in range(N):
        curve = [0.7 + rng.gauss(0, 0.05) for _ in range(20)]
        raw.append(max(curve) - 0.7)
        smooth.append(stats.kept_epoch(curve)[1] - 0.7)
    _say("mean optimism of the raw best epoch (flat truth, sd 0.05, 20 epochs)", sum(raw) / N)
    _say("mean optimism of the smoothed best epoch", sum(smooth) / N)
    assert sum(smooth) / N < 0.6 * sum(raw) / N
