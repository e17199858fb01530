"""``sertune bench faults``: fault drills end to end, one line each with what was lost.

Every drill runs real processes - ``sertune`` searches as subprocesses, a real ``mlflow server``,
``ray start --head`` with token authentication, real SIGKILL / SIGINT - in its own temporary
``SERTUNE_HOME``, and stops only what it started (by process session and Ray temp dir; never
``ray stop``). Target: every line says ``lost 0``, no hang longer than its documented timeout.

| drill            | what happens                                          | what counts as lost            |
|------------------|-------------------------------------------------------|--------------------------------|
| driver_kill      | SIGKILL the driver mid-trial, then ``search resume``   | epochs missing/doubled, trials re-run |
| worker_kill      | SIGKILL a warm slot's Train worker mid-trial           | epochs missing or doubled      |
| sigint           | Ctrl-C mid-search, then ``search resume``             | trials missing, wrong statuses |
| mlflow_outage    | the tracking server is down 60 s mid-search           | metric points never recorded   |
| mlflow_down      | an unreachable ``--tracking-uri``                     | anything started (must be 0)   |
| two_first        | two first searches at once on a fresh home            | searches failed, store broken  |
| second_ray       | another Ray instance runs on the host                 | trials not finished            |
| resources        | ``cpus_per_worker: 64`` on this machine               | seconds past the refusal limit |
| token_head       | submit to a token-authenticated ``ray start --head``  | trials not finished            |
| secrets          | fake AWS/MLflow secrets; search, promote, submit      | files containing a secret      |
| same_name        | two ``search run --name same`` started together        | both or neither ran, runs != budget |
| disk_low         | the disk fills mid-search (a ballast file), freed, resume | trials lost, not interrupted |
| bad_checkpoint   | SIGKILL mid-trial, garble the newest checkpoint, resume | epochs missing/doubled, trial failed |
| disk_full        | the home on a 300 MB tmpfs filled to the last byte mid-trial, freed, resume | finished trials lost, tracebacks, not interrupted |
| kill_after_stop_cv | 3-fold CV: SIGKILL the driver 3 s after ASHA stopped a trial, resume | resume failed or hung, runs left RUNNING, trials re-run |
| kill_closing     | SIGKILL after the last trial, during the closing steps, resume | the same; the parent not FINISHED |
| kill_in_confirm  | SIGKILL during the confirmation runs, resume           | the same                       |
| kill_in_baseline | SIGKILL during the single-task baseline search, resume | the same                       |
| kill_repeats     | ``objective.repeats: 2``: SIGKILL mid-search, resume   | the same                       |
| kill_pbt         | population-based training: SIGKILL mid-search, resume  | the same                       |
| kill_study       | a 3-outer-fold study: SIGKILL once fold 0 finished, ``study resume`` | fold 0 re-run, resume failed, table or study run missing |
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..testing import (
    free_port,
    kill_owned,
    processes,
    start_mlflow,
    start_ray_head,
    start_sertune,
    wait_mid_trial,
)
from ..trainable import EPOCHS_DONE


class Drill:
    """A temporary home, a spec writer and subprocess runners for one drill."""

    def __init__(self, name: str):
        self.name = name
        self.root = Path(tempfile.mkdtemp(prefix=f"sertune-drill-{name}-"))
        self.home = self.root / "home"
        self.ray_tmp = f"/tmp/sd{os.getpid() % 100000}{name[:3]}"  # Ray's socket paths stay short
        self.env = {
            **os.environ,
            "SERTUNE_HOME": str(self.home),
            "SERTUNE_RAY_NUM_CPUS": "2",
            "SERTUNE_RAY_TEMP_DIR": self.ray_tmp,
            "PYTHONUNBUFFERED": "1",
        }
        for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "SERTUNE_STORAGE"):
            self.env.pop(k, None)

    def remove(self) -> None:
        """Delete the drill's home and Ray temp dirs (after its processes are gone)."""
        import shutil

        for path in (self.root, *Path(self.ray_tmp).parent.glob(Path(self.ray_tmp).name + "*")):
            shutil.rmtree(path, ignore_errors=True)

    def spec(self, name: str, edit: Callable[[dict], None] | None = None) -> Path:
        import yaml

        from ..spec import presets

        raw = yaml.safe_load(presets()["smoke"].read_text())
        raw["name"] = name
        raw["robustness"] = None
        # epochs of about a second on 2 CPUs (~6 ms a step): 3x smoke's corpus in batches of 2,
        # without smoke's cap of 3 steps, so a drill can strike mid-trial
        raw["data"]["synthetic"]["per_class"] = 18
        raw["params"]["optim.min_steps_per_epoch"] = 200
        raw["budget"]["max_steps_per_epoch"] = 200
        if edit:
            edit(raw)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def cli(
        self, *args: str, timeout: float = 900, env: dict | None = None
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sertune.cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env or self.env,
        )

    def start(self, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, list[str]]:
        return start_sertune(*args, env=env or self.env)

    @staticmethod
    def wait_for(
        lines: list[str], pattern: str, proc: subprocess.Popen, timeout: float = 600
    ) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, "".join(lines))
            if m:
                return m
            if proc.poll() is not None:
                raise RuntimeError(f"ended before {pattern!r}: {''.join(lines)[-800:]}")
            time.sleep(0.1)
        raise TimeoutError(f"no {pattern!r} within {timeout:.0f}s")

    def killed_mid_trial(self, search: str, trials: int, epochs: int) -> tuple[set[str], str]:
        """Run ``search`` (``trials`` of ``epochs``, one at a time) and SIGKILL its driver once a
        trial has finished and another is mid-way (:func:`wait_mid_trial`); returns the finished
        trials and the running one."""
        spec = self.spec(
            search,
            lambda r: r["budget"].update(
                trials=trials, concurrency=1, max_epochs=epochs, grace_epochs=epochs
            ),
        )
        proc, lines = self.start("search", "run", str(spec))
        try:
            got = wait_mid_trial(lines, proc, self.home / "searches" / search, epochs, 600)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            self.clean(proc)
        return got

    def together(self, *commands: list[str]) -> list[tuple[subprocess.Popen, list[str]]]:
        """Start every ``sertune`` command at once; wait until all have ended (15 min each).
        Returns each one's process and console lines."""
        started = [self.start(*args) for args in commands]
        try:
            for p, _ in started:
                p.wait(timeout=900)
        finally:
            for p, _ in started:
                self.clean(p)
        return started

    def clean(self, proc: subprocess.Popen | None = None) -> None:
        kill_owned(session=proc.pid if proc else None, temp_dir=self.ray_tmp)

    def runs(self, search: str, uri: str | None = None) -> list[Any]:
        """What MLflow holds for ``search``. Read with MLflow's own client, not through
        ``sertune.tracking``: a drill checks what the code under test wrote, as a user would."""
        from mlflow import MlflowClient

        c = MlflowClient(uri or f"sqlite:///{self.home / 'mlflow.db'}")
        exp = c.get_experiment_by_name("sertune")
        return (
            c.search_runs([exp.experiment_id], f"tags.`sertune.search` = '{search}'")
            if exp
            else []
        )

    def runs_by_kind(self, kind: str, uri: str | None = None) -> list[Any]:
        """Every run of ``kind`` (search, trial, study) in the drill's MLflow store."""
        from mlflow import MlflowClient

        c = MlflowClient(uri or f"sqlite:///{self.home / 'mlflow.db'}")
        exp = c.get_experiment_by_name("sertune")
        return c.search_runs([exp.experiment_id], f"tags.`sertune.kind` = '{kind}'") if exp else []

    def epoch_gaps(self, search: str, epochs: int, uri: str | None = None) -> int:
        """Metric points missing or doubled across a search's finished trial runs."""
        from mlflow import MlflowClient

        c = MlflowClient(uri or f"sqlite:///{self.home / 'mlflow.db'}")
        lost = 0
        for r in self.runs(search, uri):
            if r.data.tags.get("sertune.kind") != "trial":
                continue
            steps = [m.step for m in c.get_metric_history(r.info.run_id, "val_uar")]
            want = list(range(1, int(r.data.metrics.get(EPOCHS_DONE, epochs)) + 1))
            lost += len(set(want) ^ set(steps)) + (len(steps) - len(set(steps)))
        return lost


def submit_to_token_head(d: Drill, spec: str) -> subprocess.CompletedProcess:
    """``sertune search submit --wait`` of the drill's spec ``spec`` to a token-authenticated head
    of its own, from a client that has the token but not ``RAY_AUTH_MODE``; the head is stopped
    afterwards."""
    head, address, env = start_token_head(d)
    try:
        client = {**env}
        client.pop("RAY_AUTH_MODE")
        return d.cli(
            "search", "submit", str(d.spec(spec)), "--address", address, "--wait", env=client
        )
    finally:
        kill_owned(session=head.pid, temp_dir=d.ray_tmp + "h")


def start_token_head(
    d: Drill, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str, dict]:
    port, dash = free_port(), free_port()
    token = d.root / "cluster.token"
    token.write_text("sertune-drill-" + os.urandom(16).hex())
    env = {
        **d.env,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        **(extra_env or {}),
    }
    env.pop("SERTUNE_RAY_TEMP_DIR", None)
    head = start_ray_head(port, dash, d.ray_tmp + "h", env, d.root / "head.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401: up and asking for the token
            break
        except OSError:
            if head.poll() is not None:
                raise RuntimeError((d.root / "head.log").read_text()[-800:]) from None
            time.sleep(0.5)
    return head, f"http://127.0.0.1:{dash}", env


# -- the drills ------------------------------------------------------------------------------------------


def driver_kill(d: Drill) -> tuple[int, str]:
    """SIGKILL the driver mid-trial, then `sertune search resume`."""
    finished, _ = d.killed_mid_trial("crash", trials=3, epochs=6)
    resumed = d.cli("search", "resume", "crash")
    d.clean()
    rerun = set(re.findall(r"trial (\w+) started", resumed.stdout)) & finished
    lost = (
        d.epoch_gaps("crash", 6)
        + len(rerun)
        + (0 if "(3 trials, 0 failed" in resumed.stdout else 1)
    )
    return lost, f"resume exit {resumed.returncode}, {len(rerun)} finished trials re-run"


def _record_phase(d: Drill, search: str) -> str:
    try:
        path = d.home / "state" / "searches" / f"{search}.json"
        return json.loads(path.read_text()).get("phase", "")
    except (OSError, ValueError):
        return ""


def _kill_then_resume(
    d: Drill,
    search: str,
    edit: Callable[[dict], None],
    strike: Callable[[list[str], subprocess.Popen], bool],
    point: str,
    trials: int,
    limit_s: float = 480,
) -> tuple[int, str]:
    """Run ``search``, SIGKILL its driver once ``strike(console, proc)`` says so, resume it
    (``limit_s`` at most: past it the resume counts as hung), then read what the user would:
    the resume's exit, ``search status``, MLflow's run states. Lost: a resume that failed or
    hung, a finished trial re-run, a run left RUNNING, fewer than ``trials`` trial runs
    FINISHED, a parent not FINISHED. (A run KILLED is a trial started after Tune's last saved
    state: the resume runs another in its place, so it is shown, not lost.)"""
    spec = d.spec(search, edit)
    proc, lines = d.start("search", "run", str(spec))
    try:
        deadline = time.monotonic() + 600
        while not strike(lines, proc):
            if proc.poll() is not None:
                raise RuntimeError(f"the search ended before {point}: {''.join(lines)[-600:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {point} within 600 s")
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        d.clean(proc)
    finished = set(re.findall(r"trial (\w+) finished", "".join(lines)))
    t0 = time.monotonic()
    try:
        resumed = d.cli("search", "resume", search, timeout=limit_s)
        out, code, hung = resumed.stdout + resumed.stderr, resumed.returncode, 0
    except subprocess.TimeoutExpired as e:
        out, code, hung = str(e.stdout or ""), None, 1
    wall = time.monotonic() - t0
    d.clean()
    status = d.cli("search", "status", search).stdout.splitlines()[:1]
    rerun = set(re.findall(r"trial (\w+) started", out)) & finished
    runs = d.runs(search)
    states = {}
    for r in runs:
        kind = "parent" if r.data.tags.get("sertune.kind") == "search" else "trial"
        states.setdefault(kind, []).append(r.info.status)
    parent = (states.get("parent") or ["none"])[0]
    open_runs = sum(s == "RUNNING" for s in states.get("trial", []))
    short = max(0, trials - sum(s == "FINISHED" for s in states.get("trial", [])))
    lost = (code != 0) + len(rerun) + open_runs + short + (parent != "FINISHED")
    lost += not (status and "finished" in status[0])
    trial_states = ", ".join(
        f"{n} {s}" for s, n in sorted(_count(states.get("trial", [])).items())
    )
    return lost, (
        f"killed {point}; resume exit {code}, hung {hung}, {wall:.0f}s; "
        f"status {status[0] if status else '?'!r}; MLflow parent {parent}, trials {trial_states}; "
        f"{len(rerun)} finished trials re-run"
    )


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _after(pattern: str, delay_s: float = 3.0) -> Callable[[list[str], subprocess.Popen], bool]:
    """Strike ``delay_s`` after the console first matched ``pattern``."""
    seen: list[float] = []

    def strike(lines: list[str], proc: subprocess.Popen) -> bool:
        if not seen and re.search(pattern, "".join(lines)):
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay_s

    return strike


def kill_after_stop_cv(d: Drill) -> tuple[int, str]:
    """A 3-fold cross-validated search; SIGKILL the driver 3 s after ASHA stopped a trial (its
    fold jobs train on to their end meanwhile), then resume."""

    def edit(r: dict) -> None:
        r["objective"]["cv"] = {"folds": 3}
        # epochs of a few steps (as the smoke preset's): in the 3 s before the kill the stopped
        # trial's fold jobs train on to their last epoch, past what Tune's saved state knows
        r["budget"].update(
            trials=6, concurrency=3, max_epochs=3, grace_epochs=1, max_steps_per_epoch=3
        )
        r["params"]["optim.min_steps_per_epoch"] = 8

    return _kill_then_resume(
        d, "cvstop", edit, _after(r"stopped early by the scheduler"), "after a scheduler stop", 6
    )


def kill_closing(d: Drill) -> tuple[int, str]:
    """SIGKILL the driver after its last trial, while it writes the search's closing steps
    (the record says ``closing``), then resume: only the closing steps run."""

    def edit(r: dict) -> None:
        r["budget"].update(trials=3, concurrency=2, max_epochs=2, grace_epochs=2)

    return _kill_then_resume(
        d,
        "closing",
        edit,
        lambda lines, proc: _record_phase(d, "closing") == "closing",
        "after the last trial, before the closing steps",
        3,
    )


def kill_in_confirm(d: Drill) -> tuple[int, str]:
    """SIGKILL the driver 3 s into its confirmation runs, then resume."""

    def edit(r: dict) -> None:
        r["budget"].update(trials=2, concurrency=2, max_epochs=3, grace_epochs=3)
        r["confirm"] = {"top_k": 1, "seeds": 2}

    return _kill_then_resume(
        d,
        "confirming",
        edit,
        _phase_then(d, "confirming", "confirm"),
        "during the confirmation",
        4,  # 2 trials and 2 confirmation runs
    )


def kill_in_baseline(d: Drill) -> tuple[int, str]:
    """SIGKILL the driver 3 s into its single-task baseline search, then resume."""

    def edit(r: dict) -> None:
        r["budget"].update(trials=2, concurrency=2, max_epochs=3, grace_epochs=3)
        r["baseline"] = "stl_baseline"

    return _kill_then_resume(
        d, "based", edit, _phase_then(d, "based", "baseline"), "during the baseline", 2
    )


def kill_repeats(d: Drill) -> tuple[int, str]:
    """``objective.repeats: 2``; SIGKILL the driver mid-search once a trial finished, resume."""

    def edit(r: dict) -> None:
        r["objective"]["repeats"] = 2
        r["budget"].update(trials=3, concurrency=2, max_epochs=4, grace_epochs=4)

    return _kill_then_resume(
        d, "repeated", edit, _after(r"trial \w+ finished", 4.0), "mid-search (repeats)", 3
    )


def kill_pbt(d: Drill) -> tuple[int, str]:
    """Population-based training; SIGKILL the driver once a trial reported epoch 3, resume."""

    def edit(r: dict) -> None:
        r["search"] = {
            "sampler": "random",
            "scheduler": "pbt",
            "scheduler_options": {"perturbation_interval": 2},
        }
        r["budget"].update(trials=2, concurrency=2, max_epochs=6, grace_epochs=1)

    return _kill_then_resume(d, "pbt", edit, _after(r"epoch 3/6", 1.0), "mid-search (PBT)", 2)


def _phase_then(d: Drill, search: str, phase: str, delay_s: float = 3.0):
    seen: list[float] = []

    def strike(lines: list[str], proc: subprocess.Popen) -> bool:
        if not seen and _record_phase(d, search) == phase:
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= delay_s

    return strike


def worker_kill(d: Drill) -> tuple[int, str]:
    """SIGKILL a warm slot's Ray Train worker mid-trial."""
    spec = d.spec(
        "wk", lambda r: r["budget"].update(trials=1, concurrency=1, max_epochs=5, grace_epochs=5)
    )
    proc, lines = d.start("search", "run", str(spec))
    try:
        d.wait_for(lines, r"trial \w+ epoch 2/5", proc)
        workers = [
            pid
            for pid, sid, cmd in processes()
            if sid == proc.pid and cmd.startswith("ray::RayTrainWorker")
        ]
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        d.clean(proc)
    epochs = [int(e) for e in re.findall(r"trial \w+ epoch (\d)/5", "".join(lines))]
    lost = (
        len(set(range(1, 6)) ^ set(epochs))
        + len(epochs)
        - len(set(epochs))
        + (proc.returncode != 0)
    )
    return (
        lost,
        f"killed {len(workers)} worker(s), epochs reported {epochs}, exit {proc.returncode}",
    )


def sigint(d: Drill) -> tuple[int, str]:
    """Ctrl-C mid-search, then `sertune search resume`."""
    spec = d.spec(
        "stop", lambda r: r["budget"].update(trials=3, concurrency=1, max_epochs=4, grace_epochs=4)
    )
    proc, lines = d.start("search", "run", str(spec))
    try:
        d.wait_for(lines, r"trial \w+ epoch 2/4", proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        d.clean(proc)
    marked = json.loads((d.home / "state" / "searches" / "stop.json").read_text())["status"]
    resumed = d.cli("search", "resume", "stop")
    d.clean()
    ok = (
        proc.returncode == 130
        and marked == "interrupted"
        and "(3 trials, 0 failed" in resumed.stdout
    )
    return (0 if ok else 1) + d.epoch_gaps(
        "stop", 4
    ), f"exit {proc.returncode}, marked {marked}, resume exit {resumed.returncode}"


def mlflow_outage(d: Drill, down_s: float = 60.0) -> tuple[int, str]:
    """The tracking server is down 60 s in the middle of a search."""
    root, port = d.root / "server", free_port()
    root.mkdir()
    server = start_mlflow(root, port)
    uri = f"http://127.0.0.1:{port}"
    spec = d.spec(
        "outage",
        lambda r: r["budget"].update(trials=3, concurrency=1, max_epochs=4, grace_epochs=4),
    )
    proc, lines = d.start("search", "run", str(spec), "--tracking-uri", uri)
    try:
        d.wait_for(lines, r"trial \w+ epoch 1/4", proc)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        time.sleep(down_s)
        server = start_mlflow(root, port)
        proc.wait(timeout=900)
        lost = d.epoch_gaps("outage", 4, uri) + sum(
            r.info.status != "FINISHED" for r in d.runs("outage", uri)
        )
        lost += proc.returncode != 0
        said = bool(re.search(r"unreachable", "".join(lines))) and "caught up" in "".join(lines)
    finally:
        d.clean(proc)
        os.killpg(server.pid, signal.SIGTERM)
    return lost, f"console said unreachable + caught up: {said}, exit {proc.returncode}"


def mlflow_down(d: Drill) -> tuple[int, str]:
    """An unreachable --tracking-uri: refused before anything starts."""
    t0 = time.monotonic()
    p = d.cli(
        "search", "run", str(d.spec("down")), "--tracking-uri", f"http://127.0.0.1:{free_port()}"
    )
    started = int(bool(re.search(r"trial \w+ started", p.stdout))) + int(
        (d.home / "cache").exists()
    )
    return started + (
        p.returncode != 2
    ), f"exit {p.returncode} in {time.monotonic() - t0:.1f}s: {p.stderr.strip()[:90]}"


def two_first(d: Drill) -> tuple[int, str]:
    """Two first searches at once on a fresh SERTUNE_HOME."""
    (a, _), (b, _) = d.together(
        ["search", "run", str(d.spec("one"))], ["search", "run", str(d.spec("two"))]
    )
    check = d.cli("search", "list")
    lost = (a.returncode != 0) + (b.returncode != 0) + (check.returncode != 0)
    lost += sum(
        len([r for r in d.runs(s) if r.data.tags.get("sertune.kind") == "trial"]) != 2
        for s in ("one", "two")
    )
    return lost, f"exits {a.returncode}, {b.returncode}; store readable: {check.returncode == 0}"


def second_ray(d: Drill) -> tuple[int, str]:
    """Another Ray instance runs on the host during a search (ASHA stops trials)."""
    head, _, _ = start_token_head(d)
    try:
        spec = d.spec(
            "beside",
            lambda r: r["budget"].update(trials=4, concurrency=2, max_epochs=3, grace_epochs=1),
        )
        p = d.cli("search", "run", str(spec), timeout=900)
    finally:
        kill_owned(session=head.pid, temp_dir=d.ray_tmp + "h")
        d.clean()
    return (p.returncode != 0) + (
        0 if "(4 trials, 0 failed" in p.stdout else 1
    ), f"exit {p.returncode}"


def resources(d: Drill, limit_s: float = 60.0) -> tuple[int, str]:
    """cpus_per_worker: 64 on this machine."""
    t0 = time.monotonic()
    p = d.cli(
        "search", "run", str(d.spec("huge", lambda r: r["resources"].update(cpus_per_worker=64)))
    )
    d.clean()
    took = time.monotonic() - t0
    ok = p.returncode == 2 and "resources.cpus_per_worker" in p.stderr
    return (0 if ok else 1) + int(
        max(0.0, took - limit_s)
    ), f"exit {p.returncode} after {took:.0f}s: {p.stderr.strip()[-90:]}"


def token_head(d: Drill) -> tuple[int, str]:
    """Submit to a token-authenticated `ray start --head`."""
    p = submit_to_token_head(d, "sub")
    return (p.returncode != 0) + (
        0 if "(2 trials, 0 failed" in p.stdout else 1
    ), f"exit {p.returncode}"


def secrets(d: Drill) -> tuple[int, str]:
    """Fake AWS and MLflow secrets in the environment; a search, a promotion and a submission."""
    fake = {
        "AWS_ACCESS_KEY_ID": "AKIAFAKE" + os.urandom(4).hex(),
        "AWS_SECRET_ACCESS_KEY": "SECRETaws" + os.urandom(8).hex(),
        "MLFLOW_TRACKING_USERNAME": "someone",
        "MLFLOW_TRACKING_PASSWORD": "SECRETmlflow" + os.urandom(8).hex(),
    }
    d.env.update(fake)
    run = d.cli("search", "run", str(d.spec("sec")))
    promote = d.cli("promote", "sec")
    try:
        sub = submit_to_token_head(d, "sec-sub")
    finally:
        d.clean()
    needles = [
        fake["AWS_SECRET_ACCESS_KEY"],
        fake["MLFLOW_TRACKING_PASSWORD"],
        (d.root / "cluster.token").read_text(),
    ]
    hits = []
    for root in (Path(d.ray_tmp), Path(d.ray_tmp + "h"), d.home):
        for f in root.rglob("*") if root.exists() else []:
            if f.is_file() and not f.is_symlink():
                try:
                    data = f.read_bytes()
                except OSError:
                    continue
                hits += [str(f) for n in needles if n.encode() in data]
    for out in (run, promote, sub):
        hits += ["console"] * sum(n in out.stdout + out.stderr for n in needles)
    failed = (run.returncode != 0) + (promote.returncode != 0) + (sub.returncode != 0)
    return (
        len(hits) + failed,
        f"{len(hits)} file(s) with a secret; exits {run.returncode}/{promote.returncode}/{sub.returncode}",
    )


def same_name(d: Drill) -> tuple[int, str]:
    """Two `search run --name same` started together: exactly one runs, its budget's runs."""
    spec = str(d.spec("same", lambda r: r["budget"].update(trials=2, max_epochs=2)))
    (a, la), (b, lb) = d.together(*[["search", "run", spec, "--name", "same"]] * 2)
    exits = sorted([a.returncode, b.returncode])
    trials = [r for r in d.runs("same") if r.data.tags.get("sertune.kind") == "trial"]
    parents = [r for r in d.runs("same") if r.data.tags.get("sertune.kind") == "search"]
    lost = (exits != [0, 2]) + abs(len(trials) - 2) + abs(len(parents) - 1)
    refused = next((ln.strip() for ln in la + lb if "is running" in ln), "no refusal")
    return (
        lost,
        f"exits {exits}, {len(trials)} trial runs, 1 parent: {len(parents) == 1}; {refused[:80]}",
    )


def disk_low(d: Drill) -> tuple[int, str]:
    """The disk fills mid-search (a ballast file under the home takes the room the running floor
    leaves): the search stops as interrupted with its state whole; the ballast removed, resume
    finishes with every trial that had finished before."""
    import shutil

    from ..diskspace import MB

    spec = d.spec(
        "disk", lambda r: r["budget"].update(trials=3, concurrency=1, max_epochs=4, grace_epochs=4)
    )
    d.home.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(d.home).free / MB
    env = {**d.env, "SERTUNE_MIN_FREE_MB": "64", "SERTUNE_MIN_FREE_RUNNING_MB": str(free - 300)}
    proc, lines = d.start("search", "run", str(spec), env=env)
    ballast = d.home / "ballast"
    try:
        finished, _ = wait_mid_trial(lines, proc, d.home / "searches" / "disk", 4, 600)
        with ballast.open("wb") as fh:  # 400 MB: below the running floor
            for _ in range(400):
                fh.write(b"\0" * MB)
            fh.flush()
            os.fsync(fh.fileno())
        proc.wait(timeout=300)
    finally:
        d.clean(proc)
        ballast.unlink(missing_ok=True)
    said = any("disk nearly full" in ln for ln in lines)
    status = json.loads((d.home / "state" / "searches" / "disk.json").read_text())["status"]
    resumed = d.cli("search", "resume", "disk")
    d.clean()
    rerun = set(re.findall(r"trial (\w+) started", resumed.stdout)) & finished
    lost = (
        (proc.returncode != 130)
        + (not said)
        + (status != "interrupted")
        + len(rerun)
        + (0 if "(3 trials, 0 failed" in resumed.stdout else 1)
        + d.epoch_gaps("disk", 4)
    )
    return lost, (
        f"said disk nearly full: {said}, exit {proc.returncode}, record {status}; resume exit "
        f"{resumed.returncode}, {len(finished)} finished before, {len(rerun)} re-run"
    )


def disk_full(d: Drill) -> tuple[int, str]:
    """The home on a real 300 MB tmpfs, filled to the last byte mid-trial once Tune's saved
    state has a trial finished: every write fails (checkpoints, the MLflow store, Tune's state, the record) until the disk
    watch stops the search as interrupted - no traceback on the console. The ballast removed,
    resume keeps the finished trial and ends with the budget's trials finished. Needs root to
    mount the tmpfs; says so and counts nothing lost where it cannot."""
    from ..diskspace import MB

    mount = d.root / "small"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        return 0, "skipped: cannot mount a tmpfs here (needs root)"
    home = mount / "home"
    env = {**d.env, "SERTUNE_HOME": str(home), "SERTUNE_MIN_FREE_MB": "150"}
    try:
        spec = d.spec(
            "full",
            lambda r: r["budget"].update(trials=4, concurrency=1, max_epochs=4, grace_epochs=4),
        )
        proc, lines = d.start("search", "run", str(spec), env=env)
        try:
            # once Tune's saved state, not only the console, has a trial finished (a trial that
            # ends after the state's last save is rightly resumed from its checkpoint)
            finished, _ = wait_mid_trial(lines, proc, home / "searches" / "full", 4, 600)
            with (home / "ballast").open("wb") as fh:  # until the disk says no more
                try:
                    while True:
                        fh.write(b"\0" * MB)
                except OSError:
                    pass
            proc.wait(timeout=300)
        finally:
            d.clean(proc)
        (home / "ballast").unlink(missing_ok=True)
        out = "".join(lines)
        said = "disk nearly full" in out
        tracebacks = out.count("Traceback")
        resumed = d.cli("search", "resume", "full", env=env)
        status = d.cli("search", "status", "full", env=env).stdout
        d.clean()
        rerun = set(re.findall(r"trial (\w+) started", resumed.stdout)) & finished
        kept = all(t in resumed.stdout for t in finished)
        lost = (
            (proc.returncode != 130)
            + (not said)
            + tracebacks
            + len(rerun)
            + (not kept)
            + (0 if "trials: 4 finished" in status else 1)
        )
        trials = re.search(r"trials: .+", status)
        return lost, (
            f"said disk nearly full: {said}, exit {proc.returncode}, {tracebacks} tracebacks; "
            f"resume exit {resumed.returncode}, {len(finished)} finished before, kept: {kept}, "
            f"{len(rerun)} re-run; status: {' '.join(status.split()[:3])} "
            f"{trials.group(0) if trials else '(no trials line)'}"
        )
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def bad_checkpoint(d: Drill) -> tuple[int, str]:
    """SIGKILL the driver mid-trial, garble the newest checkpoint of the running trial, resume:
    the damaged checkpoint is named and passed over, the trial resumes from the one before."""
    _, running = d.killed_mid_trial("badck", trials=2, epochs=6)
    ckpts = sorted((d.home / "searches" / "badck" / "_train" / running).glob("checkpoint_*"))
    state = ckpts[-1] / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
    state.write_bytes(bytes(data))
    resumed = d.cli("search", "resume", "badck")
    d.clean()
    named = f"checkpoint {ckpts[-1]} is damaged" in resumed.stdout + resumed.stderr
    lost = (
        (resumed.returncode != 0)
        + (0 if "(2 trials, 0 failed" in resumed.stdout else 1)
        + d.epoch_gaps("badck", 6)
    )
    return (
        lost,
        f"garbled {state.parent.name}/state.pt; named: {named}; resume exit {resumed.returncode}",
    )


STUDY_ROBUSTNESS = {
    "snrs_db": [10],
    "noises": ["white"],
    "fgsm_eps": [0.005],
    "pgd_eps": [],
    "max_utterances": 24,
}


def study_sized(r: dict) -> None:
    """A drill spec back to the smoke preset's corpus and epochs (a study drill strikes between
    fold searches, not mid-trial): 2 trials of 1 epoch, one at a time."""
    r["data"]["synthetic"]["per_class"] = 6
    r["params"].pop("optim.min_steps_per_epoch", None)
    r["budget"].pop("max_steps_per_epoch", None)
    r["budget"].update(trials=2, concurrency=1, max_epochs=1, grace_epochs=1)


def kill_study(d: Drill) -> tuple[int, str]:
    """A study (3 outer folds x 2 arms x 2 trials): SIGKILL its driver as soon as outer fold 1
    starts, ``sertune study resume``. Lost: a fold-0 search run again (its trials started a
    second time), a resume that failed, a fold search or the study not finished, the Markdown
    or HTML report missing, the study run not FINISHED with every fold search as its child."""

    def edit(r: dict) -> None:
        study_sized(r)
        r["robustness"] = dict(STUDY_ROBUSTNESS)

    spec = d.spec("st", edit)
    study = "drill-study"
    args = ("study", "run", str(spec), "--vs", "stl_baseline", "--outer", "3", "--name", study)
    args += ("--parallel", "1")  # one after the other: fold 0 ends before fold 1 starts
    proc, lines = d.start(*args)
    try:
        d.wait_for(lines, r"outer fold 1, \S+: search", proc, timeout=600)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        d.clean(proc)
    first = "".join(lines)
    fold0 = set(re.findall(r"trial (\w+) started", first.split("outer fold 1,")[0]))
    resumed = d.cli("study", "resume", study, timeout=600)
    d.clean()
    out = resumed.stdout + resumed.stderr
    rerun = fold0 & set(re.findall(r"trial (\w+) started", out))
    kept = len(re.findall(r"outer fold 0, \S+: done before", out))
    status = d.cli("study", "status", study).stdout
    report = d.home / "state" / "studies" / study
    runs = d.runs(study)
    parent = next((r for r in runs if r.data.tags.get("sertune.kind") == "study"), None)
    children = []
    if parent is not None:
        from mlflow import MlflowClient

        c = MlflowClient(f"sqlite:///{d.home / 'mlflow.db'}")
        exp = c.get_experiment_by_name("sertune").experiment_id
        children = c.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    lost = (resumed.returncode != 0) + len(rerun) + (kept != 2)
    lost += "finished" not in status.splitlines()[0] if status else 1
    lost += sum(not (report / f).exists() for f in ("report.md", "report.html"))
    lost += parent is None or parent.info.status != "FINISHED"
    lost += len([c for c in children if c.info.status == "FINISHED"]) != 6
    return lost, (
        f"killed as outer fold 1 started ({len(fold0)} fold-0 trials had run); resume exit "
        f"{resumed.returncode}; fold-0 searches kept {kept}/2, their trials re-run {len(rerun)}; "
        f"status {status.splitlines()[0] if status else '?'!r}; study run "
        f"{parent.info.status if parent else 'missing'} with {len(children)} fold searches; "
        f"last lines: {' | '.join(out.strip().splitlines()[-3:])}"
    )


DRILLS: dict[str, Callable[[Drill], tuple[int, str]]] = {
    "driver_kill": driver_kill,
    "worker_kill": worker_kill,
    "sigint": sigint,
    "mlflow_outage": mlflow_outage,
    "mlflow_down": mlflow_down,
    "two_first": two_first,
    "second_ray": second_ray,
    "resources": resources,
    "token_head": token_head,
    "secrets": secrets,
    "same_name": same_name,
    "disk_low": disk_low,
    "bad_checkpoint": bad_checkpoint,
    "disk_full": disk_full,
    "kill_after_stop_cv": kill_after_stop_cv,
    "kill_closing": kill_closing,
    "kill_in_confirm": kill_in_confirm,
    "kill_in_baseline": kill_in_baseline,
    "kill_repeats": kill_repeats,
    "kill_pbt": kill_pbt,
    "kill_study": kill_study,
}


def run_drills(only: list[str] | None = None) -> int:
    names = only or list(DRILLS)
    unknown = set(names) - set(DRILLS)
    if unknown:
        print(f"unknown drill(s): {', '.join(sorted(unknown))}; see --list", file=sys.stderr)
        return 2
    failures = 0
    for name in names:
        d = Drill(name)
        t0 = time.monotonic()
        try:
            lost, detail = DRILLS[name](d)
        except Exception as e:  # noqa: BLE001 - a drill that breaks is reported, the next one runs
            lost, detail = (
                1,
                f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
            )
            d.clean()
        failures += lost > 0
        if lost:  # kept for a look; a clean drill leaves nothing behind
            detail += f"; kept: {d.root}"
        else:
            d.remove()
        print(f"{name:14} lost {lost}   ({detail}; {time.monotonic() - t0:.0f}s)", flush=True)
    return 1 if failures else 0
