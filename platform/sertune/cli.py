"""``sertune``: search, track and promote MTL-AUG speech emotion models.

Heavy imports happen inside each command, so ``--help`` and spec validation are instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EPILOG = """\
quick start (embedded default: local Ray, MLflow on SQLite under ~/.sertune, synthetic corpus):
  sertune demo                                  synthesise data, search, promote, print where it all is
  sertune search run search_spaces/smoke.yaml   run a search from a spec
  sertune ui                                    browse every search and trial in the MLflow UI
  sertune promote NAME --gate 'robust/uar_snr10_white>=0.5'
  sertune predict models:/ser-mtl-aug@champion some.wav

environment: SERTUNE_HOME (default ~/.sertune), MLFLOW_TRACKING_URI, SERTUNE_STORAGE (s3://...),
AWS_ENDPOINT_URL (S3-compatible stores), RAY_ADDRESS (join a cluster).
"""


def _fail(msg: str, code: int = 2) -> int:
    print(f"sertune: error: {msg}", file=sys.stderr)
    return code


# -- data ------------------------------------------------------------------------------------------


def cmd_data_synth(a: argparse.Namespace) -> int:
    from trainables.data.synth import synthesise_corpus

    t0 = time.monotonic()
    manifest = synthesise_corpus(
        a.out, n_speakers=a.speakers, per_class=a.per_class, n_unlabelled=a.unlabelled, seed=a.seed
    )
    n = sum(1 for _ in manifest.open()) - 1
    print(
        f"wrote {n} utterances ({a.speakers} speakers) and {manifest} in {time.monotonic() - t0:.1f}s"
    )
    return 0


def cmd_data_cache(a: argparse.Namespace) -> int:
    from trainables.data.cache import build_cache, load_cache
    from trainables.data.corpora import CorpusError

    from . import settings

    try:
        path = build_cache(a.corpus, a.root, a.cache or settings.cache_root())
    except (CorpusError, ValueError) as e:
        return _fail(str(e))
    c = load_cache(path)
    print(c.report.summary())
    print(
        f"cache: {path} (fingerprint {c.fingerprint[:16]}, {len(c)} utterances, "
        f"{c.audio.nbytes / 1e6:.1f} MB int16)"
    )
    return 0


# -- bench -----------------------------------------------------------------------------------------


def cmd_bench_train(a: argparse.Namespace) -> int:
    from .trainable import get_trainable

    t = get_trainable(a.trainable)
    r = t.bench_train(device=a.device, batch=a.batch, steps=a.steps, rounds=a.rounds)
    print(f"(a) ceiling  (train step on features on the device): {r.ceiling:,.0f} samples/s")
    print(f"(b) pipeline (waveform -> augment -> log-mel -> step): {r.pipeline:,.0f} samples/s")
    print(f"pipeline/ceiling: {r.ratio:.2f}")
    return 0


def cmd_bench_search(a: argparse.Namespace) -> int:
    from .bench_search import run_search_bench

    return run_search_bench(trials=a.trials, gpus=a.fractional_gpus, num_cpus=a.num_cpus)


# -- search ----------------------------------------------------------------------------------------


def _load(path: str, name: str | None = None, a: argparse.Namespace | None = None):
    from .spec import load_spec

    sets = getattr(a, "set", None) or []
    smoke = bool(getattr(a, "smoke", False))
    return load_spec(path, {"name": name} if name else None, sets=sets, smoke=smoke)


def cmd_search_validate(a: argparse.Namespace) -> int:
    from .spec import SpecError

    try:
        spec = _load(a.spec, None, a)
    except SpecError as e:
        return _fail(str(e))
    kind = "multi-objective" if spec.objective.multi else "single-objective"
    print(
        f"{a.spec}: ok — {spec.budget.trials} trials, {kind}, {len(spec.space)} searched parameters"
    )
    return 0


def cmd_search_run(a: argparse.Namespace) -> int:
    from .search import format_table, run_search
    from .spec import SpecError

    try:
        spec = _load(a.spec, a.name, a)
    except SpecError as e:
        return _fail(str(e))
    result = run_search(spec, tracking_uri=a.tracking_uri, num_cpus=a.num_cpus)
    _print_result(result, format_table)
    return 0


def _print_result(result, format_table) -> None:
    from . import settings

    print()
    print(f"best trials of {result.name!r} ({len(result.rows)} trials, {result.errors} failed):")
    print(format_table(result))
    print()
    print(f"trial results and checkpoints: {result.path}")
    print(
        f"MLflow: {settings.tracking_uri()}  (parent run {result.parent_run_id}; `sertune ui` to browse)"
    )
    print(f"next: sertune promote {result.name}")


def cmd_search_resume(a: argparse.Namespace) -> int:
    from .search import format_table, resume_search

    try:
        result = resume_search(a.name, num_cpus=a.num_cpus)
    except (KeyError, RuntimeError) as e:
        return _fail(str(e.args[0]))
    _print_result(result, format_table)
    return 0


def cmd_search_list(a: argparse.Namespace) -> int:
    from .search import list_records

    records = list_records()
    if not records:
        print("no searches yet; start one with `sertune search run SPEC` or `sertune demo`")
        return 0
    print(f"{'name':24} {'status':10} {'created':20} {'trials':>6}  spec")
    for r in records:
        status = r.get("status", "?")
        if r.get("submission_id"):
            status = "submitted"
        print(
            f"{r['name']:24} {status:10} {r['created']:20} {r['spec']['budget']['trials']:>6}  {r.get('source', '')}"
        )
    return 0


def cmd_search_status(a: argparse.Namespace) -> int:
    from .search import load_record, search_status

    try:
        record = load_record(a.name)
    except KeyError as e:
        return _fail(str(e.args[0]))
    if record.get("submission_id") and record.get("address"):
        from .submit import job_status

        print(job_status(record))
    print(json.dumps(search_status(a.name), indent=2, default=str))
    return 0


def cmd_search_submit(a: argparse.Namespace) -> int:
    from .spec import SpecError
    from .submit import submit

    try:
        spec = _load(a.spec, a.name, a)
    except SpecError as e:
        return _fail(str(e))
    sid = submit(spec, a.spec, a.address, wait=a.wait, tracking_uri=a.tracking_uri)
    return 0 if sid else 1


def cmd_search_logs(a: argparse.Namespace) -> int:
    from .submit import job_logs

    print(job_logs(a.name))
    return 0


def cmd_search_stop(a: argparse.Namespace) -> int:
    from .submit import job_stop

    print(job_stop(a.name))
    return 0


# -- tracking / registry ---------------------------------------------------------------------------


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(trials=a.trials, concurrency=a.concurrency, epochs=a.epochs, name=a.name)


def cmd_promote(a: argparse.Namespace) -> int:
    from .registry import GateFailed, promote

    try:
        v = promote(
            a.search,
            objective=a.objective,
            gates=a.gate or [],
            model_name=a.name,
            tracking_uri=a.tracking_uri,
        )
    except GateFailed as e:
        print(str(e), file=sys.stderr)
        return 3
    except (KeyError, ValueError) as e:
        return _fail(str(e.args[0]))
    print(
        f"registered {v['name']} version {v['version']} (trial {v['trial']}, {v['objective']}={v['value']:.4f})"
    )
    print(
        f"alias champion -> version {v['version']}"
        + (f"; previous -> version {v['previous']}" if v.get("previous") else "")
    )
    print(f"use it: sertune predict models:/{v['name']}@champion FILE.wav")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from .registry import predict_files

    rows = predict_files(a.model_uri, a.files, tracking_uri=a.tracking_uri)
    for r in rows:
        if r.get("error"):
            print(f"{r['file']}: skipped ({r['error']})")
            continue
        probs = "  ".join(f"{k}={v:.3f}" for k, v in r["probabilities"].items())
        print(f"{r['file']}: {r['emotion']}  ({probs})")
    return 0 if all(not r.get("error") for r in rows) else 1


def cmd_report(a: argparse.Namespace) -> int:
    from trainables.data.corpora import CorpusError

    from .registry import report_model

    try:
        out = report_model(
            a.model_uri,
            a.corpus,
            a.root,
            a.out,
            fold=a.fold,
            tracking_uri=a.tracking_uri,
            max_utterances=a.max_utterances,
        )
    except (CorpusError, ValueError) as e:
        return _fail(str(e))
    print((Path(out) / "summary.md").read_text())
    print(f"report: {out}/robustness.json, {out}/uar_vs_snr.png, {out}/uar_vs_eps.png")
    return 0


def cmd_ui(a: argparse.Namespace) -> int:
    import subprocess

    from . import settings

    uri = settings.tracking_uri(a.tracking_uri)
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        a.host,
        "--port",
        str(a.port),
    ]
    if not uri.startswith("http"):
        cmd += ["--default-artifact-root", settings.artifact_root()]
    print(f"MLflow UI for {uri}: http://{a.host}:{a.port}  (Ctrl-C stops it)", flush=True)
    return subprocess.call(cmd)


# -- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sertune",
        description="Hyperparameter search for MTL-AUG speech emotion recognition: Ray Tune + Optuna "
        "search, Ray Train trials, MLflow tracking and registry.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    specopts = argparse.ArgumentParser(add_help=False)
    specopts.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="edit the spec without touching the file, e.g. --set data.root=/data/iemocap "
        "--set budget.trials=8 --set params.loss.w_aug=0 (repeatable)",
    )
    specopts.add_argument(
        "--smoke",
        action="store_true",
        help="shrink the search to a CPU smoke run: 2 trials, 1 epoch, a tiny model",
    )
    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or "
        "sqlite:///$SERTUNE_HOME/mlflow.db)",
    )

    d = sub.add_parser(
        "demo",
        help="the one-command tour: synthetic corpus, small search, promotion",
        parents=[tracking],
    )
    d.add_argument("--trials", type=int, default=6, help="trials in the demo search (default 6)")
    d.add_argument("--concurrency", type=int, default=2, help="trials at a time (default 2)")
    d.add_argument("--epochs", type=int, default=4, help="max epochs per trial (default 4)")
    d.add_argument("--name", default="demo", help="search name (default demo)")
    d.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="corpora: synthesise one, decode one into the cache")
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser(
        "synth", help="write a synthetic emotional-speech corpus (wav + manifest.csv)"
    )
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0, help="same seed, same corpus (default 0)")
    s.add_argument(
        "--speakers", type=int, default=8, help="speakers, alternating male/female (default 8)"
    )
    s.add_argument(
        "--per-class", type=int, default=12, help="utterances per speaker and emotion (default 12)"
    )
    s.add_argument(
        "--unlabelled", type=int, default=0, help="extra unlabelled utterances (default 0)"
    )
    s.set_defaults(func=cmd_data_synth)
    c = dsub.add_parser(
        "cache", help="decode a corpus once into the cache and print its data report"
    )
    c.add_argument("corpus", help="iemocap | msp_improv | emodb | ravdess | crema_d | manifest")
    c.add_argument("root", help="the corpus folder as distributed (or the manifest CSV)")
    c.add_argument("--cache", help="cache root (default $SERTUNE_HOME/cache)")
    c.set_defaults(func=cmd_data_cache)

    b = sub.add_parser("bench", help="benchmarks that print figures and ratios")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bt = bsub.add_parser("train", help="on-device pipeline vs. model-step ceiling (samples/s)")
    bt.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    bt.add_argument("--batch", type=int, help="batch size (default 256 on cuda, 32 on cpu)")
    bt.add_argument("--steps", type=int, default=20, help="steps per timed round (default 20)")
    bt.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds, median reported (default 3)"
    )
    bt.add_argument("--trainable", default="mtl_aug", help=argparse.SUPPRESS)
    bt.set_defaults(func=cmd_bench_train)
    bs = bsub.add_parser(
        "search", help="per-trial fixed overhead of Tune+Train trials, before/after"
    )
    bs.add_argument(
        "--trials", type=int, default=4, help="short trials per configuration (default 4)"
    )
    bs.add_argument(
        "--fractional-gpus",
        type=float,
        default=0.0,
        help="GPU fraction per trial to measure packing (needs a GPU; default off)",
    )
    bs.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    bs.set_defaults(func=cmd_bench_search)

    se = sub.add_parser("search", help="run, resume, submit and inspect searches")
    ssub = se.add_subparsers(dest="search_command", required=True)
    v = ssub.add_parser(
        "validate", help="check a spec without running anything", parents=[specopts]
    )
    v.add_argument("spec")
    v.set_defaults(func=cmd_search_validate)
    r = ssub.add_parser(
        "run",
        help="run a search on local Ray (or the cluster in RAY_ADDRESS)",
        parents=[tracking, specopts],
    )
    r.add_argument("spec", help="a YAML spec, e.g. search_spaces/mtl_aug.yaml")
    r.add_argument("--name", help="search name (default: the spec's name)")
    r.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    r.set_defaults(func=cmd_search_run)
    rs = ssub.add_parser("resume", help="continue a stopped or crashed search")
    rs.add_argument("name")
    rs.add_argument("--num-cpus", type=int)
    rs.set_defaults(func=cmd_search_resume)
    ls = ssub.add_parser("list", help="searches on this machine")
    ls.set_defaults(func=cmd_search_list)
    st = ssub.add_parser("status", help="how far a search got and its best trial so far")
    st.add_argument("name")
    st.set_defaults(func=cmd_search_status)
    sm = ssub.add_parser(
        "submit",
        help="submit a search to a Ray cluster through Ray Jobs",
        parents=[tracking, specopts],
    )
    sm.add_argument("spec")
    sm.add_argument(
        "--address", required=True, help="Ray dashboard address, e.g. http://head:8265"
    )
    sm.add_argument("--name")
    sm.add_argument("--wait", action="store_true", help="follow the logs until the job ends")
    sm.set_defaults(func=cmd_search_submit)
    lg = ssub.add_parser("logs", help="logs of a submitted search")
    lg.add_argument("name")
    lg.set_defaults(func=cmd_search_logs)
    sp = ssub.add_parser("stop", help="stop a submitted search (resume it later)")
    sp.add_argument("name")
    sp.set_defaults(func=cmd_search_stop)

    pr = sub.add_parser(
        "promote", help="register a search's best model, gated on robustness", parents=[tracking]
    )
    pr.add_argument("search", help="search name")
    pr.add_argument(
        "--objective", help="metric to pick the best trial by (default: the search's first)"
    )
    pr.add_argument(
        "--gate",
        action="append",
        metavar="EXPR",
        help="e.g. 'robust/uar_snr10_white>=0.5' (repeatable; all must pass)",
    )
    pr.add_argument(
        "--name", default="ser-mtl-aug", help="registered model name (default ser-mtl-aug)"
    )
    pr.set_defaults(func=cmd_promote)

    pd = sub.add_parser("predict", help="emotion probabilities for wav files", parents=[tracking])
    pd.add_argument("model_uri", help="e.g. models:/ser-mtl-aug@champion or runs:/<id>/model")
    pd.add_argument("files", nargs="+")
    pd.set_defaults(func=cmd_predict)

    rp = sub.add_parser(
        "report", help="robustness report for a model on a corpus", parents=[tracking]
    )
    rp.add_argument("model_uri")
    rp.add_argument("--corpus", required=True, help="corpus adapter (e.g. manifest, emodb)")
    rp.add_argument("--root", required=True)
    rp.add_argument("--fold", type=int, default=0)
    rp.add_argument("--out", default="robustness-report")
    rp.add_argument("--max-utterances", type=int, default=200)
    rp.set_defaults(func=cmd_report)

    ui = sub.add_parser("ui", help="start the MLflow UI on the default store", parents=[tracking])
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
