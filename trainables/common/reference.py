"""The field's reference baseline: eGeMAPS functionals + a standardised, class-balanced logistic
regression, on a search's own split.

SER papers report it beside every model, so every search does too (``Trainable.reference``,
called once per search by the control plane). What it is:

* features: openSMILE's eGeMAPSv02 functionals (88 per clip) of each clip's whole waveform, as
  the decoded cache holds it (the corpus's sample rate);
* model: ``StandardScaler`` -> ``LogisticRegression(class_weight="balanced")``, fitted on the
  training speakers only; C from :data:`C_GRID`, chosen by the validation speakers' UAR (ties:
  the smaller C); not refitted on train + validation;
* figures under the names a trial reports, defined the same way (:mod:`.metrics`): ``val_uar``
  (``val_war``, ``val_f1``) at the chosen C, ``test_uar``, ``test_war``, ``test_f1`` on every test
  clip, and with robustness options the ``robust/*`` figures on the class-stratified capped test
  subset a trial uses, under the noisy conditions of :func:`noisy_conditions`: the same generator,
  seeded alike and drawn in the same order as ``robustness.evaluate_robustness``, so a reference
  figure and a model figure of one name are measured on sample-identical clips (for a model
  evaluated on the CPU: a CUDA generator draws other white/file noise). Adversarial attacks need
  a waveform gradient, which features + a linear model do not have: none are reported.

Features are cached beside the decoded caches, ``<cache_root>/reference/<fingerprint>/
egemaps_v02-<condition>-<key>.npz`` (``clean-all``: every labelled clip; ``white-snr10``, ...: a
noisy copy of the robustness subset), so a second search on the same corpus extracts nothing.
Extraction runs on a few threads (openSMILE releases the GIL while it computes).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .metrics import confusion, scores
from .noise import add_noise_flat
from .robustness import DEFAULTS, make_noise
from .utterances import Utterances, stratified_subset

SCHEMA = "sertune.reference/1"
NAME = "egemaps_lr"
FEATURE_SET, FEATURE_LEVEL = "eGeMAPSv02", "Functionals"
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
ADVERSARIAL = "n/a: eGeMAPS + a linear model has no waveform gradient to attack"
PREFIX = "egemaps_v02"  # cache file names: <PREFIX>-<condition>-<key>.npz


def noisy_conditions(
    utts: Utterances,
    options: dict[str, Any],
    seed: int,
    bank: torch.Tensor | None = None,
) -> Iterator[tuple[str, float, Utterances]]:
    """(noise type, SNR, noisy copy of ``utts``) for every noise condition of ``options``, made
    exactly as ``robustness.evaluate_robustness`` makes them for a model's report: one generator
    on ``utts``' device seeded with ``seed``, one noise signal per type in the options' order,
    each mixed in at every SNR. A type without a source (``file`` without a noise bank) is left
    out, as there."""
    base = utts.select(torch.arange(len(utts), device=utts.device))
    for kind, snr, make in _lazy_conditions(base, options, seed, bank):
        yield kind, snr, make()


def _lazy_conditions(
    base: Utterances, options: dict[str, Any], seed: int, bank: torch.Tensor | None
) -> Iterator[tuple[str, float, Callable[[], Utterances]]]:
    """:func:`noisy_conditions` of contiguous float ``base``, each noisy copy made only when
    asked for (a cached condition needs none); every type's noise is still drawn, in order, so
    the next type gets what the generator gives it in a model's report."""
    o = {**DEFAULTS, **options}
    g = torch.Generator(device=base.device).manual_seed(seed)
    owner = base.owner()
    for kind in o["noises"]:
        noise = make_noise(kind, base, g, bank)
        if noise is None:
            continue
        for snr in o["snrs_db"]:

            def make(noise=noise, snr=snr) -> Utterances:
                return base.with_audio(add_noise_flat(base.audio, noise, owner, len(base), snr))

            yield kind, float(snr), make


def condition_name(kind: str, snr: float) -> str:
    """``white``, 10.0 -> ``white-snr10`` (a cache file's condition)."""
    return f"{kind}-snr{int(snr)}"


def noise_bank(files: list[str], sample_rate: int) -> torch.Tensor | None:
    """The ``file`` noise's source, as a trial reads it: every file at the corpus's rate, back to
    back (None without files)."""
    if not files:
        return None
    from trainables.data.audio import read_audio

    return torch.from_numpy(np.concatenate([read_audio(f, sample_rate) for f in files]))


# -- features ---------------------------------------------------------------------------------------


class Extractor:
    """eGeMAPSv02 functionals of float waveforms on ``workers`` threads (one ``Smile`` each)."""

    def __init__(self, sample_rate: int, workers: int | None = None):
        import opensmile

        self.sample_rate = int(sample_rate)
        self.version = str(opensmile.__version__)
        self.workers = workers or max(1, min(4, _cpus()))
        self._local = threading.local()
        self.names = list(self._smile().feature_names)
        self.dim = len(self.names)
        self.extracted = 0  # clips
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _smile(self):
        smile = getattr(self._local, "smile", None)
        if smile is None:
            import opensmile

            smile = self._local.smile = opensmile.Smile(
                feature_set=opensmile.FeatureSet.eGeMAPSv02,
                feature_level=opensmile.FeatureLevel.Functionals,
            )
        return smile

    def _one(self, wave: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(wave, dtype=np.float32)
        return self._smile().process_signal(x, self.sample_rate).to_numpy()[0]

    def __call__(self, waves: list[np.ndarray]) -> np.ndarray:
        """(n, dim) float32 features of ``waves``, in order."""
        self.extracted += len(waves)
        if not waves:
            return np.zeros((0, self.dim), np.float32)
        if self.workers == 1 or len(waves) < 4:
            rows = [self._one(w) for w in waves]
        else:
            if self._pool is None:  # kept: each thread's Smile is built once
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="sertune-egemaps")
            rows = list(self._pool.map(self._one, waves))
        return np.stack(rows).astype(np.float32)


def _cpus() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )


class FeatureCache:
    """Feature files under ``<cache_root>/reference/<fingerprint>/``, counted as hits and misses
    (one per file: a condition of a corpus)."""

    def __init__(self, cache_root: str | Path, extractor: Extractor):
        root = str(cache_root)
        self.notes: list[str] = []
        if root.startswith("s3://"):  # features are a local convenience, never published
            root = str(Path(tempfile.gettempdir()) / "sertune-reference-cache")
            self.notes.append(f"cache root {cache_root} is remote: features cached in {root}")
        self.root = Path(root).expanduser() / "reference"
        self.extractor = extractor
        self.hits = self.misses = 0

    def key(self, indices: np.ndarray, *parts: Any) -> str:
        h = hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes())
        h.update(repr((self.extractor.version, FEATURE_SET, FEATURE_LEVEL, *parts)).encode())
        return h.hexdigest()[:12]

    def path(self, fingerprint: str, condition: str, key: str) -> Path:
        return self.root / fingerprint / f"{PREFIX}-{condition}-{key}.npz"

    def load(self, path: Path, indices: np.ndarray) -> np.ndarray | None:
        try:
            with np.load(path) as z:
                if np.array_equal(z["indices"], indices) and z["features"].shape == (
                    len(indices),
                    self.extractor.dim,
                ):
                    return z["features"]
        except (OSError, KeyError, ValueError):
            pass
        return None

    def get(
        self, path: Path, indices: np.ndarray, waves: Callable[[], list[np.ndarray]]
    ) -> np.ndarray:
        """The features of clips ``indices`` from ``path``, else extracted from ``waves()`` and
        kept there (written whole or not at all)."""
        got = self.load(path, indices)
        if got is not None:
            self.hits += 1
            return got
        self.misses += 1
        feats = self.extractor(waves())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                indices=np.asarray(indices, np.int64),
                features=feats,
                names=np.array(self.extractor.names),
                opensmile=np.array(self.extractor.version),
            )
        os.replace(tmp, path)
        return feats


def _clip_waves(utts: Utterances) -> list[np.ndarray]:
    """Each clip of contiguous float ``utts`` as a float32 array."""
    audio = utts.audio.detach().cpu().numpy().astype(np.float32, copy=False)
    offs, lens = utts.offsets.cpu().numpy(), utts.lengths.cpu().numpy()
    return [audio[o : o + n] for o, n in zip(offs.tolist(), lens.tolist(), strict=True)]


def _clean_all(corpus, cache: FeatureCache) -> tuple[np.ndarray, dict[int, int]]:
    """Features of every labelled clip of ``corpus`` (one cache file) and clip -> row."""
    lab = np.nonzero(corpus.labels >= 0)[0]
    feats = cache.get(_clean_path(corpus, cache), lab, lambda: [corpus.waveform(i) for i in lab])
    return feats, {int(i): r for r, i in enumerate(lab)}


def _clean_path(corpus, cache: FeatureCache) -> Path:
    lab = np.nonzero(corpus.labels >= 0)[0]
    return cache.path(corpus.fingerprint, "clean-all", cache.key(lab, corpus.sample_rate))


def _rows(feats: np.ndarray, row: dict[int, int], idx: np.ndarray) -> np.ndarray:
    return feats[[row[int(i)] for i in idx]]


# -- the model --------------------------------------------------------------------------------------


def _figures(pred: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    cm = confusion(torch.from_numpy(np.asarray(pred)), torch.from_numpy(np.asarray(y)), n_classes)
    return {k: float(v) for k, v in scores(cm).items()}


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int, notes: list[str]):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    model = Pipeline(
        [
            ("scale", StandardScaler()),
            (
                "lr",
                LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed),
            ),
        ]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        notes.append(f"C={c:g}: logistic regression did not converge in 5000 iterations")
    return model


def _check_classes(corpus, split: dict[str, np.ndarray]) -> None:
    where = f"{corpus.path}"
    for part in ("train", "val", "test"):
        if len(split[part]) == 0:
            raise ValueError(
                f"reference baseline: corpus {where} has no {part} clips in this split"
            )
    names = corpus.label_names
    have = set(corpus.labels[split["train"]].tolist())
    if len(have) < 2:
        raise ValueError(
            f"reference baseline: corpus {where}: the training speakers have only "
            f"{', '.join(names[c] for c in sorted(have)) or 'no'} labelled clips; "
            "a classifier needs at least two classes"
        )
    for part in ("val", "test"):
        missing = sorted(set(corpus.labels[split[part]].tolist()) - have)
        if missing:
            raise ValueError(
                f"reference baseline: corpus {where}: class(es) "
                f"{', '.join(names[c] for c in missing)} of the {part} speakers are missing "
                "from the training speakers"
            )


def _finite(x: np.ndarray, what: str, notes: list[str]) -> np.ndarray:
    bad = ~np.isfinite(x)
    if bad.any():
        notes.append(f"{what}: {int(bad.sum())} non-finite feature values set to 0")
        x = np.where(bad, 0.0, x).astype(np.float32)
    return x


# -- the report -------------------------------------------------------------------------------------


def reference_report(
    data: dict[str, Any],
    robustness: dict[str, Any] | None,
    seed: int,
    cache_root: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The reference baseline on ``data``'s split (a ``prepare_data`` result); see the module
    docstring. JSON-serialisable."""
    from trainables.data.cache import load_cache, speaker_independent_split

    t0 = time.monotonic()
    corpus = load_cache(data["cache"])
    split = speaker_independent_split(
        corpus,
        data.get("fold", 0),
        data.get("n_folds"),
        label_fraction=data.get("label_fraction", 1.0),
        label_seed=data.get("label_seed", 0),
        cv=None,
        dealing=data.get("dealing", "balanced"),
    )
    _check_classes(corpus, split)
    extractor = Extractor(corpus.sample_rate)
    try:
        return _report(corpus, split, data, robustness, seed, cache_root, log, extractor, t0)
    finally:
        extractor.close()


def _report(corpus, split, data, robustness, seed, cache_root, log, extractor, t0):
    import opensmile
    import sklearn

    from trainables.data.audio import AudioError
    from trainables.data.cache import load_cache

    n_classes = len(corpus.label_names)
    cache = FeatureCache(cache_root, extractor)
    notes: list[str] = list(cache.notes)

    # what will be extracted: every labelled clip, the noisy copies, the cross corpora
    plan: list[tuple[Path, int]] = []
    lab = np.nonzero(corpus.labels >= 0)[0]
    plan.append((_clean_path(corpus, cache), len(lab)))
    options = None if robustness is None else dict(robustness)
    pick = bank = None
    noisy_paths: dict[str, Path] = {}
    crosses = []
    if options is not None:
        o = {**DEFAULTS, **options}
        test = split["test"]
        pick = test[stratified_subset(corpus.labels[test], options.get("max_utterances"), seed)]
        if len(pick) == 0:
            notes.append("robustness.max_utterances leaves no test clip: no robust/* figures")
            options = None
    if options is not None:
        files = list(data.get("noise_files") or [])
        if "file" in o["noises"]:
            if not files:
                notes.append("noise type 'file': no data.noise_files, left out (as in a trial)")
            else:
                try:
                    bank = noise_bank(files, corpus.sample_rate)
                except (AudioError, OSError) as e:
                    notes.append(f"noise type 'file' left out: a noise file is unusable ({e})")
        stamp = [_file_stamp(f) for f in files] if bank is not None else []
        for i, kind in enumerate(o["noises"]):
            if kind == "file" and bank is None:
                continue
            # a type's noise depends on what the generator drew for the types before it
            key = cache.key(
                pick,
                corpus.sample_rate,
                seed,
                list(o["noises"][: i + 1]),
                stamp,
                torch.__version__,
            )
            for snr in o["snrs_db"]:
                cond = condition_name(kind, snr)
                noisy_paths[cond] = cache.path(corpus.fingerprint, cond, key)
                plan.append((noisy_paths[cond], len(pick)))
        for c in data.get("cross_corpus") or []:
            cc = load_cache(c["cache"])
            if tuple(cc.label_names) != tuple(corpus.label_names):
                raise ValueError(
                    f"reference baseline: cross corpus {c['name']} ({cc.path}) has classes "
                    f"{list(cc.label_names)}, the training corpus {corpus.path} "
                    f"{list(corpus.label_names)}"
                )
            clab = np.nonzero(cc.labels >= 0)[0]
            cidx = clab[stratified_subset(cc.labels[clab], options.get("max_utterances"), 0)]
            crosses.append((c["name"], cc, cidx))
            plan.append((_clean_path(cc, cache), len(clab)))
    total = sum(n for _, n in plan)
    cached = sum(n for p, n in plan if p.exists())
    log(
        f"[sertune] reference: {FEATURE_SET} functionals of {total:,} clips (cached: {cached:,}) "
        f"on {extractor.workers} thread(s) ..."
    )

    # clean features, the model, C chosen on the validation speakers
    feats, row = _clean_all(corpus, cache)
    feats = _finite(feats, corpus.path.name, notes)
    x = {p: _rows(feats, row, split[p]) for p in ("train", "val", "test")}
    y = {p: corpus.labels[split[p]] for p in ("train", "val", "test")}
    by_c: dict[str, float] = {}
    best = None
    for c in C_GRID:
        model = _fit(x["train"], y["train"], c, seed, notes)
        val = _figures(model.predict(x["val"]), y["val"], n_classes)
        by_c[f"{c:g}"] = val["uar"]
        if best is None or val["uar"] > best[2]["uar"]:  # ties: the smaller C stays
            best = (c, model, val)
    c_best, model, val = best
    metrics: dict[str, float] = {f"val_{k}": v for k, v in val.items()}
    test = _figures(model.predict(x["test"]), y["test"], n_classes)
    metrics.update({f"test_{k}": v for k, v in test.items()})

    if options is not None:
        y_pick = corpus.labels[pick]
        metrics["robust/uar_clean"] = _figures(
            model.predict(_rows(feats, row, pick)), y_pick, n_classes
        )["uar"]
        base = Utterances.from_corpus(corpus, torch.device("cpu"), streamed=True).select(pick)
        noisy = []
        for kind, snr, make in _lazy_conditions(base, options, seed, bank):
            cond = condition_name(kind, snr)
            f = cache.get(noisy_paths[cond], pick, lambda make=make: _clip_waves(make()))
            f = _finite(f, cond, notes)
            uar = _figures(model.predict(f), y_pick, n_classes)["uar"]
            metrics[f"robust/uar_snr{int(snr)}_{kind}"] = uar
            noisy.append(uar)
        if noisy:
            metrics["robust/uar_noise_mean"] = float(np.mean(noisy))
        for name, cc, cidx in crosses:
            cfeats, crow = _clean_all(cc, cache)
            cfeats = _finite(cfeats, cc.path.name, notes)
            metrics[f"robust/uar_cross_{name}"] = _figures(
                model.predict(_rows(cfeats, crow, cidx)), cc.labels[cidx], n_classes
            )["uar"]

    seconds = time.monotonic() - t0
    shown = f"val UAR {metrics['val_uar']:.2f}, test UAR {metrics['test_uar']:.2f}"
    for snr, kind in ((10, "white"), (10, "babble")):
        if f"robust/uar_snr{snr}_{kind}" in metrics:
            shown += f", {snr} dB {kind} {metrics[f'robust/uar_snr{snr}_{kind}']:.2f}"
            break
    log(
        f"[sertune] reference (eGeMAPS + logistic regression, C={c_best:g}): {shown} "
        f"({seconds:.1f}s, {extractor.extracted:,} clips extracted)"
    )
    return {
        "schema": SCHEMA,
        "name": NAME,
        "description": (
            f"{FEATURE_SET} functionals (opensmile {extractor.version}, {extractor.dim} features) "
            f"+ standardised class-balanced logistic regression (scikit-learn "
            f"{sklearn.__version__})"
        ),
        "features": {
            "set": FEATURE_SET,
            "level": FEATURE_LEVEL,
            "opensmile": str(opensmile.__version__),
            "dim": extractor.dim,
        },
        "C": float(c_best),
        "C_grid": [float(c) for c in C_GRID],
        "val_uar_by_C": by_c,
        "data": {
            "corpus": corpus.path.name,
            "train": len(split["train"]),
            "val": len(split["val"]),
            "test": len(split["test"]),
            "robustness_utterances": None if pick is None else len(pick),
        },
        "metrics": {k: float(v) for k, v in metrics.items()},
        "adversarial": ADVERSARIAL,
        "notes": list(dict.fromkeys(notes)),
        "seconds": round(seconds, 3),
        "cache": {"hits": cache.hits, "misses": cache.misses},
    }


def _file_stamp(path: str) -> str:
    try:
        st = os.stat(path)
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return f"{path}:missing"
