"""``sertune bench data``: a corpus of a given size through the cache build and the training input.

1. A corpus of ``hours`` of speech-like audio (wav files and a manifest, written once and reused;
   or the user's own manifest): the cache build with 1 process and with ``workers``, timed on
   the same files (read once beforehand, so neither build pays for the cold disk).
2. Training samples/s with the corpus resident on the device against streamed from the cache's
   memory map (its budget forced below the corpus size), each in its own process - a slot - in
   alternating rounds: the same batches (``trainables.common.batches``), augmentation bank,
   log-mel and a small MTL-AUG model step; and each slot's peak resident memory, private
   (anonymous) and file-backed (the memory map's pages) apart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

CLIP_S = 4.0
SMALL_MODEL = {
    "model.conv_channels": [8, 16],
    "model.lstm_hidden": 32,
    "model.attn_dim": 16,
    "features.n_mels": 40,
    "features.segment_s": 2.0,
}


def make_corpus(root: Path, hours: float, sample_rate: int = 16000, log=print) -> Path:
    """``hours`` of speech-like clips (``CLIP_S`` s each, 8 speakers, 4 emotions) and a manifest;
    kept at ``root`` and reused when it is there already."""
    import soundfile as sf

    from trainables.data.synth import make_speakers, synth_utterance

    manifest = root / "manifest.csv"
    n = max(8, int(round(hours * 3600 / CLIP_S)))
    if manifest.exists() and sum(1 for _ in manifest.open()) - 1 == n:
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    speakers = make_speakers(8, rng)
    emotions = ("angry", "happy", "neutral", "sad")
    pool = [
        synth_utterance(speakers[i % 8], emotions[i % 4], rng) for i in range(64)
    ]  # stitched and varied below: syllables are slow to synthesise, files are not
    t0, rows = time.monotonic(), ["path,label,speaker"]
    length = int(CLIP_S * 16000)
    for i in range(n):
        k = i % 64
        w = np.tile(pool[k], int(np.ceil(length / len(pool[k]))))[:length]
        w = np.roll(w, int(rng.integers(0, length))) * rng.uniform(0.5, 1.0)
        w = w + rng.normal(0, 0.003, length).astype(np.float32)
        if sample_rate != 16000:
            from trainables.data.audio import resample

            w = resample(w.astype(np.float32), 16000, sample_rate)
        sub = root / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        sf.write(sub / f"u{i:06d}.wav", w, sample_rate, subtype="PCM_16")
        rows.append(f"{sub.name}/u{i:06d}.wav,{emotions[k % 4]},{speakers[k % 8].name}")
        if i and i % 2000 == 0:
            log(f"[bench data] wrote {i:,}/{n:,} files ({time.monotonic() - t0:.0f}s)")
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def _read_all(root: Path) -> None:
    for p in root.rglob("*.wav"):
        with p.open("rb") as fh:
            while fh.read(1 << 20):
                pass


def build_times(manifest: Path, workers: int, log=print) -> dict[str, Any]:
    """Seconds to build the cache with 1 and with ``workers`` processes (fresh cache roots)."""
    from trainables.data.cache import build_cache

    _read_all(manifest.parent)
    out: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="sertune-bench-data-"))
    try:
        for w in (1, workers):
            t0 = time.perf_counter()
            path = build_cache(
                "manifest", manifest, tmp / f"w{w}", workers=w, progress=lambda m: None
            )
            out[w] = time.perf_counter() - t0
            log(f"[bench data] cache build, {w} process(es): {out[w]:.1f}s")
        keep = manifest.parent.parent / "cache"
        if not (keep / path.name).exists():
            keep.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), keep / path.name)
        out["cache"] = str(keep / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- one slot (a child process) -------------------------------------------------------------------


class _Peak:
    """Peak RssAnon / RssFile of this process, and of the pages of the corpus's memory map
    (``audio.npy`` in ``/proc/self/smaps``), sampled every 50 ms."""

    def __init__(self):
        self.anon = self.file = self.corpus = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.05)

    def sample(self) -> None:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    self.anon = max(self.anon, int(line.split()[1]) * 1024)
                elif line.startswith("RssFile:"):
                    self.file = max(self.file, int(line.split()[1]) * 1024)
        mapped, inside = 0, False
        with open("/proc/self/smaps") as fh:
            for line in fh:
                if not line[0].isupper():  # a mapping's header: address range, ..., path
                    inside = line.rstrip().endswith("audio.npy")
                elif inside and line.startswith("Rss:"):
                    mapped += int(line.split()[1]) * 1024
        self.corpus = max(self.corpus, mapped)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()
        self.sample()


def slot(opts: dict[str, Any]) -> dict[str, Any]:
    """Train ``opts["steps"]`` steps of a small MTL-AUG model on the cache, the corpus placed as
    ``opts["placement"]`` says; samples/s after ``opts["warmup"]`` steps, and peak memory."""
    import torch

    from trainables.common.batches import TrainBatches

    from .augment import AugmentationBank
    from .config import MTLAugConfig
    from .model import MTLAugModel, mtl_aug_loss
    from .train import Resident

    peak = _Peak()
    torch.set_num_threads(int(opts.get("threads", 1)))
    dev = torch.device(opts["device"])
    resident = Resident({}, dev, opts["placement"])
    corpus, utts = resident.corpus(opts["cache"])
    cfg = MTLAugConfig.from_dict({**SMALL_MODEL, "optim.batch_size": opts["batch"]})
    torch.manual_seed(0)
    bank = AugmentationBank(cfg.aug, cfg.features).to(dev)
    model = MTLAugModel(cfg.model, cfg.features.n_mels).to(dev)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    labels = torch.from_numpy(np.asarray(corpus.labels)).to(dev)
    pool = np.arange(len(corpus))
    batches = TrainBatches(utts, None, pool, labels, bank.crop_length)
    bs, warm, steps = opts["batch"], opts["warmup"], opts["steps"]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))
    plan = [order[(i * bs) % (len(pool) - bs) :][:bs] for i in range(warm + steps)]
    gen = torch.Generator(device=dev).manual_seed(0)
    it = batches.epoch(plan, seed=0)
    t0 = None
    for i in range(warm + steps):
        if i == warm:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
        wav, valid, y = next(it)
        feats, aug = bank(wav, gen, valid=valid)
        loss = mtl_aug_loss(model(feats), y, aug, cfg.loss).total
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    it.close()
    peak.stop()
    return {
        "mode": resident.mode().split()[-1],
        "note": resident.notes[0] if resident.notes else "",
        "samples_per_s": steps * bs / dt,
        "peak_anon": peak.anon,
        "peak_file": peak.file,
        "peak_corpus_map": peak.corpus,
        "gpu_peak": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0,
        "corpus_bytes": int(corpus.audio.nbytes),
    }


def _run_slot(opts: dict[str, Any]) -> dict[str, Any]:
    p = subprocess.run(
        [sys.executable, "-m", "trainables.mtl_aug.bench_data", json.dumps(opts)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(opts.get("threads", 1))},
    )
    if p.returncode:
        raise RuntimeError(f"bench data slot failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(
    hours: float,
    workers: int,
    device: str,
    budget_mb: float | None,
    steps: int,
    rounds: int,
    batch: int | None,
    root: str | None,
    home: Path,
    sample_rate: int = 16000,
    log=print,
) -> dict[str, Any]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if root:
        manifest = Path(root).expanduser()
        manifest = manifest / "manifest.csv" if manifest.is_dir() else manifest
        hours_said = "your corpus"
    else:
        corpus_dir = home / "bench-data" / f"corpus-{hours:g}h-{sample_rate}"
        log(
            f"[bench data] corpus: {hours:g} h of {CLIP_S:g} s clips at {sample_rate} Hz in {corpus_dir}"
        )
        manifest = make_corpus(corpus_dir, hours, sample_rate, log)
        hours_said = f"{hours:g} h"
    files = sum(1 for _ in manifest.open()) - 1
    built = build_times(manifest, workers, log)
    size = Path(built["cache"], "audio.npy").stat().st_size
    budget = budget_mb if budget_mb is not None else size / 1e6 / 4
    batch = batch or (256 if device == "cuda" else 32)
    base = {"cache": built["cache"], "device": device, "batch": batch, "steps": steps}
    base["warmup"] = max(3, steps // 10)
    modes = {
        "resident": {**base, "placement": {"corpus_on_device": "always"}},
        "streamed": {**base, "placement": {"corpus_budget_mb": budget}},
    }
    res: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for r in range(rounds):
        for m in ("resident", "streamed") if r % 2 == 0 else ("streamed", "resident"):
            res[m].append(_run_slot(modes[m]))
            log(
                f"[bench data] round {r + 1}/{rounds} {m}: {res[m][-1]['samples_per_s']:,.0f} samples/s"
            )
    med = {m: float(np.median([x["samples_per_s"] for x in v])) for m, v in res.items()}
    out = {
        "hours": hours_said,
        "files": files,
        "cache_mb": size / 1e6,
        "build_s": {1: built[1], workers: built[workers]},
        "workers": workers,
        "samples_per_s": med,
        "ratio": med["streamed"] / med["resident"],
        "budget_mb": budget,
        "slots": {m: v[-1] for m, v in res.items()},
        "device": device,
        "batch": batch,
    }
    _print(out, log)
    return out


def _print(o: dict[str, Any], log) -> None:
    w = o["workers"]
    b1, bw = o["build_s"][1], o["build_s"][w]
    log(f"corpus: {o['hours']}, {o['files']:,} files, cache {o['cache_mb']:,.0f} MB int16")
    log(f"cache build   1 process : {b1:7.1f} s  ({o['files'] / b1:,.0f} files/s)")
    log(
        f"cache build {w:>3} processes: {bw:7.1f} s  ({o['files'] / bw:,.0f} files/s)   speed-up x{b1 / bw:.2f}"
    )
    for m in ("resident", "streamed"):
        s = o["slots"][m]
        gpu = f", GPU peak {s['gpu_peak'] / 1e6:,.0f} MB" if s["gpu_peak"] else ""
        log(
            f"training {m:9}: {o['samples_per_s'][m]:9,.0f} samples/s (median)   peak RSS: private "
            f"{s['peak_anon'] / 1e6:,.0f} MB, file-backed {s['peak_file'] / 1e6:,.0f} MB of which "
            f"the corpus map {s['peak_corpus_map'] / 1e6:,.0f} MB{gpu}"
        )
    log(f"  streamed slot: {o['slots']['streamed']['note']}")
    log(
        "  (private: the process's own memory - a resident corpus is in it; file-backed: "
        "mapped files, torch's libraries included; the corpus map's pages are the page cache's, "
        "shared by every slot of the node)"
    )
    log(
        f"streamed/resident: {o['ratio']:.2f}   (batch {o['batch']} on {o['device']}, budget "
        f"{o['budget_mb']:,.0f} MB < corpus {o['cache_mb']:,.0f} MB)"
    )


if __name__ == "__main__":  # one slot, its options as JSON: prints its figures as JSON
    print(json.dumps(slot(json.loads(sys.argv[1]))))
