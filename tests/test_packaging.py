"""The project installs as one distribution and never shadows the standard library."""

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_platform_is_a_source_folder_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()
    p = subprocess.run(
        [sys.executable, "-c", "import platform; print(platform.system())"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 0 and p.stdout.strip() == "Linux", p.stderr


def test_packages_import_from_the_repo_root_too():
    code = "import sertune, trainables.mtl_aug.trainable, search_spaces, torch, ray, mlflow; print('ok')"
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert p.stdout.strip() == "ok", p.stderr[-2000:]


def test_help_is_instant_and_imports_no_heavy_library():
    code = (
        "import sys, sertune.cli as c\n"
        "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))"
    )
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "sertune demo" in p.stdout and p.stdout.strip().endswith("[]"), p.stdout + p.stderr
    assert time.monotonic() - t0 < 10


def test_every_command_has_help():
    for cmd in (
        ["demo"],
        ["search", "run"],
        ["search", "resume"],
        ["search", "submit"],
        ["promote"],
        ["predict"],
        ["report"],
        ["ui"],
        ["bench", "train"],
        ["bench", "search"],
        ["data", "synth"],
    ):
        p = subprocess.run(
            [sys.executable, "-m", "sertune.cli", *cmd, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 0 and "usage: sertune" in p.stdout, (cmd, p.stderr)
