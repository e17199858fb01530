"""``sertune``: search, track and promote speech emotion models trained with MTL-AUG.

Each command lives in a module of this package (``data``, ``search``, ``models``, ``tools``) and
imports heavy libraries only when it runs, so ``sertune --help`` and spec validation are instant.
Every user-facing failure is a :class:`sertune.errors.SertuneError`: caught here once, printed as
one or two lines, returned as its exit code (``--debug`` adds the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import GateFailed, SertuneError
from .options import common

EPILOG = """\
quick start (embedded default: local Ray, MLflow on SQLite under ~/.sertune, synthetic corpus):
  sertune demo                          synthesise data, search, promote, predict, print where it all is
  sertune doctor                        check this environment (torch/torchaudio kernels, the lock, GPUs)
  sertune search presets                the packaged search specs
  sertune search run smoke              run a search from a preset (or a path to a spec)
  sertune ui                            browse every search and trial in the MLflow UI
  sertune study run demo --vs stl_baseline --outer 4
                                        the paper's table: nested speaker CV, MTL-AUG vs single-task vs eGeMAPS
  sertune promote NAME --gate 'val_robust/uar_snr10_white>=0.5'
  sertune predict models:/ser-mtl-aug@champion some.wav

environment: SERTUNE_HOME (default ~/.sertune), MLFLOW_TRACKING_URI, SERTUNE_STORAGE (s3://...),
AWS_ENDPOINT_URL (S3-compatible stores), RAY_ADDRESS (join a cluster).
"""


def build_parser() -> argparse.ArgumentParser:
    from . import data, models, search, study, tools

    p = argparse.ArgumentParser(
        prog="sertune",
        description="Hyperparameter search for MTL-AUG speech emotion recognition: Ray Tune + "
        "Optuna search, Ray Train trials, MLflow tracking and registry.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common()],
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    tools.add_demo(sub)
    tools.add_doctor(sub)
    search.add(sub)
    study.add(sub)
    models.add(sub)
    data.add(sub)
    tools.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    args.debug = getattr(args, "debug", False)
    args.verbose = getattr(args, "verbose", False)
    try:
        return int(args.func(args) or 0)
    except GateFailed as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except SertuneError as e:
        if args.debug:
            traceback.print_exc()
        print(f"sertune: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("sertune: interrupted", file=sys.stderr)
        return 130
