"""A real crash: the search runs as a subprocess, is SIGKILLed after a trial finished, and
`sertune search resume` completes it without re-running finished trials."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def sertune(*args, env):
    return [sys.executable, "-m", "sertune.cli", *args]


def test_resume_after_sigkill(home, tmp_path):
    raw = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    raw.update(name="crash", robustness=None)
    raw["budget"].update(
        trials=3, concurrency=1, max_epochs=2, grace_epochs=2, max_steps_per_epoch=2
    )
    spec = tmp_path / "crash.yaml"
    spec.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "SERTUNE_HOME": str(home),
        "SERTUNE_RAY_NUM_CPUS": "2",
        "PYTHONUNBUFFERED": "1",
    }

    proc = subprocess.Popen(
        sertune("search", "run", str(spec), env=env),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True
    ).start()
    finished: set[str] = set()
    first_finish = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            text = "".join(lines)
            finished = set(re.findall(r"trial (\w+) finished", text))
            started = re.findall(r"trial (\w+) started", text)
            if finished and first_finish is None:
                first_finish = time.monotonic()
            # kill while the next trial runs, after one finished and the state was saved (every 2 s)
            if (
                finished
                and len(started) > len(finished)
                and time.monotonic() - first_finish > 4
                and re.search(rf"trial {started[-1]} epoch 1/2", text)
            ):
                break
            assert proc.poll() is None, "".join(lines)[-3000:]
            time.sleep(0.2)
        else:
            raise AssertionError("no trial finished in time:\n" + "".join(lines)[-3000:])
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait(timeout=30)
    finally:
        subprocess.run(
            [str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True
        )
    assert proc.returncode == -signal.SIGKILL
    before = "".join(lines)
    assert "best trials" not in before  # it really died mid-search

    resumed = subprocess.run(
        sertune("search", "resume", "crash", env=env),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, before[-2000:] + "\n----- resume -----\n" + out[-3000:]
    restarted = set(re.findall(r"trial (\w+) started", out))
    assert not (restarted & finished), (
        f"finished trials re-run: {restarted & finished}\n{before}\n{out}"
    )
    table = out[out.index("best trials") :]
    assert "(3 trials, 0 failed)" in table
    for tid in finished:
        assert tid in table

    from ray.tune import ExperimentAnalysis

    ea = ExperimentAnalysis(str(home / "searches" / "crash"))
    assert len(ea.trials) == 3 and {t.status for t in ea.trials} == {"TERMINATED"}
    status = subprocess.run(
        sertune("search", "status", "crash", env=env),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert '"TERMINATED": 3' in status.stdout
