"""The cache build in shards: parallel builds write the same cache as a serial one, bad files
are reported the same way, and a build killed mid-way resumes from its finished shards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from trainables.data.cache import build_cache, load_cache

ROOT = Path(__file__).resolve().parents[2]


def _corpus(root: Path, n: int, sr: int = 16000, channels: int = 1, broken: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,speaker"]
    rng = np.random.default_rng(0)
    for i in range(n):
        x = 0.2 * np.sin(2 * np.pi * (150 + i) * np.arange(sr) / sr) + 0.01 * rng.normal(size=sr)
        sf.write(root / f"u{i:04d}.wav", np.stack([x] * channels, 1), sr, subtype="PCM_16")
        label = ["angry", "happy", "neutral", "sad", ""][i % 5]
        rows.append(f"u{i:04d}.wav,{label},s{i % 4}")
    if broken:
        (root / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
        (root / "empty.wav").write_bytes(b"")
        sf.write(root / "silent.wav", np.zeros(16000), 16000)
        rows += [f"{b}.wav,angry,s1" for b in ("garbage", "empty", "silent", "missing")]
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def _stat(pid: int) -> list[str] | None:
    try:  # "pid (comm) state ppid ...": split after the command's closing parenthesis
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) and int(st[1]) == pid:
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def _files(cache: Path) -> dict[str, bytes]:
    return {f: (cache / f).read_bytes() for f in ("audio.npy", "index.json", "report.json")}


def test_a_parallel_build_writes_the_serial_builds_cache_and_reports_bad_files_alike(tmp_path):
    root = _corpus(tmp_path / "corpus", 40, sr=22050, channels=2, broken=True)
    said: list[str] = []
    serial = build_cache("manifest", root, tmp_path / "c1", workers=1, progress=said.append)
    parallel = build_cache(
        "manifest", root, tmp_path / "c2", workers=2, shard_files=3, progress=said.append
    )
    assert serial.name == parallel.name  # the same fingerprint
    assert _files(serial) == _files(parallel)  # byte for byte: samples, index, data report
    report = load_cache(parallel).report.to_dict()
    assert report["skipped_counts"] == {"silent": 1, "unreadable": 3}  # garbage, empty, missing
    assert report["resampled"] == 40 and report["downmixed"] == 40 and report["unlabelled"] == 8
    assert not list((tmp_path / "c2").glob(".build-*"))  # the shards are gone once assembled


def test_a_build_killed_mid_way_resumes_from_its_finished_shards(tmp_path):
    """SIGKILL while shards are being decoded by a pool; its processes leave too; the next build
    says it resumes, decodes only the missing shards and writes the cache an uninterrupted build
    writes."""
    root = _corpus(tmp_path / "corpus", 300, sr=44100, channels=2)
    code = (
        "import sys; from trainables.data.cache import build_cache; "
        f"build_cache('manifest', {str(root)!r}, {str(tmp_path / 'c')!r}, workers=2, "
        "shard_files=5, progress=lambda m: None)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 120
    shards: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        shards = list((tmp_path / "c").glob(".build-*/shard-*.json"))
        if len(shards) >= 15:
            break
        time.sleep(0.01)
    pool = _children(proc.pid)  # its decoding processes
    assert pool
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in pool):
        time.sleep(0.2)
    assert not [p for p in pool if _alive(p)]  # they leave with the build
    kept = len(list((tmp_path / "c").glob(".build-*/shard-*.json")))
    assert 15 <= kept < 60, f"killed at {kept}/60 shards"
    assert not list((tmp_path / "c").glob("manifest-*/COMPLETE"))

    said: list[str] = []
    resumed = build_cache("manifest", root, tmp_path / "c", shard_files=5, progress=said.append)
    line = next(m for m in said if "resuming" in m)
    assert f"{kept}/60 shards ({kept * 5:,} files) already decoded" in line, said
    clean = build_cache("manifest", root, tmp_path / "clean", progress=lambda m: None)
    assert resumed.name == clean.name and _files(resumed) == _files(clean)
    assert json.loads((resumed / "index.json").read_text())["fingerprint"] == (
        (clean / "COMPLETE").read_text()
    )


def test_a_build_left_by_another_state_of_the_corpus_is_not_resumed(tmp_path):
    """Shards kept for a fingerprint are only reused by the same fingerprint."""
    root = _corpus(tmp_path / "corpus", 12)
    build_cache("manifest", root, tmp_path / "c", shard_files=4, progress=lambda m: None)
    built = next((tmp_path / "c").glob("manifest-*"))
    stale = tmp_path / "c" / f".build-{built.name}"
    stale.mkdir()
    (stale / "FINGERPRINT").write_text("something else")
    (stale / "shard-00000.json").write_text("{}")
    (built / "COMPLETE").unlink()
    said: list[str] = []
    again = build_cache("manifest", root, tmp_path / "c", shard_files=4, progress=said.append)
    assert not any("resuming" in m for m in said)
    assert (again / "COMPLETE").exists() and len(load_cache(again)) == 12


def test_ray_tasks_build_the_same_cache(tmp_path, ray_2cpu):
    """``executor="ray"`` (what a multi-node cluster uses): shards decoded by Ray tasks."""
    root = _corpus(tmp_path / "corpus", 20, sr=22050, broken=True)
    serial = build_cache("manifest", root, tmp_path / "c1", workers=1, progress=lambda m: None)
    tasks = build_cache(
        "manifest", root, tmp_path / "c2", shard_files=4, executor="ray", progress=lambda m: None
    )
    assert _files(serial) == _files(tasks)
