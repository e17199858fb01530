"""The decoded cache: a corpus decoded once to 16 kHz mono int16, then reused by every trial.

Layout of one cache folder (``<cache_root>/<corpus>-<fingerprint[:16]>/``)::

    audio.npy     int16 (N,)    every utterance back to back
    index.json    offsets, lengths, labels, speakers, groups, splits, source paths
    report.json   the data report (what was resampled, downmixed, skipped and why)
    COMPLETE      written last: a folder without it is a crashed build and is rebuilt

The fingerprint covers the corpus name, each file's relative path, size and mtime, the sample
rate and the cache format version, so an edited corpus gets a new cache and an unchanged one is
never decoded twice. A trial moves ``audio.npy`` onto its device once (an IEMOCAP-size corpus is
~1.4 GB as int16).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import AudioError, DataReport, read_audio
from .corpora import EMOTIONS_4, CorpusError, Utterance, scan_corpus

CACHE_VERSION = 2  # 2: int16 = round(x * 32768), so 16-bit files round-trip exactly


def fingerprint(corpus: str, items: list[Utterance], sample_rate: int) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{corpus}|{sample_rate}".encode())
    for it in sorted(items, key=lambda u: u.path):
        try:
            st = os.stat(it.path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"|{it.path}|{stamp}|{it.label}|{it.speaker}|{it.group}|{it.split}".encode())
    return h.hexdigest()


@dataclass
class DecodedCorpus:
    """A loaded cache: int16 audio and per-utterance arrays (numpy, host memory)."""

    path: Path
    audio: np.ndarray  # int16 (N,)
    offsets: np.ndarray  # int64 (U,)
    lengths: np.ndarray  # int64 (U,)
    labels: np.ndarray  # int64 (U,), -1 = unlabelled
    speakers: list[str]
    groups: list[str]
    splits: list[str | None]
    utt_ids: list[str]
    label_names: tuple[str, ...]
    sample_rate: int
    fingerprint: str
    report: DataReport

    def __len__(self) -> int:
        return len(self.offsets)

    def waveform(self, i: int) -> np.ndarray:
        o, n = int(self.offsets[i]), int(self.lengths[i])
        return self.audio[o : o + n].astype(np.float32) / 32768.0


def build_cache(
    corpus: str,
    root: str | Path,
    cache_root: str | Path,
    sample_rate: int = 16000,
    progress: Callable[[str], None] | None = None,
    allow_absolute_paths: bool = False,
) -> Path | str:
    """Decode ``corpus`` at ``root`` into ``cache_root`` unless an identical cache exists.

    Returns the cache folder (a URI when ``cache_root`` is ``s3://``). Unusable files are skipped
    and listed in ``report.json``, with the reason; so are manifest paths outside the corpus root.
    """
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if str(cache_root).startswith("s3://"):  # build on this machine, then publish
        from .remote import publish_cache

        local_root = Path(tempfile.gettempdir()) / "sertune-cache-build"
        return publish_cache(
            build_cache(corpus, root, local_root, sample_rate, say, allow_absolute_paths),
            str(cache_root),
        )
    items, excluded, rejected = scan_corpus(corpus, root, allow_absolute_paths)
    fp = fingerprint(corpus, items, sample_rate)
    cache_root = Path(cache_root).expanduser()
    out = cache_root / f"{corpus}-{fp[:16]}"
    if (out / "COMPLETE").exists():
        return out
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent searches decode a corpus once
        if (out / "COMPLETE").exists():
            return out
        return _decode(corpus, root, items, excluded, rejected, fp, out, sample_rate, say)


def _decode(corpus, root, items, excluded, rejected, fp, out, sample_rate, say) -> Path:
    cache_root = out.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{corpus}-", dir=cache_root))
    n_rejected = sum(len(v) for v in rejected.values())
    report = DataReport(corpus=corpus, found=len(items) + sum(excluded.values()) + n_rejected)
    report.excluded_labels = dict(excluded)
    for reason, paths in rejected.items():
        for p in paths:
            report.skip(p, reason)
    chunks, rows, offset = [], [], 0
    t0, last = time.monotonic(), time.monotonic()
    for n, it in enumerate(items, start=1):
        try:
            x = read_audio(it.path, sample_rate, report)
        except AudioError as e:
            report.skip(it.path, e.reason)
            continue
        pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
        chunks.append(pcm)
        label = EMOTIONS_4.index(it.label) if it.label is not None else -1
        if it.label is None:
            report.unlabelled += 1
        else:
            report.class_counts[it.label] = report.class_counts.get(it.label, 0) + 1
        rows.append(
            {
                "id": it.utt_id,
                "path": it.path,
                "speaker": it.speaker,
                "group": it.group,
                "split": it.split,
                "label": label,
                "offset": offset,
                "length": int(pcm.shape[0]),
            }
        )
        offset += pcm.shape[0]
        if time.monotonic() - last > 5.0:
            last = time.monotonic()
            say(f"[cache] {corpus}: decoded {n}/{len(items)} files ({last - t0:.0f}s)")
    report.used = len(rows)
    if not rows:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CorpusError(f"{root}: no usable audio in corpus {corpus!r}\n{report.summary()}")
    np.save(tmp / "audio.npy", np.concatenate(chunks))
    index = {
        "version": CACHE_VERSION,
        "corpus": corpus,
        "root": str(root),
        "fingerprint": fp,
        "sample_rate": sample_rate,
        "label_names": list(EMOTIONS_4),
        "utterances": rows,
    }
    (tmp / "index.json").write_text(json.dumps(index))
    report.save(tmp / "report.json")
    (tmp / "COMPLETE").write_text(fp)
    if out.exists():  # a crashed earlier build
        shutil.rmtree(out)
    tmp.rename(out)
    say(f"[cache] {report.summary()}")
    return out


def load_cache(path: str | Path) -> DecodedCorpus:
    """Load a cache folder; an ``s3://`` cache is first pulled to this node (once, verified)."""
    if str(path).startswith("s3://"):
        from .remote import ensure_local

        path = ensure_local(str(path))
    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise FileNotFoundError(f"{path}: not a complete decoded cache (no COMPLETE marker)")
    index = json.loads((path / "index.json").read_text())
    rows = index["utterances"]
    return DecodedCorpus(
        path=path,
        audio=np.load(path / "audio.npy", mmap_mode="r"),
        offsets=np.array([r["offset"] for r in rows], dtype=np.int64),
        lengths=np.array([r["length"] for r in rows], dtype=np.int64),
        labels=np.array([r["label"] for r in rows], dtype=np.int64),
        speakers=[r["speaker"] for r in rows],
        groups=[r["group"] for r in rows],
        splits=[r["split"] for r in rows],
        utt_ids=[r["id"] for r in rows],
        label_names=tuple(index["label_names"]),
        sample_rate=int(index["sample_rate"]),
        fingerprint=index["fingerprint"],
        report=DataReport.from_dict(json.loads((path / "report.json").read_text())),
    )


def speaker_independent_split(
    corpus: DecodedCorpus,
    fold: int = 0,
    n_folds: int | None = None,
    label_fraction: float = 1.0,
    label_seed: int = 0,
    cv: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Indices of ``train``, ``val``, ``test`` and ``unlabelled`` with no speaker group shared.

    Groups (sessions or speakers) are sorted and dealt round-robin into ``n_folds`` folds
    (default: one per group, at most 5). Fold ``fold`` is the test set, the next fold the
    validation set (what searches optimise), the rest trains. A manifest's own split column
    wins over folds. Unlabelled utterances only ever train (auxiliary losses).

    ``label_fraction`` < 1 is the semi-supervised setting: of each training speaker's labelled
    utterances only that share (at least one) keeps its label; the rest join ``unlabelled``.
    The choice depends only on ``label_seed``, so every trial, seed and baseline of a search sees
    the same labels. Validation and test keep theirs.

    ``cv = {"fold": k, "folds": K}`` is fold k of a cross-validated objective: the speaker groups
    of train and validation together (never the test set's) are dealt round-robin into K folds;
    fold k validates, the others train. The test set is the same for every fold. With
    ``"refit": True`` (the best configuration re-trained after a cross-validated search) every
    fold trains; fold k's speakers still report ``val`` figures, on speakers it trained on.
    """
    split = _split(corpus, fold, n_folds)
    if cv is not None:
        split = _cv_fold(corpus, split, int(cv["fold"]), int(cv["folds"]), bool(cv.get("refit")))
    if label_fraction < 1.0:
        keep, drop = _label_share(corpus, split["train"], label_fraction, label_seed)
        unlabelled = np.sort(np.concatenate([split["unlabelled"], drop]))
        split = {**split, "train": keep, "unlabelled": unlabelled}
    return split


def _cv_fold(
    corpus: DecodedCorpus, split: dict[str, np.ndarray], k: int, folds: int, refit: bool = False
) -> dict[str, np.ndarray]:
    pool = np.sort(np.concatenate([split["train"], split["val"]]))
    n_groups = len({corpus.groups[i] for i in pool})
    if n_groups < folds:
        raise ValueError(
            f"{corpus.path}: {folds}-fold cross-validation needs >= {folds} speaker groups "
            f"outside the test set, found {n_groups}"
        )
    if not 0 <= k < folds:
        raise ValueError(f"cross-validation fold {k} is outside 0..{folds - 1}")
    f = _deal(corpus, pool, folds)
    return {**split, "train": pool if refit else pool[f != k], "val": pool[f == k]}


def _deal(corpus: DecodedCorpus, idx: np.ndarray, n: int) -> np.ndarray:
    """Each of ``idx``'s fold: speaker groups sorted, then dealt round-robin into ``n`` folds."""
    fold_of = {g: i % n for i, g in enumerate(sorted({corpus.groups[i] for i in idx}))}
    return np.array([fold_of[corpus.groups[i]] for i in idx])


def _label_share(
    corpus: DecodedCorpus, train: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    keep, drop = [], []
    for spk in sorted({corpus.speakers[i] for i in train}):
        mine = rng.permutation(np.array([i for i in train if corpus.speakers[i] == spk]))
        n = max(1, int(round(fraction * len(mine))))
        keep.append(mine[:n])
        drop.append(mine[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(drop)).astype(np.int64)


def _split(corpus: DecodedCorpus, fold: int, n_folds: int | None) -> dict[str, np.ndarray]:
    idx = np.arange(len(corpus))
    unl = idx[corpus.labels < 0]
    lab = idx[corpus.labels >= 0]
    if any(s is not None for s in corpus.splits):
        by = {
            s: np.array([i for i in lab if corpus.splits[i] == s], dtype=np.int64)
            for s in ("train", "val", "test")
        }
        return {**by, "unlabelled": unl}
    groups = sorted({corpus.groups[i] for i in lab})
    n = n_folds or min(5, len(groups))
    if len(groups) < 3 or n < 3:
        raise ValueError(
            f"{corpus.path}: speaker-independent train/val/test needs >= 3 speaker groups, "
            f"found {len(groups)}"
        )
    if not 0 <= fold < n:
        raise ValueError(f"data.fold: {fold} is outside 0..{n - 1}")
    val_fold = (fold + 1) % n
    f = _deal(corpus, lab, n)
    return {
        "train": lab[(f != fold) & (f != val_fold)],
        "val": lab[f == val_fold],
        "test": lab[f == fold],
        "unlabelled": unl,
    }
