"""``sertune promote | predict | report``: the registry and using its models."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import command, print_result, tracking_option


def add(sub) -> None:
    pr = command(
        sub,
        "promote",
        "register a search's best model, gated on robustness (alias champion)",
        "sertune promote mtl-aug --gate 'val_robust/uar_snr10_babble>=0.45' --gate 'robust/uar_pgd0.005>=0.3'\n"
        "sertune promote mtl-aug --confirm-top 3 --seeds 3   # re-train the top 3 first, rank by mean",
        parents=[tracking_option()],
    )
    pr.add_argument("search", nargs="?", help="search name (or --study NAME)")
    pr.add_argument(
        "--study",
        metavar="NAME",
        help="register the configuration a finished study supports: the spec arm's most "
        "frequent fold winner (ties - a continuous space rarely repeats one - go to the fold "
        "champion that won its own fold most clearly, its margin over that fold's median trial "
        "in sd); no outer fold's test figure chooses. The model is that fold search's champion "
        "(trained without the fold's speakers); the study's table is the version's description",
    )
    pr.add_argument(
        "--objective",
        help="metric to pick the best by, a selection figure: val_* or val_robust/* (default: the "
        "search's first)",
    )
    pr.add_argument(
        "--gate",
        action="append",
        metavar="EXPR",
        help="e.g. 'val_robust/uar_snr10_white>=0.5' (repeatable; all must pass; means when "
        "confirmed). Gates on val_* / val_robust/* figures (validation speakers) choose: a better "
        "candidate failing one is passed over. Gates on robust/* / test_* figures (test "
        "speakers) only report on the champion so chosen: a failure refuses to register, never "
        "passes over to another candidate",
    )
    pr.add_argument(
        "--gate-on",
        choices=["mean", "lower"],
        default="mean",
        help="what a gate compares for a confirmed configuration: the mean over its seeds, or the "
        "cautious end of the mean's 95 %% confidence interval (lower bound for >=)",
    )
    pr.add_argument("--name", default="ser-mtl-aug", help="registered model name")
    pr.add_argument(
        "--confirm-top",
        type=int,
        metavar="K",
        help="first re-train the K best configurations with --seeds fresh seeds",
    )
    pr.add_argument(
        "--seeds", type=int, default=3, help="fresh seeds per configuration with --confirm-top"
    )
    pr.add_argument("--num-cpus", type=int, help="CPUs for local Ray during --confirm-top")
    pr.set_defaults(func=promote)

    pd = command(
        sub,
        "predict",
        "emotion probabilities for audio files (a folder reads its wav/flac/ogg files)",
        "sertune predict models:/ser-mtl-aug@champion a.wav b.wav\n"
        "sertune predict models:/ser-mtl-aug@champion recordings/ --format csv > out.csv",
        parents=[tracking_option()],
    )
    pd.add_argument(
        "model_uri", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a folder"
    )
    pd.add_argument("files", nargs="+", help="audio files and/or folders")
    pd.add_argument(
        "--format", choices=("text", "json", "csv"), default="text", help="output format"
    )
    pd.set_defaults(func=predict)

    rp = command(
        sub,
        "report",
        "robustness report of a model on a corpus (noise × SNR, FGSM/PGD × ε)",
        "sertune report models:/ser-mtl-aug@champion --corpus emodb --root /data/emodb --split all",
        parents=[tracking_option()],
    )
    rp.add_argument("model_uri")
    rp.add_argument(
        "--corpus", required=True, help="corpus adapter (e.g. manifest, emodb, synthetic)"
    )
    rp.add_argument("--root", required=True, help="the corpus folder (or manifest)")
    rp.add_argument("--fold", type=int, default=0, help="test speaker group with --split test")
    rp.add_argument(
        "--split",
        choices=("test", "all"),
        default="test",
        help="test: that fold's speakers; all: every labelled clip (a cross corpus)",
    )
    rp.add_argument("--out", default="robustness-report", help="output folder")
    rp.add_argument(
        "--max-utterances",
        type=int,
        default=200,
        help="cap, as a class-stratified sample (0: no cap)",
    )
    rp.set_defaults(func=report)


def promote(a: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..registry import promote as do_promote

    study = None
    if a.study:
        from ..study import load_study, output_dir, supported_fold

        if a.search:
            raise UsageError("give a search name or --study NAME, not both")
        study = load_study(a.study)
        if study.status != "finished":
            raise UsageError(f"study {a.study!r} has not finished ({study.status})")
        fold, entry, why = supported_fold(study)
        a.search = entry["search"]
        print(
            f"study {study.name}: outer fold {fold}'s champion of {study.arms[0]!r}, search "
            f"{a.search} ({entry['objective']['metric']}={entry['objective']['value']:.4f} on its "
            f"validation speakers): {why}"
        )
    elif not a.search:
        raise UsageError("promote: give a search name, or --study NAME")

    if a.confirm_top:
        from ..search import confirm_search

        print_result(
            confirm_search(
                a.search, a.confirm_top, a.seeds, num_cpus=a.num_cpus, verbose=a.verbose
            )
        )
    v = do_promote(
        a.search,
        objective=a.objective,
        gates=a.gate or [],
        model_name=a.name,
        gate_on=a.gate_on,
        tracking_uri=a.tracking_uri,
    )
    if study is not None:
        from .. import tracking

        table = (output_dir(study.name) / "report.md").read_text()
        head = (
            f"**Promoted from study {study.name}** (outer fold {fold}'s champion of the spec arm, "
            f"search `{a.search}`, trained without that fold's speakers: {why}). The study's "
            "table:\n\n"
        )
        store = tracking.Store(a.tracking_uri or study.tracking_uri)
        store.describe_version(v["name"], v["version"], (head + table)[:60000])
        print(f"version {v['version']}'s description: the study's table ({study.name})")
    for skipped in v["passed_over"]:
        print(
            f"passed over the {skipped['label']} ({v['objective']}={skipped['value']:.4f}): "
            f"failed {', '.join(skipped['failed'])}"
        )
    for line in v.get("reported", []):
        print(line)
    spread = f" ± {v['sd']:.4f} over {v['n']} seeds" if v["confirmed"] else ""
    what = "already registered as" if v.get("reused") else "registered"
    print(
        f"{what} {v['name']} version {v['version']} (trial {v['trial']}, "
        f"{v['objective']}={v['value']:.4f}{spread})"
    )
    if v.get("model_source"):
        print(f"the model: {v['model_source']}")
    print(
        f"alias champion -> version {v['version']}"
        + (f"; previous -> version {v['previous']}" if v.get("previous") else "")
    )
    print(f"use it: sertune predict models:/{v['name']}@champion FILE.wav")
    return 0


def predict(a: argparse.Namespace) -> int:
    from ..inference import format_predictions, predict_files

    rows = predict_files(a.model_uri, a.files, tracking_uri=a.tracking_uri)
    print(format_predictions(rows, a.format))
    return 0 if all(not r.get("error") for r in rows) else 1


def report(a: argparse.Namespace) -> int:
    from ..inference import report_model

    out = report_model(
        a.model_uri,
        a.corpus,
        a.root,
        a.out,
        fold=a.fold,
        split=a.split,
        tracking_uri=a.tracking_uri,
        max_utterances=a.max_utterances or None,
    )
    print((Path(out) / "summary.md").read_text())
    print(f"report: {out}/robustness.json, {out}/uar_vs_snr.png, {out}/uar_vs_eps.png")
    return 0
