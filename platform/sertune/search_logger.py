"""A search in MLflow: the Tune callback that turns trial events into journal records.

One parent run per search (spec, data report, search settings; at the end the leaderboard,
plots and ``best/*``) and one nested child run per trial: params, per-epoch metrics with the
trial's real epoch as step, the best-validation model as a pickle-free pyfunc, its robustness
report, and a status tag: ``finished``, ``stopped_early`` (with the epoch), ``failed`` (with the
reason) or ``interrupted``. Trials a scheduler stopped are evaluated afterwards on their best
checkpoint, so they get test and robustness figures too.

Records go through :class:`sertune.tracking.Journal`; nothing here calls MLflow directly.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray.tune import Callback

from . import tracking
from .failures import trial_error_reason
from .leaderboard import trial_epochs
from .records import SearchRecord, objectives
from .tracking import Kind, Op

PARENT = "parent"
NOTE = "mlflow.note.content"  # the run page's description: markdown, shown first


def image(path: str, title: str) -> str:
    """A markdown image of one of the run's own artifacts, as the MLflow UI serves them."""
    return f"![{title}](get-artifact?path={path.replace('/', '%2F')}&run_uuid={{run_id}})"


def trial_note(trial_id: str, result: dict[str, Any], epochs: int, stopped: bool) -> str:
    """A trial's run page, first thing: which epoch it is, its robustness plots, the figures."""
    best = result.get("best_epoch")
    lines = [
        f"**Trial {trial_id}** — {'stopped early by the scheduler' if stopped else 'finished'} "
        f"after {epochs} epoch(s); its result is its best-validation epoch"
        + (f" ({int(best) + 1})." if best is not None else "."),
        "",
        image("robustness/uar_vs_snr.png", "UAR vs SNR"),
        image("robustness/uar_vs_eps.png", "UAR vs adversarial ε"),
        "",
        "| figure | UAR |",
        "|---|---|",
    ]
    for k in ("val_uar", "test_uar", "robust/uar_clean"):
        if isinstance(result.get(k), (int, float)):
            lines.append(f"| {k} | {result[k]:.3f} |")
    for k in sorted(k for k in result if k.startswith("robust/") and k != "robust/uar_clean"):
        if isinstance(result[k], (int, float)):
            lines.append(f"| {k} | {result[k]:.3f} |")
    lines += ["", "Report: Artifacts → robustness (robustness.json, summary.md)."]
    return "\n".join(lines)


# Tune bookkeeping, never metrics
REPORTED_SKIP = {
    "timestamp",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "time_since_restore",
    "iterations_since_restore",
    "training_iteration",
    "epoch",
    "done",
    "loop_started_at",
    "checkpoint_dir_name",
    "pbt_exploited_epoch",
    "pbt_lineage",
}


def metric_rows(result: dict[str, Any], ts_ms: int) -> list[list[Any]]:
    rows = []
    for k, v in result.items():
        if k in REPORTED_SKIP or k.startswith(("config/", "placement/")):
            continue
        value = tracking.clean_value(v)
        if value is not None:
            rows.append([k, value, ts_ms])
    return rows


class MLflowSearchLogger(Callback):
    """Tune callback: parent + child runs through the journal; picklable (Tune saves callbacks)."""

    def __init__(
        self,
        record: SearchRecord,
        spec: Any,
        log=print,
        evaluator=None,
        tag: str = "",
        on_parent_run: Callable[[str], None] | None = None,
    ):
        self.uri = record.tracking_uri
        self.name = record.name
        self.record = record  # read here; its owner (the driver's Search) writes it
        self.on_parent_run = on_parent_run  # called once the parent run exists
        self.max_epochs = spec.budget.max_epochs
        self.trainable = spec.trainable
        self.log = log
        self.evaluator = evaluator  # evaluates stopped trials' best checkpoints
        self.tag = tag  # e.g. "confirm": extra tag on the child runs of this Tuner
        self.open_trials: set[str] = set()
        self.resumed = False  # a resumed search may find its trials' runs already in MLflow
        self.journal: tracking.Journal | None = None
        self._stopped: dict[str, int] = {}
        self.evaluated: dict[str, dict[str, Any]] = {}  # stopped trials' test + robustness figures
        # population-based training: per trial, the weights each of its epochs trained with,
        # through the trials whose checkpoints it took ([epoch, {param: value}, from trial])
        self.schedules: dict[str, list[list[Any]]] = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(journal=None, evaluator=None, log=print, on_parent_run=None)
        return state

    # Tune saves this with its experiment state, so a resumed PBT search keeps the lineages its
    # killed driver had built (epochs trained after that save are reported again and replace)
    def get_state(self) -> dict[str, Any] | None:
        return {"schedules": self.schedules} if self.schedules else None

    def set_state(self, state: dict[str, Any]) -> None:
        self.schedules = {k: [list(e) for e in v] for k, v in state.get("schedules", {}).items()}

    # -- the parent ------------------------------------------------------------------------------
    def start(self, resumed: bool = False) -> MLflowSearchLogger:
        self.resumed = resumed
        self.journal = tracking.Journal(self.name, self.uri, self.log)
        self.journal.on_run = self._on_run
        self.journal.start()
        spec = self.record.spec
        tags = {
            tracking.TAG_SEARCH: self.name,
            tracking.TAG_KIND: "search",
            tracking.TAG_STATUS: "running",
            "sertune.trainable": spec["trainable"],
            "sertune.corpus": spec["data"]["corpus"],
            "sertune.data_fingerprint": self.record.data.get("fingerprint", ""),
            "sertune.objective": json.dumps(objectives(spec)),
            "sertune.storage": self.record.path,
            "mlflow.runName": self.name,
        }
        if self.record.baseline_of:
            tags["sertune.baseline_of"] = self.record.baseline_of
        b, r = spec["budget"], spec["resources"]
        params = {f"budget.{k}": v for k, v in b.items()} | {
            f"resources.{k}": v for k, v in r.items()
        }
        params |= {"seed": spec["seed"], "space": ",".join(sorted(spec["space"]))}
        params |= {f"fixed.{k}": v for k, v in spec["params"].items()}
        params |= {"execution": spec.get("execution", "warm")}
        strategy = spec.get("search") or {}
        multi = len(objectives(spec)) > 1
        params |= {
            "search.sampler": strategy.get("sampler", "tpe"),
            "search.scheduler": strategy.get("scheduler") or ("none" if multi else "asha"),
        }
        params |= {
            f"search.sampler_options.{k}": v
            for k, v in (strategy.get("sampler_options") or {}).items()
        }
        params |= {
            f"search.scheduler_options.{k}": v
            for k, v in (strategy.get("scheduler_options") or {}).items()
        }
        if self.record.warm_start:
            sources = self.record.warm_start["sources"]
            tags["sertune.warm_start"] = ", ".join(f"{k} ({n} trials)" for k, n in sources.items())
        self.journal.append(
            Op(
                Kind.RUN,
                key=PARENT,
                identity={tracking.TAG_SEARCH: self.name, tracking.TAG_KIND: "search"},
                run_name=self.name,
                tags=tags,
                params=params,
            )
        )
        if resumed:
            self.journal.append(Op(Kind.TAGS, key=PARENT, tags={tracking.TAG_STATUS: "running"}))
            return self
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(self.record.source or "")
            if src.is_file():
                (Path(tmp) / "spec.yaml").write_text(src.read_text())
            (Path(tmp) / "spec.resolved.json").write_text(json.dumps(spec, indent=2))
            (Path(tmp) / "data_report.json").write_text(
                json.dumps(self.record.data.get("report", {}), indent=2)
            )
            self.journal.append(
                Op(Kind.ARTIFACTS, key=PARENT, src=self.journal.stage(tmp), path="search")
            )
        return self

    def _on_run(self, key: str, run_id: str) -> None:
        if key == PARENT and self.on_parent_run is not None:
            self.on_parent_run(run_id)

    @property
    def parent_run_id(self) -> str | None:
        return self.journal.run_id(PARENT) if self.journal else self.record.parent_run_id

    # -- children ---------------------------------------------------------------------------------
    def _child(self, trial: Any) -> str:
        from .tuner import flat_config

        tid = trial.trial_id
        config = flat_config(trial.config)
        if tid not in self.open_trials:
            self.open_trials.add(tid)
            tags = {
                tracking.TAG_SEARCH: self.name,
                tracking.TAG_TRIAL: tid,
                tracking.TAG_KIND: "trial",
                tracking.TAG_STATUS: "running",
            }
            if self.tag:
                tags["sertune.phase"] = self.tag
            for k, v in config.items():
                if k.startswith("__"):  # confirm runs carry their origin in the config
                    tags[f"sertune.{k.strip('_')}"] = str(v)
            self.journal.append(
                Op(
                    Kind.RUN,
                    key=tid,
                    parent=PARENT,
                    identity={tracking.TAG_SEARCH: self.name, tracking.TAG_TRIAL: tid},
                    lookup=self.resumed,
                    run_name=f"{self.name}-{tid}",
                    tags=tags,
                    params={k: v for k, v in config.items() if not k.startswith("__")},
                )
            )
        return tid

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._child(trial)

    def _track_schedule(self, key: str, result: dict[str, Any]) -> None:
        """Population-based training: tag a hand-over, keep the trial's lineage. The warm proxy
        sends the whole lineage (every epoch's values and the trial that trained it, kept with
        the checkpoints) on each result, so nothing is rebuilt here."""
        donor = result.get("pbt_exploited_from")
        if donor:
            at = int(result.get("pbt_exploited_epoch", 0))
            note = f"took trial {donor}'s checkpoint at epoch {at}"
            self.journal.append(
                Op(Kind.TAGS, key=key, tags={f"sertune.pbt_exploit_epoch_{at}": note})
            )
        if result.get("pbt_lineage"):
            self.schedules[key] = json.loads(result["pbt_lineage"])

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        key = self._child(trial)
        self._track_schedule(key, result)
        ts = int(result.get("timestamp", time.time()) * 1000)
        self.journal.append(
            Op(Kind.METRICS, key=key, step=trial_epochs(result), metrics=metric_rows(result, ts))
        )

    def _checkpoint_uri(self, result: dict[str, Any]) -> str | None:
        ckpt = result.get("checkpoint_path")
        scheme = self.record.path.split("://")[0] if "://" in self.record.path else ""
        if ckpt and scheme and "://" not in ckpt:  # Ray reports paths without the scheme
            ckpt = f"{scheme}://{ckpt}"
        return ckpt

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._child(trial)
        last = trial.last_result or {}
        epochs = trial_epochs(last)
        finished = epochs >= self.max_epochs
        tags = {tracking.TAG_STATUS: "finished" if finished else "stopped_early"}
        if not finished:
            tags["sertune.stopped_by"] = f"scheduler at epoch {epochs}"
        if "best_epoch" in last:
            tags["sertune.best_epoch"] = str(int(last["best_epoch"]) + 1)
        self.journal.append(Op(Kind.TAGS, key=key, tags=tags))
        ckpt = self._checkpoint_uri(last)
        if ckpt:
            best = f"{ckpt.rstrip('/')}/best"
            self.journal.append(Op(Kind.MODEL, key=key, src=best, trainable=self.trainable))
            if not finished and self.evaluator is not None:  # its best epoch's test figures, later
                self._stopped[key] = epochs
                self.evaluator.submit(key, ckpt)
                self.open_trials.discard(key)
                return
            if self.record.spec.get("robustness"):
                self.journal.append(
                    Op(Kind.ARTIFACTS, key=key, src=f"{best}/robustness", path="robustness")
                )
                note = trial_note(key, last, epochs, stopped=False)
                self.journal.append(Op(Kind.TAGS, key=key, tags={NOTE: note}))
        self.journal.append(Op(Kind.END, key=key, status="FINISHED"))
        self.open_trials.discard(key)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        key = self._child(trial)
        self.journal.append(
            Op(
                Kind.TAGS,
                key=key,
                tags={
                    tracking.TAG_STATUS: "failed",
                    "sertune.failure_reason": trial_error_reason(trial),
                },
            )
        )
        self.journal.append(Op(Kind.END, key=key, status="FAILED"))
        self.open_trials.discard(key)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self.collect_evaluations()

    # -- evaluations of stopped trials ---------------------------------------------------------------
    def collect_evaluations(self, wait_s: float = 0.0) -> None:
        if self.evaluator is None:
            return
        for key, outcome in self.evaluator.ready(wait_s):
            if outcome.get("error"):
                self.journal.append(
                    Op(
                        Kind.TAGS,
                        key=key,
                        tags={"sertune.evaluation_error": outcome["error"][:500]},
                    )
                )
            else:
                step = self._stopped.get(key, 0)
                self.evaluated[key] = outcome["metrics"]
                ts = int(time.time() * 1000)
                rows = [
                    [k, v, ts]
                    for k, v in outcome["metrics"].items()
                    if tracking.clean_value(v) is not None
                ]
                rows = [[k, tracking.clean_value(v), t] for k, v, t in rows]
                self.journal.append(
                    Op(Kind.METRICS, key=key, step=step, metrics=rows, dedupe=False)
                )
                note = trial_note(key, outcome["metrics"], step, stopped=True)
                self.journal.append(Op(Kind.TAGS, key=key, tags={NOTE: note}))
                if outcome.get("files"):
                    with tempfile.TemporaryDirectory() as tmp:
                        for name, data in outcome["files"].items():
                            (Path(tmp) / name).write_bytes(data)
                        self.journal.append(
                            Op(
                                Kind.ARTIFACTS,
                                key=key,
                                src=self.journal.stage(tmp),
                                path="robustness",
                            )
                        )
            self.journal.append(Op(Kind.END, key=key, status="FINISHED"))

    # -- the end ----------------------------------------------------------------------------------------
    def finish(
        self,
        result: Any,
        status: str = "finished",
        wait_s: float = 600.0,
        cause: str | None = None,
    ) -> None:
        """Close the search: wait for stopped trials' evaluations, summary on the parent.
        ``cause``: why the search stopped early (its trials failed the same way); nothing is
        evaluated then."""
        from .summary import write_search_summary

        if self.evaluator is not None and self.evaluator.pending and not cause:
            self.log(
                f"[sertune] evaluating {self.evaluator.pending} stopped trial(s) on their best epoch"
            )
            deadline = time.monotonic() + wait_s
            while self.evaluator.pending and time.monotonic() < deadline:
                self.collect_evaluations(wait_s=1.0)
        for row in result.rows:  # the leaderboard and the summary show them too
            for k, v in self.evaluated.get(row["trial"], {}).items():
                if k.startswith(("test_", "robust/")) and row.get(k) is None:
                    row[k] = v
        with tempfile.TemporaryDirectory() as tmp:
            best = write_search_summary(Path(tmp), result, self.record.spec)
            if best and self.schedules.get(best["trial"]):
                from .summary import write_schedule

                write_schedule(Path(tmp), best["trial"], self.schedules)
            self.journal.append(
                Op(Kind.ARTIFACTS, key=PARENT, src=self.journal.stage(tmp), path="summary")
            )
        tags = {
            tracking.TAG_STATUS: status,
            "sertune.trials_failed": str(result.errors),
            NOTE: self._parent_note(result, cause),
        }
        if cause:
            tags["sertune.failure_reason"] = cause[:5000]
        if best:
            tags["sertune.best_trial"] = best["trial"]
            ts = int(time.time() * 1000)
            keep = {m["metric"] for m in objectives(self.record.spec)}
            rows = [
                [f"best/{k}", tracking.clean_value(v), ts]
                for k, v in best.items()
                if tracking.clean_value(v) is not None
                and (k in keep or k.startswith(("val_", "test_", "robust/")))
            ]
            self.journal.append(Op(Kind.METRICS, key=PARENT, step=0, metrics=rows, dedupe=False))
        self.journal.append(Op(Kind.TAGS, key=PARENT, tags=tags))
        self.journal.append(
            Op(Kind.END, key=PARENT, status="FINISHED" if status == "finished" else "FAILED")
        )

    def _parent_note(self, result: Any, cause: str | None = None) -> str:
        from .leaderboard import format_table

        lines = [f"**Stopped early**: {cause}", ""] if cause else []
        lines += [
            f"**Search {self.name}** — {len(result.rows)} trials, {result.errors} failed, "
            f"{sum(r['state'] == 'stopped' for r in result.rows)} stopped early. The trials are the "
            "child runs; each result is the trial's best-validation epoch.",
            "",
            "```",
            format_table(result),
            "```",
            "",
            image("summary/optimisation_history.png", "optimisation history"),
            image("summary/slices.png", "objective against each searched parameter"),
            image("summary/param_importances.png", "parameter importances"),
        ]
        if len(result.metrics) > 1:
            lines.append(image("summary/pareto_front.png", "Pareto front"))
        if self.schedules:
            lines.append(image("summary/pbt_schedule.png", "the best trial's PBT schedule"))
        lines += [
            "",
            "Everything: Artifacts → summary (leaderboard.csv, plots), search (spec, data report).",
        ]
        return "\n".join(lines)

    def log_confirmation(self, groups: list[dict[str, Any]]) -> None:
        """The confirmation table (mean ± sd per configuration) on the parent run."""
        from .confirm import format_confirmation

        if not groups:
            return
        key = objectives(self.record.spec)[0]["metric"]
        shown = [key] + [
            m
            for m in ("test_uar", "robust/uar_snr10_white", "robust/uar_clean")
            if m != key and m in groups[0]["stats"]
        ]
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "confirmation.json").write_text(json.dumps(groups, indent=2))
            (Path(tmp) / "confirmation.md").write_text(
                "```\n" + format_confirmation(groups, shown) + "\n```\n"
            )
            self.journal.append(
                Op(Kind.ARTIFACTS, key=PARENT, src=self.journal.stage(tmp), path="confirmation")
            )
        best = groups[0]
        ts = int(time.time() * 1000)
        rows = [
            [f"confirmed/{k}_mean", tracking.clean_value(s["mean"]), ts]
            for k, s in best["stats"].items()
        ]
        rows += [
            [f"confirmed/{k}_sd", tracking.clean_value(s["sd"]), ts]
            for k, s in best["stats"].items()
        ]
        self.journal.append(Op(Kind.METRICS, key=PARENT, step=0, metrics=rows, dedupe=False))
        self.journal.append(
            Op(Kind.TAGS, key=PARENT, tags={"sertune.confirmed_best": best["configuration_of"]})
        )

    def log_comparison(self, name: str, baseline: str) -> None:
        """Side by side with the baseline search, from what MLflow holds of both."""
        from .comparison import compare, format_comparison, search_figures, write_comparison

        self.journal.drain(600)
        try:
            store = tracking.Store(self.uri)
            cmp = compare(search_figures(store, name), search_figures(store, baseline))
        except Exception as e:  # noqa: BLE001 - a comparison must not fail the search
            self.log(f"[sertune] no comparison with {baseline!r}: {e}")
            return
        self.log(f"\n[sertune] {name} vs its baseline {baseline}:\n{format_comparison(cmp)}")
        with tempfile.TemporaryDirectory() as tmp:
            write_comparison(cmp, Path(tmp))
            self.journal.append(
                Op(Kind.ARTIFACTS, key=PARENT, src=self.journal.stage(tmp), path="comparison")
            )
        self.journal.append(Op(Kind.TAGS, key=PARENT, tags={"sertune.baseline": baseline}))

    def interrupted(self) -> None:
        """Ctrl-C / SIGTERM: open trials become KILLED + ``interrupted``, so is the parent."""
        for key in sorted(self.open_trials):
            self.journal.append(Op(Kind.TAGS, key=key, tags={tracking.TAG_STATUS: "interrupted"}))
            self.journal.append(Op(Kind.END, key=key, status="KILLED"))
        self.open_trials.clear()
        self.journal.append(Op(Kind.TAGS, key=PARENT, tags={tracking.TAG_STATUS: "interrupted"}))
        self.journal.append(Op(Kind.END, key=PARENT, status="KILLED"))

    def close(self, timeout_s: float = 120.0) -> int:
        return self.journal.close(timeout_s) if self.journal else 0
