"""``sertune search ...`` and ``sertune compare``: run, resume, inspect and clean up searches."""

from __future__ import annotations

import argparse
import sys

from .options import command, print_result, tracking_option


def spec_options(smoke: bool = True) -> argparse.ArgumentParser:
    """``--set`` (and ``--smoke`` where a command runs the spec's own budget)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="edit the spec without touching the file, e.g. --set data.root=/data/iemocap "
        "--set budget.trials=8 --set params.loss.w_aug=0 --set space.loss.w_aug.low=0.1 "
        "(repeatable)",
    )
    if not smoke:
        return p
    p.add_argument(
        "--smoke",
        action="store_true",
        help="shrink the search to a CPU smoke run: 2 trials, 1 epoch, a tiny model",
    )
    return p


def add(sub) -> None:
    se = sub.add_parser("search", help="run, resume, submit, inspect and remove searches")
    ssub = se.add_subparsers(dest="search_command", required=True, metavar="SUBCOMMAND")

    v = command(
        ssub,
        "validate",
        "check a spec without running anything",
        "sertune search validate mtl_aug --set data.corpus=emodb --set data.root=/data/emodb",
        parents=[spec_options()],
    )
    v.add_argument("spec", help="a preset name (see `sertune search presets`) or a YAML file")
    v.set_defaults(func=validate)

    r = command(
        ssub,
        "run",
        "run a search on local Ray (or the cluster in RAY_ADDRESS)",
        "sertune search run mtl_aug --set data.corpus=iemocap --set data.root=/data/IEMOCAP_full_release\n"
        "sertune search run search_spaces/smoke.yaml --num-cpus 2",
        parents=[tracking_option(), spec_options()],
    )
    r.add_argument("spec", help="a preset name (see `sertune search presets`) or a YAML file")
    r.add_argument(
        "--name",
        help="search name (default: the spec's name): letters, digits, '.', '_', '-', at most "
        "128; one search per name",
    )
    r.add_argument(
        "--replace",
        action="store_true",
        help="a search of this name has ended: remove it (its folders, record and MLflow runs) "
        "and run this one in its place (without it: refused, with what to do)",
    )
    r.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    r.add_argument(
        "--baseline",
        help="also run this baseline of the trainable (e.g. stl_baseline) and compare",
    )
    r.set_defaults(func=run)

    rs = command(
        ssub,
        "resume",
        "continue an interrupted or crashed search; finished trials stay",
        "sertune search resume mtl-aug",
    )
    rs.add_argument("name")
    rs.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    rs.set_defaults(func=resume)

    ls = command(
        ssub,
        "list",
        "searches on this machine, with a dead driver shown as crashed",
        "sertune search list",
    )
    ls.set_defaults(func=list_)

    st = command(
        ssub,
        "status",
        "how far a search got: trials by state, best so far, MLflow link",
        "sertune search status mtl-aug\nsertune search status mtl-aug --json",
    )
    st.add_argument("name")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=status)

    sg = command(
        ssub,
        "strategies",
        "the samplers and schedulers a spec can choose, with their options",
        "sertune search strategies\nsertune search validate smoke --set search.sampler=cmaes",
    )
    sg.set_defaults(func=strategies)

    pr = command(
        ssub,
        "presets",
        "the packaged specs, usable by name anywhere",
        "sertune search presets\nsertune search run mtl_aug --smoke",
    )
    pr.set_defaults(func=presets)

    sm = command(
        ssub,
        "submit",
        "submit a search to a Ray cluster through Ray Jobs",
        "sertune search submit mtl_aug --address http://head:8265 --wait",
        parents=[tracking_option(), spec_options()],
    )
    sm.add_argument("spec", help="a preset name or a YAML file")
    sm.add_argument(
        "--address", required=True, help="Ray dashboard address, e.g. http://head:8265"
    )
    sm.add_argument("--name", help="search name (default: the spec's name)")
    sm.add_argument("--wait", action="store_true", help="follow the logs until the job ends")
    sm.set_defaults(func=submit)

    lg = command(ssub, "logs", "logs of a submitted search", "sertune search logs mtl-aug")
    lg.add_argument("name")
    lg.set_defaults(func=logs)

    sp = command(
        ssub, "stop", "stop a submitted search (resume it later)", "sertune search stop mtl-aug"
    )
    sp.add_argument("name")
    sp.set_defaults(func=stop)

    sy = command(
        ssub,
        "sync",
        "send a search's MLflow records that are still waiting (after an outage)",
        "sertune search sync mtl-aug",
    )
    sy.add_argument("name")
    sy.set_defaults(func=sync)

    rm = command(
        ssub,
        "rm",
        "remove a search: its trials and checkpoints, its record and, with --mlflow, its MLflow runs",
        "sertune search rm old-search\nsertune search rm old-search --mlflow --yes",
    )
    rm.add_argument("name")
    rm.add_argument("--mlflow", action="store_true", help="also delete its MLflow runs")
    rm.add_argument("--yes", action="store_true", help="do not ask")
    rm.set_defaults(func=remove)

    cp = command(
        sub,
        "compare",
        "compare two finished searches on the same data (mean ± spread over confirmed seeds)",
        "sertune compare mtl-aug mtl-aug--stl_baseline",
        parents=[tracking_option()],
    )
    cp.add_argument("a")
    cp.add_argument("b")
    cp.add_argument("--out", help="also write comparison.json/.md and the plot into this folder")
    cp.set_defaults(func=compare)


def _load(path: str, name: str | None = None, a: argparse.Namespace | None = None):
    from ..spec import load_spec

    sets = list(getattr(a, "set", None) or [])
    if getattr(a, "baseline", None):
        sets.append(f"baseline={a.baseline}")
    smoke = bool(getattr(a, "smoke", False))
    return load_spec(path, {"name": name} if name is not None else None, sets=sets, smoke=smoke)


def validate(a: argparse.Namespace) -> int:
    spec = _load(a.spec, None, a)
    kind = "multi-objective" if spec.objective.multi else "single-objective"
    s = spec.search
    warm = f", warm start from {', '.join(s.warm_start)}" if s.warm_start else ""
    print(
        f"{spec.source}: ok — {spec.budget.trials} trials, {kind}, {len(spec.space)} searched "
        f"parameters, sampler {s.sampler}, scheduler {s.scheduler_name(spec.objective.multi)}"
        f"{warm}, {spec.execution} execution"
    )
    return 0


def strategies(a: argparse.Namespace) -> int:
    from ..strategies import describe

    print(describe())
    print(
        "\nchoose them in a spec under `search:`, or: --set search.sampler=random "
        "--set search.scheduler=median"
    )
    return 0


def _finish(result) -> int:
    print_result(result)
    if not result.completed:
        print(
            f"sertune: error: every trial of {result.name!r} failed (see the table above)",
            file=sys.stderr,
        )
        return 1
    return 0


def run(a: argparse.Namespace) -> int:
    from ..search import run_search

    spec = _load(a.spec, a.name, a)
    return _finish(
        run_search(
            spec,
            tracking_uri=a.tracking_uri,
            num_cpus=a.num_cpus,
            verbose=a.verbose,
            replace=a.replace,
        )
    )


def resume(a: argparse.Namespace) -> int:
    from ..search import resume_search

    return _finish(resume_search(a.name, num_cpus=a.num_cpus, verbose=a.verbose))


def list_(a: argparse.Namespace) -> int:
    from ..records import effective_status, list_records

    corrupt: list[str] = []
    records = list_records(corrupt)
    for line in corrupt:  # named, skipped: the other searches are listed
        print(f"corrupt: {line}")
    if not records:
        if not corrupt:
            print("no searches yet; start one with `sertune search run SPEC` or `sertune demo`")
        return 0
    print(f"{'name':28} {'status':12} {'created':20} {'trials':>6}  spec")
    for r in records:
        status = effective_status(r)
        print(
            f"{r.name:28} {status:12} {r.created:20} {r.spec.budget.trials:>6}  {r.source or ''}"
        )
    crashed = [r.name for r in records if effective_status(r) == "crashed"]
    for name in crashed:
        print(f"{name}: crashed — resume with: sertune search resume {name}")
    return 0


def _sync(record) -> None:
    from .. import tracking

    journal = tracking.Journal(record.name, record.tracking_uri, log=print)
    if journal.pending:
        journal.start()
        journal.close(timeout_s=60)


def status(a: argparse.Namespace) -> int:
    import json

    from ..records import load_record
    from ..status import format_status, search_status

    record = load_record(a.name)
    if record.submission_id and record.address:
        from ..submit import job_status

        print(job_status(record))
    elif record.tracking_uri:
        _sync(record)
    s = search_status(a.name)
    if a.json:
        print(json.dumps({k: v for k, v in s.items() if k != "rows"}, indent=2, default=str))
    else:
        print(format_status(s, load_record(a.name)))
    return 0


def presets(a: argparse.Namespace) -> int:
    import yaml

    from ..spec import presets as found

    for name, path in found().items():
        first = next(
            (
                ln.lstrip("# ").strip()
                for ln in path.read_text().splitlines()
                if ln.startswith("#")
            ),
            "",
        )
        raw = yaml.safe_load(path.read_text())
        print(f"{name:14} {raw['budget']['trials']:>3} trials  {first}")
    print("\nrun one by name: sertune search run NAME [--smoke] [--set KEY=VALUE ...]")
    return 0


def submit(a: argparse.Namespace) -> int:
    from ..submit import submit as do_submit

    spec = _load(a.spec, a.name, a)
    sid = do_submit(spec, spec.source, a.address, wait=a.wait, tracking_uri=a.tracking_uri)
    return 0 if sid else 1


def logs(a: argparse.Namespace) -> int:
    from ..submit import job_logs

    print(job_logs(a.name))
    return 0


def stop(a: argparse.Namespace) -> int:
    from ..submit import job_stop

    print(job_stop(a.name))
    return 0


def sync(a: argparse.Namespace) -> int:
    from .. import tracking
    from ..records import load_record

    record = load_record(a.name)
    journal = tracking.Journal(a.name, record.tracking_uri, log=print)
    n = journal.pending
    if not n:
        print(f"{a.name}: every MLflow record is sent")
        return 0
    journal.start()
    left = journal.close(timeout_s=300)
    print(f"{a.name}: sent {n - left} of {n} waiting MLflow records")
    return 0 if not left else 1


def remove(a: argparse.Namespace) -> int:
    from ..remove import remove_search

    if not a.yes and sys.stdin.isatty():
        what = "its trials, checkpoints, record" + (" and MLflow runs" if a.mlflow else "")
        if input(f"remove search {a.name!r} ({what})? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    for line in remove_search(a.name, mlflow_runs=a.mlflow):
        print(line)
    return 0


def compare(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import tracking
    from ..comparison import (
        compare as do_compare,
    )
    from ..comparison import (
        format_comparison,
        search_figures,
        write_comparison,
    )

    store = tracking.Store(a.tracking_uri)
    result = do_compare(search_figures(store, a.a), search_figures(store, a.b))
    print(format_comparison(result))
    if a.out:
        for p in write_comparison(result, Path(a.out)):
            print(f"wrote {p}")
    return 0
