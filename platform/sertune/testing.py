"""What the tests and ``sertune bench faults`` share: stopping exactly the processes they started,
free ports, waiting for a server, a real ``mlflow server`` to point searches at, and the moment
to kill a search's driver mid-trial.

Ownership is by process session (a process started with ``start_new_session=True``) and by a
Ray temp dir named as a path on the command line; never ``ray stop`` or ``pkill``: other work
shares the machine.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

# -- stopping what a drill (or a test) started, and nothing else -------------------------------------


def processes() -> list[tuple[int, int, str]]:
    """(pid, session id, command line) of every live, non-zombie process we can read."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] == "Z":  # a zombie: already dead, waiting for its parent
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        out.append((int(d.name), int(fields[3]), cmd))
    return out


def names_path(cmd: str, path: str) -> bool:
    """Whether a command line names ``path`` itself or something inside it: ``/tmp/rw1`` is
    named by ``--temp-dir=/tmp/rw1`` and ``/tmp/rw1/session_x/sockets``, not by ``/tmp/rw12``."""
    path = path.rstrip("/")
    return re.search(rf"(?:^|[\s=:'\"]){re.escape(path)}(?:$|[/\s'\":])", cmd) is not None


def owned(session: int | None = None, temp_dir: str | None = None) -> list[int]:
    """Processes of one session (a process started with ``start_new_session``), and Ray
    processes that name ``temp_dir`` (its ``--temp-dir``, or a path inside it) on their
    command line."""
    me = os.getpid()
    return [
        pid
        for pid, sid, cmd in processes()
        if pid != me
        and ((session is not None and sid == session) or (temp_dir and names_path(cmd, temp_dir)))
    ]


def kill_owned(
    session: int | None = None, temp_dir: str | None = None, timeout: float = 20
) -> int:
    """SIGKILL what :func:`owned` finds; wait until it is gone."""
    pids = owned(session, temp_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and owned(session, temp_dir):
        time.sleep(0.2)
    return len(pids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Until ``url`` answers; fails with the end of ``log`` if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{url}: the server exited\n{log.read_text()[-3000:]}"
                ) from None
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s\n{log.read_text()[-3000:]}")


def start_mlflow(
    root: Path, port: int, app_name: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` (SQLite under ``root``, proxied artifacts, its
    own session); returns once ``/health`` answers. ``app_name="basic-auth"`` asks for
    credentials (with ``MLFLOW_AUTH_CONFIG_PATH`` in ``env``)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]  # fmt: skip
    if app_name:
        cmd += ["--app-name", app_name]
    log = root / "server.log"
    proc = subprocess.Popen(
        cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    wait_http(f"http://127.0.0.1:{port}/health", proc, log)
    return proc


def start_sertune(*args: str, env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    """``sertune ARGS`` as a subprocess in its own session; its output lines collect in the
    returned list as they come (stdout and stderr together)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sertune.cli", *args],
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
    return proc, lines


def start_ray_head(
    port: int, dashboard_port: int, temp_dir: str, env: dict[str, str], log: Path
) -> subprocess.Popen:
    """``ray start --head --block`` (2 CPUs, dashboard on 127.0.0.1) in its own session; token
    authentication when ``env`` sets ``RAY_AUTH_MODE=token``."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--block", "--port", str(port),
           "--dashboard-port", str(dashboard_port), "--num-cpus", "2",
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--temp-dir", temp_dir, "--disable-usage-stats"]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_mid_trial(
    lines: list[str], proc: subprocess.Popen, state: Path, epochs: int, timeout: float
) -> tuple[set[str], str]:
    """Wait until a search (``proc``, its console ``lines``, its Tune state folder ``state``) has
    finished a trial and Tune's saved state also knows a running one in the middle of its
    ``epochs`` (epoch 2 to ``epochs - 2``): the moment to kill its driver. Returns the finished
    trials and that running one. Raises ``RuntimeError`` when the search ends first and
    ``TimeoutError`` after ``timeout`` seconds (the message's first line says which)."""
    seen: dict[str, float] = {}  # when each "trial X started" line arrived
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = "".join(lines)
        finished = set(re.findall(r"trial (\w+) finished", text))
        for t in re.findall(r"trial (\w+) started", text):
            seen.setdefault(t, time.time())
        saved = max((p.stat().st_mtime for p in state.glob("experiment_state-*.json")), default=0)
        # Tune saves its state every 2 s: a saved state newer than the trial's start knows it
        mid = [
            t
            for t, e in re.findall(rf"trial (\w+) epoch (\d+)/{epochs}", text)
            if t not in finished and 2 <= int(e) <= epochs - 2 and saved > seen[t] + 0.5
        ]
        if finished and mid:
            return finished, mid[-1]
        if proc.poll() is not None:
            raise RuntimeError(
                "the search ended before a trial was mid-way with its state saved\n" + text[-3000:]
            )
        time.sleep(0.1)
    raise TimeoutError(
        f"no trial was mid-way with its state saved within {timeout:.0f} s\n"
        + "".join(lines)[-3000:]
    )
