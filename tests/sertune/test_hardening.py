"""Nothing outside its home, nothing lost, no lie (the hostile-but-fair drills): safe names and
deletes, one search per name, bounded spec parsing, corrupt files named, checked model files,
the disk watched, credentials kept out of every file. Each with real files and processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.sertune.test_faults import cli, env_for, write_spec

REPO = Path(__file__).resolve().parents[2]


# -- names and deletes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../x", "../../../outside/victim", "a/b", "", "a" * 300, ".hidden"]
)
def test_an_unsafe_search_name_is_one_line_everywhere(home, name):
    from sertune.errors import UsageError
    from sertune.records import check_name

    with pytest.raises(UsageError) as e:
        check_name(name)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300
    for command in (["search", "rm", "--yes"], ["search", "status"], ["promote"]):
        p = cli(*command, name, env=env_for(home))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, (command, p.stderr)
        assert "search name" in p.stderr


def test_rm_never_deletes_what_a_record_names_outside_the_search_s_folder(home, tmp_path):
    from sertune.records import SearchRecord, save_record
    from sertune.remove import remove_search
    from sertune.spec import load_spec

    victim = tmp_path / "outside" / "victim"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    spec = load_spec("smoke")
    record = SearchRecord(
        name="smoke",
        spec=spec,
        source="smoke",
        data={},
        created="now",
        path=str(victim),
        status="finished",
    )
    save_record("smoke", record)
    done = remove_search("smoke")
    assert (victim / "precious.txt").read_text() == "keep me"
    assert any(line.startswith(f"left {victim}: outside") for line in done)
    assert "removed the record of 'smoke'" in done


def test_an_empty_name_is_refused_not_replaced(home):
    p = cli("search", "run", "smoke", "--smoke", "--name", "", env=env_for(home))
    assert p.returncode == 2 and "name" in p.stderr and len(p.stderr.strip().splitlines()) == 1


# -- one search per name ---------------------------------------------------------------------------


HOLD = """
import sys, time
from sertune.records import search_lock
try:
    with search_lock("same"):
        print("won", flush=True)
        time.sleep(3)
except Exception as e:
    print("refused:", e, flush=True)
"""


def test_two_runs_of_one_name_at_the_same_instant_exactly_one_wins(home):
    env = env_for(home)
    procs = [
        subprocess.Popen([sys.executable, "-c", HOLD], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs[0].startswith("refused: search 'same' is running (pid ") and outs[1] == "won"
    # the kernel dropped the lock with its holder: the name is free again
    assert subprocess.run([sys.executable, "-c", HOLD], env=env, capture_output=True, text=True,
                          timeout=60).stdout.strip() == "won"  # fmt: skip


def test_a_name_an_ended_search_holds_is_refused_without_replace(home):
    from sertune.errors import UsageError
    from sertune.records import SearchRecord, save_record
    from sertune.search import _claim
    from sertune.spec import load_spec

    spec = load_spec("smoke")
    rec = SearchRecord(name="smoke", spec=spec, data={}, created="then", status="finished",
                       path=str(home / "searches" / "smoke"))  # fmt: skip
    save_record("smoke", rec)
    with pytest.raises(UsageError, match=r"exists \(finished, then\).*--replace"):
        _claim("smoke", replace=False, log=print)
    lines = []
    _claim("smoke", replace=True, log=lines.append)  # removes it, says what it removed
    assert any("removed the record of 'smoke'" in ln for ln in lines)
    _claim("smoke", replace=False, log=print)  # free now


# -- bounded spec parsing --------------------------------------------------------------------------

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
name: *g
"""


def test_an_alias_bomb_is_refused_at_once_in_one_line(tmp_path):
    from sertune.spec import SpecError, load_spec

    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as e:
        load_spec(f)
    took = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert took < 2 and peak < 200 << 20
    assert (
        str(e.value) == f"{f}: line 1: YAML anchors and aliases (&, *) are not allowed in a spec"
    )


@pytest.mark.parametrize(
    "content, says",
    [
        (b"name: x\xff\xfe\n", "not UTF-8 text: byte 0xff at offset 7"),
        (b"name: " + b"[" * 10000 + b"]" * 10000 + b"\n", "nested deeper than 32 levels"),
        (b"name: x\n" + b"#" * (1 << 20) + b"\n", "a spec is at most 1048576 bytes"),
    ],
)
def test_a_spec_outside_the_bounds_is_one_line(tmp_path, home, content, says):
    f = tmp_path / "bad.yaml"
    f.write_bytes(content)
    p = cli("search", "validate", str(f), env=env_for(home))
    assert p.returncode == 2 and says in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_budgets_are_capped_and_an_error_never_echoes_a_huge_value(tmp_path):
    from sertune.spec import SpecError, load_spec

    def edit(raw):
        raw["budget"].update(trials=10**9, max_epochs=10**9)
        raw["search"] = {"sampler": "x" * 100_000}

    with pytest.raises(SpecError) as e:
        load_spec(write_spec(tmp_path, "big", edit))
    fields = {f for f, _ in e.value.problems}
    assert {"budget.trials", "budget.max_epochs"} <= fields
    assert all(len(m) < 400 for _, m in e.value.problems)


# -- corrupt files ---------------------------------------------------------------------------------


def test_a_corrupt_record_is_named_by_list_and_status_never_crashes_them(home):
    from sertune.records import SearchRecord, record_path, save_record
    from sertune.spec import load_spec

    save_record(
        "good",
        SearchRecord(
            name="good",
            spec=load_spec("smoke"),
            data={},
            created="t",
            status="finished",
            path=str(home / "searches" / "good"),
        ),
    )
    record_path("bad").write_bytes(b"\xff\xfe{not json")
    record_path("cut").write_text('{"name": "cut", "spec": {')
    p = cli("search", "list", env=env_for(home))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert sum(ln.startswith("corrupt: ") for ln in lines) == 2
    assert any(ln.startswith("good ") for ln in lines)
    p = cli("search", "status", "bad", env=env_for(home))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert f"{record_path('bad')}: not a search record (not UTF-8 at byte 0)" in p.stderr


def test_a_damaged_checkpoint_is_found_by_its_manifest(tmp_path):
    from sertune.sessions import checkpoint_manifest, damaged_file

    ck = tmp_path / "checkpoint_000001"
    (ck / "best").mkdir(parents=True)
    (ck / "state.pt").write_bytes(os.urandom(4096))
    (ck / "best" / "model.safetensors").write_bytes(os.urandom(1024))
    (ck / "COMPLETE").write_text(json.dumps(checkpoint_manifest(ck)))
    assert damaged_file(ck) is None
    data = bytearray((ck / "state.pt").read_bytes())
    data[-10:] = b"0123456789"
    (ck / "state.pt").write_bytes(bytes(data))
    assert damaged_file(ck) == "state.pt"

    # a checkpoint from before manifests: its files checked by what their formats tell
    import torch
    from safetensors.torch import save_file

    (ck / "COMPLETE").write_text("")
    torch.save({"w": torch.arange(5000.0)}, ck / "state.pt")
    save_file({"w": torch.ones(300)}, ck / "best" / "model.safetensors")
    (ck / "metrics.json").write_text('{"val_uar": 0.5}')
    assert damaged_file(ck) is None
    whole = (ck / "state.pt").read_bytes()
    (ck / "state.pt").write_bytes(whole[: len(whole) // 2])  # cut short
    assert damaged_file(ck) == "state.pt"
    garbled = bytearray(whole)
    mid = len(whole) // 2  # inside the 20 kB tensor: its CRC-32 no longer matches
    garbled[mid : mid + 60] = os.urandom(60)
    (ck / "state.pt").write_bytes(bytes(garbled))
    assert damaged_file(ck) == "state.pt"
    (ck / "state.pt").write_bytes(whole)
    weights = (ck / "best" / "model.safetensors").read_bytes()
    (ck / "best" / "model.safetensors").write_bytes(weights[:-100])
    assert damaged_file(ck) == "best/model.safetensors"
    (ck / "best" / "model.safetensors").write_bytes(weights)
    (ck / "metrics.json").write_text('{"val_uar": 0.')
    assert damaged_file(ck) == "metrics.json"


def _logged_model(tmp_path: Path) -> Path:
    """A model folder as MLflow stores it (``MLmodel`` + data with its digests)."""
    from sertune.serving import META, file_digests
    from trainables.mtl_aug.config import MTLAugConfig
    from trainables.mtl_aug.export import save_model
    from trainables.mtl_aug.model import MTLAugModel

    cfg = MTLAugConfig.from_dict(
        {"model.conv_channels": [4, 8], "model.lstm_hidden": 8, "features.n_mels": 32}
    )
    model = tmp_path / "model"
    data = model / "data"
    save_model(data, MTLAugModel(cfg.model, 32), cfg, ("angry", "happy", "neutral", "sad"))
    (data / META).write_text(json.dumps({"trainable": "mtl_aug", "sha256": file_digests(data)}))
    (model / "MLmodel").write_text(
        "flavors:\n  python_function:\n    data: data\n    loader_module: sertune.serving\n"
    )
    return model


def test_flipped_bytes_in_the_weights_are_one_line_never_nan_predictions(tmp_path, home):
    import numpy as np
    import soundfile as sf

    model = _logged_model(tmp_path)
    wav = tmp_path / "a.wav"
    sf.write(wav, 0.1 * np.ones(16000), 16000)
    assert cli("predict", str(model), str(wav), env=env_for(home)).returncode == 0
    weights = model / "data" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = os.urandom(64)  # random bytes over the end: still loads, gives NaN
    weights.write_bytes(bytes(data))
    p = cli("predict", str(model), str(wav), env=env_for(home))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"{weights}: damaged (its SHA-256 is not the one recorded" in p.stderr
    (model / "data" / "sertune_model.json").write_text("{garbled")
    p = cli("predict", str(model), str(wav), env=env_for(home))
    assert p.returncode == 2 and "not a sertune model description" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


# -- the disk ----------------------------------------------------------------------------------------


def test_a_search_refuses_to_start_below_the_free_space_floor(home, tmp_path, monkeypatch):
    from sertune.diskspace import check_free_space, lowest
    from sertune.errors import UsageError

    check_free_space()  # this machine has room
    _, free = lowest()
    monkeypatch.setenv("SERTUNE_MIN_FREE_MB", str(free + 10_000))
    with pytest.raises(UsageError, match=r"MB free, below the \d+ MB a search needs to start"):
        check_free_space()
    p = cli("search", "run", str(write_spec(tmp_path, "full")), env={**env_for(home),
            "SERTUNE_MIN_FREE_MB": str(free + 10_000)})  # fmt: skip
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_disk_watch_stops_a_running_search_as_a_signal_would(home, monkeypatch):
    from sertune.diskspace import DiskWatch, lowest

    got, lines = [], []
    previous = signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        with DiskWatch(lines.append, "s", period_s=0.05) as watch:
            time.sleep(0.3)
            assert not got  # room enough
            monkeypatch.setenv("SERTUNE_MIN_FREE_MB", str(2 * lowest()[1] + 1000))
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got == [signal.SIGTERM] and watch.tripped
    assert lines[0].startswith("[sertune] disk nearly full: ")
    assert lines[0].endswith("sertune search resume s")


def test_credentials_in_a_tracking_url_go_to_mlflow_s_variables_only(monkeypatch):
    from sertune import settings

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, "")  # recorded, so what tracking_uri sets is undone after the test
        monkeypatch.delenv(key)
    clean = settings.tracking_uri("http://admin:p%40ss@127.0.0.1:5000")
    assert clean == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "admin"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "p@ss"
    assert settings.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_a_second_signal_still_leaves_the_record_interrupted(monkeypatch):
    """The driver's last step after a forced stop, with further signals ignored."""
    from sertune.interrupts import StopSignals, ignoring_signals

    stop = StopSignals(log=lambda m: None)
    with stop:
        stop.fired = "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGINT, None)
    assert stop.forced
    marked = threading.Event()
    with ignoring_signals():
        os.kill(os.getpid(), signal.SIGINT)  # ignored: the record is still written
        marked.set()
    assert marked.is_set()


def test_a_resume_names_the_ended_trials_its_saved_state_lacks():
    from sertune.driver import lost_from_state
    from sertune.tracking import Run

    def run(trial, status, phase=None):
        tags = {"sertune.trial_id": trial, "sertune.status": status, "sertune.kind": "trial"}
        return Run(run_id=trial, tags={**tags, **({"sertune.phase": phase} if phase else {})})

    runs = [
        run("a", "finished"),
        run("b", "stopped_early"),
        run("c", "interrupted"),  # not ended: Tune re-runs it from its checkpoint
        run("d", "finished", phase="confirm"),  # another phase's experiment
    ]
    assert lost_from_state({"a", "b", "c"}, runs) is None
    note = lost_from_state({"c"}, runs)
    assert note.startswith("resume: Tune's saved state holds 1 trial(s) but not 2 that ended")
    assert "(a, b)" in note and "promote count them" in note


def test_tune_s_log_on_a_full_disk_is_one_line_not_a_traceback_per_message(capsys):
    import logging

    from sertune import ray_compat

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with ray_compat.tune_logs_to("/dev/full"):  # every write: ENOSPC
        for i in range(3):
            logging.getLogger("ray.tune").error("trial %d failed", i)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    assert err.count("[sertune] cannot write Tune's messages to /dev/full") == 1


def test_tune_s_copies_to_local_storage_are_whole_or_not_made(tmp_path, monkeypatch):
    """The sync of Tune's experiment folder to a local search folder: a copy cut short (a full
    disk) leaves the last whole file, never half of the new one."""
    import errno
    import shutil

    import pyarrow.fs as pafs

    from sertune import ray_compat

    ray_compat.atomic_local_uploads()
    from ray.train._internal import storage

    staging, dest = tmp_path / "staging", tmp_path / "searches" / "s"
    staging.mkdir()
    (staging / "experiment_state-1.json").write_text('{"trial_data": [1, 2]}')
    (staging / "skip.png").write_bytes(b"x")
    storage._upload_to_fs_path(str(staging), pafs.LocalFileSystem(), str(dest), ["*.png"])
    assert json.loads((dest / "experiment_state-1.json").read_text()) == {"trial_data": [1, 2]}
    assert not (dest / "skip.png").exists()

    (staging / "experiment_state-1.json").write_text('{"trial_data": [1, 2, 3]}')
    real = shutil.copyfile

    def full_disk(src, dst):
        Path(dst).write_text('{"trial_da')  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(OSError):
        storage._upload_to_fs_path(str(staging), pafs.LocalFileSystem(), str(dest))
    monkeypatch.setattr(shutil, "copyfile", real)
    assert json.loads((dest / "experiment_state-1.json").read_text()) == {"trial_data": [1, 2]}
    assert sorted(p.name for p in dest.iterdir()) == ["experiment_state-1.json"]


def test_a_task_error_nothing_collected_is_one_line_on_the_console():
    """Ray logs an uncollected task error with its whole remote traceback (seen once in the
    disk-full drill: a trial whose checkpoint upload hit ENOSPC, dropped as the search stopped);
    the console gets the innermost error line."""
    import logging

    from ray._private.worker import _unhandled_error_handler

    from sertune import ray_compat

    ray_compat.quiet()
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: said.append(handler.format(r))  # type: ignore[method-assign]
    logger = logging.getLogger("ray._private.worker")
    logger.addHandler(handler)
    remote = (
        "ray::WarmTrial.train() (pid=1, ip=127.0.0.1, actor_id=ab, repr=WarmTrial)\n"
        '  File "/x/ray/tune/trainable/trainable.py", line 329, in train\n'
        "    raise skipped from exception_cause(skipped)\n"
        "           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
        '  File "/x/sertune/warm/proxy.py", line 220, in step\n'
        "    raise TrialFailed(reason)\n"
        "sertune.warm.board.TrialFailed: Error: [Errno 28] No space left on device\n"
    )
    try:
        _unhandled_error_handler(RuntimeError(remote))
    finally:
        logger.removeHandler(handler)
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].endswith("TrialFailed: Error: [Errno 28] No space left on device"), said
    assert "File " not in said[0]
