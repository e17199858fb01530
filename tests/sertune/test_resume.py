"""A real crash: the search runs as a subprocess and is SIGKILLed in the middle of a trial.

`sertune search status` then says it crashed (not "running"), and `sertune search resume`
completes it: finished trials are not re-run, and the interrupted trial continues from its last
checkpoint so that its history reads as if it had never been interrupted (MLflow steps 1..N
once each, status finished, the leaderboard's epochs N).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sertune.testing import kill_owned, start_sertune, wait_mid_trial
from sertune.trainable import SCHEDULE_PREFIX

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 8


def driver_env(home: Path, ray_tmp: str) -> dict[str, str]:
    """A search driver's environment: this test's home, 2 CPUs, its own Ray temp dir."""
    return {**os.environ, "SERTUNE_HOME": str(home), "SERTUNE_RAY_NUM_CPUS": "2",
            "SERTUNE_RAY_TEMP_DIR": ray_tmp, "PYTHONUNBUFFERED": "1"}  # fmt: skip


def sertune(*args):
    return [sys.executable, "-m", "sertune.cli", *args]


@pytest.mark.slow
def test_resume_after_sigkill_mid_trial(home, tmp_path):
    raw = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    raw.update(name="crash", robustness=None)
    # epochs of ~1 s, so Tune saves its state (every 2 s) while a trial is half-way
    raw["params"].update(
        {
            "model.conv_channels": [8, 16, 32],
            "model.lstm_hidden": 32,
            "optim.min_steps_per_epoch": 36,
        }
    )
    raw["budget"].update(
        trials=3, concurrency=1, max_epochs=EPOCHS, grace_epochs=EPOCHS, max_steps_per_epoch=40
    )
    spec = tmp_path / "crash.yaml"
    spec.write_text(yaml.safe_dump(raw))
    ray_tmp = f"/tmp/rs{os.getpid()}"  # Ray's socket paths must stay short
    env = driver_env(home, ray_tmp)
    proc, lines = start_sertune("search", "run", str(spec), env=env)
    try:
        # once a saved state knows a finished trial and the running one, kill the driver while
        # that one is in the middle of its epochs
        finished, victim = wait_mid_trial(lines, proc, home / "searches" / "crash", EPOCHS, 300)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait(timeout=30)
    finally:
        kill_owned(session=proc.pid, temp_dir=ray_tmp)  # only what this test started
    assert proc.returncode == -signal.SIGKILL
    before = "".join(lines)
    assert "best trials" not in before and victim not in finished

    status = subprocess.run(
        sertune("search", "status", "crash"), env=env, capture_output=True, text=True, timeout=120
    )
    assert "crashed — resume with: sertune search resume crash" in status.stdout, (
        status.stdout + status.stderr
    )

    resumed = subprocess.run(
        sertune("search", "resume", "crash"), env=env, capture_output=True, text=True, timeout=600
    )
    kill_owned(temp_dir=ray_tmp)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, before[-2000:] + "\n----- resume -----\n" + out[-3000:]
    restarted = set(re.findall(r"trial (\w+) started", out))
    assert not (restarted & finished), f"finished trials re-run: {restarted & finished}\n{out}"
    assert re.search(rf"trial {victim} epoch {EPOCHS}/{EPOCHS}", out), out
    assert not re.search(rf"trial {victim} epoch 1/{EPOCHS}", out), out  # continued, not restarted
    table = out[out.index("best trials") :]
    assert "(3 trials, 0 failed, 0 stopped early)" in table
    for row in [ln for ln in table.splitlines() if re.match(r"^\d+\s", ln)]:
        assert re.search(rf"\s finished\s+{EPOCHS}\s", row), row

    from mlflow import MlflowClient

    from sertune import settings

    c = MlflowClient(settings.tracking_uri())
    exp = c.get_experiment_by_name("sertune").experiment_id
    (run,) = c.search_runs([exp], f"tags.`sertune.trial_id` = '{victim}'")
    assert run.data.tags["sertune.status"] == "finished" and run.info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "val_uar")]
    assert sorted(steps) == list(range(1, EPOCHS + 1)), steps  # each epoch once, the real epoch

    status = subprocess.run(
        sertune("search", "status", "crash"), env=env, capture_output=True, text=True, timeout=120
    )
    assert "search crash: finished" in status.stdout and "3 finished" in status.stdout, (
        status.stdout
    )


PBT_EPOCHS = 8


@pytest.mark.slow
def test_pbt_resumes_after_sigkill_of_the_driver(home, tmp_path):
    """A PBT search is SIGKILLed after a trial has taken another's checkpoint; `resume` completes
    it: every trial ends at epoch 8 with each epoch it trained logged once, and the winner's
    lineage still runs 1..8 (the hand-over is neither lost nor applied twice)."""
    from tests.linear_trainable import linear_spec

    raw = linear_spec(
        home,
        "pbt-crash",
        budget={"trials": 4, "concurrency": 2, "max_epochs": PBT_EPOCHS, "grace_epochs": 1},
        params={"features.n_mels": 16, "pace.epoch_s": 0.7},
        space={"optim.lr": {"type": "float", "low": 0.001, "high": 0.5, "log": True}},
        search={
            "sampler": "random",
            "scheduler": "pbt",
            "scheduler_options": {
                "mutate": ["optim.lr"],
                "perturbation_interval": 2,
                "quantile_fraction": 0.5,
            },
        },
    )
    spec = tmp_path / "pbt-crash.yaml"
    spec.write_text(yaml.safe_dump(raw))
    ray_tmp = f"/tmp/rp{os.getpid()}"
    env = driver_env(home, ray_tmp)
    proc, lines = start_sertune("search", "run", str(spec), env=env)
    state = home / "searches" / "pbt-crash"
    exploited_at = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            text = "".join(lines)
            if exploited_at is None and "'s checkpoint at epoch" in text:
                exploited_at = time.time()
            saved = max(
                (p.stat().st_mtime for p in state.glob("experiment_state-*.json")), default=0
            )
            # once Tune's saved state is newer than a hand-over, kill the driver mid-search
            if exploited_at and saved > exploited_at + 0.5:
                break
            assert proc.poll() is None, text[-3000:]
            time.sleep(0.1)
        else:
            raise AssertionError("no hand-over in time:\n" + "".join(lines)[-3000:])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_owned(session=proc.pid, temp_dir=ray_tmp)
    before = "".join(lines)
    assert proc.returncode == -signal.SIGKILL and "best trials" not in before

    resumed = subprocess.run(
        sertune("search", "resume", "pbt-crash"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    kill_owned(temp_dir=ray_tmp)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, before[-2000:] + "\n----- resume -----\n" + out[-3000:]
    table = out[out.index("best trials") :]
    assert "(4 trials, 0 failed" in table, table
    rows = [ln for ln in table.splitlines() if re.match(r"^\d+\s", ln)]
    assert len(rows) == 4
    for row in rows:
        assert re.search(rf"\s finished\s+{PBT_EPOCHS}\s", row), row

    import json

    from mlflow import MlflowClient

    from sertune import settings

    c = MlflowClient(settings.tracking_uri())
    exp = c.get_experiment_by_name("sertune").experiment_id
    runs = c.search_runs([exp], "tags.`sertune.search` = 'pbt-crash'")
    children = [r for r in runs if r.data.tags.get("sertune.kind") == "trial"]
    (parent,) = [r for r in runs if r.data.tags.get("sertune.kind") == "search"]
    assert len(children) == 4
    for ch in children:
        assert ch.data.tags["sertune.status"] == "finished", ch.data.tags
        # the epochs it trained itself, once each (a trial that took a checkpoint skips ahead)
        steps = sorted(
            m.step for m in c.get_metric_history(ch.info.run_id, f"{SCHEDULE_PREFIX}optim.lr")
        )
        assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == PBT_EPOCHS, steps
    local = c.download_artifacts(parent.info.run_id, "summary", str(tmp_path / "dl"))
    sched = json.loads((Path(local) / "pbt_schedules.json").read_text())
    epochs = [e[0] for e in sched["schedules"][sched["winner"]]]
    assert epochs == list(range(1, PBT_EPOCHS + 1)), sched
