"""``sertune demo | ui | bench``: the tour, the MLflow UI, and benchmarks that print figures."""

from __future__ import annotations

import argparse
import os

from ..errors import UsageError
from .options import command, tracking_option


def add_demo(sub) -> None:
    d = command(
        sub,
        "demo",
        "the one-command tour: synthetic corpus, small search, promotion, prediction",
        "sertune demo\nSERTUNE_HOME=/tmp/try sertune demo --trials 4",
        parents=[tracking_option()],
    )
    d.add_argument("--trials", type=int, default=6, help="trials in the demo search")
    d.add_argument("--concurrency", type=int, default=2, help="trials at a time")
    d.add_argument("--epochs", type=int, default=4, help="max epochs per trial")
    d.add_argument("--name", default="demo", help="search name")
    d.set_defaults(func=demo)


def add_doctor(sub) -> None:
    from .search import spec_options

    dr = command(
        sub,
        "doctor",
        "check that this environment can run a search: torch and torchaudio load and run their "
        "kernels, versions equal the lock, which GPUs are visible, Ray/MLflow/Optuna/transformers "
        "import; given a spec, that it validates and that its model builds (a self-supervised "
        "encoder's checkpoint loads and runs a forward pass)",
        "sertune doctor\nsertune doctor --ray-address 10.0.0.5:6379   # and every node of that cluster"
        "\nsertune doctor mtl_aug_ssl --set params.model.ssl.checkpoint=/models/wavlm-base-plus",
        parents=[spec_options(smoke=False)],
    )
    dr.add_argument(
        "spec", nargs="?", help="a spec (path or preset name) whose model to check as well"
    )
    dr.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="also run the checks on every node of this Ray cluster (GCS address)",
    )
    dr.set_defaults(func=doctor)


def add(sub) -> None:
    ui = command(
        sub,
        "ui",
        "the MLflow UI on the default store, opened on the trials table",
        "sertune ui\nsertune ui --port 5050 --host 0.0.0.0",
        parents=[tracking_option()],
    )
    ui.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    ui.add_argument("--port", type=int, default=5000, help="port to listen on")
    ui.add_argument("--workers", type=int, default=1, help="server processes (1 fits a laptop)")
    ui.add_argument("--study", metavar="NAME", help="also print the page of this study's run")
    ui.set_defaults(func=run_ui)

    b = sub.add_parser("bench", help="benchmarks that print figures and ratios")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")
    bt = command(
        bsub,
        "train",
        "on-device pipeline vs. model-step ceiling (samples/s); a small trial's epoch time "
        "beside its end-of-trial evaluation (test + robustness report): eval = X.X epochs",
        "sertune bench train --device cuda --batch 256",
    )
    bt.add_argument("--device", default="auto", help="cpu | cuda | auto")
    bt.add_argument("--batch", type=int, help="batch size (default 256 on cuda, 32 on cpu)")
    bt.add_argument("--steps", type=int, default=20, help="steps per timed round")
    bt.add_argument("--rounds", type=int, default=3, help="interleaved rounds, median reported")
    bt.add_argument("--trainable", default="mtl_aug", help=argparse.SUPPRESS)
    bt.set_defaults(func=bench_train)

    be = command(
        bsub,
        "encoder",
        "MTL-AUG on a self-supervised encoder (WavLM Base/Large configs, random weights, nothing "
        "downloaded), frozen and top-2 fine-tuned: train-step samples/s (bf16 on CUDA), peak "
        "memory per slot and slots per GPU, fixed cost per trial warm vs from disk",
        "sertune bench encoder --device cuda              # base and large, frozen and top2\n"
        "sertune bench encoder --sizes tiny               # what a CPU can run",
    )
    be.add_argument("--device", default="auto", help="cpu | cuda | auto")
    be.add_argument(
        "--sizes", help="comma-separated: tiny, base, large (default: base,large on cuda; tiny)"
    )
    be.add_argument("--modes", help="comma-separated: frozen, top2 (default: both)")
    be.add_argument("--batch", type=int, help="clips per step (default 16 on cuda, 2 on cpu)")
    be.add_argument("--seconds", type=float, default=3.0, help="clip length (default 3 s)")
    be.add_argument("--steps", type=int, default=5, help="steps per timed round")
    be.add_argument("--rounds", type=int, default=3, help="timed rounds, median reported")
    be.add_argument("--trainable", default="mtl_aug", help=argparse.SUPPRESS)
    be.set_defaults(func=bench_encoder)

    bd = command(
        bsub,
        "data",
        "a corpus of N hours: cache build with 1 and N processes, training input resident vs "
        "streamed (budget below the corpus), each slot's peak memory",
        "sertune bench data --hours 5\nsertune bench data --root /data/mine/manifest.csv "
        "--device cuda",
    )
    bd.add_argument("--hours", type=float, default=5.0, help="synthetic corpus size (default 5)")
    bd.add_argument("--root", help="your own manifest (or folder with manifest.csv) instead")
    bd.add_argument("--workers", type=int, help="processes of the parallel build (default: CPUs)")
    bd.add_argument("--device", default="auto", help="cpu | cuda | auto")
    bd.add_argument(
        "--budget-mb",
        type=float,
        help="the streamed slot's budget (default: a quarter of the corpus)",
    )
    bd.add_argument("--steps", type=int, default=60, help="timed training steps per round")
    bd.add_argument("--rounds", type=int, default=3, help="alternating rounds, median reported")
    bd.add_argument("--batch", type=int, help="batch size (default 256 on cuda, 32 on cpu)")
    bd.add_argument("--sample-rate", type=int, default=16000, help="the synthetic files' rate")
    bd.add_argument("--trainable", default="mtl_aug", help=argparse.SUPPRESS)
    bd.set_defaults(func=bench_data)

    bs = command(
        bsub,
        "search",
        "fixed cost per trial: warm slots against one Train run per trial, side by side; packing",
        "sertune bench search --trials 8\nsertune bench search --fractional-gpus 0.25\n"
        "sertune bench search --set model.encoder=ssl --set model.ssl.checkpoint=/models/wavlm-base-plus",
    )
    bs.add_argument("--trials", type=int, default=8, help="short sequential trials per mode")
    bs.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a trainable parameter for every mode's trials, e.g. model.encoder=ssl "
        "(repeatable): the fixed cost with a self-supervised encoder, loaded once per warm slot "
        "vs once per trial",
    )
    bs.add_argument(
        "--fractional-gpus",
        type=float,
        default=0.0,
        help="GPU share per packed slot (needs a GPU; 0 packs CPU slots)",
    )
    bs.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    bs.set_defaults(func=bench_search)

    from .search import spec_options

    bp = command(
        bsub,
        "sampler",
        "the search's value: each sampler against random search at the same budget, over seeds",
        "sertune bench sampler\nsertune bench sampler --samplers random tpe gp --trials 12 --seeds 5\n"
        "sertune bench sampler mtl_aug --set data.corpus=emodb --set data.root=/data/emodb",
        parents=[spec_options(smoke=False)],
    )
    bp.add_argument(
        "spec",
        nargs="?",
        default="demo",
        help="the search to measure: a preset or a YAML file (default: demo, synthetic corpus)",
    )
    bp.add_argument(
        "--samplers",
        nargs="+",
        default=["random", "tpe"],
        help="samplers to compare (random first: the reference)",
    )
    bp.add_argument(
        "--pbt",
        action="store_true",
        help="also population-based training of the aux weights and augmentation mix",
    )
    bp.add_argument("--trials", type=int, default=8, help="trials per search")
    bp.add_argument("--seeds", type=int, default=3, help="searches per sampler (seeds 0..N-1)")
    bp.add_argument("--epochs", type=int, default=3, help="max epochs per trial")
    bp.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    bp.add_argument("--out", help="also write bench_sampler.png/.json into this folder")
    bp.set_defaults(func=bench_sampler)

    bn = command(
        bsub,
        "noise",
        "how much of each figure is the configuration and how much the seed: N random "
        "configurations x S seeds, between/within sd, reliability (ICC), smallest difference "
        "resolved",
        "sertune bench noise smoke --configs 6 --seeds 3\n"
        "sertune bench noise mtl_aug --set data.corpus=iemocap --set data.root=/data/IEMOCAP "
        "--configs 8 --seeds 4",
        parents=[spec_options()],
    )
    bn.add_argument("spec", help="a preset name (see `sertune search presets`) or a YAML file")
    bn.add_argument("--configs", type=int, default=6, help="configurations drawn from the space")
    bn.add_argument("--seeds", type=int, default=3, help="seeds per configuration (>= 2)")
    bn.add_argument("--num-cpus", type=int, help="CPUs for local Ray (default: all)")
    bn.add_argument("--out", help="also write bench_noise.png/.json into this folder")
    bn.set_defaults(func=bench_noise)

    sc = command(
        bsub,
        "scale",
        "driver and MLflow cost per trial at 100, 300, 1000 trials on a fake multi-GPU cluster",
        "sertune bench scale\nsertune bench scale --sizes 100 300 1000 --trial-seconds 2",
    )
    sc.add_argument(
        "--sizes", type=int, nargs="+", default=[100, 300, 1000], help="trials per run"
    )
    sc.add_argument(
        "--trial-seconds", type=float, default=2.0, help="simulated training per trial"
    )
    sc.add_argument("--epochs", type=int, default=4, help="reports per trial")
    sc.add_argument("--slots", type=int, default=8, help="concurrent trials (fake GPUs)")
    sc.set_defaults(func=bench_scale)

    bf = command(
        bsub,
        "faults",
        "fault drills end to end: one line per drill with what was lost",
        "sertune bench faults\nsertune bench faults --only sigint worker_kill",
    )
    bf.add_argument("--only", nargs="+", help="run only these drills")
    bf.add_argument("--list", action="store_true", help="list the drills and exit")
    bf.set_defaults(func=bench_faults)


def demo(a: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(
        trials=a.trials, concurrency=a.concurrency, epochs=a.epochs, name=a.name, verbose=a.verbose
    )


def doctor(a: argparse.Namespace) -> int:
    from ..doctor import environment, run_checks
    from ..errors import EnvironmentProblem

    print(f"sertune doctor: {environment()}")
    checks = run_checks()
    for c in checks:
        if c.ok:
            print(c.line())
    failed = [c for c in checks if not c.ok]
    if not failed and a.ray_address:
        import os

        from ..cluster import check_nodes, init_ray, shutdown_ray

        os.environ["RAY_ADDRESS"] = a.ray_address
        init_ray()
        try:
            print(f"  ok    {'nodes':11} {check_nodes(force=True)}")
        finally:
            shutdown_ray()
    if failed:
        raise EnvironmentProblem("\n".join(c.line() for c in failed))
    print("environment ok")
    if a.spec:
        from ..spec import load_spec
        from ..trainable import get_trainable

        spec = load_spec(a.spec, sets=a.set)  # a spec that does not validate: its problems, exit 2
        print(f"spec {spec.name}: valid ({spec.trainable})")
        lines = get_trainable(spec.trainable).check_model(dict(spec.params))
        for ok, text in lines:
            print(f"  {'ok  ' if ok else 'FAIL'}  {'model':12} {text}")
        if not all(ok for ok, _ in lines):
            raise EnvironmentProblem(f"spec {spec.name}: its model does not build here")
    return 0


def run_ui(a: argparse.Namespace) -> int:
    from ..ui import serve_ui

    run_id = None
    if a.study:
        from ..study import load_study

        run_id = load_study(a.study).run_id
    return serve_ui(a.host, a.port, a.tracking_uri, workers=a.workers, run_id=run_id)


def bench_train(a: argparse.Namespace) -> int:
    from ..trainable import get_trainable

    r = get_trainable(a.trainable).bench_train(a.device, a.batch, a.steps, a.rounds)
    print(f"(a) ceiling  (train step on features on the device): {r.ceiling:,.0f} samples/s")
    print(f"(b) pipeline (waveform -> augment -> log-mel -> step): {r.pipeline:,.0f} samples/s")
    print(f"pipeline/ceiling: {r.ratio:.2f}")
    return 0


def bench_encoder(a: argparse.Namespace) -> int:
    from ..trainable import get_trainable

    if a.steps < 1 or a.rounds < 1 or (a.batch is not None and a.batch < 1) or a.seconds <= 0:
        raise UsageError("--steps, --rounds, --batch and --seconds must be positive")

    def names(text: str | None) -> list[str] | None:
        return [n.strip() for n in text.split(",") if n.strip()] if text else None

    try:
        get_trainable(a.trainable).bench_encoder(
            sizes=names(a.sizes),
            modes=names(a.modes),
            device=a.device,
            batch=a.batch,
            seconds=a.seconds,
            steps=a.steps,
            rounds=a.rounds,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0


def bench_data(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import settings
    from ..trainable import get_trainable

    if a.hours <= 0 or (a.workers is not None and a.workers < 1) or a.steps < 1 or a.rounds < 1:
        raise UsageError("--hours, --workers, --steps and --rounds must be positive")
    workers = a.workers or max(2, len(os.sched_getaffinity(0)))
    get_trainable(a.trainable).bench_data(
        hours=a.hours,
        workers=workers,
        device=a.device,
        budget_mb=a.budget_mb,
        steps=a.steps,
        rounds=a.rounds,
        batch=a.batch,
        root=a.root,
        home=Path(settings.home()),
        sample_rate=a.sample_rate,
    )
    return 0


def bench_search(a: argparse.Namespace) -> int:
    from ..bench.search import run_search_bench

    return run_search_bench(
        trials=a.trials, gpus=a.fractional_gpus, num_cpus=a.num_cpus, sets=a.set
    )


def bench_sampler(a: argparse.Namespace) -> int:
    from ..bench.sampler import run_sampler_bench
    from ..spec import SpecError
    from ..strategies import SAMPLERS

    unknown = [s for s in a.samplers if s not in SAMPLERS]
    if unknown:
        raise SpecError(
            "--samplers", "", f"unknown sampler {unknown[0]!r}; known: {', '.join(SAMPLERS)}"
        )
    return run_sampler_bench(
        a.samplers,
        spec=a.spec,
        sets=a.set,
        pbt=a.pbt,
        trials=a.trials,
        seeds=a.seeds,
        epochs=a.epochs,
        num_cpus=a.num_cpus,
        out=a.out,
    )


def bench_noise(a: argparse.Namespace) -> int:
    from ..bench.noise import run_noise_bench

    run_noise_bench(
        a.spec,
        configs=a.configs,
        seeds=a.seeds,
        sets=a.set,
        smoke=a.smoke,
        num_cpus=a.num_cpus,
        out=a.out,
    )
    return 0


def bench_scale(a: argparse.Namespace) -> int:
    from ..bench.scale import run_scale_bench

    return run_scale_bench(a.sizes, a.trial_seconds, a.epochs, a.slots)


def bench_faults(a: argparse.Namespace) -> int:
    from ..bench.faults import DRILLS, run_drills

    if a.list:
        for name, drill in DRILLS.items():
            print(f"{name:18} {drill.__doc__.splitlines()[0]}")
        return 0
    return run_drills(a.only)
