"""``sertune study ...``: nested speaker-independent cross-validation of a spec against its
single-task twin (or another spec) and the field's reference baseline, as one resumable job."""

from __future__ import annotations

import argparse
import sys

from .options import command, tracking_option
from .search import spec_options

PARALLEL = (
    "fold searches at once, each in a driver of its own on the same Ray cluster (default: as "
    "many as the cluster holds, its trial slots // budget.concurrency; 1: one after the other "
    "on this driver's warm slots)"
)


def add(sub) -> None:
    st = sub.add_parser(
        "study",
        help="the paper's table: nested speaker-independent CV, spec vs --vs vs reference",
        description="A study runs a complete search per outer speaker fold and arm (the spec, "
        "the --vs arm) on the other speakers, evaluates each fold's champion once on the "
        "fold's untouched speakers, computes the eGeMAPS + logistic-regression reference on "
        "the same split, and reports every condition (clean, noise x SNR, attacks, cross "
        "corpus) as mean ± sd over outer folds with paired 95 % intervals.",
    )
    ssub = st.add_subparsers(dest="study_command", required=True, metavar="SUBCOMMAND")

    r = command(
        ssub,
        "run",
        "run a study: a search per outer fold and arm, then the paired table",
        "sertune study run demo --vs stl_baseline --outer 4\n"
        "sertune study run mtl_aug --vs stl_baseline --outer all --set data.corpus=emodb "
        "--set data.root=/data/emodb\n"
        "sertune study run mtl_aug --vs my_other_spec.yaml --outer 0,3,7",
        parents=[tracking_option(), spec_options(smoke=True)],
    )
    r.add_argument("spec", help="the spec arm: a preset name or a YAML file")
    r.add_argument(
        "--vs",
        default="stl_baseline",
        help="the arm to beat: the trainable's named baseline (stl_baseline: the same search "
        "with the auxiliary tasks off) or another spec on the same data",
    )
    r.add_argument(
        "--outer",
        default="all",
        help="outer folds: all (leave one speaker group out), K (K balanced folds), or fold "
        "numbers 0,3,7 of leave-one-group-out",
    )
    r.add_argument(
        "--name", help="study name (default: SPEC-study); fold searches are NAME.foldK.ARM"
    )
    r.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    r.add_argument("--parallel", type=int, metavar="N", help=PARALLEL)
    r.set_defaults(func=run)

    rs = command(
        ssub,
        "resume",
        "go on with an interrupted or crashed study (finished fold searches are kept)",
        "sertune study resume demo-study",
    )
    rs.add_argument("name")
    rs.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    rs.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="fold searches at once, as for `study run` (default: as the study last ran)",
    )
    rs.set_defaults(func=resume)

    fd = command(
        ssub,
        "fold",
        "run (or resume) one fold search of a study in this process: what a study running "
        "fold searches in parallel starts for each",
        "sertune study fold demo-study 2 demo",
    )
    fd.add_argument("name")
    fd.add_argument("fold", type=int)
    fd.add_argument("arm")
    fd.set_defaults(func=fold)

    ss = command(
        ssub,
        "status",
        "each fold search's state and champion, the study's progress",
        "sertune study status demo-study",
    )
    ss.add_argument("name")
    ss.set_defaults(func=status)

    ls = command(ssub, "list", "studies on this machine", "sertune study list")
    ls.set_defaults(func=list_)

    rp = command(
        ssub,
        "report",
        "the study's table (Markdown; report.html and study.json beside it)",
        "sertune study report demo-study",
        parents=[tracking_option()],
    )
    rp.add_argument("name")
    rp.set_defaults(func=report)

    rm = command(
        ssub,
        "rm",
        "remove a study: its fold searches (with --mlflow their runs and the study run) and record",
        "sertune study rm demo-study --mlflow --yes",
    )
    rm.add_argument("name")
    rm.add_argument("--mlflow", action="store_true", help="also delete the MLflow runs")
    rm.add_argument("--yes", action="store_true", help="do not ask")
    rm.set_defaults(func=remove)

    sm = command(
        ssub,
        "submit",
        "submit a study to a Ray cluster through Ray Jobs (the driver runs there)",
        "sertune study submit mtl_aug --vs stl_baseline --outer all --address http://head:8265",
        parents=[tracking_option(), spec_options(smoke=False)],
    )
    sm.add_argument("spec", help="a preset name or a YAML file")
    sm.add_argument("--vs", default="stl_baseline", help="as for `study run`")
    sm.add_argument("--outer", default="all", help="as for `study run`")
    sm.add_argument("--name", help="study name (default: SPEC-study)")
    sm.add_argument(
        "--address", required=True, help="Ray dashboard address, e.g. http://head:8265"
    )
    sm.set_defaults(func=submit)


def _spec(a: argparse.Namespace):
    from ..spec import load_spec

    return load_spec(a.spec, sets=list(a.set or []), smoke=bool(getattr(a, "smoke", False)))


def run(a: argparse.Namespace) -> int:
    from ..study import run_study

    spec = _spec(a)
    record = run_study(
        spec,
        a.vs,
        a.outer,
        name=a.name,
        sets=list(a.set or []),
        tracking_uri=a.tracking_uri,
        num_cpus=a.num_cpus,
        verbose=a.verbose,
        parallel=a.parallel,
    )
    return 0 if record.status == "finished" else 1


def resume(a: argparse.Namespace) -> int:
    from ..study import resume_study

    record = resume_study(a.name, num_cpus=a.num_cpus, verbose=a.verbose, parallel=a.parallel)
    return 0 if record.status == "finished" else 1


def fold(a: argparse.Namespace) -> int:
    from ..study import run_fold

    return run_fold(a.name, a.fold, a.arm, verbose=a.verbose)


def status(a: argparse.Namespace) -> int:
    from ..records import effective_status, load_record
    from ..study import load_study, study_status, timing_lines

    record = load_study(a.name)
    if record.submission_id and record.address:
        from ..submit import job_status

        print(job_status(record))  # the study's driver runs on the cluster: its table is there
        if not record.outer:
            return 0
    print(
        f"study {record.name}: {study_status(record)} — {len(record.outer)} outer fold(s) of "
        f"{record.n_outer}, arms {', '.join(record.arms)} (+ reference), created {record.created}"
    )
    done = 0
    print(f"  {'fold':5} {'arm':16} {'search':36} {'status':12} {'objective':>10} {'test UAR':>9}")
    for k, arm, sname in record.searches():
        entry = record.folds.get(f"{k}/{arm}") or {}
        try:
            state = effective_status(load_record(sname))
        except Exception:  # noqa: BLE001 - not started yet
            state = "not started"
        if entry.get("status") == "finished":
            done += 1
        obj = (entry.get("objective") or {}).get("value")
        test = (entry.get("metrics") or {}).get("test_uar")
        print(
            f"  {k:<5} {arm:16} {sname:36} {state:12} "
            f"{obj if obj is None else format(obj, '.3f'):>10} "
            f"{test if test is None else format(test, '.3f'):>9}"
        )
    print(f"  {done} of {len(record.searches())} fold searches have their figures")
    for line in timing_lines(record):
        print(f"  {line}")
    state = study_status(record)
    if state in ("interrupted", "crashed"):
        print(f"resume it: sertune study resume {record.name}")
    elif state == "finished":
        print(f"its table: sertune study report {record.name}")
    return 0


def list_(a: argparse.Namespace) -> int:
    from ..study import list_studies, study_status

    found = list_studies()
    if not found:
        print("no studies yet; start one with `sertune study run SPEC --vs stl_baseline`")
        return 0
    print(f"{'name':28} {'status':12} {'created':20} {'outer':>5}  arms")
    for r in found:
        print(
            f"{r.name:28} {study_status(r):12} {r.created:20} {len(r.outer):>5}  {', '.join(r.arms)}"
        )
    return 0


def report(a: argparse.Namespace) -> int:
    from .. import tracking
    from ..study import load_study, write_report

    record = load_study(a.name)
    if not record.folds:
        print(f"study {a.name!r} has no finished fold search yet", file=sys.stderr)
        return 1
    write_report(
        record, tracking.Store(a.tracking_uri or record.tracking_uri), log=print, final=False
    )
    return 0


def remove(a: argparse.Namespace) -> int:
    from ..study import remove_study

    if not a.yes and sys.stdin.isatty():
        what = "its fold searches, record" + (" and MLflow runs" if a.mlflow else "")
        if input(f"remove study {a.name!r} ({what})? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    for line in remove_study(a.name, mlflow_runs=a.mlflow):
        print(line)
    return 0


def submit(a: argparse.Namespace) -> int:
    from ..submit import submit_study

    spec = _spec(a)
    sid = submit_study(
        spec, a.vs, a.outer, a.name, list(a.set or []), a.address, tracking_uri=a.tracking_uri
    )
    return 0 if sid else 1
