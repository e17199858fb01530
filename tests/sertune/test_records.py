"""The search record on its own, no Ray: frozen, one JSON file that round-trips, a bad file
refused naming the file and field (and skipped by ``search list``), one writer whose saves the
MLflow logger's callback cannot undo, and a stop signal that ends a phase by raising."""

import json
import signal
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from sertune.errors import UsageError
from sertune.interrupts import Stopped, StopSignals
from sertune.records import (
    Phase,
    SearchRecord,
    list_records,
    load_record,
    record_path,
    save_record,
)

REPO = Path(__file__).resolve().parents[2]


def record(**kw) -> SearchRecord:
    from sertune.spec import load_spec

    spec = load_spec(REPO / "search_spaces" / "smoke.yaml")
    return SearchRecord(name="r", spec=spec, path="/tmp/r", **kw)


def test_a_record_is_frozen_and_round_trips_through_its_file(home):
    r = record(tracking_uri="sqlite:///x.db", data={"fingerprint": "f"})
    with pytest.raises(ValidationError):
        r.status = "finished"  # type: ignore[misc]
    save_record("r", r)
    on_disk = json.loads(record_path("r").read_text())
    assert "parent_run_id" not in on_disk and on_disk["phase"] == "search"  # unset: not written
    assert load_record("r") == r and load_record("r").phase is Phase.SEARCH
    later = r.but(status="finished", phase="done")
    assert (later.status, later.phase, r.status) == ("finished", Phase.DONE, "running")
    with pytest.raises(TypeError, match="no field stauts"):
        r.but(stauts="finished")
    with pytest.raises(ValidationError):
        r.but(phase="sideways")


def test_a_bad_record_file_is_refused_naming_the_file_and_field(home):
    save_record("good", record().but(name="good"))
    bad = record_path("bad")
    spec = json.loads(record().to_json())["spec"]
    bad.write_text(json.dumps({"name": "bad", "spec": spec, "path": "/p", "phase": "sideways"}))
    with pytest.raises(UsageError, match=r"bad\.json: field phase"):
        load_record("bad")
    record_path("half").write_text('{"name": "ha')
    with pytest.raises(UsageError, match=r"half\.json: not a search record"):
        load_record("half")
    assert [r.name for r in list_records()] == ["good"]  # `search list` shows the others


def test_a_record_written_before_the_spec_was_typed_opens_typed(home):
    """Older records hold the spec as the plain JSON of ``SearchSpec.model_dump()``: the same
    object, so they read as a typed spec; a spec field that no longer fits is named."""
    from sertune.spec import ParamSpec, SearchSpec

    old = json.loads(record().to_json())
    old["spec"] = {k: v for k, v in old["spec"].items()}  # as the dict-era driver wrote it
    record_path("old").write_text(json.dumps({**old, "name": "old"}, indent=2))
    r = load_record("old")
    assert isinstance(r.spec, SearchSpec) and r.spec.budget.trials == 2
    assert all(isinstance(p, ParamSpec) for p in r.spec.space.values())
    old["spec"]["budget"]["trails"] = 3  # a field this version does not know
    record_path("odd").write_text(json.dumps({**old, "name": "odd"}))
    with pytest.raises(UsageError, match=r"odd\.json: field spec\.budget\.trails"):
        load_record("odd")


def test_the_drivers_saves_and_the_loggers_parent_run_callback_do_not_undo_each_other(home):
    from sertune.search import Search
    from sertune.spec import load_spec

    spec = load_spec(REPO / "search_spaces" / "smoke.yaml")
    search = Search("r", spec, record())
    search.save()
    # the journal's thread reports the parent run while the driver saves status changes
    t = threading.Thread(target=lambda: [search.on_parent_run(f"run{i}") for i in range(200)])
    t.start()
    for i in range(200):
        search.save(failure=f"f{i}")
    t.join()
    on_disk = load_record("r")
    assert on_disk == search.record
    assert (on_disk.parent_run_id, on_disk.failure) == ("run199", "f199")


def test_a_stop_signal_ends_a_phase_by_raising_stopped():
    told = []  # Tune's own SIGUSR1 handler ends its loop; here one that notes it was told
    previous = signal.signal(signal.SIGUSR1, lambda *_: told.append("SIGUSR1"))
    try:
        with StopSignals(log=lambda *_: None) as stop:
            stop.check()  # nothing arrived: the phase is complete
            with stop.tune_loop():
                signal.raise_signal(signal.SIGTERM)  # inside Tune's loop: no exception here
            assert told == ["SIGUSR1"] and stop.fired == "SIGTERM"
            with pytest.raises(Stopped, match="SIGTERM"):
                stop.check()
    finally:
        signal.signal(signal.SIGUSR1, previous)
