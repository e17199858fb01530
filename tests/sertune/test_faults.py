"""Faults and bad input, each reproduced with real processes: nothing lost, nothing hangs, and
every failure says what and where in a line or two.

(The drills that need a real `mlflow server` outage, a token-authenticated Ray head or a second
Ray instance live in test_tracking.py and test_cluster.py; `sertune bench faults` runs them all.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from sertune.testing import kill_owned

REPO = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sertune.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def write_spec(tmp_path: Path, name: str, edit=None) -> Path:
    raw = yaml.safe_load(yaml.safe_dump(SMOKE))
    raw["name"] = name
    if edit:
        edit(raw)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "SERTUNE_HOME": str(home),
        "SERTUNE_RAY_NUM_CPUS": "2",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


# -- data loss and corruption --------------------------------------------------------------------


def test_two_first_searches_at_once_create_the_store_once(tmp_path):
    """Four processes open a fresh SQLite store at the same moment: none crashes, the store
    works afterwards, and it runs in WAL mode (readers beside the writer)."""
    home = tmp_path / "home"
    code = (
        "from sertune import tracking; c = tracking.client();print(tracking.get_experiment_id(c))"
    )
    env = env_for(home)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1  # one experiment, whoever created it
    import sqlite3

    with sqlite3.connect(home / "mlflow.db") as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("select count(*) from experiments").fetchone()[0] >= 1


def test_manifest_paths_outside_the_corpus_root_are_refused(tmp_path):
    import numpy as np
    import soundfile as sf

    from trainables.data.cache import build_cache, load_cache

    root, outside = tmp_path / "corpus", tmp_path / "outside"
    for d in (root, outside):
        d.mkdir()
    x = 0.2 * np.sin(np.arange(8000) / 10)
    for n in ("a", "b"):
        sf.write(root / f"{n}.wav", x, 16000)
    sf.write(outside / "x.wav", x, 16000)
    (root / "manifest.csv").write_text(
        "path,label,speaker\na.wav,angry,s1\nb.wav,sad,s2\n"
        f"../outside/x.wav,happy,s3\n{outside / 'x.wav'},happy,s3\n"
    )
    report = load_cache(
        build_cache("manifest", root, tmp_path / "c1", progress=lambda m: None)
    ).report
    assert report.used == 2 and report.found == 4
    assert sorted(report.skipped["outside_corpus_root"]) == sorted(
        ["../outside/x.wav", str(outside / "x.wav")]
    )
    allowed = build_cache(
        "manifest", root, tmp_path / "c2", progress=lambda m: None, allow_absolute_paths=True
    )
    assert load_cache(allowed).report.used == 4  # the spec said so explicitly


# -- hangs and lies ------------------------------------------------------------------------------------


def test_unsatisfiable_resources_are_refused_before_anything_runs(tmp_path, home):
    spec = write_spec(tmp_path, "huge", lambda r: r["resources"].update(cpus_per_worker=64))
    t0 = time.monotonic()
    p = cli("search", "run", str(spec), env=env_for(home), timeout=240)
    assert p.returncode == 2, p.stdout + p.stderr
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith(
        f"sertune: error: {spec}: resources.cpus_per_worker: one trial needs 1 worker(s) × 64 CPU"
    )
    assert "local Ray" in line and "trial" not in p.stdout.replace("trials of", "")
    assert time.monotonic() - t0 < 180


def test_an_unreachable_tracking_server_is_refused_up_front(tmp_path, home):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here
    t0 = time.monotonic()
    p = cli(
        "search",
        "run",
        str(write_spec(tmp_path, "nomlflow")),
        "--tracking-uri",
        f"http://127.0.0.1:{port}",
        env=env_for(home),
        timeout=120,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip() == (
        f"sertune: error: MLflow tracking server http://127.0.0.1:{port}: unreachable "
        "(connection refused; is the server running?)"
    )
    assert "search 'nomlflow'" not in p.stdout  # nothing prepared, Ray never started
    assert time.monotonic() - t0 < 60


def _run_until(args, env, pattern, timeout=300) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sertune.cli", *args],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True
    ).start()
    deadline = time.monotonic() + timeout
    while not re.search(pattern, "".join(lines)):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.1)
    return proc, lines


@pytest.mark.parametrize(
    "sig, times",
    # both in the slow tier: make test's driver kill and resume is the study's (test_study.py)
    [
        pytest.param(signal.SIGINT, 2, marks=pytest.mark.slow),
        pytest.param(signal.SIGTERM, 1, marks=pytest.mark.slow),
    ],
    ids=["double-ctrl-c", "sigterm"],
)
def test_a_stopped_search_is_interrupted_not_finished_and_resumes(tmp_path, home, sig, times):
    """SIGTERM (or Ctrl-C twice: stop at once) mid-search: exit 130, the search and its open
    MLflow runs are marked interrupted (KILLED), the resume command is printed (not Ray's),
    nothing reads 'finished'; `sertune search resume` completes it. (One Ctrl-C takes SIGTERM's
    path.)"""

    def edit(raw):
        # the first trial is interrupted, the second has not started: resume finishes one and
        # runs the other
        raw["budget"].update(trials=2, concurrency=1, max_epochs=4, grace_epochs=4)
        raw["robustness"] = None
        raw["params"]["optim.min_steps_per_epoch"] = 36  # epochs of a second or so

    spec = write_spec(tmp_path, "stopme", edit)
    ray_tmp = f"/tmp/rs{os.getpid()}{sig}"
    env = env_for(home, SERTUNE_RAY_TEMP_DIR=ray_tmp)
    proc, lines = _run_until(["search", "run", str(spec)], env, r"trial \w+ epoch 2/4")
    proc.send_signal(sig)
    for _ in range(times - 1):
        time.sleep(0.5)
        proc.send_signal(sig)
    try:
        proc.wait(timeout=120)
    finally:
        kill_owned(session=proc.pid, temp_dir=ray_tmp)
    out = "".join(lines)
    assert proc.returncode == 130, out[-3000:]
    assert "Resume it with: sertune search resume stopme" in out and "Tuner.restore" not in out
    assert "best trials" not in out

    from mlflow import MlflowClient

    from sertune import settings
    from sertune.records import load_record

    assert load_record("stopme").status == "interrupted"
    c = MlflowClient(settings.tracking_uri())
    runs = c.search_runs(
        [c.get_experiment_by_name("sertune").experiment_id], "tags.`sertune.search` = 'stopme'"
    )
    parent = [r for r in runs if r.data.tags["sertune.kind"] == "search"][0]
    assert parent.info.status == "KILLED" and parent.data.tags["sertune.status"] == "interrupted"
    open_ones = [
        r
        for r in runs
        if r.data.tags["sertune.kind"] == "trial"
        and r.data.tags["sertune.status"] not in ("finished", "stopped_early")
    ]
    assert open_ones and all(
        r.info.status == "KILLED" and r.data.tags["sertune.status"] == "interrupted"
        for r in open_ones
    )
    status = cli("search", "status", "stopme", env=env)
    assert (
        "search stopme: interrupted — resume with: sertune search resume stopme" in status.stdout
    )

    resumed = cli("search", "resume", "stopme", env=env, timeout=600)
    kill_owned(temp_dir=ray_tmp)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-2000:]
    assert "(2 trials, 0 failed" in resumed.stdout
    parent = c.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["sertune.status"] == "finished"


@pytest.mark.slow
def test_a_search_whose_trials_all_fail_exits_non_zero(tmp_path, home):
    (tmp_path / "nan_space.py").write_text(
        "def space(trial):\n    return {'optim.lr': 1e20, 'optim.grad_clip': 0.0}\n"
    )

    def edit(raw):
        raw["define_by_run"] = "nan_space.py:space"
        raw["robustness"] = None

    p = cli(
        "search", "run", str(write_spec(tmp_path, "allfail", edit)), env=env_for(home), timeout=400
    )
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    assert "every trial of 'allfail' failed" in p.stderr and p.stdout.count(" FAILED: ") == 2
    # the leaderboard names each distinct reason once, uncut, with its trials
    (why,) = [ln for ln in p.stdout.splitlines() if ln.startswith("failed (2): ")]
    assert "loss became" in why
    from sertune.records import load_record

    assert load_record("allfail").status == "failed"


# -- clear errors ---------------------------------------------------------------------------------------


def test_spec_errors_are_all_reported_at_once(tmp_path, home):
    def edit(raw):
        raw["budget"]["trails"] = 3
        raw["space"]["loss.w_aug"] = {"type": "float", "low": 2.0, "high": 1.0}
        raw["objective"]["metric"] = "val_acc"

    spec = write_spec(tmp_path, "bad", edit)
    p = cli("search", "validate", str(spec), env=env_for(home))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"sertune: error: {spec}: budget.trails: unknown key (allowed: trials, concurrency, "
        "max_epochs, grace_epochs, reduction_factor, max_steps_per_epoch, trial_max_failures)"
    ]  # a spec that does not parse stops there; once it parses, every problem is listed:
    del_edit = write_spec(
        tmp_path,
        "bad2",
        lambda r: (
            r["space"].update({"loss.w_aug": {"type": "float", "low": 2.0, "high": 1.0}}),
            r["objective"].update(metric="val_acc"),
            r["params"].update({"model.layers": 3}),
        ),
    )
    p = cli("search", "validate", str(del_edit), env=env_for(home))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 3, p.stderr
    assert any(": objective.metric: unknown metric 'val_acc'" in ln for ln in lines)
    assert any(": params.model.layers: unknown parameter" in ln for ln in lines)
    assert any(": space.loss.w_aug: low (2.0) > high (1.0)" in ln for ln in lines)


def test_set_reaches_a_searched_parameters_fields_and_defaults_follow_the_user(home):
    from sertune.spec import load_spec

    spec = load_spec("mtl_aug", sets=["space.loss.w_aug.low=0.1", "budget.max_epochs=1"])
    assert spec.space["loss.w_aug"].low == 0.1 and spec.space["loss.w_aug"].high == 1.0
    assert spec.budget.max_epochs == 1 and spec.budget.grace_epochs == 1  # default yielded


def test_a_corrupt_model_file_is_one_line(tmp_path, home):
    from trainables.mtl_aug.config import MTLAugConfig
    from trainables.mtl_aug.export import save_model
    from trainables.mtl_aug.model import MTLAugModel

    cfg = MTLAugConfig.from_dict(
        {"model.conv_channels": [4, 8], "model.lstm_hidden": 8, "features.n_mels": 32}
    )
    model = tmp_path / "model"
    save_model(
        model / "data", MTLAugModel(cfg.model, 32), cfg, ("angry", "happy", "neutral", "sad")
    )
    (model / "data" / "sertune_model.json").write_text(json.dumps({"trainable": "mtl_aug"}))
    (model / "MLmodel").write_text(
        "flavors:\n  python_function:\n    data: data\n    loader_module: sertune.serving\n"
    )
    weights = model / "data" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    wav = tmp_path / "a.wav"
    import numpy as np
    import soundfile as sf

    sf.write(wav, 0.1 * np.ones(16000), 16000)
    p = cli("predict", str(model), str(wav), env=env_for(home))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert f"{weights}: cannot load the weights (truncated or corrupt?)" in p.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["search", "logs"],
        ["search", "stop"],
        ["search", "status"],
        ["search", "resume"],
        ["promote"],
    ],
)
def test_an_unknown_search_name_is_one_line(home, command):
    p = cli(*command, "no-such-search", env=env_for(home))
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "sertune: error: no search named 'no-such-search' (known: none); see `sertune search list`"
    ], p.stderr


@pytest.mark.parametrize(
    "folds", [pytest.param(0, marks=pytest.mark.slow), 2], ids=["trial", "cv-fold"]
)
def test_a_killed_worker_resumes_its_trial_from_the_last_checkpoint(tmp_path, home, folds):
    """SIGKILL the Ray Train worker of a warm slot mid-trial: Train restarts the worker group and
    the trial continues from its last checkpoint (no epoch twice, none lost). Cross-validated,
    the killed worker is one fold job's: that fold resumes, and the trial's epochs (the folds'
    mean) still come once each."""
    from sertune.testing import processes

    def edit(raw):
        raw["budget"].update(trials=1, concurrency=max(1, folds), max_epochs=5, grace_epochs=5)
        raw["robustness"] = None
        raw["params"]["optim.min_steps_per_epoch"] = 36
        if folds:
            raw["objective"]["cv"] = {"folds": folds}

    ray_tmp = f"/tmp/rw{os.getpid()}"
    env = env_for(home, SERTUNE_RAY_TEMP_DIR=ray_tmp)
    proc, lines = _run_until(
        ["search", "run", str(write_spec(tmp_path, "workerkill", edit))],
        env,
        r"trial \w+ epoch 2/5",
    )
    try:
        workers = [
            pid
            for pid, sid, cmd in processes()
            if sid == proc.pid and cmd.startswith("ray::RayTrainWorker")
        ]
        assert len(workers) == max(1, folds), [c for _, s, c in processes() if s == proc.pid]
        os.kill(workers[0], signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        kill_owned(session=proc.pid, temp_dir=ray_tmp)
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    epochs = [int(e) for e in re.findall(r"trial \w+ epoch (\d)/5", out)]
    assert epochs == [1, 2, 3, 4, 5], out  # each epoch reported once: resumed, not restarted
    assert "(1 trials, 0 failed" in out
