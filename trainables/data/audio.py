"""Reading audio: one function, and a report of everything that was not plain 16 kHz mono.

Corrupt, empty or too short files are never a crash and never silently dropped: they land in a
:class:`DataReport` with the reason. Other sample rates are resampled, stereo is downmixed, and the
report counts those too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

from sertune.errors import DataError

MIN_DURATION_S = 0.25  # shorter than a syllable: nothing to learn emotion from


class AudioError(DataError):
    """A file cannot be used; ``reason`` is a short machine-friendly tag."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DataReport:
    """What happened to every file of a corpus while it was decoded."""

    corpus: str = ""
    found: int = 0
    used: int = 0
    resampled: int = 0
    downmixed: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> files
    excluded_labels: dict[str, int] = field(
        default_factory=dict
    )  # label -> count (not in classes)
    class_counts: dict[str, int] = field(default_factory=dict)
    unlabelled: int = 0

    def skip(self, path: str | Path, reason: str) -> None:
        self.skipped.setdefault(reason, []).append(str(path))

    @property
    def n_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "corpus": self.corpus,
            "found": self.found,
            "used": self.used,
            "resampled": self.resampled,
            "downmixed": self.downmixed,
            "skipped": {k: sorted(v) for k, v in sorted(self.skipped.items())},
            "skipped_counts": {k: len(v) for k, v in sorted(self.skipped.items())},
            "excluded_labels": dict(sorted(self.excluded_labels.items())),
            "class_counts": dict(sorted(self.class_counts.items())),
            "unlabelled": self.unlabelled,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DataReport:
        keys = ("corpus", "found", "used", "resampled", "downmixed", "skipped")
        r = cls(**{k: d[k] for k in keys})
        r.excluded_labels = dict(d.get("excluded_labels", {}))
        r.class_counts = dict(d.get("class_counts", {}))
        r.unlabelled = int(d.get("unlabelled", 0))
        return r

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    def summary(self) -> str:
        lines = [
            f"{self.corpus}: {self.used}/{self.found} files used "
            f"({self.resampled} resampled, {self.downmixed} downmixed, {self.n_skipped} skipped)"
        ]
        if self.class_counts:
            counts = ", ".join(f"{k}={v}" for k, v in sorted(self.class_counts.items()))
            lines.append(f"  classes: {counts}; unlabelled={self.unlabelled}")
        for reason, files in sorted(self.skipped.items()):
            shown = ", ".join(Path(f).name for f in files[:3])
            more = f" (+{len(files) - 3} more)" if len(files) > 3 else ""
            lines.append(f"  skipped {len(files)} {reason}: {shown}{more}")
        if self.excluded_labels:
            ex = ", ".join(f"{k}={v}" for k, v in sorted(self.excluded_labels.items()))
            lines.append(f"  labels outside the class set (not used): {ex}")
        return "\n".join(lines)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling (anti-aliased), (L,) float32 -> (L·sr_out/sr_in,)."""
    from scipy.signal import resample_poly

    g = gcd(sr_in, sr_out)
    return resample_poly(x, sr_out // g, sr_in // g).astype(np.float32)


def read_audio(
    path: str | Path, sample_rate: int = 16000, report: DataReport | None = None
) -> np.ndarray:
    """Read ``path`` as mono float32 at ``sample_rate``; raise :class:`AudioError` if unusable.

    Resampling and downmixing are counted in ``report`` when one is given.
    """
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (L, C)
    except Exception as e:  # soundfile raises several types for broken headers
        raise AudioError(
            "unreadable", str(e).splitlines()[0] if str(e) else type(e).__name__
        ) from e
    if x.size == 0:
        raise AudioError("empty")
    if not np.isfinite(x).all():
        raise AudioError("non_finite_samples")
    if x.shape[1] > 1:
        x = x.mean(axis=1, keepdims=True)
        if report is not None:
            report.downmixed += 1
    x = x[:, 0]
    if sr != sample_rate:
        x = resample(x, sr, sample_rate)
        if report is not None:
            report.resampled += 1
    if x.shape[0] < MIN_DURATION_S * sample_rate:
        raise AudioError("too_short", f"{x.shape[0] / sample_rate:.3f}s < {MIN_DURATION_S}s")
    if float(np.abs(x).max()) == 0.0:
        raise AudioError("silent")
    return x.astype(np.float32, copy=False)
