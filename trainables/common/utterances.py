"""Utterances on the device, and the one input path from a waveform to what a model sees.

Every place that turns speech into model input goes through :class:`Windowing` and
:func:`utterance_logits`: validation and test in the training loop, the robustness report,
``sertune report`` and the served model (``predict_proba``). The rule, in one place:

* a clip is cut into windows of ``segment`` samples (the model's ``features.segment_s``), a new
  window every ``hop`` samples (half a segment), the last one aligned to the clip's end;
* a clip shorter than one segment is one window, zero-padded at the end, exactly as a training
  crop of a short clip is;
* the model's logits are averaged over a clip's windows.

Training draws one random crop per clip instead (augmentation); its crop is one window of the
same length, padded the same way.

Storage: utterances lie back to back in one 1-D tensor (``audio``: int16 as decoded, or float),
with ``offsets`` and ``lengths`` per utterance, so a whole corpus moves to the device once and
batches are cut by index arithmetic. A corpus larger than its slot's budget is *streamed*: its
``audio`` stays on the host, a memory map of the decoded cache (one page cache for every slot of
the node), while offsets, lengths and labels are on the device; :meth:`Utterances.take` gathers
the samples a batch needs on the host and copies them over, so every reader below works on both.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

Forward = Callable[[torch.Tensor], torch.Tensor]  # waveforms (B, segment) -> logits (B, C)


class HostAudio:
    """A decoded cache's ``audio.npy`` mapped into memory, read by gathers of sample positions.

    The pages a gather touches count towards the process's resident set until the kernel drops
    them; after every ``window_bytes`` read the mapping is told to let go (``MADV_DONTNEED``:
    the page cache keeps them, so the next read is a memory copy, not a disk read), which keeps a
    streaming slot's resident memory near its budget however large the corpus.
    """

    def __init__(self, path: str | Path, window_bytes: int = 256 << 20):
        # copy-on-write: a writable view torch accepts without copying; nothing writes to it
        self.array = np.load(Path(path), mmap_mode="c")
        self.tensor = torch.from_numpy(self.array)
        self.window_bytes = max(int(window_bytes), 1 << 20)
        self._read = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    def gather(self, pos: torch.Tensor) -> torch.Tensor:
        """Samples at ``pos`` (a CPU int64 tensor of any shape), int16, same shape."""
        out = self.tensor[pos]
        self._count(out.numel() * 2 + (pos.shape[0] if pos.dim() > 1 else 1) * mmap.PAGESIZE)
        return out

    def crops(self, start: np.ndarray, length: np.ndarray, n: int) -> torch.Tensor:
        """(B, n) int16: each row ``n`` samples from ``start`` (a clip's ``length`` at most, zeros
        after it) - one slice copy per row, far less work than gathering B x n positions."""
        out = np.zeros((len(start), n), dtype=np.int16)
        read = 0
        for i, (s, m) in enumerate(
            zip(start.tolist(), np.minimum(length, n).tolist(), strict=True)
        ):
            out[i, :m] = self.array[s : s + m]
            read += m
        self._count(read * 2 + len(start) * mmap.PAGESIZE)
        return torch.from_numpy(out)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self._read += nbytes
            if self._read >= self.window_bytes:
                self._read = 0
                self.release()

    def release(self) -> None:
        _release(self.array)


def _release(array) -> None:
    """Let the kernel drop this process's pages of a memory-mapped array (they stay cached)."""
    m = getattr(array, "_mmap", None)
    if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)


@dataclass
class Utterances:
    audio: torch.Tensor  # (T,) int16 (a decoded cache) or float (perturbed copies)
    offsets: torch.Tensor  # (U,) int64
    lengths: torch.Tensor  # (U,) int64
    labels: torch.Tensor  # (U,) int64, -1 = unlabelled
    host: HostAudio | None = None  # streamed: ``audio`` is this memory map, on the host

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    @property
    def streamed(self) -> bool:
        return self.host is not None

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    @classmethod
    def from_corpus(
        cls, corpus, device: torch.device, streamed: bool = False, window_bytes: int = 256 << 20
    ) -> Utterances:
        """A decoded corpus (``trainables.data.cache.DecodedCorpus``) moved onto ``device`` once,
        or, ``streamed``, left on the host as a memory map of its cache (only the per-utterance
        arrays move)."""
        host = HostAudio(Path(corpus.path) / "audio.npy", window_bytes) if streamed else None
        if host is None:
            audio = torch.from_numpy(np.array(corpus.audio)).to(device)  # int16, a copy
            _release(corpus.audio)  # the cache's pages: read once, not held twice
        return cls(
            audio=host.tensor if host else audio,
            offsets=torch.from_numpy(np.asarray(corpus.offsets)).to(device),
            lengths=torch.from_numpy(np.asarray(corpus.lengths)).to(device),
            labels=torch.from_numpy(np.asarray(corpus.labels)).to(device),
            host=host,
        )

    def take(self, pos: torch.Tensor) -> torch.Tensor:
        """``audio[pos]`` on this utterances' device, wherever ``audio`` lives."""
        if self.host is None:
            return self.audio[pos]
        return to_device(self.host.gather(pos.cpu()), self.device)

    @classmethod
    def from_waveforms(
        cls, waves: list, device: torch.device | str = "cpu", labels=None
    ) -> Utterances:
        """Float waveforms (any lengths) -> utterances stored back to back."""
        arrays = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
        lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        audio = np.concatenate(arrays) if arrays else np.zeros(0, np.float32)
        y = np.full(len(arrays), -1) if labels is None else np.asarray(labels)
        return cls(
            audio=torch.from_numpy(audio).to(device),
            offsets=torch.from_numpy(offsets).to(device),
            lengths=torch.from_numpy(lengths).to(device),
            labels=torch.from_numpy(y.astype(np.int64)).to(device),
        )

    def select(self, idx: torch.Tensor | np.ndarray) -> Utterances:
        """A contiguous float copy of utterances ``idx`` (for perturbation and attacks)."""
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.device)
        lengths = self.lengths[idx]
        offsets = torch.cumsum(lengths, 0) - lengths
        owner = torch.repeat_interleave(torch.arange(idx.numel(), device=self.device), lengths)
        rel = torch.arange(owner.numel(), device=self.device) - offsets[owner]
        audio = _as_float(self.take(self.offsets[idx][owner] + rel))
        return Utterances(audio, offsets, lengths, self.labels[idx])

    def with_audio(self, audio: torch.Tensor) -> Utterances:
        return Utterances(audio, self.offsets, self.lengths, self.labels)

    def owner(self) -> torch.Tensor:
        """(T,) the utterance of each sample (for utterances stored contiguously, in order)."""
        return torch.repeat_interleave(torch.arange(len(self), device=self.device), self.lengths)

    def crops(
        self, idx: torch.Tensor, length: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) utterance indices -> ((B, length) float crops, (B, length) bool ``valid``).

        Random crops when a generator is given (training), else from each clip's start. Clips
        shorter than ``length`` are zero-padded at the end; ``valid`` marks their real samples.
        """
        off, ln = self.offsets[idx], self.lengths[idx]
        slack = (ln - length).clamp_min(0)
        if generator is None:
            start = off
        else:
            r = torch.rand(idx.shape[0], generator=generator, device=self.device)
            start = off + (r * (slack + 1).float()).long().clamp_max(slack)
        ar = torch.arange(length, device=self.device)
        valid = ar.unsqueeze(0) < ln.unsqueeze(1)  # (B, length)
        pos = torch.where(valid, start.unsqueeze(1) + ar, torch.zeros_like(ar))
        return _as_float(self.take(pos)) * valid, valid


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto ``device``; through pinned memory, without blocking, to a GPU."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 32768.0 if x.dtype == torch.int16 else x


@dataclass(frozen=True)
class Windowing:
    """Which windows of each clip the model sees (see the module docstring)."""

    segment: int  # samples per window: the model's training crop
    hop: int  # samples between window starts

    @classmethod
    def for_segment(cls, segment: int) -> Windowing:
        return cls(segment=segment, hop=max(1, segment // 2))

    def plan(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U,) clip lengths -> (owner (W,), start (W,)): each window's clip and start sample."""
        slack = (lengths - self.segment).clamp_min(0)
        n_win = 1 + torch.div(slack + self.hop - 1, self.hop, rounding_mode="floor")
        owner = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=lengths.device), n_win
        )
        first = torch.cumsum(n_win, 0) - n_win
        k = torch.arange(owner.numel(), device=lengths.device) - first[owner]
        start = torch.minimum(k * self.hop, slack[owner])  # the last window ends at the clip's end
        return owner, start

    def gather(
        self, utts: Utterances, idx: torch.Tensor, owner: torch.Tensor, start: torch.Tensor
    ) -> torch.Tensor:
        """Windows (W, segment) of clips ``idx[owner]``; zeros past a clip's end."""
        ar = torch.arange(self.segment, device=utts.device)
        clip = idx[owner]
        rel = start.unsqueeze(1) + ar  # (W, segment)
        valid = rel < utts.lengths[clip].unsqueeze(1)
        pos = torch.where(valid, utts.offsets[clip].unsqueeze(1) + rel, torch.zeros_like(rel))
        return _as_float(utts.take(pos)) * valid


def utterance_logits(
    forward: Forward,
    utts: Utterances,
    windowing: Windowing,
    idx: torch.Tensor | None = None,
    batch_windows: int = 256,
) -> torch.Tensor:
    """Logits (len(idx), C) of clips ``idx`` (default: all), averaged over each clip's windows.

    Differentiable in ``utts.audio`` (attacks use it); wrap in ``torch.no_grad()`` otherwise.
    """
    if idx is None:
        idx = torch.arange(len(utts), device=utts.device)
    owner, start = windowing.plan(utts.lengths[idx])
    sums, counts = None, torch.bincount(owner, minlength=idx.numel()).clamp_min(1)
    for i in range(0, owner.numel(), batch_windows):
        o = owner[i : i + batch_windows]
        logits = forward(windowing.gather(utts, idx, o, start[i : i + batch_windows]))
        if sums is None:
            sums = torch.zeros(idx.numel(), logits.shape[1], device=logits.device)
        sums = sums.index_add(0, o, logits)
    if sums is None:  # no clips
        return torch.zeros(0, 0, device=utts.device)
    return sums / counts.unsqueeze(1).to(sums.dtype)


def stratified_subset(labels: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """Positions of at most ``n`` items, each class keeping its share (deterministic, sorted)."""
    labels = np.asarray(labels)
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    for i in np.argsort(-(counts / counts.sum() * n - quota))[: n - quota.sum()]:
        quota[i] += 1  # largest remainders first
    picked = [
        rng.permutation(np.nonzero(labels == c)[0])[:q]
        for c, q in zip(classes, quota, strict=True)
    ]
    return np.sort(np.concatenate(picked)) if picked else np.arange(0)
