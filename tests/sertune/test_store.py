"""``tracking.Store``, the one handle the rest of sertune reads MLflow through, against a real
SQLite store and no Ray: the runs the journal wrote come back as frozen views across pages,
earlier searches' finished trials are found by search or experiment name, ``search rm --mlflow``
deletes one search's runs and no other's, and the experiment's view and a benchmark's run land
where the UI reads them."""

import dataclasses

import pytest

from sertune import tracking
from sertune.errors import NotFound
from sertune.tracking import Journal, Kind, Op, Store


@pytest.fixture
def uri(home):
    return tracking.ensure_store()


def write_search(uri, search, trials):
    """A parent run and one child per ``(trial, status, uar)``, written by the journal."""
    j = Journal(search, uri, log=lambda m: None)
    ident = {tracking.TAG_SEARCH: search, tracking.TAG_KIND: "search"}
    j.append(Op(Kind.RUN, key="parent", identity=ident, run_name=search, tags=ident))
    for tid, status, uar in trials:
        tags = {tracking.TAG_SEARCH: search, tracking.TAG_TRIAL: tid, tracking.TAG_KIND: "trial"}
        run_tags = {**tags, tracking.TAG_STATUS: status}
        params = {"loss.w_aug": 0.5}
        j.append(
            Op(Kind.RUN, key=tid, identity=tags, parent="parent", tags=run_tags, params=params)
        )
        for epoch in (1, 2):
            j.append(Op(Kind.METRICS, key=tid, step=epoch, metrics=[["val_uar", uar, epoch]]))
        j.append(Op(Kind.END, key=tid, status="FINISHED"))
    j.start()
    assert j.close(timeout_s=60) == 0
    return j


def test_a_search_s_runs_come_back_as_frozen_views(uri):
    j = write_search(uri, "s", [("t1", "finished", 0.6), ("t2", "failed", 0.3)])
    store = Store(uri)
    runs = store.runs_of("s")
    assert sorted(r.kind for r in runs) == ["search", "trial", "trial"]
    t1 = next(r for r in store.runs_of("s", kind="trial") if r.trial == "t1")
    assert (t1.status, t1.done, t1.run_id) == ("finished", True, j.run_id("t1"))
    assert t1.params == {"loss.w_aug": "0.5"} and t1.metrics == {"val_uar": 0.6}
    assert t1.end_ms >= t1.start_ms > 0
    assert store.metric_steps(t1.run_id, "val_uar") == [1, 2]
    assert store.run(t1.run_id) == t1
    with pytest.raises(dataclasses.FrozenInstanceError):
        t1.tags = {}
    assert store.runs_of("nothing-by-this-name") == []


def test_finished_trials_of_an_earlier_search_and_an_unknown_name_is_refused(uri):
    write_search(uri, "early", [("a", "finished", 0.5), ("b", "stopped_early", 0.4),
                                ("c", "failed", 0.1), ("d", "running", 0.2)])  # fmt: skip
    found = Store(uri).finished_trials("early")
    assert [t.trial for t in found] == ["a", "b"]  # only trials whose figures count
    assert [t.start_ms for t in found] == sorted(t.start_ms for t in found)
    with pytest.raises(NotFound, match="no search or MLflow experiment named 'late'"):
        Store(uri).finished_trials("late")


def test_search_rm_with_mlflow_deletes_that_search_s_runs_and_no_other(uri, tmp_path):
    from sertune.records import SearchRecord, list_records, save_record
    from sertune.remove import remove_search
    from sertune.spec import load_spec

    for name in ("gone", "kept"):
        write_search(uri, name, [("t1", "finished", 0.5)])
        path = str(tmp_path / name)
        spec = load_spec("smoke")
        record = SearchRecord(name=name, spec=spec, path=path, tracking_uri=uri, status="finished")
        save_record(name, record)
    said = remove_search("gone", mlflow_runs=True)
    assert "deleted 2 MLflow run(s) of 'gone' (restorable from the MLflow UI's trash)" in said
    store = Store(uri)
    assert store.runs_of("gone") == [] and len(store.runs_of("kept")) == 2
    assert [r.name for r in list_records()] == ["kept"]


def test_the_experiment_view_and_a_bench_run_land_where_the_ui_reads_them(uri, tmp_path):
    store = Store(uri)
    exp = store.set_experiment_tags({"sertune.view": "trials"})
    plot = tmp_path / "bench.png"
    plot.write_bytes(b"\x89PNG")
    rid = store.log_bench_run(
        "bench-x", {"trials": 2}, {"best": 0.6000000238, "nan": 1e999}, [plot]
    )
    c = tracking.client(uri)  # read back with MLflow's own client, as a user would
    assert c.get_experiment(exp).tags["sertune.view"] == "trials"
    run = c.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_KIND] == "bench"
    assert run.data.metrics == {"best": 0.6} and run.data.params == {"trials": "2"}
    assert [a.path for a in c.list_artifacts(rid)] == ["bench.png"]
    assert store.version_of("no-such-model", "champion") is None
