"""What the rest of sertune reads from and asks of the MLflow store, behind one handle.

:class:`Store` is bound to one store (a SQLite file or a server); its methods are every query and
every write outside the journal: a search's runs, the finished trials of earlier searches, a
run's metric history, deleting runs, the experiment's view tags, a benchmark's run, and the model
registry (versions, aliases). Runs come back as :class:`Run`, a frozen view with plain dicts, so
callers never hold an MLflow object and nothing outside this package calls MLflow.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NotFound
from .store import (
    TAG_KIND,
    TAG_SEARCH,
    TAG_STATUS,
    TAG_TRIAL,
    clean_value,
    client,
    get_experiment_id,
    is_missing,
)

#: The statuses of a trial whose figures count: it ran to its end or a scheduler stopped it.
DONE = ("finished", "stopped_early")


@dataclass(frozen=True)
class Run:
    """One MLflow run as sertune reads it."""

    run_id: str
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    start_ms: int = 0
    end_ms: int = 0  # the start while the run is open

    @classmethod
    def of(cls, r: Any) -> Run:
        start = int(r.info.start_time or 0)
        return cls(
            run_id=r.info.run_id,
            tags=dict(r.data.tags),
            params=dict(r.data.params),
            metrics=dict(r.data.metrics),
            start_ms=start,
            end_ms=int(r.info.end_time or start),
        )

    @property
    def kind(self) -> str:
        """``search`` (a parent run), ``trial`` or ``bench``."""
        return self.tags.get(TAG_KIND, "")

    @property
    def status(self) -> str:
        """sertune's status of the run (``finished``, ``stopped_early``, ``failed``, ...)."""
        return self.tags.get(TAG_STATUS, "")

    @property
    def trial(self) -> str:
        return self.tags.get(TAG_TRIAL, "")

    @property
    def done(self) -> bool:
        return self.status in DONE


class Store:
    """A handle on one MLflow store: ``Store(uri)``, or ``Store()`` for this machine's default."""

    def __init__(self, tracking_uri: str | None = None):
        self._client = client(tracking_uri)
        self.uri: str = self._client.tracking_uri

    # -- runs --------------------------------------------------------------------------------------

    def experiment_id(self, create: bool = True) -> str:
        """The ``sertune`` experiment; :class:`NotFound` when ``create`` is off and it is not there."""
        return get_experiment_id(self._client, create=create)

    def runs_of(self, search: str, kind: str | None = None) -> list[Run]:
        """Every run of ``search`` (all pages), or only its ``kind`` (``search``, ``trial``)."""
        flt = f"tags.`{TAG_SEARCH}` = '{search}'"
        if kind:
            flt += f" and tags.`{TAG_KIND}` = '{kind}'"
        return self._all_runs([self.experiment_id(create=False)], flt)

    def run(self, run_id: str) -> Run:
        return Run.of(self._client.get_run(run_id))

    def finished_trials(self, source: str) -> list[Run]:
        """The finished (or scheduler-stopped) trials of an earlier search, by search name in this
        store's sertune experiment, else every sertune trial of the MLflow experiment ``source``;
        oldest first. Raises :class:`NotFound` when neither exists."""
        trial = f"tags.`{TAG_KIND}` = 'trial'"
        runs = self._all_runs(
            [self.experiment_id()], f"{trial} and tags.`{TAG_SEARCH}` = '{source}'"
        )
        if not runs:
            exp = self._client.get_experiment_by_name(source)
            if exp is None:
                raise NotFound(f"no search or MLflow experiment named {source!r} in {self.uri}")
            runs = self._all_runs([exp.experiment_id], trial)
        return sorted((r for r in runs if r.done), key=lambda r: r.start_ms)

    def metric_steps(self, run_id: str, key: str) -> list[int]:
        """The steps at which ``key`` was logged on ``run_id``, in MLflow's order."""
        return [m.step for m in self._client.get_metric_history(run_id, key)]

    def delete_runs(self, runs: list[Run]) -> int:
        """Move ``runs`` to MLflow's trash (restorable from the UI); return how many."""
        for r in runs:
            self._client.delete_run(r.run_id)
        return len(runs)

    def experiment_tags(self) -> dict[str, str]:
        """The ``sertune`` experiment's tags (empty when it does not exist yet)."""
        try:
            exp = self.experiment_id(create=False)
        except NotFound:
            return {}
        return dict(self._client.get_experiment(exp).tags)

    def set_experiment_tags(self, tags: Mapping[str, str]) -> str:
        """Tags on the ``sertune`` experiment (created if needed); returns its id."""
        exp = self.experiment_id()
        for k, v in tags.items():
            self._client.set_experiment_tag(exp, k, v)
        return exp

    def log_bench_run(
        self, name: str, params: dict[str, Any], metrics: dict[str, float], files: list[Path]
    ) -> str:
        """One finished run for a benchmark's figures and plots; returns its id."""
        c = self._client
        run = c.create_run(
            self.experiment_id(), run_name=name, tags={TAG_KIND: "bench", "mlflow.runName": name}
        )
        rid = run.info.run_id
        for k, v in params.items():
            c.log_param(rid, k, v)
        for k, v in metrics.items():
            if clean_value(v) is not None:
                c.log_metric(rid, k, clean_value(v))
        for f in files:
            c.log_artifact(rid, str(f))
        c.set_terminated(rid, "FINISHED")
        return rid

    # -- a study's run: written by its driver directly (a handful of calls, not a journal) ----

    def open_run(self, run_id: str | None, name: str, kind: str, tags: Mapping[str, str]) -> str:
        """The run ``run_id`` when it is still there, else the one of ``kind`` named ``name``
        (a resumed study finds its run again), else a new one; returns its id."""
        c = self._client
        if run_id:
            try:
                c.get_run(run_id)
                return run_id
            except Exception as e:
                if not is_missing(e):
                    raise
        flt = f"tags.`{TAG_SEARCH}` = '{name}' and tags.`{TAG_KIND}` = '{kind}'"
        found = self._all_runs([self.experiment_id()], flt)
        if found:
            return found[0].run_id
        return c.create_run(self.experiment_id(), run_name=name, tags=dict(tags)).info.run_id

    def set_run_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(run_id, k, v)

    def log_run_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        rows = [
            Metric(k, clean_value(v), ts, 0)
            for k, v in metrics.items()
            if clean_value(v) is not None
        ]
        for i in range(0, len(rows), 500):
            self._client.log_batch(run_id, metrics=rows[i : i + 500])

    def log_run_artifacts(self, run_id: str, files: list[Path], path: str | None = None) -> None:
        for f in files:
            self._client.log_artifact(run_id, str(f), path)

    def run_state(self, run_id: str) -> str:
        """MLflow's status of a run (``RUNNING``, ``FINISHED``, ``KILLED``, ...)."""
        return self._client.get_run(run_id).info.status

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._client.set_terminated(run_id, status)

    def _all_runs(self, experiment_ids: list[str], filter_string: str) -> list[Run]:
        out, token = [], None
        while True:
            page = self._client.search_runs(
                experiment_ids, filter_string, max_results=1000, page_token=token
            )
            out += [Run.of(r) for r in page]
            token = page.token
            if not token:
                return out

    # -- the model registry ------------------------------------------------------------------------

    def version_of(self, name: str, alias: str) -> str | None:
        """The version of registered model ``name`` that ``alias`` points at; None if none."""
        try:
            return str(self._client.get_model_version_by_alias(name, alias).version)
        except Exception as e:
            if is_missing(e) or "not found" in str(e).lower():
                return None
            raise

    def register(
        self,
        model_uri: str,
        name: str,
        tags: dict[str, str],
        description: str = "",
        timeout_s: float = 60,
    ) -> str:
        """A new version of registered model ``name`` (created if needed) from a logged model,
        waited for until MLflow calls it READY; returns the version."""
        import mlflow

        c = self._client
        try:
            c.get_registered_model(name)
        except Exception as e:
            if not is_missing(e):
                raise
            c.create_registered_model(name, description=description)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            # MLflow prints "Registered model ... already exists" on its own; callers say more
            mv = mlflow.register_model(model_uri, name, tags=tags)
        version = str(mv.version)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if c.get_model_version(name, version).status == "READY":
                break
            time.sleep(0.5)
        return version

    def version_tagged(self, name: str, tag: str, value: str) -> str | None:
        """The newest READY version of ``name`` whose tag ``tag`` is ``value`` (a model promoted
        before: promotion reuses it), or None."""
        try:
            found = self._client.search_model_versions(f"name = '{name}'")
        except Exception as e:
            if is_missing(e):
                return None
            raise
        hits = [int(v.version) for v in found if v.tags.get(tag) == value and v.status == "READY"]
        return str(max(hits)) if hits else None

    def describe_version(self, name: str, version: str, description: str) -> None:
        """The version's Description in the registry UI (markdown)."""
        self._client.update_model_version(name, version, description=description)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._client.set_registered_model_alias(name, alias, version)
