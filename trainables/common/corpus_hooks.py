"""The data half of the trainable contract, shared by every trainable that reads SER corpora.

The control plane never imports the data layer: ``sertune data synth|cache``, the search's data
preparation and ``sertune predict``'s file reading all come through these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sertune.trainable import CorpusCache, TooFewSpeakerGroups

SYNTHETIC = "synthetic"


class CorpusHooks:
    """Mix into a ``sertune.trainable.Trainable`` that trains on decoded corpus caches."""

    def corpora(self) -> tuple[str, ...]:
        from trainables.data.corpora import ADAPTERS

        return (*sorted(ADAPTERS), SYNTHETIC)

    def prepare_data(
        self, data: dict[str, Any], cache_root: str, progress: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Decode (or reuse) every corpus the spec names; return the loop's data config."""
        from trainables.data.cache import build_cache, load_cache

        def cache(corpus: str, root: str) -> str:
            if corpus == SYNTHETIC:
                corpus, root = "manifest", str(ensure_synthetic(root, data.get("synthetic", {})))
            return str(
                build_cache(
                    corpus,
                    root,
                    cache_root,
                    progress=progress,
                    allow_absolute_paths=bool(data.get("allow_absolute_paths")),
                )
            )

        main = cache(data["corpus"], data["root"])
        loaded = load_cache(main)
        out: dict[str, Any] = {
            "cache": main,
            "fold": int(data.get("fold", 0)),
            "n_folds": data.get("n_folds"),
            "label_fraction": float(data.get("label_fraction", 1.0)),
            "label_seed": int(data.get("label_seed", 0)),
            "dealing": data.get("dealing") or "balanced",  # how speaker groups become folds
            "noise_files": [str(Path(p).expanduser()) for p in data.get("noise_files") or []],
            "fingerprint": loaded.fingerprint,
            "report": loaded.report.to_dict(),
        }
        if data.get("unlabelled"):
            u = data["unlabelled"]
            out["unlabelled_cache"] = cache(u["corpus"], u["root"])
        out["cross_corpus"] = [
            {"name": c.get("name") or c["corpus"], "cache": cache(c["corpus"], c["root"])}
            for c in data.get("cross_corpus") or []
        ]
        return out

    def split_report(self, data: dict[str, Any], cv_folds: int | None = None) -> list[str]:
        """The split's lines (``trainables.data.cache.split_lines``); K folds above the groups
        outside the test set raise :class:`TooFewSpeakerGroups`."""
        from trainables.data.cache import cv_groups, load_cache, split_lines

        corpus = load_cache(data["cache"])
        fold, n_folds = int(data.get("fold", 0)), data.get("n_folds")
        dealing = data.get("dealing", "balanced")
        if cv_folds:
            groups = cv_groups(corpus, fold, n_folds, dealing)
            if len(groups) < cv_folds:
                name = data.get("corpus") or corpus.path.name.rsplit("-", 1)[0]
                raise TooFewSpeakerGroups(name, cv_folds, groups)
        return split_lines(corpus, fold, n_folds, dealing, cv_folds)

    def speaker_groups(self, data: dict[str, Any]) -> list[str]:
        """The labelled speaker groups (a study's outer folds are dealt from them)."""
        import numpy as np

        from sertune.errors import UsageError
        from trainables.data.cache import load_cache

        corpus = load_cache(data["cache"])
        if any(s is not None for s in corpus.splits):
            raise UsageError(
                f"{data.get('corpus') or corpus.path.name}: its manifest fixes the split (a "
                "'split' column): there are no speaker groups to deal into outer folds"
            )
        return sorted({corpus.groups[i] for i in np.nonzero(corpus.labels >= 0)[0]})

    def reference(
        self,
        data: dict[str, Any],
        robustness: dict[str, Any] | None,
        seed: int,
        cache_root: str,
        log: Callable[[str], None] = print,
    ) -> dict[str, Any] | None:
        """eGeMAPSv02 functionals + a standardised, class-balanced logistic regression on
        ``data``'s split (``trainables.common.reference``): ``test_*``, ``val_uar`` and the
        ``robust/*`` figures a trial reports, on the same clips and noisy copies."""
        from trainables.common.reference import reference_report

        return reference_report(data, robustness, seed, cache_root, log)

    def cache_corpus(self, corpus: str, root: str, cache_root: str) -> CorpusCache:
        from trainables.data.cache import build_cache, load_cache

        path = build_cache(corpus, root, cache_root)
        c = load_cache(path)
        return CorpusCache(
            path=str(path),
            fingerprint=c.fingerprint,
            utterances=len(c),
            megabytes=c.audio.nbytes / 1e6,
            report_summary=c.report.summary(),
        )

    def synthesise_corpus(self, out: str, **options: Any) -> Path:
        from trainables.data.synth import synthesise_corpus

        return synthesise_corpus(out, **options)

    def read_audio(self, path: str, sample_rate: int):
        from trainables.data.audio import read_audio

        return read_audio(path, sample_rate)


def ensure_synthetic(root: str | Path, options: dict[str, Any] | None = None) -> Path:
    """The synthetic corpus at ``root``, generated there first if it is not there yet."""
    import fcntl

    from trainables.data.synth import synthesise_corpus

    root = Path(root).expanduser()
    manifest = root / "manifest.csv"
    if manifest.exists():
        return manifest
    root.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two first searches at once generate it once
        if not manifest.exists():
            synthesise_corpus(root, **(options or {}))
    return manifest
