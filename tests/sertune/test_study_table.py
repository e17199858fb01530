"""The study's table (no Ray, no MLflow): its intervals are ``sertune.stats``'s, they cover a
known truth in simulation, and its Markdown, HTML and JSON forms hold every figure."""

import json
import re

import numpy as np
import pytest

from sertune import stats
from sertune import study_table as stt

ROBUST = {
    "robust/uar_snr20_white": -0.05,
    "robust/uar_snr0_white": -0.25,
    "robust/uar_snr10_babble": -0.12,
    "robust/uar_noise_mean": -0.14,
    "robust/uar_fgsm0.005": -0.2,
    "robust/uar_fgsm0.001": -0.08,
    "robust/uar_pgd0.005": -0.3,
    "robust/uar_cross_emodb": -0.18,
}
ADVERSARIAL = ("robust/uar_fgsm0.005", "robust/uar_fgsm0.001", "robust/uar_pgd0.005")


def _fold(base: float, arm_gain: float, k: int, adversarial: bool = True) -> dict[str, float]:
    wobble = 0.013 * ((k * 7) % 5 - 2)  # a fold's own difficulty, shared by the arms
    uar = round(base + arm_gain + wobble, 4)
    out = {
        "test_uar": uar,
        "test_war": round(uar + 0.02, 4),
        "test_f1": round(uar - 0.01, 4),
        "robust/uar_clean": uar,  # not a row
        "val_uar": 0.9,  # not a row
    }
    for m, drop in ROBUST.items():
        if adversarial or m not in ADVERSARIAL:
            out[m] = round(uar + drop + 0.004 * k * (1 if arm_gain > 0.03 else -1), 4)
    return out


def _per_fold(n_folds: int) -> dict[str, dict[int, dict[str, float]]]:
    return {
        "reference": {k: _fold(0.45, 0.0, k, adversarial=False) for k in range(n_folds)},
        "stl_baseline": {k: _fold(0.45, 0.03 + 0.002 * k, k) for k in range(n_folds)},
        "demo": {k: _fold(0.45, 0.06 + 0.011 * (k % 2), k) for k in range(n_folds)},
    }


WINNERS = {
    "demo": {
        0: {"params": {"lr": 0.00031234, "w_aux": 0.3, "encoder": "cnn"}, "val_uar": 0.6},
        1: {"params": {"lr": 0.00029876, "w_aux": 0.32, "encoder": "cnn"}, "val_uar": 0.61},
        2: {"params": {"lr": 0.00033333, "w_aux": 0.28, "encoder": "cnn"}, "val_uar": 0.59},
    },
    "stl_baseline": {
        0: {"lr": 0.001, "encoder": "cnn"},
        1: {"lr": 0.0001, "encoder": "crnn"},
        2: {"lr": 0.0012, "encoder": "cnn"},
    },
}


def _table(n_folds: int = 3, **kw) -> stt.StudyTable:
    return stt.build_table(
        "paper",
        ["reference", "stl_baseline", "demo"],
        "demo",
        "stl_baseline",
        _per_fold(n_folds),
        **kw,
    )


# -- (a) the intervals are sertune.stats' ---------------------------------------------------------
@pytest.mark.parametrize("n_folds", [3, 4])
def test_intervals_are_paired_difference_of_the_per_fold_figures(n_folds):
    pf = _per_fold(n_folds)
    table = _table(n_folds)
    assert table.folds == list(range(n_folds))
    for row in table.rows:
        for which, other in (("vs", "stl_baseline"), ("reference", "reference")):
            a = {f"fold{k}": f[row.metric] for k, f in pf["demo"].items() if row.metric in f}
            b = {f"fold{k}": f[row.metric] for k, f in pf[other].items() if row.metric in f}
            got = getattr(row, which)
            want = stats.paired_difference(a, b)
            if want is None:
                assert got is None  # reference: no adversarial figures
                continue
            assert (got.diff, got.low, got.high, got.n, got.df) == (
                want.diff,
                want.low,
                want.high,
                want.n,
                want.df,
            )
            assert got.excludes_zero == want.excludes_zero
        for arm in table.arms:
            values = [f[row.metric] for f in pf[arm].values() if row.metric in f]
            cell = row.cells[arm]
            if not values:
                assert cell is None
                continue
            s = stats.summary(values)
            assert (cell.mean, cell.sd, cell.n) == (s.mean, s.sd, s.n)


def test_rows_order_and_labels():
    names = [
        "robust/uar_cross_emodb",
        "robust/uar_pgd0.01",
        "robust/uar_pgd0.005",
        "robust/uar_fgsm0.01",
        "robust/uar_fgsm0.001",
        "robust/uar_noise_mean",
        "robust/uar_snr-5_white",
        "robust/uar_snr20_white",
        "robust/uar_snr0_babble",
        "robust/uar_snr10_babble",
        "robust/uar_cross_cremad",
        "robust/uar_clean",
        "val_robust/uar_snr10_white",
        "val_uar",
        "test_f1",
        "test_war",
        "test_uar",
        "epochs_done",
    ]
    assert [label for _, label in stt.condition_rows(names)] == [
        "clean UAR",
        "clean WAR",
        "clean macro-F1",
        "babble noise 10 dB",
        "babble noise 0 dB",
        "white noise 20 dB",
        "white noise -5 dB",
        "noise mean",
        "FGSM ε=0.001",
        "FGSM ε=0.01",
        "PGD ε=0.005",
        "PGD ε=0.01",
        "cross-corpus: cremad",
        "cross-corpus: emodb",
    ]


def test_one_shared_fold_gives_the_plain_difference_and_no_interval():
    pf = {
        "reference": {0: {"test_uar": 0.4}},
        "stl_baseline": {0: {"test_uar": 0.5}, 1: {"test_uar": 0.52}},
        "demo": {1: {"test_uar": 0.56}, 2: {"test_uar": 0.6}},
    }
    table = stt.build_table("t", ["reference", "stl_baseline", "demo"], "demo", "stl_baseline", pf)
    row = table.row("test_uar")
    assert row.vs.n == 1 and row.vs.low is None and row.vs.diff == pytest.approx(0.04)
    assert stt.format_contrast(row.vs) == "+0.040 n/a (1 fold)"
    assert row.reference is None  # no shared fold
    assert stt.format_cell(row.cells["reference"], 3) == "0.400 (1 fold)"
    assert stt.format_cell(row.cells["demo"], 3).endswith("(n=2)")


# -- (b) simulation against known truth ------------------------------------------------------------
def _simulate(truth: float, n_reps: int = 2000, n_folds: int = 5, seed: int = 7):
    rng = np.random.default_rng(seed)
    fold_effect = rng.normal(0, 0.05, (n_reps, n_folds))  # speakers: shared by the two arms
    base = 0.55 + fold_effect + rng.normal(0, 0.02, (n_reps, n_folds))
    spec = 0.55 + truth + fold_effect + rng.normal(0, 0.02, (n_reps, n_folds))
    covered = verdicts = 0
    for r in range(n_reps):
        pf = {
            "stl_baseline": {k: {"test_uar": float(base[r, k])} for k in range(n_folds)},
            "demo": {k: {"test_uar": float(spec[r, k])} for k in range(n_folds)},
        }
        row = stt.build_table(
            "sim", ["stl_baseline", "demo"], "demo", "stl_baseline", pf, reference_arm=None
        ).rows[0]
        covered += row.vs.low <= truth <= row.vs.high
        verdicts += row.vs.verdict != stt.NO_DIFFERENCE
    return covered / n_reps, verdicts / n_reps


def test_intervals_cover_the_true_paired_difference():
    coverage, _ = _simulate(0.05)
    print(f"[simulation] coverage of a true +0.05 over 5 folds: {coverage:.3f}")
    assert 0.93 <= coverage <= 0.97


def test_a_verdict_without_a_true_difference_is_rare():
    coverage, rate = _simulate(0.0, seed=11)
    print(f"[simulation] verdict rate with no true difference: {rate:.3f}")
    assert 0.03 <= rate <= 0.07
    assert 0.93 <= coverage <= 0.97


# -- (c) Markdown -----------------------------------------------------------------------------------
def test_markdown_has_every_row_every_fold_figure_and_na_for_reference_attacks():
    pf = _per_fold(4)
    table = _table(4, winners=WINNERS, n_classes=4)
    md = stt.to_markdown(table)
    assert md.startswith("# Study paper")
    assert "4 outer folds" in md
    assert "paired over the same outer folds; intervals are 95 % t intervals with n−1 df" in md
    header = next(line for line in md.splitlines() if line.startswith("| condition"))
    assert header == (
        "| condition | reference | stl_baseline | demo | demo - stl_baseline [95 % CI] "
        "| demo - reference [95 % CI] |"
    )
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    for _, label in table.conditions:
        assert label in rows
    assert "clean UAR" in rows and "cross-corpus: emodb" in rows and "noise mean" in rows
    assert "robust/uar_clean" not in md and "val_uar" not in md
    for label in ("FGSM ε=0.005", "FGSM ε=0.001", "PGD ε=0.005"):
        cells = rows[label].strip("| ").split(" | ")
        assert cells[1] == "n/a" and cells[5] == "n/a"  # the reference arm and spec - reference
    # numbers: mean ± sd, signed difference with its interval, ASCII minus
    cells = rows["clean UAR"].strip("| ").split(" | ")
    assert re.fullmatch(r"\d\.\d{3} ± \d\.\d{3}", cells[3])
    assert re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]( \*\*.+\*\*)?", cells[4])
    assert "−" not in rows["white noise 0 dB"]
    assert "**demo > reference**" in rows["clean UAR"]
    # every per-fold number
    for arm, folds in pf.items():
        for k, f in folds.items():
            line = next(x for x in md.splitlines() if x.startswith(f"| {k} | {arm} |"))
            for m, _ in table.conditions:
                assert (f"{f[m]:.3f}" if m in f else "n/a") in line.strip("| ").split(" | ")
    # winners, floats to 3 significant digits
    assert "**demo**: the folds agree." in md
    assert "0.000312" in md and "0.00031234" not in md
    assert "**stl_baseline**: the folds disagree on lr (0.0001–0.0012), encoder (cnn, crnn)" in md


# -- (d) HTML ---------------------------------------------------------------------------------------
def test_html_is_self_contained_with_embedded_plots(tmp_path):
    table = _table(3, winners=WINNERS, n_classes=4)
    out = stt.write_html(table, tmp_path / "study" / "study.html")
    page = out.read_text()
    assert out.exists() and "data:image/png;base64," in page
    assert len(re.findall(r"data:image/png;base64,", page)) == 4  # clean, noise, attacks, cross
    srcs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert srcs and all(s.startswith("data:") for s in srcs)
    assert "<link" not in page and "<script" not in page
    assert "cross-corpus: emodb" in page and "demo &gt; reference" in page
    assert "the folds agree" in page


# -- (e) winners ------------------------------------------------------------------------------------
def test_winners_agreement():
    agree = stt.agreement("demo", WINNERS["demo"])
    assert agree.agree is True and agree.disagree == []
    assert agree.sentence == "the folds agree"
    assert agree.spread["encoder"] == "cnn" and agree.spread["w_aux"] == "0.28–0.32"

    split = stt.agreement("stl_baseline", WINNERS["stl_baseline"])
    assert split.agree is False and split.disagree == ["lr", "encoder"]

    # 25 % of the mean's magnitude: 0.9..1.1 (range 0.2 of mean 1.0) agrees; 0.8..1.2 (0.4) not
    assert stt.agreement("a", {0: {"x": 0.9}, 1: {"x": 1.1}, 2: {"x": 1.0}}).agree is True
    assert stt.agreement("a", {0: {"x": 0.8}, 1: {"x": 1.2}}).disagree == ["x"]
    assert stt.agreement("a", {0: {"x": 0}, 1: {"x": 0}}).agree is True
    assert stt.agreement("a", {0: {"x": -1.0}, 1: {"x": -1.1}}).agree is True
    assert stt.agreement("a", {0: {"b": True}, 1: {"b": False}}).disagree == ["b"]
    assert stt.agreement("a", {0: {"x": 1, "y": "u"}, 1: {"x": 1}}).disagree == ["y"]
    assert stt.agreement("a", {0: {"x": 1.0}}).agree is None
    assert stt.agreement("a", {0: {"x": 1.0}}).sentence == "one fold: nothing to compare"


# -- (f) JSON ---------------------------------------------------------------------------------------
def test_round_trip_through_json():
    table = _table(4, winners=WINNERS, n_classes=4)
    back = stt.from_dict(json.loads(json.dumps(stt.to_dict(table))))
    assert back == table
    assert stt.to_markdown(back) == stt.to_markdown(table)
