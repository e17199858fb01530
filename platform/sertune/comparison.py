"""Two searches on the same data, side by side: ``sertune compare A B`` and a search's baseline.

Each search is represented by its winning configuration: the best confirmed configuration (mean
± sd over its fresh seeds) when the search was confirmed, else its best trial - over its folds
and/or repeats when replicated, else one run (no spread). Each figure's difference A - B gets a
95 % interval from :mod:`sertune.stats`:

* **paired** only when the two sides can be paired: the same data (corpus fingerprint), the same
  split (``data.fold``, the number of folds, the cross-validation K and the speaker dealing, so
  the same speakers in every fold) and the same design (seeds with seeds, folds with folds);
  pairs by seed, or fold by fold (K folds x R repeats: each fold's repeats averaged first, df
  K-1); the printed difference is the mean of exactly the pairs the interval uses;
* else **unpaired** (Welch), with the reason said - except a seeds side against a folds side,
  whose spreads measure different things (seed noise, speaker-fold difficulty): no interval.

The verdict names a side only when the interval excludes 0. A side whose figure is its best
trial's objective (not re-run) is flagged: that figure is the one that selected it.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import stats as st
from .errors import NotFound, UsageError
from .tracking import Run, Store
from .trainable import objective_value


def _stats(values: list[float]) -> dict[str, float]:
    return st.summary(values).as_dict()


def search_figures(store: Store, search: str) -> dict[str, Any]:
    """The winning configuration of ``search`` as MLflow recorded it."""
    runs = store.runs_of(search)
    parent = next((r for r in runs if r.kind == "search"), None)
    if parent is None:
        raise NotFound(f"no search named {search!r} in MLflow ({store.uri})")
    objective = json.loads(parent.tags.get("sertune.objective", "[]"))[0]
    key, sign = objective["metric"], (1 if objective["mode"] == "max" else -1)
    # a refit's validation speakers are among its training speakers: never a search's figure
    trials = [r for r in runs if r.kind == "trial" and r.tags.get("sertune.phase") != "refit"]
    # a run's objective is its kept epoch's (smoothed) figure, not its last epoch's
    trials = [
        replace(r, metrics={**r.metrics, key: objective_value(r.metrics, key)})
        if key in r.metrics
        else r
        for r in trials
    ]
    confirmed: dict[str, list[Run]] = defaultdict(list)
    for r in trials:
        if r.tags.get("sertune.phase") == "confirm" and r.status == "finished":
            confirmed[r.tags.get("sertune.confirm_of", "?")].append(r)
    out = {
        "search": search,
        "objective": objective,
        "headline": _final_display(parent.tags.get("sertune.trainable", "")),
        "fingerprint": parent.tags.get("sertune.data_fingerprint", ""),
        "split": json.loads(parent.tags.get("sertune.split", "null") or "null"),
        "design": "single",
    }
    if confirmed:

        def mean_of(group):
            vals = [g.metrics[key] for g in group if key in g.metrics]
            return sum(vals) / len(vals) if vals else -math.inf * sign

        origin, group = max(confirmed.items(), key=lambda kv: sign * mean_of(kv[1]))
        metrics = {k for g in group for k in g.metrics}
        out.update(
            source=f"confirmed: {len(group)} seeds", configuration_of=origin, design="seeds"
        )
        out["stats"] = {
            k: _stats([g.metrics[k] for g in group if k in g.metrics]) for k in sorted(metrics)
        }
        out["by_seed"] = {
            k: {_seed(g, i): g.metrics[k] for i, g in enumerate(group) if k in g.metrics}
            for k in sorted(metrics)
        }
        return out
    done = [r for r in trials if key in r.metrics and r.done]
    if not done:
        raise UsageError(f"search {search!r} has no finished trial with {key!r}")
    best = max(done, key=lambda r: sign * r.metrics[key])
    folds = replica_figures(best)
    if folds:  # a replicated trial: its folds/repeats are the spread, paired job by job
        labels = next(iter(folds.values()))
        n = len(labels)
        what = (
            "cross-validation folds"
            if all("rep" not in lb for lb in labels)
            else "repeats"
            if all(lb.startswith("rep") for lb in labels)
            else "folds x repeats"
        )
        out.update(
            source=f"best trial, {n} {what}",
            configuration_of=best.trial,
            design="folds" if any(lb.startswith("fold") for lb in labels) else "repeats",
            selected_by=key,  # not re-run: its objective is the figure that selected it
        )
        out["stats"] = {k: st.design_summary(v).as_dict() for k, v in sorted(folds.items())}
        out["by_seed"] = folds
        return out
    out.update(
        source="best single run (no seed spread)", configuration_of=best.trial, selected_by=key
    )
    out["stats"] = {k: _stats([v]) for k, v in sorted(best.metrics.items())}
    out["by_seed"] = {k: {_seed(best, 0): v} for k, v in sorted(best.metrics.items())}
    return out


_REPLICA = re.compile(r"^(fold\d+(\.rep\d+)?|rep\d+)$")


def replica_figures(run: Run) -> dict[str, dict[str, float]]:
    """A replicated trial's figures per job (``fold<k>/<figure>``, ``rep<r>/...``,
    ``fold<k>.rep<r>/...``): {figure: {job: v}}."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for name, v in run.metrics.items():
        head, _, figure = name.partition("/")
        if _REPLICA.match(head) and figure:
            out[figure][head] = v
    return dict(out)


def _seed(run: Run, i: int) -> str:
    """What pairs two runs: the seed they trained with (a run without one pairs with none)."""
    seed = run.params.get("seed")
    return str(seed) if seed is not None else f"{run.run_id}:{i}"


def _final_display(trainable: str) -> list[str]:
    """The trainable's display metrics known at a trial's end (its test figures)."""
    from .trainable import UnknownTrainable, get_trainable

    try:
        plugin = get_trainable(trainable)
    except UnknownTrainable:  # a search of a trainable not installed here: robustness only
        return []
    return [m for m in plugin.display_metrics if m in plugin.final_metrics]


def pairing(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, str]:
    """Whether A and B can be paired unit by unit, and if not, why (one phrase)."""
    if a["design"] != b["design"]:
        return False, f"A's spread is over {a['design']}, B's over {b['design']}"
    if a["fingerprint"] != b["fingerprint"]:
        return False, "different data (corpus fingerprints differ)"
    sa, sb = a.get("split"), b.get("split")
    if sa != sb:
        if sa is None or sb is None:
            return False, "a side does not record its speaker split"
        diff = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        said = ", ".join(f"{k} {sa.get(k)} vs {sb.get(k)}" for k in diff)
        return False, f"different speaker splits ({said}): other speakers in each fold"
    return True, ""


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Rows for the objective, the trainable's test figures and every ``robust/*`` metric both
    sides have."""
    key = a["objective"]["metric"]
    headline = a.get("headline") or []
    wanted = [key, *headline] + sorted(k for k in a["stats"] if k.startswith("robust/"))
    paired_ok, why = pairing(a, b)
    # seed spread against speaker-fold spread: different things (repeats and seeds are both seeds)
    mixed = {a["design"], b["design"]} in ({"folds", "seeds"}, {"folds", "repeats"})
    rows = []
    for m in dict.fromkeys(wanted):
        sa, sb = a["stats"].get(m), b["stats"].get(m)
        if not sa or not sb:
            continue
        va, vb = a.get("by_seed", {}).get(m, {}), b.get("by_seed", {}).get(m, {})
        d = None if mixed else st.difference(va, vb, pair=paired_ok)
        diff = d.diff if d is not None else sa["mean"] - sb["mean"]
        if mixed:
            verdict = f"no interval ({why}: different sources of spread)"
        elif d is None:
            verdict = "no verdict (single run)"
        else:
            unit = st.design_words(list(va)) if d.paired else ""
            how = f"paired over {d.n} {unit}" if d.paired else "unpaired"
            if not d.paired and paired_ok is False:
                how += f": {why}"
            span = f"95 % CI {d.low:+.3f} to {d.high:+.3f}, {how}"
            if d.excludes_zero:
                verdict = f"{a['search'] if diff > 0 else b['search']} higher ({span})"
            else:
                verdict = f"no difference resolved ({span})"
        rows.append(
            {
                "metric": m,
                "a": sa,
                "b": sb,
                "diff": diff,
                "interval": None if d is None else [d.low, d.high],
                "paired": bool(d and d.paired),
                "verdict": verdict,
            }
        )
    same_data = a["fingerprint"] == b["fingerprint"]
    return {
        "a": a,
        "b": b,
        "rows": rows,
        "same_data": same_data,
        "paired": paired_ok,
        "unpaired_because": why,
    }


def format_comparison(c: dict[str, Any]) -> str:
    a, b = c["a"], c["b"]
    lines = [
        f"A = {a['search']} ({a['source']}, configuration of trial {a['configuration_of']})",
        f"B = {b['search']} ({b['source']}, configuration of trial {b['configuration_of']})",
    ]
    if not c["same_data"]:
        lines.append("WARNING: the two searches ran on different data (fingerprints differ)")
    if not c.get("paired", True) and c.get("unpaired_because"):
        lines.append(f"not paired: {c['unpaired_because']}")
    key = a["objective"]["metric"]
    for side, name in ((a, "A"), (b, "B")):
        if side.get("selected_by"):
            lines.append(
                f"{name}'s {key} is the figure that selected its trial (not re-run): "
                "optimistic; confirm it (sertune promote --confirm-top) for a fair one"
            )
    lines.append("")
    width = max([len("metric")] + [len(r["metric"]) for r in c["rows"]])
    lines.append(
        f"{'metric'.ljust(width)}  {'A mean ± sd':>15}  {'B mean ± sd':>15}  {'A - B':>7}  verdict"
    )
    for r in c["rows"]:
        fa = f"{r['a']['mean']:.3f} ± {r['a']['sd']:.3f}"
        fb = f"{r['b']['mean']:.3f} ± {r['b']['sd']:.3f}"
        lines.append(
            f"{r['metric'].ljust(width)}  {fa:>15}  {fb:>15}  {r['diff']:+7.3f}  {r['verdict']}"
        )
    return "\n".join(lines)


def plot_comparison(c: dict[str, Any], out: Path) -> Path | None:
    """A robustness metric against SNR for each noise type (``robust/<m>_snr<dB>_<noise>``), both
    searches, error bars = seed sd; the clean figure (``robust/<m>_clean``) dotted."""
    import re

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pattern = re.compile(r"^robust/([a-z0-9]+)_snr(-?\d+)_(\w+)$")
    series: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
    figure = ""  # the first metric with an SNR curve (uar for MTL-AUG) is the one plotted
    for side in ("a", "b"):
        for m, s in c[side]["stats"].items():
            hit = pattern.match(m)
            if hit and hit.group(1) == (figure := figure or hit.group(1)):
                series[(side, hit.group(3))].append((float(hit.group(2)), s["mean"], s["sd"]))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for (side, noise), pts in sorted(series.items()):
        pts.sort()
        name = c[side]["search"]
        clean = c[side]["stats"].get(f"robust/{figure}_clean")
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o" if side == "a" else "s",
            ls="-" if side == "a" else "--",
            capsize=3,
            label=f"{name} · {noise}",
        )
        if clean and side == "a":
            ax.axhline(clean["mean"], c="gray", ls=":", lw=1)
    ax.set_xlabel("SNR over the utterance (dB)")
    ax.set_ylabel(f"test {figure.upper()} (mean ± sd over seeds)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{c['a']['search']} vs {c['b']['search']} under noise", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_comparison(c: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(c, indent=2, default=str))
    (out / "comparison.md").write_text("```\n" + format_comparison(c) + "\n```\n")
    png = plot_comparison(c, out / "uar_vs_snr_comparison.png")
    return [p for p in (out / "comparison.json", out / "comparison.md", png) if p]
