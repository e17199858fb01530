"""``sertune demo``: the README's main job, end to end on the embedded default.

Synthesise a corpus → run a small search on local Ray (Ray Tune + Optuna over warm Ray Train
slots) → record it in MLflow (SQLite) → promote the best model behind a robustness gate → predict
two files with the champion → print where everything is.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import settings
from .errors import GateFailed
from .trainable import get_trainable


def run_demo(
    trials: int = 6,
    concurrency: int = 2,
    epochs: int = 4,
    name: str = "demo",
    verbose: bool = False,
) -> int:
    from .doctor import preflight
    from .inference import format_predictions, predict_files
    from .leaderboard import format_result
    from .registry import promote
    from .search import run_search
    from .spec import load_spec, presets

    t0 = time.monotonic()
    preflight()  # a broken torch/torchaudio: one line, exit 2, before anything starts
    spec_path = presets()["demo"]
    raw_budget = load_spec(spec_path).budget.model_dump()
    raw_budget.update(
        trials=trials,
        concurrency=concurrency,
        max_epochs=epochs,
        grace_epochs=min(raw_budget["grace_epochs"], epochs),
    )
    spec = load_spec(spec_path, {"name": name, "budget": raw_budget})
    print(
        f"[demo 1/4] searching {trials} configurations of MTL-AUG ({concurrency} at a time, "
        f"≤{epochs} epochs) on a synthetic corpus — SERTUNE_HOME={settings.home()}"
    )
    t_search = time.monotonic()
    result = run_search(spec, verbose=verbose, replace=True)  # a demo again replaces the last
    search_s = time.monotonic() - t_search
    print(format_result(result, settings.tracking_uri()))

    # the trainable's first robustness figure (MTL-AUG's: UAR at 10 dB SNR), against a low bar,
    # measured on the validation speakers (val_robust/*): a gate that chooses the champion
    robust = get_trainable(spec.trainable).display_robust[0]
    gate = f"val_{robust}>=0.3" if robust.startswith("robust/") else f"{robust}>=0.3"
    print(f"\n[demo 2/4] promoting the best trial that passes the gate {gate}")
    model_uri = None
    try:
        v = promote(name, gates=[gate])
        for skipped in v["passed_over"]:
            print(
                f"  passed over the {skipped['label']} ({v['objective']}={skipped['value']:.3f}): "
                f"failed {', '.join(skipped['failed'])}"
            )
        print(
            f"registered {v['name']} version {v['version']} from trial {v['trial']} "
            f"({v['objective']}={v['value']:.3f}); alias champion -> {v['version']}"
        )
        model_uri = f"models:/{v['name']}@champion"
    except GateFailed as e:
        print(e)
        print("no champion this time; the search's runs are still in MLflow")

    if model_uri:
        print(f"\n[demo 3/4] predicting with {model_uri}")
        wav = Path(spec.data.root).expanduser() / "wav"
        files = sorted(wav.glob("*/*_angry_000.wav"))[:1] + sorted(wav.glob("*/*_sad_000.wav"))[:1]
        print(format_predictions(predict_files(model_uri, [str(w) for w in files])))

    print(
        f"\n[demo 4/4] done in {time.monotonic() - t0:.0f}s (search {search_s:.0f}s). Where everything is:"
    )
    print(f"  corpus            {Path(spec.data.root).expanduser()}")
    print(f"  trials            {result.path}")
    print(f"  MLflow store      {settings.tracking_uri()}")
    print(f"  MLflow artifacts  {settings.artifact_root()}")
    print("  browse            sertune ui   (opens on the trials table)")
    print(f"  status            sertune search status {name}")
    if model_uri:
        print(f"  predict           sertune predict {model_uri} FILE.wav")
    return 0
