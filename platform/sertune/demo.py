"""``sertune demo``: the README's main job, end to end on the embedded default.

Synthesise a corpus → run a small search on local Ray (Ray Tune + Optuna over Ray Train trials)
→ record it in MLflow (SQLite) → promote the best model behind a robustness gate → predict one
file with the champion → print where everything is.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import settings


def preset(name: str) -> Path:
    import search_spaces

    return Path(search_spaces.__file__).parent / f"{name}.yaml"


def run_demo(trials: int = 6, concurrency: int = 2, epochs: int = 4, name: str = "demo") -> int:
    from .registry import GateFailed, predict_files, promote
    from .search import format_table, run_search
    from .spec import load_spec

    t0 = time.monotonic()
    spec_path = preset("demo")
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
    result = run_search(spec)
    print()
    print(format_table(result))

    print("\n[demo 2/4] promoting the best trial (gate: robust/uar_snr10_white >= 0.3)")
    try:
        v = promote(name, gates=["robust/uar_snr10_white>=0.3"])
        print(
            f"registered {v['name']} version {v['version']} from trial {v['trial']} "
            f"({v['objective']}={v['value']:.3f}); alias champion -> {v['version']}"
        )
        model_uri = f"models:/{v['name']}@champion"
    except GateFailed as e:
        print(e)
        print("no champion this time; the search's runs are still in MLflow")
        model_uri = None

    if model_uri:
        print(f"\n[demo 3/4] predicting with {model_uri}")
        wavs = sorted((Path(spec.data.root).expanduser() / "wav").glob("*/*_angry_000.wav"))[:1]
        wavs += sorted((Path(spec.data.root).expanduser() / "wav").glob("*/*_sad_000.wav"))[:1]
        for r in predict_files(model_uri, [str(w) for w in wavs]):
            probs = "  ".join(f"{k}={p:.2f}" for k, p in r["probabilities"].items())
            print(f"  {Path(r['file']).name}: {r['emotion']}  ({probs})")

    print(f"\n[demo 4/4] done in {time.monotonic() - t0:.0f}s. Where everything is:")
    print(f"  corpus            {Path(spec.data.root).expanduser()}")
    print(f"  trials            {result.path}")
    print(f"  MLflow store      {settings.tracking_uri()}")
    print(f"  MLflow artifacts  {settings.artifact_root()}")
    print("  browse            sertune ui   (then open http://127.0.0.1:5000)")
    print(f"  status            sertune search status {name}")
    if model_uri:
        print(f"  predict           sertune predict {model_uri} FILE.wav")
    return 0
