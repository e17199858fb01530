"""``sertune search status`` and ``list``: how far a search got, in sertune's words.

A search whose driver died without a word (SIGKILL, a lost node) reads ``crashed`` here, never
``running``; trials read ``finished``, ``stopped early at epoch k``, ``failed: <reason>``,
``interrupted``. Pending MLflow records of the search are sent first (its journal).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from .leaderboard import from_saved_state, kept_note
from .records import SearchRecord, effective_status, load_record


def search_status(name: str) -> dict[str, Any]:
    """Trials per state and the best so far, read from the saved Tune state."""
    record = load_record(name)
    spec = record.spec
    out: dict[str, Any] = {
        "name": name,
        "path": record.path,
        "status": effective_status(record),
        "phase": record.phase.value,
        "created": record.created,
        "budget": spec.budget.trials,
        "tracking_uri": record.tracking_uri,
        "parent_run_id": record.parent_run_id,
        "stopped_by": record.stopped_by,
        "trials": {},
        "rows": [],
    }
    try:
        result = from_saved_state(name, spec, record.path)
    except Exception as e:  # noqa: BLE001 - nothing saved yet (a search that just started)
        out["note"] = f"no trial state yet ({type(e).__name__})"
        return out
    rows, columns = result.rows, result.columns
    if out["status"] in ("crashed", "interrupted"):
        for r in rows:
            if r["status"] in ("running", "pending"):
                r["status"] = "interrupted"
    out["rows"] = rows
    out["trials"] = dict(Counter(_bucket(r) for r in rows))
    first = columns.first.metric
    best = next(
        (
            r
            for r in rows
            if isinstance(r.get(first), (int, float)) and r["state"] in ("finished", "stopped")
        ),
        None,
    )
    if best:
        out["best"] = {"trial": best["trial"], first: best[first], "config": best["config"]}
        if isinstance(best.get(f"{first}_se"), (int, float)):  # cross-validated: ± its folds' se
            out["best"]["se"] = best[f"{first}_se"]
        if kept_note(best, first):  # read on its smoothed curve: where, and the raw figures
            out["best"]["note"] = kept_note(best, first)
    return out


def _bucket(row: dict[str, Any]) -> str:
    s = row["status"]
    return (
        s.split(":")[0]
        if s.startswith("failed")
        else ("stopped early" if s.startswith("stopped") else s)
    )


def mlflow_url(record: SearchRecord, ui: str = "http://127.0.0.1:5000") -> str | None:
    """Where the search's parent run opens in the MLflow UI (``sertune ui`` for a local store)."""
    from . import tracking

    run = record.parent_run_id
    if not run:
        return None
    uri = record.tracking_uri or ""
    base = uri.rstrip("/") if tracking.is_server(uri) else ui
    try:
        exp = tracking.Store(uri).experiment_id(create=False)
    except Exception:  # noqa: BLE001 - a URL is a courtesy; the store may be offline
        return f"{base} (run {run})"
    return f"{base}/#/experiments/{exp}/runs/{run}"


def format_status(s: dict[str, Any], record: SearchRecord) -> str:
    phase = f" ({s['phase']} phase)" if s.get("phase") not in (None, "done", "search") else ""
    lines = [f"search {s['name']}: {s['status']}{phase}"]
    if s["status"] in ("crashed", "interrupted"):
        lines[0] += f" — resume with: sertune search resume {s['name']}"
    lines.append(f"  created {s['created']}, budget {s['budget']} trials, trials in {s['path']}")
    if s.get("note"):
        lines.append(f"  {s['note']}")
    if s.get("stopped_by"):
        lines.append(f"  ended early, {s['stopped_by']}")
    if s["trials"]:
        lines.append("  trials: " + ", ".join(f"{n} {k}" for k, n in sorted(s["trials"].items())))
    if s.get("best"):
        b = s["best"]
        metric = next(k for k in b if k not in ("trial", "config", "se", "note"))
        cfg = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in sorted(b["config"].items())
        )
        se = f" ± {b['se']:.3f}" if "se" in b else ""
        lines.append(
            f"  best so far: trial {b['trial']}  {metric}={b[metric]:.3f}{se}{b.get('note', '')}"
            f"  ({cfg})"
        )
    failed = [r for r in s["rows"] if r["state"] == "failed"]
    for r in failed[:5]:
        lines.append(f"  trial {r['trial']} {r['status']}")
    url = mlflow_url(record)
    if url:
        lines.append(f"  MLflow: {url}")
    return "\n".join(lines)
