"""A broken environment is refused before anything starts, and a search whose trials all fail the
same way stops early: one line, the right exit code, no traceback on the console.

The broken library is real: a ``torchaudio`` package on ``PYTHONPATH`` whose import fails the way
torchaudio 2.11.1 fails against torch 2.11.0 (``OSError ... undefined symbol``), shadowing the
installed one for a subprocess or for a Ray worker.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sertune import doctor
from sertune.failfast import FailFast, is_environment_error
from tests.linear_trainable import linear_spec

REPO = Path(__file__).resolve().parents[2]


def sertune(*args):
    return [sys.executable, "-m", "sertune.cli", *args]


@pytest.fixture
def broken_torchaudio(tmp_path):
    """A folder to put first on PYTHONPATH: torchaudio 2.11.1 that does not load."""
    root = tmp_path / "broken"
    pkg = root / "torchaudio"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        textwrap.dedent(f"""
        try:
            raise OSError("{pkg}/lib/libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace")
        except OSError as e:
            raise OSError("Could not load this library: {pkg}/lib/libtorchaudio.so") from e
    """)
    )
    info = root / "torchaudio-2.11.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchaudio\nVersion: 2.11.1\n")
    return root


def env_with(home, **extra):
    env = {**os.environ, "SERTUNE_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


# -- doctor -----------------------------------------------------------------------------------------


def test_doctor_passes_in_the_locked_environment():
    checks = doctor.run_checks()
    assert [c.line() for c in checks if not c.ok] == []
    names = [c.name for c in checks]
    assert names[:3] == ["torch", "torchaudio", "cuda"] and names[-1] == "lock"
    assert "transformers" in names  # model.encoder: ssl loads its encoder through it
    assert "packages at the versions in requirements.lock" in checks[-1].detail


def test_a_kernel_that_fails_is_one_line_naming_package_versions_and_fix(monkeypatch):
    import torchaudio.functional

    def broken(*a, **kw):
        raise RuntimeError("kernel load failed")

    monkeypatch.setattr(torchaudio.functional, "resample", broken)
    (failed,) = [c for c in doctor.run_checks() if not c.ok]
    line = failed.line()
    assert "\n" not in line and line.startswith("torchaudio 2.11.0 loads but its kernels fail")
    assert (
        "RuntimeError: kernel load failed" in line
        and "fix: pip install torchaudio==2.11.0" in line
    )


def test_a_version_that_differs_from_the_lock_is_named(tmp_path, monkeypatch):
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "optuna==0.1.0 \\\n    --hash=sha256:00\n"
        "numpy==1.0.0 ; python_version < '3.0' \\\n    --hash=sha256:00\n"  # not for this Python
    )
    monkeypatch.setenv("SERTUNE_LOCK", str(lock))
    (failed,) = [c for c in doctor.run_checks() if not c.ok]
    assert failed.name == "lock"
    assert f"1 package(s) differ from {lock}: optuna " in failed.line()
    assert "(lock 0.1.0)" in failed.line() and "numpy" not in failed.line()


def test_broken_torchaudio_refused_before_ray_starts(home, tmp_path, broken_torchaudio):
    ray_tmp = f"/tmp/rd{os.getpid()}"
    env = env_with(home, PYTHONPATH=str(broken_torchaudio), SERTUNE_RAY_TEMP_DIR=ray_tmp)
    out = subprocess.run(
        sertune("search", "run", "smoke"), env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(
        "sertune: error: torchaudio 2.11.1 does not load against torch 2.11.0 (OSError: "
    ), line
    assert "undefined symbol" in line and "fix: pip install torchaudio==2.11.0" in line
    assert not Path(ray_tmp).exists()  # Ray never started
    assert not (home / "state" / "searches" / "smoke.json").exists()  # nothing recorded

    doc = subprocess.run(sertune("doctor"), env=env, capture_output=True, text=True, timeout=300)
    assert doc.returncode == 2 and len(doc.stderr.splitlines()) == 1
    assert "ok    torch" in doc.stdout and "ok    torchaudio" not in doc.stdout


def test_every_node_of_a_cluster_is_checked_and_a_broken_one_named(broken_torchaudio):
    """A cluster (not started by sertune) whose workers get the broken torchaudio: the search is
    refused with the node named, before any trial."""
    import ray

    from sertune.cluster import check_nodes, shutdown_ray
    from sertune.errors import EnvironmentProblem

    shutdown_ray()
    ray.init(
        num_cpus=1,
        include_dashboard=False,
        _temp_dir=f"/tmp/rn{os.getpid()}",
        runtime_env={"env_vars": {"PYTHONPATH": str(broken_torchaudio)}},
    )
    try:
        with pytest.raises(EnvironmentProblem) as e:
            check_nodes()
        (line,) = str(e.value).splitlines()  # one node, one line
        ip = ray.nodes()[0]["NodeManagerAddress"]
        assert line.startswith(f"node {ip} (") and "torchaudio 2.11.1 does not load" in line
    finally:
        ray.shutdown()


def test_a_healthy_cluster_passes_the_node_check():
    import ray

    from sertune.cluster import check_nodes, shutdown_ray

    shutdown_ray()
    ray.init(num_cpus=1, include_dashboard=False, _temp_dir=f"/tmp/rh{os.getpid()}")
    try:
        assert check_nodes() == "1 node(s) pass the environment check"
    finally:
        ray.shutdown()


# -- fail fast --------------------------------------------------------------------------------------


def test_fail_fast_rules():
    same = FailFast("t-same", first=2)
    same.observe("ValueError: optim.lr must be > 0 (trial 1)")
    assert not same.tripped
    same.observe("ValueError: optim.lr must be > 0 (trial 2)")  # numbers aside, the same
    assert same.tripped.startswith("the first 2 trials all failed the same way: ValueError")

    mixed = FailFast("t-mixed", first=2)
    mixed.observe("ValueError: a")
    mixed.observe("KeyError: b")
    mixed.observe("ValueError: a")
    assert not mixed.tripped

    diverged = FailFast("t-div", first=2)  # bad hyperparameters, not a broken search
    for _ in range(3):
        diverged.observe("TrialDiverged: loss became nan at epoch 1 step 0")
    assert not diverged.tripped

    env = FailFast("t-env", first=4)
    env.observe("OSError: Could not load this library: /x/libtorchaudio.so")
    assert env.tripped.startswith("a trial failed on the environment")
    assert is_environment_error("ModuleNotFoundError: No module named 'torchaudio'")
    assert not is_environment_error("OSError: [Errno 2] No such file or directory: 'a.wav'")
    for w in (same, mixed, diverged, env):
        w.close()


@pytest.mark.slow
def test_a_search_whose_trials_all_fail_the_same_way_stops_early(home, tmp_path):
    """6 trials, 2 at a time, each raising the same error: the search stops after the first two
    end, exit 1, one line per failed trial and one line of cause, no traceback; no confirmation."""
    (tmp_path / "bad_space.py").write_text(
        "def space(trial):\n    return {'optim.lr': -1.0 - trial.number}\n"
    )
    raw = linear_spec(
        home,
        "all-fail",
        budget={"trials": 6, "concurrency": 2, "max_epochs": 2, "grace_epochs": 2},
        define_by_run="bad_space.py:space",
        confirm={"top_k": 1, "seeds": 2},
    )
    spec = tmp_path / "all-fail.yaml"
    spec.write_text(yaml.safe_dump(raw))
    env = env_with(home, SERTUNE_RAY_NUM_CPUS="2", SERTUNE_RAY_TEMP_DIR=f"/tmp/rf{os.getpid()}")
    out = subprocess.run(
        sertune("search", "run", str(spec)), env=env, capture_output=True, text=True, timeout=600
    )
    console = out.stdout + out.stderr
    assert out.returncode == 1, console
    assert "Traceback (most recent" not in console and "ERROR" not in console, console
    failed = [ln for ln in out.stdout.splitlines() if " FAILED: " in ln]
    assert 2 <= len(failed) <= 4, console  # stopped long before the 6th trial
    assert all("ValueError: optim.lr must be > 0" in ln for ln in failed)
    # start, trials, cause (the data's split and the reference baseline say what runs first)
    said = [
        ln
        for ln in console.splitlines()
        if not ln.startswith(("[sertune] data:", "[sertune] reference", "[cache]", "  classes:"))
    ]
    assert len(said) <= 2 + 2 * len(failed) + 2, console
    (cause,) = out.stderr.splitlines()
    assert cause.startswith(
        "sertune: error: search 'all-fail' stopped: the first 2 trials all "
        "failed the same way: ValueError: optim.lr must be > 0"
    )
    log = home / "state" / "searches" / "all-fail.log"
    assert f"Tracebacks: {log}" in cause and "Traceback (most recent" in log.read_text()

    from mlflow import MlflowClient

    from sertune import settings
    from sertune.records import load_record
    from sertune.tracking import get_experiment_id

    record = load_record("all-fail")
    assert record.status == "failed" and record.phase == "done"
    assert not (home / "searches" / "all-fail-confirm").exists()  # confirmation never started
    c = MlflowClient(settings.tracking_uri())
    (parent,) = c.search_runs([get_experiment_id(c)], "tags.`sertune.kind` = 'search'")
    assert parent.info.status == "FAILED"
    assert "failed the same way" in parent.data.tags["sertune.failure_reason"]
