"""The journal on its own, against a real MLflow SQLite store and no Ray: records round-trip
through disk, a new journal replays what an earlier one left in order, a run created before a
crash is found again instead of doubled, epochs reported again are logged once, and a line cut
by a crash is ignored."""

import json

import pytest

from sertune import tracking
from sertune.tracking import Journal, Kind, Op

IDENTITY = {tracking.TAG_SEARCH: "j", tracking.TAG_KIND: "search"}


def run_op(key="parent", **kw):
    ident = IDENTITY if key == "parent" else {tracking.TAG_SEARCH: "j", tracking.TAG_TRIAL: key}
    return Op(Kind.RUN, key=key, identity=ident, run_name=key, tags=ident, **kw)


def metrics(key, step, value, dedupe=True):
    return Op(Kind.METRICS, key=key, step=step, metrics=[["m", value, 1000 + step]], dedupe=dedupe)


@pytest.fixture
def store(home):
    return tracking.ensure_store()


def history(run_id, name="m"):
    c = tracking.client()
    return [(m.step, m.value) for m in c.get_metric_history(run_id, name)]


def test_a_record_round_trips_through_its_json_line():
    op = Op(Kind.ARTIFACTS, key="t1", src="/x", path="summary")
    assert op.to_json() == {"op": "artifacts", "key": "t1", "src": "/x", "path": "summary"}
    assert Op.from_json(json.loads(json.dumps(op.to_json()))) == op
    assert Op.from_json({"op": "end", "key": "t1", "status": "FINISHED"}).kind is Kind.END
    with pytest.raises(ValueError):
        Op(kind="teleport")


def test_records_left_by_a_stopped_driver_are_replayed_in_order(store):
    first = Journal("j", store, log=lambda m: None)  # never started: the driver died at once
    first.append(run_op())
    for step in (1, 2, 3):
        first.append(metrics("parent", step, step / 10))
    first.append(Op(Kind.TAGS, key="parent", tags={"sertune.status": "finished"}))
    first.append(Op(Kind.END, key="parent", status="FINISHED"))
    assert first.pending == 6

    lines: list[str] = []
    second = Journal("j", store, log=lines.append).start()
    assert second.close(timeout_s=60) == 0
    run = tracking.client().get_run(second.run_id("parent"))
    assert run.info.status == "FINISHED" and run.data.tags["sertune.status"] == "finished"
    assert history(run.info.run_id) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert (second.dir / "ops.jsonl").read_text() == ""  # compacted once all were applied
    assert lines == []


def test_a_run_created_before_a_crash_is_found_again_not_doubled(store):
    j = Journal("j", store, log=lambda m: None).start()
    j.append(run_op())
    assert j.drain(60) == 0
    created = j.run_id("parent")
    j.close()
    # the crash: MLflow has the run, but the driver died before remembering it
    (j.dir / "runs.jsonl").write_text("")
    (j.dir / "applied").write_text("0")
    (j.dir / "ops.jsonl").write_text(json.dumps(run_op(lookup=False).to_json()) + "\n")

    again = Journal("j", store, log=lambda m: None).start()
    assert again.close(timeout_s=60) == 0
    assert again.run_id("parent") == created  # pending records look the run up
    c = tracking.client()
    runs = c.search_runs([tracking.get_experiment_id(c)], "tags.`sertune.search` = 'j'")
    assert [r.info.run_id for r in runs] == [created]


def test_epochs_reported_again_are_logged_once_and_runs_keep_their_order(store):
    j = Journal("j", store, log=lambda m: None)
    j.append(run_op())
    j.append(run_op("t1", parent="parent"))
    j.append(run_op("t2", parent="parent"))
    # two trials' epochs interleaved; t1 restarted from its epoch-1 checkpoint re-reports 2
    for op in [metrics("t1", 1, 0.1), metrics("t2", 1, 0.5), metrics("t1", 2, 0.2),
               metrics("t2", 2, 0.6), metrics("t1", 2, 0.25), metrics("t1", 3, 0.3)]:  # fmt: skip
        j.append(op)
    j.start()
    assert j.drain(60) == 0
    assert history(j.run_id("t1")) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert history(j.run_id("t2")) == [(1, 0.5), (2, 0.6)]
    # a later driver: t1's epoch 3 again is dropped, a summary at step 0 (dedupe off) is kept
    j.append(metrics("t1", 3, 0.35))
    j.append(metrics("t1", 0, 0.9, dedupe=False))
    assert j.close(timeout_s=60) == 0
    assert sorted(history(j.run_id("t1"))) == [(0, 0.9), (1, 0.1), (2, 0.2), (3, 0.3)]


def test_a_line_cut_by_a_crash_is_ignored_with_everything_after_it(store):
    j = Journal("j", store, log=lambda m: None)
    j.append(run_op())
    j.append(metrics("parent", 1, 0.1))
    with (j.dir / "ops.jsonl").open("a") as fh:
        fh.write('{"op": "metrics", "key": "par')  # the driver died mid-write
    again = Journal("j", store, log=lambda m: None)
    assert again.pending == 2
    again.start()
    assert again.close(timeout_s=60) == 0
    assert history(again.run_id("parent")) == [(1, 0.1)]


def test_a_record_mlflow_refuses_is_skipped_and_said_the_rest_go_on(store):
    lines: list[str] = []
    j = Journal("j", store, log=lines.append)
    j.append(run_op())
    j.append(Op(Kind.ARTIFACTS, key="parent", src="/nonexistent/sertune-gone"))
    j.append(metrics("parent", 1, 0.1))
    j.start()
    assert j.close(timeout_s=60) == 0
    assert any("could not be written and is skipped" in ln and "gone" in ln for ln in lines)
    assert history(j.run_id("parent")) == [(1, 0.1)]


def test_a_full_disk_keeps_the_records_in_memory_and_says_so(home, tmp_path):
    """The journal's folder on a real 2 MB tmpfs filled to the brim (skipped where tmpfs cannot
    be mounted): appending never raises, one line says the records are in memory only, and
    every record still reaches MLflow."""
    import subprocess

    store = tracking.ensure_store()  # the MLflow store stays on the roomy disk
    small = home / "state" / "journal"
    small.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        lines = []
        j = Journal("j", store, log=lines.append)
        with open(small / "ballast", "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
            except OSError:
                pass
        j.start()
        j.append(run_op())
        for step in range(1, 4):
            j.append(metrics("parent", step, step / 10))
        assert j.close(30) == 0
        assert sum("kept in memory only" in ln for ln in lines) == 1, lines
        assert history(j.run_id("parent")) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
