"""sertune's statistics, in one place: every figure that ranks, gates, stops or compares comes
from here. No Ray, no MLflow, no torch: plain numbers in, plain numbers out, so every formula is
checked by simulation against known truth (``tests/sertune/test_stats.py``).

The designs a search produces and how they are summarised:

* **one run per configuration** - a value, no spread;
* **R repeats** (seeds) of a configuration - mean, sd over the R runs, se = sd/√R, df = R-1;
* **K folds** (speaker folds of a cross-validated objective) - the same over the K fold values,
  df = K-1;
* **K folds x R repeats** - the R repeats inside one fold share that fold's speakers, so they are
  *not* K·R independent runs: each fold's repeats are averaged first, then mean/sd/se over the K
  fold means with df = K-1 (the standard analysis of a balanced nested design: the fold-mean
  variance already holds the repeat noise, divided by R).

Intervals use Student's t with the design's degrees of freedom wherever an sd is estimated; a
noise given from outside (``search.stop.noise_sd``) is taken as known (normal quantile).

The module also holds the one-way and the crossed two-way ANOVA of ``sertune bench noise``, the
ICC and Spearman-Brown, the smoothed validation curve that chooses a trial's kept epoch, and the
threshold of the patience stop rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

LEVEL = 0.95  # every interval in sertune is two-sided 95 %


# -- quantiles --------------------------------------------------------------------------------------
@lru_cache(maxsize=256)
def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom (the normal
    quantile for ``df = inf``)."""
    from scipy.stats import norm, t

    p = 1 - (1 - level) / 2
    if df is None or math.isinf(df):
        return float(norm.ppf(p))
    if df <= 0:
        raise ValueError(f"t quantile needs df > 0, got {df}")
    return float(t.ppf(p, df))


def z_quantile(level: float = LEVEL) -> float:
    """The two-sided normal quantile (a known sd)."""
    return t_quantile(math.inf, level)


# -- one sample -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Summary:
    """Mean, sd, se with their degrees of freedom; ``n`` independent units (runs, or folds)."""

    mean: float
    sd: float
    se: float
    n: int
    df: int
    min: float
    max: float

    def interval(self, level: float = LEVEL) -> tuple[float, float] | None:
        if self.df < 1:
            return None
        half = t_quantile(self.df, level) * self.se
        return self.mean - half, self.mean + half

    def as_dict(self) -> dict[str, float]:
        return {
            "mean": self.mean,
            "sd": self.sd,
            "se": self.se,
            "n": self.n,
            "df": self.df,
            "min": self.min,
            "max": self.max,
        }


def summary(values: Sequence[float]) -> Summary:
    """Mean, sample sd (n-1), se = sd/√n, df = n-1 of independent values."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        raise ValueError("summary of no values")
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return Summary(mean, sd, sd / math.sqrt(n), n, n - 1, min(v), max(v))


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """The t interval of the mean of independent ``values`` (None below two)."""
    return summary(values).interval(level) if len(values) >= 2 else None


# -- replicated designs: folds x repeats --------------------------------------------------------------
_LABEL = re.compile(r"^(?:fold(?P<fold>\d+))?(?:\.?rep(?P<rep>\d+))?$")


def unit_of(label: str) -> str:
    """The independent unit a job's label belongs to: ``fold2.rep1`` -> ``fold2`` (repeats in a
    fold share its speakers), ``rep3`` -> ``rep3`` (repeats alone are independent), anything
    else (a seed) -> itself."""
    m = _LABEL.match(str(label))
    if m and m.group("fold") is not None:
        return f"fold{m.group('fold')}"
    return str(label)


def units(values: Mapping[str, float]) -> dict[str, float]:
    """Job values keyed by label -> one value per independent unit (each fold's repeats averaged
    first)."""
    groups: dict[str, list[float]] = {}
    for label, v in values.items():
        groups.setdefault(unit_of(label), []).append(float(v))
    return {u: sum(g) / len(g) for u, g in groups.items()}


def design_summary(values: Mapping[str, float]) -> Summary:
    """Mean/sd/se/df of a replicated trial's figure from its jobs' values keyed by label
    (``fold<k>``, ``rep<r>``, ``fold<k>.rep<r>``): over folds (repeats averaged inside each), or
    over repeats when there are no folds."""
    return summary(list(units(values).values()))


def design_words(labels: Sequence[str]) -> str:
    """What a set of job labels is, for a sentence: folds, repeats, folds x repeats, seeds."""
    labels = [str(x) for x in labels]
    if not labels or not all(_LABEL.match(x) and x for x in labels):
        return "seeds"
    has_fold = any(x.startswith("fold") for x in labels)
    has_rep = any("rep" in x for x in labels)
    if has_fold and has_rep:
        return "folds (repeats averaged in each)"
    return "folds" if has_fold else "repeats"


# -- two samples ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Difference:
    """mean(A) - mean(B) with its 95 % interval: ``paired`` over ``n`` shared units, else Welch."""

    diff: float
    low: float
    high: float
    n: int
    df: float
    paired: bool

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(
    a: Mapping[str, float], b: Mapping[str, float], level: float = LEVEL
) -> Difference | None:
    """Paired over the units both sides have (job labels are reduced to units first, so K folds
    x R repeats pair as K fold means, df = K-1). The difference is the mean of exactly the pairs
    the interval uses. None below two shared units."""
    ua, ub = units(a), units(b)
    common = sorted(set(ua) & set(ub))
    if len(common) < 2:
        return None
    d = summary([ua[k] - ub[k] for k in common])
    lo, hi = d.interval(level)
    return Difference(d.mean, lo, hi, d.n, d.df, True)


def welch_difference(
    a: Sequence[float], b: Sequence[float], level: float = LEVEL
) -> Difference | None:
    """Welch's interval of mean(A) - mean(B) for independent samples (None below two each)."""
    if len(a) < 2 or len(b) < 2:
        return None
    sa, sb = summary(a), summary(b)
    ea, eb = sa.se**2, sb.se**2
    diff = sa.mean - sb.mean
    se = math.sqrt(ea + eb)
    if se == 0:
        return Difference(diff, diff, diff, min(sa.n, sb.n), math.inf, False)
    df = (ea + eb) ** 2 / (ea**2 / (sa.n - 1) + eb**2 / (sb.n - 1))
    half = t_quantile(df, level) * se
    return Difference(diff, diff - half, diff + half, min(sa.n, sb.n), df, False)


def difference(
    a: Mapping[str, float], b: Mapping[str, float], pair: bool = True, level: float = LEVEL
) -> Difference | None:
    """Paired when ``pair`` and both sides share two units or more, else Welch over each side's
    independent units."""
    if pair:
        p = paired_difference(a, b, level)
        if p is not None:
            return p
    return welch_difference(list(units(a).values()), list(units(b).values()), level)


def lower_bound(
    values: Mapping[str, float] | Sequence[float], level: float = LEVEL
) -> float | None:
    """The lower end of the mean's interval over independent units (``--gate-on lower``)."""
    vals = list(units(values).values()) if isinstance(values, Mapping) else list(values)
    iv = mean_interval(vals, level)
    return None if iv is None else iv[0]


# -- ANOVA, reliability ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variance:
    """Variance components of configurations x seeds."""

    configs: int
    runs: int
    between_sd: float  # sd of the configurations' true means (>= 0)
    within_sd: float  # one run's sd around its configuration's mean (residual)
    within_df: int
    seed_sd: float | None  # a seed's main effect shared by every configuration (crossed only)
    design: str  # "crossed" or "one-way"

    @property
    def icc(self) -> float:
        total = self.between_sd**2 + self.within_sd**2
        return self.between_sd**2 / total if total > 0 else 0.0

    def resolvable(self, level: float = LEVEL) -> float:
        """Smallest difference between two configurations (one run each) told apart at
        ``level``: t(within df) · √2 · within sd."""
        df = self.within_df if self.within_df > 0 else math.inf
        return t_quantile(df, level) * math.sqrt(2) * self.within_sd


def spearman_brown(icc: float, k: int) -> float:
    """Reliability of the mean of ``k`` runs when one run's is ``icc``."""
    return k * icc / (1 + (k - 1) * icc) if icc > 0 else 0.0


def icc(between_sd: float, within_sd: float) -> float:
    total = between_sd**2 + within_sd**2
    return between_sd**2 / total if total > 0 else 0.0


def oneway_anova(groups: Sequence[Sequence[float]]) -> Variance | None:
    """One-way random-effects ANOVA of ``groups`` (each a configuration's runs; unbalanced
    allowed). None below two configurations or with no replicated one."""
    groups = [[float(v) for v in g if math.isfinite(float(v))] for g in groups]
    groups = [g for g in groups if g]
    if len(groups) < 2 or not any(len(g) > 1 for g in groups):
        return None
    n_total = sum(len(g) for g in groups)
    k = len(groups)
    df_within = n_total - k
    if df_within <= 0:
        return None
    grand = sum(sum(g) for g in groups) / n_total
    means = [sum(g) / len(g) for g in groups]
    ss_within = sum(sum((v - m) ** 2 for v in g) for g, m in zip(groups, means, strict=True))
    ms_within = ss_within / df_within
    ms_between = sum(len(g) * (m - grand) ** 2 for g, m in zip(groups, means, strict=True)) / (
        k - 1
    )
    n0 = (n_total - sum(len(g) ** 2 for g in groups) / n_total) / (k - 1)
    var_between = max(0.0, (ms_between - ms_within) / n0)
    return Variance(
        k, n_total, math.sqrt(var_between), math.sqrt(ms_within), df_within, None, "one-way"
    )


def crossed_anova(table: Sequence[Sequence[float]]) -> Variance | None:
    """Two-way ANOVA without replication of a complete configurations x seeds ``table`` (row i:
    configuration i's runs, column j: the j-th seed, the same seed for every configuration).

    A seed that helps or hurts every configuration alike (its data order, its initialisation)
    is a main effect: it is taken out of "within" and reported as ``seed_sd``, since every trial
    of a search shares the search's seed and such an effect cancels when trials are compared.
    within = the residual (configuration x seed interaction + noise), df = (C-1)(S-1)."""
    rows = [[float(v) for v in r] for r in table]
    c = len(rows)
    if c < 2:
        return None
    s = len(rows[0])
    if (
        s < 2
        or any(len(r) != s for r in rows)
        or not all(math.isfinite(v) for r in rows for v in r)
    ):
        return None
    grand = sum(map(sum, rows)) / (c * s)
    rmean = [sum(r) / s for r in rows]
    cmean = [sum(r[j] for r in rows) / c for j in range(s)]
    ss_rows = s * sum((m - grand) ** 2 for m in rmean)
    ss_cols = c * sum((m - grand) ** 2 for m in cmean)
    ss_res = sum(
        (rows[i][j] - rmean[i] - cmean[j] + grand) ** 2 for i in range(c) for j in range(s)
    )
    df_res = (c - 1) * (s - 1)
    ms_res = ss_res / df_res
    ms_rows = ss_rows / (c - 1)
    ms_cols = ss_cols / (s - 1)
    var_between = max(0.0, (ms_rows - ms_res) / s)
    var_seed = max(0.0, (ms_cols - ms_res) / c)
    return Variance(
        c,
        c * s,
        math.sqrt(var_between),
        math.sqrt(ms_res),
        df_res,
        math.sqrt(var_seed),
        "crossed",
    )


# -- the kept epoch -----------------------------------------------------------------------------------
SMOOTH_WINDOW = 3  # a centred 3-epoch mean (2 at the ends)


def smoothed(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """The centred moving mean of a validation curve: epoch e averages epochs e-h..e+h
    (h = window // 2), truncated at both ends. While a trial trains, its newest epoch's value
    averages only the epochs it has."""
    v = [float(x) for x in values]
    h = window // 2
    out = []
    for e in range(len(v)):  # a non-finite epoch (a diverged loss) is left out of its neighbours'
        part = [x for x in v[max(0, e - h) : e + h + 1] if math.isfinite(x)]
        out.append(sum(part) / len(part) if part and math.isfinite(v[e]) else math.nan)
    return out


def kept_epoch(
    values: Sequence[float], mode: str = "max", window: int = SMOOTH_WINDOW
) -> tuple[int, float] | None:
    """The epoch (0-based) whose model a trial keeps and the figure it reports: the best epoch of
    the smoothed curve (the earliest on a tie), with that smoothed value. A single epoch's peak
    on a small validation set is mostly noise (the winner's curse); its neighbours tell how much
    of it the model holds. None for an empty curve; a non-finite value counts as the worst."""
    if not values:
        return None
    s = smoothed(values, window)
    if all(not math.isfinite(x) for x in s):
        return None
    sign = 1 if mode == "max" else -1
    best = max(
        range(len(s)), key=lambda e: (sign * s[e] if math.isfinite(s[e]) else -math.inf, -e)
    )
    return best, s[best]


# -- the patience stop rule -----------------------------------------------------------------------------
PATIENCE_ALPHA = 0.2  # chance that equal trials look like an improvement (resets patience)


@lru_cache(maxsize=512)
def max_gain_threshold(before: int, after: int, alpha: float = PATIENCE_ALPHA) -> float:
    """``d`` (in units of one run's sd) such that when ``after`` new runs and ``before`` earlier
    runs all share one true mean, ``max(new) - max(earlier) > d`` happens with probability
    ``alpha``. Comparing with the *maximum* of the earlier runs flatters it (the maximum of 8
    runs overstates their mean by ~1.4 sd); this threshold accounts for both maxima exactly
    (P(Y - X > d) with X, Y maxima of normals, by quadrature)."""
    import numpy as np
    from scipy.stats import norm

    x = np.linspace(-8.0, 8.0, 4001)
    dx = x[1] - x[0]
    fx = before * norm.pdf(x) * norm.cdf(x) ** (before - 1)

    def exceed(d: float) -> float:
        return float(np.sum(fx * (1 - norm.cdf(x + d) ** after)) * dx)

    lo, hi = -6.0, 6.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if exceed(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def pooled_sd(sds: Sequence[float], dfs: Sequence[int]) -> tuple[float, int] | None:
    """Pooled sd of several samples' sds with their dfs (the sd of one run's noise estimated
    from several configurations' repeats); None when no df."""
    total = sum(dfs)
    if total <= 0:
        return None
    var = sum(d * s**2 for s, d in zip(sds, dfs, strict=True)) / total
    return math.sqrt(var), total
