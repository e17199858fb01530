"""The end of a search on its MLflow parent run: the leaderboard, plots and ``best/*``
(:meth:`SearchReport.finish`), the confirmation table (:meth:`SearchReport.confirmation`) and
the comparison with the baseline search (:meth:`SearchReport.comparison`).

The driver calls these with what they need, once a phase is over; the Tune callback that
records trials as they run is ``sertune.search_logger.TrialLogger``. Everything goes through
the search's journal, like the trials' records.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from . import tracking
from .leaderboard import SearchResult, rank
from .run_notes import NOTE, image
from .search_logger import PARENT, SearchRuns, TrialLogger
from .tracking import Kind, Op


class SearchReport:
    """Writes a search's conclusions onto its parent run (``runs``: the search's MLflow runs)."""

    def __init__(self, runs: SearchRuns):
        self.runs = runs

    def finish(
        self,
        result: SearchResult,
        status: str = "finished",
        trials: TrialLogger | None = None,
        cause: str | None = None,
        wait_s: float = 600.0,
    ) -> None:
        """Close the search: wait for stopped trials' evaluations (``trials``: the last phase's
        logger), summary on the parent. ``cause``: why the search stopped early (its trials
        failed the same way); nothing is evaluated then."""
        from .summary import write_schedule, write_search_summary

        runs = self.runs
        if trials is not None and not cause:
            trials.wait_for_evaluations(wait_s)
        if runs.resumed:
            self.close_open_trials(result)
        for row in result.rows:  # the leaderboard and the summary show them too
            for k, v in runs.evaluated.get(row["trial"], {}).items():
                if k.startswith(("test_", "robust/", "val_robust/")) and row.get(k) is None:
                    row[k] = v
        if result.columns.constraints:  # a stopped trial's figures decide its feasibility now
            result.rows = rank(result.rows, result.columns)
        with tempfile.TemporaryDirectory() as tmp:
            best = write_search_summary(Path(tmp), result, runs.spec)
            if best and runs.schedules.get(best["trial"]):
                write_schedule(Path(tmp), best["trial"], runs.schedules)
            src = runs.journal.stage(tmp)
            runs.append(Op(Kind.ARTIFACTS, key=PARENT, src=src, path="summary"))
        tags = {
            tracking.TAG_STATUS: status,
            "sertune.trials_failed": str(result.errors),
            NOTE: self._parent_note(result, cause),
        }
        if cause:
            tags["sertune.failure_reason"] = cause[:5000]
        if result.stopped_by:
            tags["sertune.stopped_by"] = result.stopped_by
        if best:
            tags["sertune.best_trial"] = best["trial"]
            ts = int(time.time() * 1000)
            keep = {m.metric for m in runs.spec.metrics}
            rows = [
                [f"best/{k}", tracking.clean_value(v), ts]
                for k, v in best.items()
                if tracking.clean_value(v) is not None
                and (k in keep or k.startswith(("val_", "test_", "robust/")))
            ]
            runs.append(Op(Kind.METRICS, key=PARENT, step=0, metrics=rows, dedupe=False))
        ref = result.reference
        if ref and isinstance(ref.get("metrics"), dict):
            # the reference baseline on the same split: is the search worth it?
            tags["sertune.reference"] = str(ref.get("description") or ref.get("name"))[:5000]
            ts = int(time.time() * 1000)
            rows = [
                [f"reference/{k}", tracking.clean_value(v), ts]
                for k, v in ref["metrics"].items()
                if tracking.clean_value(v) is not None
            ]
            runs.append(Op(Kind.METRICS, key=PARENT, step=0, metrics=rows, dedupe=False))
        runs.append(Op(Kind.TAGS, key=PARENT, tags=tags))
        ended = "FINISHED" if status == "finished" else "FAILED"
        runs.append(Op(Kind.END, key=PARENT, status=ended))

    def close_open_trials(self, result: SearchResult) -> None:
        """A resumed search's trial runs that a killed driver left ``running`` in MLflow and this
        driver never took up again: ended as the leaderboard knows them (finished, stopped
        early, else interrupted). Runs this driver logged end through their own records."""
        runs = self.runs
        rows = {r["trial"]: r for r in result.rows}
        try:
            open_runs = [
                r
                for r in tracking.Store(runs.uri).runs_of(runs.name, "trial")
                if r.status == "running" and r.trial not in runs.seen
            ]
        except Exception as e:  # noqa: BLE001 - the store's own error, said in one line
            runs.log(f"[sertune] could not list the search's open trial runs: {e}")
            return
        for r in open_runs:
            row = rows.get(r.trial)
            if row is not None:
                state = {"finished": "finished", "stopped": "stopped_early"}.get(row["state"])
            else:  # a confirmation or refit run: it ended if its end-of-trial figures are there
                state = "finished" if any(k.startswith("test_") for k in r.metrics) else None
            ident = {tracking.TAG_SEARCH: runs.name, tracking.TAG_TRIAL: r.trial}
            runs.append(Op(Kind.RUN, key=r.trial, parent=PARENT, identity=ident, lookup=True))
            tags = {tracking.TAG_STATUS: state or "interrupted"}
            runs.append(Op(Kind.TAGS, key=r.trial, tags=tags))
            runs.append(Op(Kind.END, key=r.trial, status="FINISHED" if state else "KILLED"))

    def _parent_note(self, result: SearchResult, cause: str | None = None) -> str:
        from .leaderboard import format_table

        lines = [f"**Stopped early**: {cause}", ""] if cause else []
        if result.stopped_by:
            lines += [f"**Ended early**, {result.stopped_by}.", ""]
        lines += [
            f"**Search {self.runs.name}** — {len(result.rows)} trials, {result.errors} failed, "
            f"{sum(r['state'] == 'stopped' for r in result.rows)} stopped early. The trials are the "
            "child runs; each result is the trial's kept epoch (its smoothed validation curve's best).",
            "",
            "```",
            format_table(result),
            "```",
            "",
            *(
                [
                    f"The `reference` row: {result.reference.get('description')}, on the same "
                    "split (no adversarial figures: it has no waveform gradient).",
                    "",
                ]
                if result.reference
                else []
            ),
            image("summary/optimisation_history.png", "optimisation history"),
            image("summary/slices.png", "objective against each searched parameter"),
            image("summary/param_importances.png", "parameter importances"),
        ]
        if len(result.metrics) > 1:
            lines.append(image("summary/pareto_front.png", "Pareto front"))
        if self.runs.schedules:
            lines.append(image("summary/pbt_schedule.png", "the best trial's PBT schedule"))
        lines += [
            "",
            "Everything: Artifacts → summary (leaderboard.csv, plots), search (spec, data report).",
        ]
        return "\n".join(lines)

    def confirmation(self, groups: list[dict[str, Any]]) -> None:
        """The confirmation table (mean ± sd per configuration) on the parent run."""
        from .confirm import format_confirmation

        if not groups:
            return
        runs = self.runs
        shown = runs.columns.summary(groups[0]["stats"])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "confirmation.json").write_text(json.dumps(groups, indent=2))
            (Path(tmp) / "confirmation.md").write_text(
                "```\n" + format_confirmation(groups, shown) + "\n```\n"
            )
            src = runs.journal.stage(tmp)
            runs.append(Op(Kind.ARTIFACTS, key=PARENT, src=src, path="confirmation"))
        best = groups[0]
        ts = int(time.time() * 1000)
        rows = [
            [f"confirmed/{k}_{stat}", tracking.clean_value(s[stat]), ts]
            for stat in ("mean", "sd")
            for k, s in best["stats"].items()
        ]
        runs.append(Op(Kind.METRICS, key=PARENT, step=0, metrics=rows, dedupe=False))
        tags = {"sertune.confirmed_best": best["configuration_of"]}
        runs.append(Op(Kind.TAGS, key=PARENT, tags=tags))

    def comparison(self, name: str, baseline: str) -> None:
        """Side by side with the baseline search, from what MLflow holds of both."""
        from .comparison import compare, format_comparison, search_figures, write_comparison

        runs = self.runs
        runs.journal.drain(600)
        try:
            store = tracking.Store(runs.uri)
            cmp = compare(search_figures(store, name), search_figures(store, baseline))
        except Exception as e:  # noqa: BLE001 - a comparison must not fail the search
            runs.log(f"[sertune] no comparison with {baseline!r}: {e}")
            return
        runs.log(f"\n[sertune] {name} vs its baseline {baseline}:\n{format_comparison(cmp)}")
        with tempfile.TemporaryDirectory() as tmp:
            write_comparison(cmp, Path(tmp))
            src = runs.journal.stage(tmp)
            runs.append(Op(Kind.ARTIFACTS, key=PARENT, src=src, path="comparison"))
        runs.append(Op(Kind.TAGS, key=PARENT, tags={"sertune.baseline": baseline}))
