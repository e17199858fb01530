"""A study's table: nested speaker-independent cross-validation, arm against arm, fold by fold.

A study runs, for each outer fold k (test speakers = outer fold k) and each arm (``reference``:
eGeMAPS + logistic regression; the ``--vs`` arm, e.g. the single-task twin; the spec's arm), a
complete search on the other speakers, and evaluates its champion once on fold k's speakers.
This module turns those per-fold figures into the table a paper shows: each arm's mean ± sd over
its outer folds (sd with n-1), then ``spec - vs`` and ``spec - reference`` **paired** over the
folds both arms have, with a 95 % t interval (df = pairs - 1), a per-fold table with every
number, and each arm's winning configuration per fold with whether the folds agree on it.

Pure functions: no Ray, no MLflow. Every mean, sd and interval comes from :mod:`sertune.stats`
(``summary``, ``paired_difference``; each outer fold is one unit, labelled ``fold<k>``).

The per-fold figures use a trial's metric names (``test_uar``, ``test_war``, ``test_f1``,
``robust/uar_snr{SNR}_{noise}``, ``robust/uar_noise_mean``, ``robust/uar_fgsm{eps:g}``,
``robust/uar_pgd{eps:g}``, ``robust/uar_cross_{name}``); any other key (``robust/uar_clean``,
``val_*``) is left out of the table.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .stats import paired_difference, summary

NO_DIFFERENCE = "no difference shown"
AGREE_TOLERANCE = 0.25  # a numeric parameter agrees when max - min <= 25 % of |mean|


# -- conditions: which metric is which row, in which order ------------------------------------------
@dataclass(frozen=True)
class ConditionKind:
    """One kind of row: the metrics it matches, its label, its order among its own kind, the
    short header of the per-fold table and the plot group it is drawn in."""

    group: str  # "clean", "noise", "adversarial", "cross-corpus": one figure each in the HTML
    measure: str  # what the number is ("UAR", "WAR", "macro-F1"): the plot's y axis
    pattern: re.Pattern[str]
    label: Callable[[re.Match[str]], str]
    short: Callable[[re.Match[str]], str]
    order: Callable[[re.Match[str]], tuple] = lambda m: ()


def _snr(m: re.Match[str]) -> int:
    return int(m.group("snr"))


def _eps(m: re.Match[str]) -> float:
    return float(m.group("eps"))


_EPS = r"(?P<eps>\d*\.?\d+(?:e[-+]?\d+)?)"

CONDITIONS: tuple[ConditionKind, ...] = (
    ConditionKind(
        "clean", "UAR", re.compile(r"^test_uar$"), lambda m: "clean UAR", lambda m: "clean UAR"
    ),
    ConditionKind(
        "clean", "WAR", re.compile(r"^test_war$"), lambda m: "clean WAR", lambda m: "clean WAR"
    ),
    ConditionKind(
        "clean",
        "macro-F1",
        re.compile(r"^test_f1$"),
        lambda m: "clean macro-F1",
        lambda m: "clean F1",
    ),
    ConditionKind(  # by noise type, then SNR from the cleanest down
        "noise",
        "UAR",
        re.compile(r"^robust/uar_snr(?P<snr>-?\d+)_(?P<noise>\w+)$"),
        lambda m: f"{m.group('noise')} noise {_snr(m)} dB",
        lambda m: f"{m.group('noise')} {_snr(m)} dB",
        lambda m: (m.group("noise"), -_snr(m)),
    ),
    ConditionKind(
        "noise",
        "UAR",
        re.compile(r"^robust/uar_noise_mean$"),
        lambda m: "noise mean",
        lambda m: "noise mean",
    ),
    ConditionKind(
        "adversarial",
        "UAR",
        re.compile(rf"^robust/uar_fgsm{_EPS}$"),
        lambda m: f"FGSM ε={_eps(m):g}",
        lambda m: f"FGSM {_eps(m):g}",
        lambda m: (_eps(m),),
    ),
    ConditionKind(
        "adversarial",
        "UAR",
        re.compile(rf"^robust/uar_pgd{_EPS}$"),
        lambda m: f"PGD ε={_eps(m):g}",
        lambda m: f"PGD {_eps(m):g}",
        lambda m: (_eps(m),),
    ),
    ConditionKind(
        "cross-corpus",
        "UAR",
        re.compile(r"^robust/uar_cross_(?P<name>.+)$"),
        lambda m: f"cross-corpus: {m.group('name')}",
        lambda m: f"cross {m.group('name')}",
        lambda m: (m.group("name"),),
    ),
)


def condition_of(metric: str) -> tuple[int, ConditionKind, re.Match[str]] | None:
    """The kind of row a metric is (its index in :data:`CONDITIONS`), or None: not in the table."""
    for i, kind in enumerate(CONDITIONS):
        m = kind.pattern.match(metric)
        if m:
            return i, kind, m
    return None


def condition_rows(metric_names: Iterable[str]) -> list[tuple[str, str]]:
    """The table's rows for these metric names, in order: ``[(metric, label), ...]``; clean UAR,
    WAR, macro-F1, noise by type then SNR descending, noise mean, FGSM then PGD by ε ascending,
    each cross-corpus set. Other names are left out."""
    found = []
    for name in set(metric_names):
        hit = condition_of(name)
        if hit:
            i, kind, m = hit
            found.append(((i, kind.order(m)), name, kind.label(m)))
    return [(name, label) for _, name, label in sorted(found)]


def _kind(metric: str) -> tuple[ConditionKind, re.Match[str]]:
    hit = condition_of(metric)
    if hit is None:
        raise ValueError(f"{metric!r} is not a condition of the study table")
    return hit[1], hit[2]


def short_label(metric: str) -> str:
    """The per-fold table's column header of a condition (``white 20 dB``, ``FGSM 0.005``)."""
    kind, m = _kind(metric)
    return kind.short(m)


# -- the table --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One arm's figure for one condition: mean ± sd over its ``n`` outer folds (sd with n-1)."""

    mean: float
    sd: float
    n: int


@dataclass(frozen=True)
class Contrast:
    """``a - b`` paired over the ``n`` outer folds both arms have; the 95 % t interval (df n-1)
    from :func:`sertune.stats.paired_difference`, None with a single pair (then ``diff`` is that
    pair's difference)."""

    a: str
    b: str
    diff: float
    low: float | None
    high: float | None
    n: int
    df: int | None
    verdict: str  # "a > b" / "a < b" where the interval excludes 0, NO_DIFFERENCE, or "" (1 fold)

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Row:
    metric: str
    label: str
    cells: dict[str, Cell | None]  # every arm; None: the arm has no figure (n/a)
    vs: Contrast | None  # spec - vs (None: no vs arm, or no shared fold)
    reference: Contrast | None  # spec - reference


@dataclass(frozen=True)
class Agreement:
    """Whether one arm's outer folds chose the same configuration."""

    arm: str
    folds: list[int]
    spread: dict[str, str]  # parameter -> "0.001–0.003" (numeric) or "a, b" (categorical)
    disagree: list[str]  # parameters whose folds disagree
    agree: bool | None  # None below two folds

    @property
    def sentence(self) -> str:
        if self.agree is None:
            return "one fold: nothing to compare"
        if self.agree:
            return "the folds agree"
        return "the folds disagree on " + ", ".join(
            f"{p} ({self.spread[p]})" for p in self.disagree
        )


@dataclass
class StudyTable:
    name: str
    arms: list[str]  # the columns' order: reference, vs, any other, spec
    spec_arm: str
    vs_arm: str | None
    reference_arm: str | None
    folds: list[int]  # every outer fold any arm has
    conditions: list[tuple[str, str]]  # (metric, label), the rows' order
    rows: list[Row]
    per_fold: dict[str, dict[int, dict[str, float]]]  # the table's figures only
    winners: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    agreement: dict[str, Agreement] = field(default_factory=dict)
    n_classes: int | None = None

    def row(self, metric: str) -> Row:
        return next(r for r in self.rows if r.metric == metric)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _by_fold(per_fold: Mapping[str, Mapping[int, Mapping[str, float]]], arm: str, metric: str):
    return {
        f"fold{k}": float(v[metric])
        for k, v in per_fold.get(arm, {}).items()
        if _finite(v.get(metric))
    }


def _contrast(per_fold, a: str, b: str, metric: str) -> Contrast | None:
    fa, fb = _by_fold(per_fold, a, metric), _by_fold(per_fold, b, metric)
    common = sorted(set(fa) & set(fb))
    if not common:
        return None
    d = paired_difference(fa, fb)
    if d is None:  # one shared fold: its difference, no interval
        k = common[0]
        return Contrast(a, b, fa[k] - fb[k], None, None, 1, None, "")
    verdict = f"{a} > {b}" if d.low > 0 else f"{a} < {b}" if d.high < 0 else NO_DIFFERENCE
    return Contrast(a, b, d.diff, d.low, d.high, d.n, int(d.df), verdict)


def winner_params(winner: Mapping[str, Any]) -> dict[str, Any]:
    """A winner's configuration: its ``params`` when it has them, else the mapping itself."""
    params = winner.get("params")
    return dict(params) if isinstance(params, Mapping) else dict(winner)


def shorten(value: Any) -> Any:
    """Floats to 3 significant digits (``0.000312``, ``1.5e-05``); anything else unchanged."""
    if isinstance(value, float):
        return float(f"{value:.3g}")
    return value


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _numeric(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def agreement(arm: str, winners: Mapping[int, Mapping[str, Any]]) -> Agreement:
    """Do ``arm``'s outer folds agree on its winning configuration? A categorical parameter
    agrees when every fold chose the same value; a numeric one when its range (max - min) is
    within 25 % of its mean's magnitude. A parameter some fold lacks disagrees."""
    folds = sorted(int(k) for k in winners)
    params = [winner_params(winners[k]) for k in sorted(winners, key=int)]
    names: list[str] = []
    for p in params:
        names += [n for n in p if n not in names]
    spread: dict[str, str] = {}
    disagree: list[str] = []
    for n in names:
        values = [p[n] for p in params if n in p]
        if len(values) == len(params) and all(_numeric(v) for v in values):
            lo, hi = min(values), max(values)
            mean = sum(values) / len(values)
            spread[n] = _fmt_value(lo) if lo == hi else f"{_fmt_value(lo)}–{_fmt_value(hi)}"
            ok = (hi - lo) <= AGREE_TOLERANCE * abs(mean)
        else:
            seen: list[str] = []
            for p in params:
                s = _fmt_value(p[n]) if n in p else "(absent)"
                if s not in seen:
                    seen.append(s)
            spread[n] = ", ".join(seen)
            ok = len(seen) == 1
        if not ok:
            disagree.append(n)
    return Agreement(arm, folds, spread, disagree, None if len(folds) < 2 else not disagree)


def build_table(
    name: str,
    arms: list[str],
    spec_arm: str,
    vs_arm: str | None,
    per_fold: dict[str, dict[int, dict[str, float]]],
    winners: dict[str, dict[int, dict]] | None = None,
    reference_arm: str | None = "reference",
    n_classes: int | None = None,
) -> StudyTable:
    """The study's table from ``per_fold[arm][fold][metric]`` (each outer fold's champion on that
    fold's test speakers) and optionally ``winners[arm][fold]`` (its winning configuration: a
    dict of parameters, or a dict with ``params``)."""
    order = list(dict.fromkeys(arms))
    for arm in (spec_arm, vs_arm, reference_arm):
        if arm is not None and arm not in order and arm in per_fold:
            order.append(arm)
    if spec_arm not in order:
        order.append(spec_arm)
    first = [a for a in (reference_arm, vs_arm) if a is not None and a in order]
    columns = first + [a for a in order if a not in first and a != spec_arm] + [spec_arm]
    if vs_arm is not None and vs_arm not in columns:
        vs_arm = None
    if reference_arm is not None and reference_arm not in columns:
        reference_arm = None

    names = {m for arm in columns for f in per_fold.get(arm, {}).values() for m in f}
    conditions = condition_rows(names)
    kept = {m for m, _ in conditions}
    figures = {
        arm: {
            int(k): {m: float(v) for m, v in f.items() if m in kept and _numeric(v)}
            for k, f in sorted(per_fold.get(arm, {}).items(), key=lambda kv: int(kv[0]))
        }
        for arm in columns
    }
    rows = []
    for metric, label in conditions:
        cells: dict[str, Cell | None] = {}
        for arm in columns:
            values = list(_by_fold(figures, arm, metric).values())
            if values:
                s = summary(values)
                cells[arm] = Cell(s.mean, s.sd, s.n)
            else:
                cells[arm] = None
        vs = _contrast(figures, spec_arm, vs_arm, metric) if vs_arm else None
        ref = _contrast(figures, spec_arm, reference_arm, metric) if reference_arm else None
        rows.append(Row(metric, label, cells, vs, ref))
    won = {
        arm: {int(k): dict(w) for k, w in sorted(ws.items(), key=lambda kv: int(kv[0]))}
        for arm, ws in (winners or {}).items()
        if ws
    }
    return StudyTable(
        name=name,
        arms=columns,
        spec_arm=spec_arm,
        vs_arm=vs_arm,
        reference_arm=reference_arm,
        folds=sorted({k for f in figures.values() for k in f}),
        conditions=conditions,
        rows=rows,
        per_fold=figures,
        winners=won,
        agreement={arm: agreement(arm, ws) for arm, ws in won.items()},
        n_classes=n_classes,
    )


# -- text -------------------------------------------------------------------------------------------
def format_cell(cell: Cell | None, folds: int | None = None) -> str:
    """``0.712 ± 0.031``; ``0.712 (1 fold)``; ``(n=3)`` appended when the arm has fewer folds
    than the study; ``n/a`` without a figure."""
    if cell is None:
        return "n/a"
    if cell.n < 2:
        return f"{cell.mean:.3f} (1 fold)"
    text = f"{cell.mean:.3f} ± {cell.sd:.3f}"
    return text + (f" (n={cell.n})" if folds is not None and cell.n < folds else "")


def format_contrast(c: Contrast | None) -> str:
    """``+0.041 [-0.012, +0.094]`` (ASCII minus); ``+0.041 n/a (1 fold)``; ``n/a``."""
    if c is None:
        return "n/a"
    if c.low is None or c.high is None:
        return f"{c.diff:+.3f} n/a (1 fold)"
    return f"{c.diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}]"


def _contrast_md(c: Contrast | None) -> str:
    text = format_contrast(c)
    return f"{text} **{c.verdict}**" if c is not None and c.excludes_zero else text


def _contrast_columns(table: StudyTable) -> list[tuple[str, str]]:
    out = []
    if table.vs_arm:
        out.append(("vs", f"{table.spec_arm} - {table.vs_arm}"))
    if table.reference_arm:
        out.append(("reference", f"{table.spec_arm} - {table.reference_arm}"))
    return out


def describe(table: StudyTable) -> str:
    """The sentence that says what was run."""
    roles = []
    for arm in table.arms:
        role = (
            "the reference"
            if arm == table.reference_arm
            else "the comparison arm"
            if arm == table.vs_arm
            else "the spec's arm"
            if arm == table.spec_arm
            else "another arm"
        )
        roles.append(f"{arm} ({role})")
    n = len(table.folds)
    return (
        f"Nested speaker-independent cross-validation over {n} outer fold{'s' if n != 1 else ''}: "
        f"for each outer fold and each arm - {', '.join(roles)} - a complete search ran on the "
        "other speakers and its champion was evaluated once on the fold's test speakers. Cells "
        "are mean ± sd over the outer folds (sd with n−1); differences are paired over the same "
        "outer folds; intervals are 95 % t intervals with n−1 df. A verdict is given only where "
        "the interval excludes 0."
    )


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _fold_rows(table: StudyTable) -> tuple[list[str], list[list[str]]]:
    header = ["fold", "arm"] + [short_label(m) for m, _ in table.conditions]
    rows = []
    for k in table.folds:
        for arm in table.arms:
            f = table.per_fold.get(arm, {}).get(k)
            if f is None:
                continue
            rows.append(
                [str(k), arm]
                + [f"{f[m]:.3f}" if _finite(f.get(m)) else "n/a" for m, _ in table.conditions]
            )
    return header, rows


def _winner_rows(table: StudyTable, arm: str) -> tuple[list[str], list[list[str]]]:
    ag = table.agreement[arm]
    names = list(ag.spread)
    rows = []
    for k, w in table.winners[arm].items():
        p = winner_params(w)
        rows.append([str(k)] + [_fmt_value(shorten(p[n])) if n in p else "n/a" for n in names])
    rows.append(["spread"] + [ag.spread[n] for n in names])
    return ["fold", *names], rows


def to_markdown(table: StudyTable) -> str:
    """The study as Markdown, paste-able in a paper: title, what was run, the main table, the
    per-fold table, the winning configurations."""
    contrasts = _contrast_columns(table)
    n = len(table.folds)
    lines = [f"# Study {table.name}: nested speaker-independent cross-validation", ""]
    lines += [describe(table), ""]
    header = ["condition", *table.arms, *(f"{title} [95 % CI]" for _, title in contrasts)]
    lines += _md_table(
        header,
        (
            [r.label]
            + [format_cell(r.cells.get(a), n) for a in table.arms]
            + [_contrast_md(getattr(r, which)) for which, _ in contrasts]
            for r in table.rows
        ),
    )
    lines += ["", "## Per outer fold", ""]
    lines += _md_table(*_fold_rows(table))
    if table.winners:
        lines += ["", "## Winning configurations", ""]
        for arm in table.winners:
            lines += [f"**{arm}**: {table.agreement[arm].sentence}.", ""]
            lines += _md_table(*_winner_rows(table, arm))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# -- HTML -------------------------------------------------------------------------------------------
_ARM_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3")


def _html_table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _plots(table: StudyTable) -> list[tuple[str, str]]:
    """One PNG (base64) per condition group: a grid of small plots, one per condition, each arm's
    per-fold points with each fold's points joined across the arms and the mean marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[str, str, ConditionKind]]] = {}
    for metric, label in table.conditions:
        kind, _ = _kind(metric)
        groups.setdefault(kind.group, []).append((metric, label, kind))
    colours = {
        arm: ("#7f7f7f" if arm == table.reference_arm else _ARM_COLOURS[i % len(_ARM_COLOURS)])
        for i, arm in enumerate(table.arms)
    }
    xs = range(len(table.arms))
    out = []
    for group, conditions in groups.items():
        ncols = min(4, len(conditions))
        nrows = math.ceil(len(conditions) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 2.7 * nrows), squeeze=False)
        for ax in axes.flat[len(conditions) :]:
            ax.set_visible(False)
        for i, (ax, (metric, label, kind)) in enumerate(zip(axes.flat, conditions, strict=False)):
            for k in table.folds:
                ys = [
                    table.per_fold.get(arm, {}).get(k, {}).get(metric, math.nan)
                    for arm in table.arms
                ]
                ax.plot(xs, ys, color="#b0b0b0", lw=0.7, zorder=1)
            shown: list[float] = []
            for x, arm in zip(xs, table.arms, strict=True):
                vals = list(_by_fold(table.per_fold, arm, metric).values())
                if not vals:
                    ax.text(
                        x,
                        0.5,
                        "n/a",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="gray",
                        transform=ax.get_xaxis_transform(),
                    )
                    continue
                shown += vals
                ax.scatter([x] * len(vals), vals, s=14, color=colours[arm], zorder=2)
                mean = sum(vals) / len(vals)
                ax.hlines(mean, x - 0.28, x + 0.28, color="black", lw=1.8, zorder=3)
            if shown:  # the folds' range, not 0..1: the differences are what is read
                lo, hi = min(shown), max(shown)
                pad = max(0.1 * (hi - lo), 0.01)
                ax.set_ylim(lo - pad, hi + pad)
            if table.n_classes and kind.measure == "UAR":
                chance = 1 / table.n_classes
                bottom, top = ax.get_ylim()
                if bottom <= chance <= top:
                    ax.axhline(chance, color="gray", ls=":", lw=1)
                else:
                    ax.text(
                        0.98,
                        0.02 if chance < bottom else 0.98,
                        f"chance {chance:.3f} {'below' if chance < bottom else 'above'}",
                        ha="right",
                        va="bottom" if chance < bottom else "top",
                        fontsize=6,
                        color="gray",
                        transform=ax.transAxes,
                    )
            ax.set_title(label, fontsize=8)
            ax.set_xticks(list(xs))
            ax.set_xticklabels(table.arms, fontsize=7, rotation=20)
            ax.set_xlim(-0.5, len(table.arms) - 0.5)
            ax.tick_params(axis="y", labelsize=7)
            if i % ncols == 0:
                ax.set_ylabel(f"test {kind.measure}", fontsize=7)
        fig.suptitle(
            f"{group}: per outer fold (points; a fold's points joined), mean (bar)"
            + (", chance level (dotted)" if table.n_classes else ""),
            fontsize=8,
        )
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        out.append((group, base64.b64encode(buf.getvalue()).decode("ascii")))
    return out


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
td.verdict { font-weight: bold; }
p.note { max-width: 60em; } img { max-width: 100%; }
"""


def write_html(table: StudyTable, path: Path) -> Path:
    """One self-contained HTML page (the plots embedded as base64 PNG): the main table, one grid
    of plots per condition group, the per-fold table, the winning configurations."""
    e = html.escape
    contrasts = _contrast_columns(table)
    n = len(table.folds)
    header = ["condition", *table.arms]
    for _, title in contrasts:
        header += [f"{title} [95 % CI]", "verdict"]
    main = []
    for r in table.rows:
        cells = [r.label] + [format_cell(r.cells.get(a), n) for a in table.arms]
        for which, _ in contrasts:
            c = getattr(r, which)
            cells += [format_contrast(c), c.verdict if c is not None and c.excludes_zero else ""]
        main.append(cells)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Study {e(table.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Study {e(table.name)}: nested speaker-independent cross-validation</h1>",
        f'<p class="note">{e(describe(table))}</p>',
        _html_table(header, main, "main"),
    ]
    if table.conditions:
        parts.append("<h2>Per outer fold, by condition</h2>")
        for group, png in _plots(table):
            parts.append(
                f'<h3>{e(group)}</h3><img alt="{e(group)}: per-fold figures" '
                f'src="data:image/png;base64,{png}">'
            )
    parts += ["<h2>Per outer fold</h2>", _html_table(*_fold_rows(table), "folds")]
    if table.winners:
        parts.append("<h2>Winning configurations</h2>")
        for arm in table.winners:
            parts.append(f"<p><b>{e(arm)}</b>: {e(table.agreement[arm].sentence)}.</p>")
            parts.append(_html_table(*_winner_rows(table, arm), "winners"))
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# -- JSON -------------------------------------------------------------------------------------------
def to_dict(table: StudyTable) -> dict[str, Any]:
    """Plain JSON-able data (``study.json``); fold keys become strings."""
    return {
        "name": table.name,
        "arms": list(table.arms),
        "spec_arm": table.spec_arm,
        "vs_arm": table.vs_arm,
        "reference_arm": table.reference_arm,
        "n_classes": table.n_classes,
        "folds": list(table.folds),
        "conditions": [[m, label] for m, label in table.conditions],
        "rows": [asdict(r) for r in table.rows],
        "per_fold": {
            arm: {str(k): dict(f) for k, f in folds.items()}
            for arm, folds in table.per_fold.items()
        },
        "winners": {
            arm: {str(k): dict(w) for k, w in ws.items()} for arm, ws in table.winners.items()
        },
        "agreement": {arm: asdict(a) for arm, a in table.agreement.items()},
    }


def _contrast_from(d: Mapping[str, Any] | None) -> Contrast | None:
    return None if d is None else Contrast(**d)


def from_dict(d: Mapping[str, Any]) -> StudyTable:
    """The table :func:`to_dict` wrote."""
    return StudyTable(
        name=d["name"],
        arms=list(d["arms"]),
        spec_arm=d["spec_arm"],
        vs_arm=d.get("vs_arm"),
        reference_arm=d.get("reference_arm"),
        folds=[int(k) for k in d["folds"]],
        conditions=[(m, label) for m, label in d["conditions"]],
        rows=[
            Row(
                r["metric"],
                r["label"],
                {a: None if c is None else Cell(**c) for a, c in r["cells"].items()},
                _contrast_from(r.get("vs")),
                _contrast_from(r.get("reference")),
            )
            for r in d["rows"]
        ],
        per_fold={
            arm: {int(k): dict(f) for k, f in folds.items()}
            for arm, folds in d["per_fold"].items()
        },
        winners={
            arm: {int(k): dict(w) for k, w in ws.items()}
            for arm, ws in (d.get("winners") or {}).items()
        },
        agreement={
            arm: Agreement(
                a["arm"],
                [int(k) for k in a["folds"]],
                dict(a["spread"]),
                list(a["disagree"]),
                a["agree"],
            )
            for arm, a in (d.get("agreement") or {}).items()
        },
        n_classes=d.get("n_classes"),
    )
