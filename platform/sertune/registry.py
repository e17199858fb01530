"""Promotion to the MLflow model registry (gated on robustness), prediction and on-demand reports."""

from __future__ import annotations

import json
import operator
import re
import subprocess
from pathlib import Path
from typing import Any

from . import __version__, settings
from .tracking import TAG_KIND, TAG_SEARCH, TAG_STATUS, TAG_TRIAL, configure, get_experiment_id

_OPS = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}
_GATE = re.compile(r"^\s*([\w./-]+)\s*(>=|<=|==|>|<)\s*(-?[\d.]+(?:e-?\d+)?)\s*$")


class GateFailed(RuntimeError):
    """A robustness gate did not pass; ``str()`` is the gate table."""


def parse_gate(expr: str) -> tuple[str, str, float]:
    m = _GATE.match(expr)
    if not m:
        raise ValueError(
            f"--gate {expr!r}: expected METRIC OP VALUE, e.g. 'robust/uar_snr10_white>=0.5'"
        )
    return m.group(1), m.group(2), float(m.group(3))


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except Exception:
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def trial_runs(client: Any, search: str) -> list[Any]:
    exp = get_experiment_id(client)
    return client.search_runs(
        [exp],
        filter_string=f"tags.`{TAG_SEARCH}` = '{search}' and tags.`{TAG_KIND}` = 'trial'",
        max_results=5000,
    )


def promote(
    search: str,
    objective: str | None = None,
    gates: list[str] | None = None,
    model_name: str = "ser-mtl-aug",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Register the best trial of ``search`` as a new version and point ``champion`` at it."""
    from mlflow import MlflowClient

    from .search import load_record

    record = load_record(search)
    uri = configure(tracking_uri or record.get("tracking_uri"))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    objectives = record["spec"]["objective"]
    first = (
        objectives["metrics"][0]
        if objectives.get("metrics")
        else {"metric": objectives["metric"], "mode": objectives["mode"]}
    )
    metric = objective or first["metric"]
    mode = first["mode"] if metric == first["metric"] else "max"
    parsed = [parse_gate(g) for g in gates or []]

    runs = [
        r
        for r in trial_runs(client, search)
        if r.data.tags.get(TAG_STATUS) in ("finished", "stopped_early")
    ]
    candidates = [
        r for r in runs if metric in r.data.metrics and r.data.tags.get("sertune.model_uri")
    ]
    if not candidates:
        raise ValueError(
            f"search {search!r}: no finished trial with metric {metric!r} and a logged model"
        )
    candidates.sort(key=lambda r: r.data.metrics[metric], reverse=(mode == "max"))
    best = candidates[0]
    m = best.data.metrics

    rows, failed = [], False
    for name, op, value in parsed:
        actual = m.get(name)
        ok = actual is not None and _OPS[op](actual, value)
        failed |= not ok
        rows.append(
            (
                name,
                f"{op} {value:g}",
                "missing" if actual is None else f"{actual:.4f}",
                "pass" if ok else "FAIL",
            )
        )
    if failed:
        width = max(len(r[0]) for r in rows)
        lines = [
            f"refusing to promote trial {best.data.tags.get(TAG_TRIAL)} of {search!r}: a gate failed",
            f"  {'metric'.ljust(width)}  required   actual    result",
        ]
        lines += [f"  {a.ljust(width)}  {b:9}  {c:8}  {d}" for a, b, c, d in rows]
        raise GateFailed("\n".join(lines))

    tags = {
        "sertune.search": search,
        "sertune.trial_id": best.data.tags.get(TAG_TRIAL, ""),
        "sertune.data_fingerprint": record["data"].get("fingerprint")
        or _parent_tag(client, best, "sertune.data_fingerprint"),
        "sertune.code_version": code_version(),
        "sertune.objective": f"{metric}={m[metric]:.6f}",
        "sertune.gates": json.dumps(gates or []),
    }
    try:
        client.get_registered_model(model_name)
    except Exception:
        client.create_registered_model(
            model_name, description="MTL-AUG speech emotion models promoted by sertune"
        )
    previous = None
    try:
        previous = client.get_model_version_by_alias(model_name, "champion").version
    except Exception:
        pass
    import mlflow

    mv = mlflow.register_model(best.data.tags["sertune.model_uri"], model_name, tags=tags)
    version = str(mv.version)
    _wait_ready(client, model_name, version)
    if previous:
        client.set_registered_model_alias(model_name, "previous", previous)
    client.set_registered_model_alias(model_name, "champion", version)
    return {
        "name": model_name,
        "version": version,
        "previous": str(previous) if previous else None,
        "trial": tags["sertune.trial_id"],
        "objective": metric,
        "value": m[metric],
        "run_id": best.info.run_id,
        "gates": rows,
    }


def _parent_tag(client: Any, run: Any, tag: str) -> str:
    parent = run.data.tags.get("mlflow.parentRunId")
    return client.get_run(parent).data.tags.get(tag, "") if parent else ""


def _wait_ready(client: Any, name: str, version: str, timeout_s: float = 60) -> None:
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if client.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.5)


def load_pyfunc(model_uri: str, tracking_uri: str | None = None):
    import mlflow

    configure(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri)


def predict_files(
    model_uri: str, files: list[str], tracking_uri: str | None = None
) -> list[dict[str, Any]]:
    """Emotion and probabilities per file; unreadable files are reported, not fatal."""
    import pandas as pd

    from trainables.data.audio import AudioError, read_audio

    model = load_pyfunc(model_uri, tracking_uri)
    sr = model.get_raw_model().predictor.sample_rate
    rows, waves = [], []
    for f in files:
        try:
            waves.append(read_audio(f, sr))
            rows.append({"file": f})
        except AudioError as e:
            rows.append({"file": f, "error": str(e)})
    good = [r for r in rows if not r.get("error")]
    if waves:
        out = model.predict(pd.DataFrame({"waveform": [w.tolist() for w in waves]}))
        for r, (_, pr) in zip(good, out.iterrows(), strict=True):
            r["emotion"] = pr["emotion"]
            r["probabilities"] = {c[2:]: float(pr[c]) for c in out.columns if c.startswith("p_")}
    return rows


def report_model(
    model_uri: str,
    corpus: str,
    root: str,
    out: str,
    fold: int = 0,
    tracking_uri: str | None = None,
    max_utterances: int | None = 200,
) -> Path:
    """Run the robustness evaluation of a logged/registered model on a corpus's test speakers."""
    from .trainable import get_trainable

    model = load_pyfunc(model_uri, tracking_uri)
    raw = model.get_raw_model()
    meta_trainable = getattr(raw, "trainable", "mtl_aug")
    trainable = get_trainable(meta_trainable)
    data = trainable.prepare_data(
        {"corpus": corpus, "root": root, "fold": fold}, settings.cache_root()
    )
    out_path = Path(out)
    from .spec import RobustnessSpec

    options = RobustnessSpec(max_utterances=max_utterances).model_dump()
    trainable.robustness_report(raw.predictor, data, options, out_path)
    return out_path
