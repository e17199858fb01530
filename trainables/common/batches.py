"""A trial's training batches: random crops of its training pool, resident or streamed.

The pool is the training clips of the main corpus (``train_idx``) followed by every clip of an
optional unlabelled pool (``extra``). Each step takes the pool positions the loop hands it and
returns ``(crops, valid, labels)`` on the device.

Where a crop starts is drawn on the host from a generator that depends only on (seed, rank,
epoch), in step order; the samples are then read where the corpus lives: on the device by index
arithmetic (resident), or on the host from the cache's memory map, pinned and copied over
(streamed: one slice copy per row). Both read the same int16 samples and turn them into float
crops on the device the same way, so a seed gives bit-identical model inputs in either mode. When any corpus is streamed, a background
thread prepares the next ``prefetch`` steps' host-side samples while the device trains on the
current one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .utterances import Utterances, _as_float, to_device

UNLABELLED = -1
CROP_SALT = 0x2545F491  # crop starts: a stream of their own, apart from dropout's


class TrainBatches:
    def __init__(
        self,
        utts: Utterances,
        extra: Utterances | None,
        train_idx: np.ndarray,
        train_labels: torch.Tensor,
        length: int,
        prefetch: int = 2,
    ):
        self.sources = [utts] if extra is None else [utts, extra]
        self.train_idx = np.asarray(train_idx, dtype=np.int64)
        self.n_main = len(self.train_idx)
        self.labels = train_labels  # (U,) on the device: this trial's labels of the main corpus
        self.length = length
        self.device = utts.device
        self.prefetch = max(1, prefetch)
        int16 = all(s.audio.dtype == torch.int16 for s in self.sources)  # decoded caches
        self.dtype = torch.int16 if int16 else torch.float32
        self._host = [
            (s.offsets.cpu().numpy(), s.lengths.cpu().numpy()) for s in self.sources
        ]  # per source: offsets and lengths on the host, where crop starts are drawn

    @property
    def streamed(self) -> bool:
        return any(s.streamed for s in self.sources)

    def epoch(self, steps: Sequence[torch.Tensor], seed: int) -> Iterator[tuple]:
        """The batches of ``steps`` (each a CPU tensor of pool positions), in order."""
        gen = torch.Generator().manual_seed((seed ^ CROP_SALT) % (2**63 - 1))
        plans = (self._plan(pos, gen) for pos in steps)
        if not self.streamed:
            for plan in plans:
                yield self._finish(plan)
            return
        yield from self._prefetched(plans)

    # -- host side: which clip, where its crop starts, and (streamed) its samples ------------------
    def _plan(self, pos: torch.Tensor, gen: torch.Generator) -> dict:
        pos = pos.cpu().numpy()
        in_main = pos < self.n_main
        parts = []
        for s, (offsets, lengths) in enumerate(self._host):
            rows = np.nonzero(in_main if s == 0 else ~in_main)[0]
            clip = self.train_idx[pos[rows]] if s == 0 else pos[rows] - self.n_main
            ln = torch.from_numpy(lengths[clip])
            parts.append({"rows": rows, "clip": clip, "off": offsets[clip], "len": ln})
        # one draw per row, in row order, whichever source the row reads
        r = torch.rand(len(pos), generator=gen)
        for p in parts:
            ln = p["len"]
            slack = (ln - self.length).clamp_min(0)
            p["start"] = torch.from_numpy(p["off"]) + (
                r[torch.from_numpy(p["rows"])] * (slack + 1).float()
            ).long().clamp_max(slack)
        for src, p in zip(self.sources, parts, strict=True):
            if src.streamed and len(p["rows"]):
                p["samples"] = src.host.crops(p["start"].numpy(), p["len"].numpy(), self.length)
                if self.device.type == "cuda":
                    p["samples"] = p["samples"].pin_memory()
        return {"n": len(pos), "parts": parts}

    # -- device side: the samples there, as float crops, with the labels ----------------------------
    def _finish(self, plan: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, dev, length = plan["n"], self.device, self.length
        raw = torch.zeros(n, length, dtype=self.dtype, device=dev)
        lens = torch.zeros(n, dtype=torch.int64, device=dev)
        y = torch.full((n,), UNLABELLED, dtype=torch.long, device=dev)
        for s, (src, p) in enumerate(zip(self.sources, plan["parts"], strict=True)):
            if not len(p["rows"]):
                continue
            rows = torch.from_numpy(p["rows"]).to(dev)
            if "samples" in p:
                raw[rows] = self._cast(to_device(p["samples"], dev))
            else:
                start, ln = p["start"].to(dev), p["len"].to(dev)
                raw[rows] = self._cast(src.audio[_positions(start, ln, length)])
            lens[rows] = p["len"].to(dev)
            if s == 0:
                y[rows] = self.labels[torch.from_numpy(p["clip"]).to(dev)]
        valid = torch.arange(length, device=dev).unsqueeze(0) < lens.unsqueeze(1)
        raw = raw.masked_fill(~valid, 0)  # past a clip's end: zeros, whichever way it was read
        return _as_float(raw) * valid, valid, y

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dtype == torch.int16 else _as_float(x)

    def _prefetched(self, plans: Iterator[dict]) -> Iterator[tuple]:
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def load() -> None:
            try:
                for plan in plans:
                    while not stop.is_set():
                        try:
                            ready.put(plan, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ready.put(done)
            except BaseException as e:  # handed to the loop, raised there
                ready.put(e)

        loader = threading.Thread(target=load, name="sertune-batches", daemon=True)
        loader.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._finish(item)
        finally:  # the trial stopped mid-epoch, or the epoch ended
            stop.set()
            loader.join(timeout=10)


def _positions(start: torch.Tensor, length: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) crop starts and clip lengths -> (B, n) sample positions; 0 past a clip's end (the
    padding reads sample 0, then ``valid`` zeroes it)."""
    ar = torch.arange(n, device=start.device)
    valid = ar.unsqueeze(0) < length.unsqueeze(1)
    return torch.where(valid, start.unsqueeze(1) + ar, torch.zeros_like(ar))
