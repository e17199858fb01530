"""What gets installed is fixed by the locks, and this environment is exactly what they say.

`make install` (and so `.ci/run`) builds .venv from requirements-dev.lock; infra/Dockerfile
installs requirements.lock. A lock that no longer satisfies pyproject.toml, or a venv that drifted
from its lock, fails here.
"""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from sertune.doctor import base_version, canonical, installed, lock_differences, read_lock

REPO = Path(__file__).resolve().parents[1]
RUNTIME = REPO / "requirements.lock"
DEV = REPO / "requirements-dev.lock"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What `make ui-check` adds to .venv for the browser tests (never in the locks).
UI_CHECK_EXTRAS = {"playwright", "pyee", "greenlet"}


def test_the_installed_packages_are_exactly_the_dev_lock():
    lock = read_lock(DEV)
    have = installed()
    assert not lock_differences(lock, have), lock_differences(lock, have)
    # pip, setuptools and wheel are locked too (the project builds with the locked setuptools)
    for tool in ("pip", "setuptools", "wheel"):
        assert base_version(have[tool]) == lock[tool], (tool, have[tool], lock[tool])
    extra = set(have) - set(lock) - {"sertune"} - UI_CHECK_EXTRAS
    assert not extra, f"installed but not in {DEV.name}: {sorted(extra)} (run `make install`)"


def test_the_locks_satisfy_pyproject_and_agree_with_each_other():
    runtime, dev = read_lock(RUNTIME), read_lock(DEV)
    assert runtime and set(runtime) <= set(dev)
    assert {k: dev[k] for k in runtime} == runtime  # the dev lock is the runtime lock plus tools
    wanted = PYPROJECT["project"]["dependencies"]
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        wanted = wanted + extra
    for line in wanted:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate():
            continue
        locked = dev.get(canonical(req.name))
        assert locked, f"{req.name} is in pyproject.toml but not in the lock: run `make lock`"
        assert req.specifier.contains(Version(locked), prereleases=True), (
            f"{req.name} {locked} in the lock does not satisfy {line!r}: run `make lock`"
        )


def test_torch_and_torchaudio_are_a_matching_pair_everywhere():
    deps = {Requirement(d).name: Requirement(d) for d in PYPROJECT["project"]["dependencies"]}
    (torch_pin,) = deps["torch"].specifier
    (audio_pin,) = deps["torchaudio"].specifier
    assert torch_pin.operator == audio_pin.operator == "=="
    assert torch_pin.version == audio_pin.version  # one release of each, built for each other
    for path in (RUNTIME, DEV):
        lock = read_lock(path)
        assert lock["torch"] == lock["torchaudio"] == torch_pin.version, path
    # every pinned line of both locks carries hashes (pip's hash-checking mode needs all of them)
    for path in (RUNTIME, DEV):
        entries = [
            ln for ln in path.read_text().splitlines() if "==" in ln and not ln[0].isspace()
        ]
        assert entries and all(ln.rstrip().endswith("\\") for ln in entries), path
