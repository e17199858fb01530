"""Is this Python environment able to run a search? Checked before anything starts.

``sertune doctor`` prints every check; ``search run``, ``search resume`` and ``demo`` run the same
checks first (before Ray starts) and refuse with one line and exit 2 when one fails, instead of
failing every trial on the same broken library. On a joined Ray cluster the same checks run on
every node (``sertune.cluster.check_nodes``), so a worker image with a broken torchaudio is
refused with the node named.

| check       | what it does                                                                   |
|-------------|--------------------------------------------------------------------------------|
| torch       | imports, runs a matrix product on the CPU                                      |
| torchaudio  | imports (loads its native library), its release equals torch's, runs a resample |
|             | (48 kHz -> 16 kHz) and a 64-band log-mel on the CPU                            |
| cuda        | what torch sees (information: no GPU is fine, trials then run on the CPU)      |
| ray, mlflow, optuna, soundfile, boto3 | import (Ray Tune and Train too), versions                |
| transformers | imports (a self-supervised encoder, ``model.encoder: ssl``, loads through it) |
| lock        | every package of ``requirements.lock`` is installed at its locked version (in a |
|             | checkout; ``SERTUNE_LOCK=PATH`` names another lock, ``SERTUNE_LOCK=none`` skips)|

torchaudio's native library is built against one torch release: torchaudio 2.11.1 does not load
against torch 2.11.0 (``undefined symbol``), although pip installs the pair happily.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import EnvironmentProblem

# Never compared with the lock: upgrading pip itself breaks nothing at run time.
INSTALLERS = {"pip", "setuptools", "wheel"}
FIX = "make install (a fresh .venv from requirements-dev.lock)"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        """``ok  torch 2.11.0 ...`` or the one-line refusal: what, versions, the fix."""
        if self.ok:
            return f"  ok    {self.name:12} {self.detail}"
        what = self.detail if self.detail.startswith(self.name) else f"{self.name} {self.detail}"
        return what + (f"; fix: {self.fix}" if self.fix else "")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_version(v: str) -> str:
    """``2.11.1+cu132`` -> ``2.11.1``."""
    return v.split("+", 1)[0]


def _one_line(e: BaseException) -> str:
    """``OSError: Could not load this library: ... (undefined symbol: ...)``: the exception and
    what caused it, on one line."""
    text = " ".join(str(e).split())
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({' '.join(str(cause).split())})"
    return f"{type(e).__name__}: {text}"[:400]


# -- the lock ---------------------------------------------------------------------------------------

_LOCK_LINE = re.compile(
    r"^([A-Za-z0-9][A-Za-z0-9._\-]*)(?:\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?\s*$"
)


def lock_path() -> Path | None:
    """The lock this environment was installed from: ``SERTUNE_LOCK``, else the checkout's
    ``requirements.lock`` (an editable install), else none (installed from the ranges)."""
    env = os.environ.get("SERTUNE_LOCK")
    if env:
        return None if env.lower() == "none" else Path(env)
    p = Path(__file__).resolve().parents[2] / "requirements.lock"
    return p if p.is_file() else None


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the lock's entries that apply to this interpreter."""
    from packaging.markers import Marker

    out: dict[str, str] = {}
    for ln in path.read_text().splitlines():
        m = _LOCK_LINE.match(ln)
        if not m:
            continue
        name, version, marker = m.groups()
        if marker and not Marker(marker).evaluate():
            continue
        out[canonical(name)] = version
    return out


def installed() -> dict[str, str]:
    """What this environment has installed: its site-packages and ``PYTHONPATH`` (not the
    copies a package vendors on ``sys.path`` at import time, like Ray's ``thirdparty_files``)."""
    import sysconfig
    from importlib import metadata

    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    paths += [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    found: dict[str, str] = {}
    for d in metadata.distributions(path=list(dict.fromkeys(paths))):
        name = d.metadata["Name"]
        if name:
            found.setdefault(canonical(name), d.version)
    return found


def lock_differences(lock: dict[str, str], have: dict[str, str]) -> list[str]:
    """``name X (lock Y)`` / ``name missing (lock Y)`` for each locked package that differs."""
    out = []
    for name, want in sorted(lock.items()):
        if name in INSTALLERS:
            continue
        got = have.get(name)
        if got is None:
            out.append(f"{name} missing (lock {want})")
        elif base_version(got) != base_version(want):
            out.append(f"{name} {got} (lock {want})")
    return out


# -- the checks ---------------------------------------------------------------------------------------


def _torch() -> Check:
    try:
        import torch

        x = torch.ones(4, 4)
        assert float((x @ x).sum()) == 64.0
    except Exception as e:  # noqa: BLE001 - any failure here is the environment's
        return Check("torch", False, f"does not work ({_one_line(e)})", FIX)
    return Check("torch", True, f"{torch.__version__}")


def _torchaudio(lock: dict[str, str]) -> Check:
    import torch

    tv = base_version(torch.__version__)
    want = lock.get("torchaudio") or tv
    fix = f"pip install torchaudio=={want} (the release built for torch {tv}), or {FIX}"
    try:
        import torchaudio
    except Exception as e:  # noqa: BLE001 - OSError (undefined symbol), ImportError, ...
        from importlib import metadata

        try:
            av = metadata.version("torchaudio")
        except metadata.PackageNotFoundError:
            return Check("torchaudio", False, f"not installed (torch {tv})", fix)
        return Check(
            "torchaudio",
            False,
            f"torchaudio {av} does not load against torch {tv} ({_one_line(e)})",
            fix,
        )
    av = base_version(torchaudio.__version__)
    if av != tv:
        return Check(
            "torchaudio",
            False,
            f"torchaudio {av} is not the release of torch {tv} (they must match to the patch)",
            fix,
        )
    try:
        import torchaudio.functional as F
        import torchaudio.transforms as T

        wave = torch.sin(torch.arange(48_000) * 0.05).unsqueeze(0)
        y = F.resample(wave, 48_000, 16_000)
        mel = T.MelSpectrogram(sample_rate=16_000, n_fft=400, hop_length=160, n_mels=64)(y)
        logmel = torch.log(mel + 1e-6)
        assert y.shape[-1] == 16_000 and logmel.shape[-2] == 64 and torch.isfinite(logmel).all()
        if torchaudio._extension._IS_TORCHAUDIO_EXT_AVAILABLE:  # the native library answers
            torch.ops._torchaudio.is_align_available()
    except Exception as e:  # noqa: BLE001
        return Check(
            "torchaudio",
            False,
            f"torchaudio {av} loads but its kernels fail on the CPU ({_one_line(e)})",
            fix,
        )
    return Check("torchaudio", True, f"{av}, kernels run (resample 48->16 kHz, 64-band log-mel)")


def _cuda() -> Check:
    import torch

    built = torch.version.cuda or "none"
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        return Check(
            "cuda",
            True,
            f"{torch.cuda.device_count()} GPU(s) visible: {', '.join(names)} (torch built for CUDA {built})",
        )
    return Check(
        "cuda", True, f"no GPU visible: trials run on the CPU (torch built for CUDA {built})"
    )


def _imports(lock: dict[str, str]) -> list[Check]:
    """The services' libraries: each must import (Tune and Train are separate imports)."""
    out = []
    for name, modules in (
        ("ray", ("ray", "ray.tune", "ray.train.torch")),
        ("mlflow", ("mlflow",)),
        ("optuna", ("optuna",)),
        ("soundfile", ("soundfile",)),
        ("boto3", ("boto3",)),
        ("transformers", ("transformers",)),  # its models load lazily: seconds, not here
    ):
        import importlib
        from importlib import metadata

        try:
            for mod in modules:
                importlib.import_module(mod)
            version = metadata.version(name)
        except Exception as e:  # noqa: BLE001
            want = lock.get(name)
            fix = f"pip install {name}=={want}, or {FIX}" if want else FIX
            out.append(Check(name, False, f"does not import ({_one_line(e)})", fix))
            continue
        detail = version
        if name == "soundfile":
            detail += f" (libsndfile {sys.modules['soundfile'].__libsndfile_version__})"
        out.append(Check(name, True, detail))
    return out


def _lock(path: Path | None, lock: dict[str, str], reported: set[str]) -> Check:
    if path is None:
        return Check("lock", True, "no lock here (installed from pyproject's ranges)")
    if not lock:
        return Check("lock", False, f"{path}: no pinned packages found", "make lock")
    diffs = [d for d in lock_differences(lock, installed()) if d.split()[0] not in reported]
    if not diffs:
        n = len([k for k in lock if k not in INSTALLERS])
        return Check("lock", True, f"{n} packages at the versions in {path.name}")
    shown = ", ".join(diffs[:6]) + (f", and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    return Check("lock", False, f"{len(diffs)} package(s) differ from {path}: {shown}", FIX)


def run_checks() -> list[Check]:
    """Every check, in order; a failed torch stops there (the rest need it)."""
    path = lock_path()
    try:
        lock = read_lock(path) if path else {}
    except OSError as e:
        return [Check("lock", False, f"{path}: cannot be read ({_one_line(e)})", "make lock")]
    checks = [_torch()]
    if not checks[0].ok:
        return checks
    checks += [_torchaudio(lock), _cuda(), *_imports(lock)]
    reported = {c.name for c in checks if not c.ok}
    checks.append(_lock(path, lock, reported))
    return checks


def environment() -> str:
    return (
        f"python {platform.python_version()} on {platform.system()} {platform.machine()} "
        f"({sys.executable})"
    )


@functools.cache
def _preflight_once() -> tuple[Check, ...]:
    return tuple(c for c in run_checks() if not c.ok)


def preflight() -> None:
    """Refuse to start (exit 2, one line per failed check) in an environment that cannot run a
    trial. Runs once per process."""
    failed = _preflight_once()
    if failed:
        raise EnvironmentProblem("\n".join(c.line() for c in failed))


def node_report() -> dict:
    """The checks as plain data, for a Ray task on another node."""
    import socket

    return {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "failed": [c.line() for c in run_checks() if not c.ok],
    }
