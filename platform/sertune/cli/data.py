"""``sertune data``: synthesise a corpus, decode one into the cache, show its speaker split
(through the trainable)."""

from __future__ import annotations

import argparse
import os
import time

from ..errors import UsageError
from .options import command


def add(sub) -> None:
    data = sub.add_parser("data", help="corpora: synthesise one, decode one into the cache")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    s = command(
        dsub,
        "synth",
        "write a synthetic emotional-speech corpus (wav files + manifest.csv)",
        "sertune data synth --out /tmp/synth --speakers 8 --per-class 12",
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0, help="same seed, same corpus")
    s.add_argument("--speakers", type=int, default=8, help="speakers, alternating male/female")
    s.add_argument("--per-class", type=int, default=12, help="utterances per speaker and emotion")
    s.add_argument("--unlabelled", type=int, default=0, help="extra unlabelled utterances")
    s.add_argument("--trainable", default="mtl_aug", help=argparse.SUPPRESS)
    s.set_defaults(func=synth)
    c = command(
        dsub,
        "cache",
        "decode a corpus once into the cache and print its data report",
        "sertune data cache emodb /data/emodb\nsertune data cache manifest /data/mine/manifest.csv",
    )
    c.add_argument("corpus", help="iemocap | msp_improv | emodb | ravdess | crema_d | manifest")
    c.add_argument("root", help="the corpus folder as distributed (or the manifest CSV)")
    c.add_argument("--cache", help="cache root (default $SERTUNE_HOME/cache)")
    c.add_argument(
        "--workers",
        type=int,
        help="processes that decode (default: every CPU; also $SERTUNE_CACHE_WORKERS); a build "
        "cut short resumes from its finished shards",
    )
    c.add_argument(
        "--ray-address",
        help="decode with Ray tasks on this cluster (ADDRESS as for ray.init; the corpus and the "
        "cache root must be on paths every node reads)",
    )
    c.add_argument("--trainable", default="mtl_aug", help=argparse.SUPPRESS)
    c.set_defaults(func=cache)
    p = command(
        dsub,
        "split",
        "show who tests, validates and trains: speakers, genders, clips per class",
        "sertune data split emodb /data/emodb\nsertune data split emodb /data/emodb --cv 4\n"
        "sertune data split iemocap /data/iemocap --fold 2 --dealing sorted",
    )
    p.add_argument("corpus", help="iemocap | msp_improv | emodb | ravdess | crema_d | manifest")
    p.add_argument("root", help="the corpus folder as distributed (or the manifest CSV)")
    p.add_argument("--fold", type=int, default=0, help="the test fold, as data.fold (default 0)")
    p.add_argument("--folds", type=int, help="folds, as data.n_folds (default: groups, at most 5)")
    p.add_argument("--cv", type=int, metavar="K", help="each fold of K-fold cross-validation")
    p.add_argument(
        "--dealing",
        choices=("balanced", "sorted"),
        default="balanced",
        help="as data.dealing (default balanced)",
    )
    p.add_argument("--cache", help="cache root (default $SERTUNE_HOME/cache)")
    p.add_argument("--trainable", default="mtl_aug", help=argparse.SUPPRESS)
    p.set_defaults(func=split)


def synth(a: argparse.Namespace) -> int:
    from ..trainable import get_trainable

    t0 = time.monotonic()
    manifest = get_trainable(a.trainable).synthesise_corpus(
        a.out, n_speakers=a.speakers, per_class=a.per_class, n_unlabelled=a.unlabelled, seed=a.seed
    )
    n = sum(1 for _ in manifest.open()) - 1
    print(
        f"wrote {n} utterances ({a.speakers} speakers) and {manifest} in {time.monotonic() - t0:.1f}s"
    )
    return 0


def cache(a: argparse.Namespace) -> int:
    from .. import settings
    from ..trainable import get_trainable

    if a.workers is not None:
        if a.workers < 1:
            raise UsageError(f"--workers: {a.workers} (at least 1)")
        os.environ["SERTUNE_CACHE_WORKERS"] = str(a.workers)
    if a.ray_address:
        import ray

        ray.init(address=a.ray_address, logging_level="ERROR", log_to_driver=False)
        os.environ["SERTUNE_CACHE_EXECUTOR"] = "ray"
    c = get_trainable(a.trainable).cache_corpus(a.corpus, a.root, a.cache or settings.cache_root())
    print(c.report_summary)
    print(
        f"cache: {c.path} (fingerprint {c.fingerprint[:16]}, {c.utterances} utterances, "
        f"{c.megabytes:.1f} MB int16)"
    )
    return 0


def split(a: argparse.Namespace) -> int:
    import sys

    from .. import settings
    from ..trainable import get_trainable

    if a.cv is not None and a.cv < 2:
        raise UsageError(f"--cv: {a.cv} (at least 2 folds)")
    if a.folds is not None and a.folds < 3:
        raise UsageError(f"--folds: {a.folds} (at least 3: test, validation, training)")
    t = get_trainable(a.trainable)
    spec = {"corpus": a.corpus, "root": a.root, "fold": a.fold, "n_folds": a.folds}
    data = t.prepare_data(
        {**spec, "dealing": a.dealing},
        a.cache or settings.cache_root(),
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    try:
        lines = t.split_report({**data, "corpus": a.corpus}, a.cv)
    except ValueError as e:  # data.fold outside the folds, too few groups for a split
        raise UsageError(str(e)) from None
    for line in lines:
        print(line)
    return 0
