"""The decoded cache: a corpus decoded once to 16 kHz mono int16, then reused by every trial.

Layout of one cache folder (``<cache_root>/<corpus>-<fingerprint[:16]>/``)::

    audio.npy     int16 (N,)    every utterance back to back
    index.json    offsets, lengths, labels, speakers, genders, groups, splits, source paths
    report.json   the data report (what was resampled, downmixed, skipped and why)
    COMPLETE      written last: a folder without it is a crashed build and is rebuilt

The fingerprint covers the corpus name, each file's relative path, size and mtime, the sample
rate and the cache format version, so an edited corpus gets a new cache and an unchanged one is
never decoded twice. A trial moves ``audio.npy`` onto its device once when it fits its slot's
budget (an IEMOCAP-size corpus is ~1.4 GB as int16), else streams batches from the memory-mapped
file (``trainables.common.batches``).

A build decodes the files in shards (``SHARD_FILES`` each) on a process pool (Ray tasks in a
multi-node cluster), keeps every finished shard in ``<cache_root>/.build-<name>/`` (so a killed
build resumes where it was) and assembles them, in corpus order, into the layout above.
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import AudioError, DataReport, read_audio
from .corpora import EMOTIONS_4, CorpusError, Utterance, scan_corpus, speaker_gender
from .folds import check_dealing, deal, describe

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
    genders: list[str | None] = field(default_factory=list)  # per utterance; None = unknown

    def __len__(self) -> int:
        return len(self.offsets)

    def waveform(self, i: int) -> np.ndarray:
        o, n = int(self.offsets[i]), int(self.lengths[i])
        return self.audio[o : o + n].astype(np.float32) / 32768.0


SHARD_FILES = 256  # files per shard of a build: the unit of parallel work and of resuming


def build_workers() -> int:
    """Processes a cache build decodes with: ``$SERTUNE_CACHE_WORKERS``, else every CPU."""
    env = os.environ.get("SERTUNE_CACHE_WORKERS", "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise CorpusError(f"SERTUNE_CACHE_WORKERS={env!r}: not a whole number") from None
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


def build_cache(
    corpus: str,
    root: str | Path,
    cache_root: str | Path,
    sample_rate: int = 16000,
    progress: Callable[[str], None] | None = None,
    allow_absolute_paths: bool = False,
    workers: int | None = None,
    shard_files: int = SHARD_FILES,
    executor: str | None = None,
) -> Path | str:
    """Decode ``corpus`` at ``root`` into ``cache_root`` unless an identical cache exists.

    Returns the cache folder (a URI when ``cache_root`` is ``s3://``). Unusable files are skipped
    and listed in ``report.json``, with the reason; so are manifest paths outside the corpus root.

    The files are decoded in shards of ``shard_files`` by ``workers`` processes (default
    :func:`build_workers`; ``executor="ray"``, or ``"auto"`` inside a multi-node Ray cluster: Ray
    tasks, which need the corpus on a path every node reads). Each finished shard is kept in
    ``<cache_root>/.build-<name>/``, so a build that crashed or was killed resumes from its
    finished shards; the cache it writes is the same, byte for byte, whatever the workers.
    ``executor`` defaults to ``$SERTUNE_CACHE_EXECUTOR`` (``auto``, ``process`` or ``ray``).
    """
    executor = executor or os.environ.get("SERTUNE_CACHE_EXECUTOR", "auto")
    if executor not in ("auto", "process", "ray"):
        raise CorpusError(f"cache executor {executor!r}: expected auto, process or ray")
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if str(cache_root).startswith("s3://"):  # build on this machine, then publish
        from .remote import publish_cache

        local_root = Path(tempfile.gettempdir()) / "sertune-cache-build"
        return publish_cache(
            build_cache(
                corpus,
                root,
                local_root,
                sample_rate,
                say,
                allow_absolute_paths,
                workers,
                shard_files,
                executor,
            ),  # fmt: skip
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
        build = _Build(corpus, root, items, fp, out, sample_rate, say, max(1, shard_files))
        build.decode(workers or build_workers(), executor)
        return build.assemble(excluded, rejected)


def decode_shard(items: list[Utterance], sample_rate: int) -> tuple[np.ndarray, list, dict]:
    """One shard's files -> (int16 samples back to back, one row per usable file, what the data
    report counts). Runs in a pool process or a Ray task; reads files, writes nothing."""
    report = DataReport()
    chunks, rows = [], []
    for it in items:
        try:
            x = read_audio(it.path, sample_rate, report)
        except AudioError as e:
            report.skip(it.path, e.reason)
            continue
        pcm = np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)
        chunks.append(pcm)
        rows.append(
            {
                "id": it.utt_id,
                "path": it.path,
                "speaker": it.speaker,
                "gender": it.gender,
                "group": it.group,
                "split": it.split,
                "label": EMOTIONS_4.index(it.label) if it.label is not None else -1,
                "length": int(pcm.shape[0]),
            }
        )
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    counts = {"resampled": report.resampled, "downmixed": report.downmixed}
    skipped = [[p, reason] for reason, paths in report.skipped.items() for p in paths]
    return audio, rows, {**counts, "skipped": skipped}


class _Build:
    """One cache build: shards decoded (in parallel, resumably), then assembled into the cache."""

    def __init__(self, corpus, root, items, fp, out: Path, sample_rate, say, shard_files: int):
        self.corpus, self.root, self.items, self.fp = corpus, root, items, fp
        self.out, self.sample_rate, self.say = out, sample_rate, say
        self.shards = [items[i : i + shard_files] for i in range(0, len(items), shard_files)]
        self.dir = out.parent / f".build-{out.name}"

    def _done(self, k: int) -> bool:
        return (self.dir / f"shard-{k:05d}.json").exists()

    def decode(self, workers: int, executor: str) -> None:
        if self.dir.exists() and _read_text(self.dir / "FINGERPRINT") != self.fp:
            shutil.rmtree(self.dir)  # another corpus state's leftovers
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "FINGERPRINT").write_text(self.fp)
        todo = [k for k in range(len(self.shards)) if not self._done(k)]
        done_files = sum(len(self.shards[k]) for k in range(len(self.shards)) if self._done(k))
        if done_files:
            self.say(
                f"[cache] {self.corpus}: resuming a build that was cut short: "
                f"{len(self.shards) - len(todo)}/{len(self.shards)} shards ({done_files:,} files) "
                f"already decoded in {self.dir}"
            )
        bar = _Progress(self.corpus, len(self.items), done_files, self.say)
        use_ray = executor == "ray" or (executor == "auto" and _ray_cluster())
        if use_ray:
            import ray

            workers = max(workers, int(ray.cluster_resources().get("CPU", 1)))
        workers = min(workers, len(todo))
        if workers <= 1 and not use_ray:
            for k in todo:
                self._keep(k, decode_shard(self.shards[k], self.sample_rate))
                bar.add(len(self.shards[k]))
        elif use_ray:
            self._ray(todo, max(workers, 1), bar)
        else:
            self._pool(todo, workers, bar)
        bar.end()

    def _pool(self, todo: list[int], workers: int, bar: _Progress) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        # spawn: the caller may hold threads (MLflow, Ray) that a fork would copy mid-lock
        ctx = multiprocessing.get_context("spawn")
        parent = os.getpid()
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_exit_with, initargs=(parent,)
        ) as pool:
            pending = {
                pool.submit(decode_shard, self.shards[k], self.sample_rate): k for k in todo
            }
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    k = pending.pop(f)
                    self._keep(k, f.result())
                    bar.add(len(self.shards[k]))

    def _ray(self, todo: list[int], workers: int, bar: _Progress) -> None:
        import ray

        task = ray.remote(num_cpus=1)(decode_shard)
        queue, running = list(todo), {}
        while queue or running:
            while queue and len(running) < 2 * workers:
                k = queue.pop(0)
                running[task.remote(self.shards[k], self.sample_rate)] = k
            ready, _ = ray.wait(list(running), num_returns=1)
            k = running.pop(ready[0])
            self._keep(k, ray.get(ready[0]))
            bar.add(len(self.shards[k]))

    def _keep(self, k: int, result: tuple[np.ndarray, list, dict]) -> None:
        """A finished shard, written whole or not at all (its .json, written last, marks it)."""
        audio, rows, counts = result
        base = self.dir / f"shard-{k:05d}"
        with open(f"{base}.npy.tmp", "wb") as fh:
            np.save(fh, audio)
        os.replace(f"{base}.npy.tmp", f"{base}.npy")
        Path(f"{base}.json.tmp").write_text(json.dumps({"rows": rows, **counts}))
        os.replace(f"{base}.json.tmp", f"{base}.json")

    def assemble(self, excluded, rejected) -> Path:
        """The shards, in corpus order, into one cache folder (``audio.npy`` written through a
        memory map: the corpus is never whole in memory)."""
        n_rejected = sum(len(v) for v in rejected.values())
        report = DataReport(
            corpus=self.corpus, found=len(self.items) + sum(excluded.values()) + n_rejected
        )
        report.excluded_labels = dict(excluded)
        for reason, paths in rejected.items():
            for p in paths:
                report.skip(p, reason)
        rows, offset = [], 0
        for k in range(len(self.shards)):
            shard = json.loads((self.dir / f"shard-{k:05d}.json").read_text())
            report.resampled += shard["resampled"]
            report.downmixed += shard["downmixed"]
            for path, reason in shard["skipped"]:
                report.skip(path, reason)
            for r in shard["rows"]:  # the index's column order: ..., offset, length
                rows.append({**{k: v for k, v in r.items() if k != "length"}, "offset": offset,
                             "length": r["length"]})  # fmt: skip
                offset += r["length"]
                if r["label"] < 0:
                    report.unlabelled += 1
                else:
                    name = EMOTIONS_4[r["label"]]
                    report.class_counts[name] = report.class_counts.get(name, 0) + 1
        report.used = len(rows)
        if not rows:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise CorpusError(
                f"{self.root}: no usable audio in corpus {self.corpus!r}\n{report.summary()}"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.corpus}-", dir=self.out.parent))
        audio = np.lib.format.open_memmap(tmp / "audio.npy", "w+", np.int16, (offset,))
        at = 0
        for k in range(len(self.shards)):
            part = np.load(self.dir / f"shard-{k:05d}.npy", mmap_mode="r")
            audio[at : at + part.shape[0]] = part
            at += part.shape[0]
        audio.flush()
        del audio
        index = {
            "version": CACHE_VERSION,
            "corpus": self.corpus,
            "root": str(self.root),
            "fingerprint": self.fp,
            "sample_rate": self.sample_rate,
            "label_names": list(EMOTIONS_4),
            "utterances": rows,
        }
        (tmp / "index.json").write_text(json.dumps(index))
        report.save(tmp / "report.json")
        (tmp / "COMPLETE").write_text(self.fp)
        if self.out.exists():  # a crashed earlier build
            shutil.rmtree(self.out)
        tmp.rename(self.out)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.say(f"[cache] {report.summary()}")
        return self.out


class _Progress:
    """``[cache] NAME [#####.....] 1,234/6,000 files (21%), 310 files/s, ETA 15s`` every few
    seconds while a build runs, and once at its end."""

    EVERY_S = 3.0

    def __init__(self, corpus: str, total: int, done: int, say):
        self.corpus, self.total, self.done, self.say = corpus, total, done, say
        self.start_done, self.t0 = done, time.monotonic()
        self.last = self.t0

    def add(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last >= self.EVERY_S:
            self.last = time.monotonic()
            self.say(self.line())

    def line(self) -> str:
        dt = max(time.monotonic() - self.t0, 1e-9)
        rate = (self.done - self.start_done) / dt
        share = self.done / max(self.total, 1)
        bar = "#" * int(share * 20) + "." * (20 - int(share * 20))
        eta = (
            f", ETA {(self.total - self.done) / rate:.0f}s"
            if rate > 0 and self.done < self.total
            else ""
        )
        return (
            f"[cache] {self.corpus} [{bar}] {self.done:,}/{self.total:,} files ({share:.0%}), "
            f"{rate:,.0f} files/s{eta}"
        )

    def end(self) -> None:
        if self.done > self.start_done and time.monotonic() - self.t0 >= self.EVERY_S:
            self.say(self.line() + f" in {time.monotonic() - self.t0:.0f}s")


def _exit_with(parent: int) -> None:
    """A pool worker's watch: it leaves when the build that started it is gone (SIGKILLed, a
    worker blocked on the task queue would otherwise wait forever)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="sertune-parent-watch", daemon=True).start()


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _ray_cluster() -> bool:
    """Inside a Ray cluster of more than one node (the caller joined it): decode with Ray tasks."""
    if "ray" not in sys.modules:
        return False
    import ray

    try:
        return ray.is_initialized() and sum(1 for n in ray.nodes() if n.get("Alive")) > 1
    except Exception:
        return False


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
    corpus = index.get("corpus", "")
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
        # a cache built before genders were kept: what the speaker id says (else unknown)
        genders=[
            r["gender"] if "gender" in r else speaker_gender(corpus, r["speaker"]) for r in rows
        ],
    )


def speaker_independent_split(
    corpus: DecodedCorpus,
    fold: int = 0,
    n_folds: int | None = None,
    label_fraction: float = 1.0,
    label_seed: int = 0,
    cv: dict[str, int] | None = None,
    dealing: str = "balanced",
) -> dict[str, np.ndarray]:
    """Indices of ``train``, ``val``, ``test`` and ``unlabelled`` with no speaker group shared.

    Groups (sessions or speakers) are dealt into ``n_folds`` folds (default: one per group, at
    most 5) by ``dealing`` (:mod:`trainables.data.folds`: ``balanced``, seeded and balanced on
    gender and classes; ``sorted``, round-robin in sorted order). Fold ``fold`` is the test set,
    the next fold the validation set (what searches optimise), the rest trains. A manifest's
    own split column wins over folds. Unlabelled utterances only ever train (auxiliary losses).

    ``label_fraction`` < 1 is the semi-supervised setting: of each training speaker's labelled
    utterances only that share (at least one) keeps its label; the rest join ``unlabelled``.
    The choice depends only on ``label_seed``, so every trial, seed and baseline of a search sees
    the same labels. Validation and test keep theirs.

    ``cv = {"fold": k, "folds": K}`` is fold k of a cross-validated objective: the speaker groups
    of train and validation together (never the test set's) are dealt the same way into K folds;
    fold k validates, the others train. The test set is the same for every fold. With
    ``"refit": True`` (the best configuration re-trained after a cross-validated search) every
    fold trains; fold k's speakers still report ``val`` figures, on speakers it trained on.
    """
    check_dealing(dealing)
    split = _split(corpus, fold, n_folds, dealing)
    if cv is not None:
        k, folds, refit = int(cv["fold"]), int(cv["folds"]), bool(cv.get("refit"))
        split = _cv_fold(corpus, split, k, folds, refit, dealing)
    if label_fraction < 1.0:
        keep, drop = _label_share(corpus, split["train"], label_fraction, label_seed)
        unlabelled = np.sort(np.concatenate([split["unlabelled"], drop]))
        split = {**split, "train": keep, "unlabelled": unlabelled}
    return split


def _cv_fold(
    corpus: DecodedCorpus,
    split: dict[str, np.ndarray],
    k: int,
    folds: int,
    refit: bool = False,
    dealing: str = "balanced",
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
    f = _deal(corpus, pool, folds, dealing)
    return {**split, "train": pool if refit else pool[f != k], "val": pool[f == k]}


def _deal(corpus: DecodedCorpus, idx: np.ndarray, n: int, dealing: str = "balanced") -> np.ndarray:
    """Each of ``idx``'s fold: its speaker groups dealt into ``n`` folds (:func:`folds.deal`)."""
    genders = corpus.genders or [None] * len(corpus)
    return deal(
        [corpus.groups[i] for i in idx],
        [corpus.speakers[i] for i in idx],
        [genders[i] for i in idx],
        corpus.labels[idx],
        n,
        dealing,
    )


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


def _split(
    corpus: DecodedCorpus, fold: int, n_folds: int | None, dealing: str = "balanced"
) -> dict[str, np.ndarray]:
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
    f = _deal(corpus, lab, n, dealing)
    return {
        "train": lab[(f != fold) & (f != val_fold)],
        "val": lab[f == val_fold],
        "test": lab[f == fold],
        "unlabelled": unl,
    }


def cv_groups(
    corpus: DecodedCorpus, fold: int = 0, n_folds: int | None = None, dealing: str = "balanced"
) -> list[str]:
    """The speaker groups outside the test set: what cross-validation folds are dealt from (a
    K-fold objective needs at least K of them)."""
    split = _split(corpus, fold, n_folds, check_dealing(dealing))
    return sorted({corpus.groups[i] for i in np.concatenate([split["train"], split["val"]])})


def split_lines(
    corpus: DecodedCorpus,
    fold: int = 0,
    n_folds: int | None = None,
    dealing: str = "balanced",
    cv_folds: int | None = None,
) -> list[str]:
    """One line per part of the split: who tests, validates and trains (speakers, genders, clips
    per class); with ``cv_folds`` K, the test part and each fold's validation speakers instead."""
    split = speaker_independent_split(corpus, fold, n_folds, dealing=dealing)
    genders = corpus.genders or [None] * len(corpus)

    def line(name: str, idx: np.ndarray) -> str:
        return describe(name, idx, corpus.speakers, genders, corpus.labels, corpus.label_names)

    if any(s is not None for s in corpus.splits):
        head = "split: the manifest's split column"
    else:
        n = n_folds or min(5, len({corpus.groups[i] for i in np.nonzero(corpus.labels >= 0)[0]}))
        head = f"split: {dealing} dealing, {n} folds: test fold {fold}, val fold {(fold + 1) % n}"
    lines = [head, line("test", split["test"])]
    if cv_folds:
        for k in range(cv_folds):
            cv = {"fold": k, "folds": cv_folds}
            part = speaker_independent_split(corpus, fold, n_folds, cv=cv, dealing=dealing)
            lines.append(line(f"cv fold {k} val", part["val"]))
    else:
        lines += [line("val", split["val"]), line("train", split["train"])]
    if len(split["unlabelled"]):
        lines.append(f"unlabelled: {len(split['unlabelled'])} clips (train only)")
    return lines
