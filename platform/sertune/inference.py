"""Using a logged or registered model: ``sertune predict`` and ``sertune report``.

Nothing here imports Ray or Tune, so a prediction starts in seconds. A model is resolved through
MLflow once (``models:/name@alias``, ``models:/name/3``, ``runs:/<id>/model`` or a local folder)
and its files are cached under ``$SERTUNE_HOME/models``; it then loads with the trainable's own
pickle-free loader, exactly as ``mlflow models serve`` would load it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from . import settings
from .errors import DataError, ModelError, ModelNeedsFiles, NotFound

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


def _resolve_version(model_uri: str, tracking_uri: str | None) -> str:
    """``models:/name@alias`` -> ``models:/name/<version>`` (so the cache key is exact)."""
    from . import tracking

    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    name, _, alias = model_uri[len("models:/") :].partition("@")
    store = tracking.Store(tracking_uri)
    version = store.version_of(name, alias)
    if version is None:
        raise NotFound(f"{model_uri}: no model {name!r} with alias {alias!r} in {store.uri}")
    return f"models:/{name}/{version}"


def model_dir(model_uri: str, tracking_uri: str | None = None) -> Path:
    """The local folder of a model's ``MLmodel`` (downloaded once, then cached)."""
    local = Path(model_uri)
    if local.is_dir():
        return local
    from . import tracking

    tracking.configure(tracking_uri)
    exact = _resolve_version(model_uri, tracking_uri)
    store = settings.tracking_uri(tracking_uri)
    key = hashlib.sha1(f"{store}|{exact}".encode()).hexdigest()[:16]
    cache = settings.home() / "models" / key
    if (cache / "MLmodel").exists():  # a version's (or a run's) files never change
        return cache
    partial = cache.with_name(f"{cache.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        path = tracking.download_model(exact, partial)
    except Exception as e:
        shutil.rmtree(partial, ignore_errors=True)
        if tracking.is_missing(e) or "not found" in str(e).lower():
            raise NotFound(f"{model_uri}: no such model in {store}") from None
        raise
    # the cache holds only whole downloads (verified when loaded)
    shutil.rmtree(cache, ignore_errors=True)
    Path(path).rename(cache)
    return cache


def data_dir(root: Path) -> Path:
    """The trainable's own model folder inside a pyfunc model's folder ``root``."""
    import yaml

    try:
        conf = yaml.safe_load((root / "MLmodel").read_text())
        return root / conf["flavors"]["python_function"]["data"]
    except (OSError, KeyError, TypeError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelError(f"{root / 'MLmodel'}: not a sertune pyfunc model ({e})") from None


def load_model(model_uri: str, tracking_uri: str | None = None):
    """The pyfunc wrapper (``sertune.serving.SERPyfuncModel``) of a model, loaded without MLflow's
    generic loader: no environment checks, no code-path juggling in this process."""
    from .serving import _load_pyfunc

    root = model_dir(model_uri, tracking_uri)
    cached = root.parent == settings.home() / "models"
    try:
        return _load_pyfunc(str(data_dir(root)))
    except ModelNeedsFiles:  # the copy is whole: what it names is missing here
        raise
    except ModelError as e:
        if not cached:
            raise
        shutil.rmtree(root, ignore_errors=True)  # never served again; the next call downloads
        raise ModelError(
            f"{e} - the local copy is removed; the next call downloads it again"
        ) from None


def load_pyfunc(model_uri: str, tracking_uri: str | None = None):
    """MLflow's own loader (what ``mlflow models serve`` uses), for checks and notebooks."""
    from . import tracking

    tracking.configure(tracking_uri)
    return tracking.load_pyfunc(model_uri)


def audio_files(paths: list[str]) -> list[str]:
    """Files as given; a folder contributes its audio files (recursively, sorted)."""
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise DataError(
                    f"{path}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in this folder"
                )
            out += [str(f) for f in found]
        else:
            out.append(p)
    return out


def predict_files(
    model_uri: str, files: list[str], tracking_uri: str | None = None
) -> list[dict[str, Any]]:
    """Emotion and probabilities per file; unreadable files are reported, not fatal."""
    from .trainable import get_trainable

    model = load_model(model_uri, tracking_uri)
    trainable = get_trainable(model.trainable)
    sr = model.predictor.sample_rate
    rows, waves = [], []
    for f in audio_files(files):
        try:
            waves.append(trainable.read_audio(f, sr))
            rows.append({"file": f})
        except DataError as e:
            rows.append({"file": f, "error": str(e)})
    good = [r for r in rows if not r.get("error")]
    if waves:
        probs = model.predictor.predict_proba(waves)
        for r, p in zip(good, probs, strict=True):
            if not np.isfinite(np.asarray(p, dtype=float)).all():
                raise ModelError(
                    f"{model_uri}: the model gives non-finite probabilities for {r['file']}: "
                    "its weights are damaged or diverged; nothing is predicted"
                )
            r["emotion"] = model.label_names[int(p.argmax())]
            r["probabilities"] = {n: float(v) for n, v in zip(model.label_names, p, strict=True)}
    return rows


def format_predictions(rows: list[dict[str, Any]], fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        import csv
        import io

        labels = next((list(r["probabilities"]) for r in rows if r.get("probabilities")), [])
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "emotion", *(f"p_{n}" for n in labels), "error"])
        for r in rows:
            probs = r.get("probabilities") or {}
            w.writerow(
                [
                    r["file"],
                    r.get("emotion", ""),
                    *(f"{probs[n]:.6f}" if n in probs else "" for n in labels),
                    r.get("error", ""),
                ]
            )
        return buf.getvalue().rstrip("\n")
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['file']}: skipped ({r['error']})")
            continue
        probs = "  ".join(f"{k}={v:.3f}" for k, v in r["probabilities"].items())
        lines.append(f"{r['file']}: {r['emotion']}  ({probs})")
    return "\n".join(lines)


def report_model(
    model_uri: str,
    corpus: str,
    root: str,
    out: str,
    fold: int = 0,
    tracking_uri: str | None = None,
    max_utterances: int | None = 200,
    split: str = "test",
) -> Path:
    """The robustness report of a model on a corpus: its test speakers, or every labelled clip
    (``split="all"``, e.g. a cross corpus); a cap takes a class-stratified sample."""
    from .spec import RobustnessSpec
    from .trainable import get_trainable

    model = load_model(model_uri, tracking_uri)
    trainable = get_trainable(model.trainable)
    data = trainable.prepare_data(
        {"corpus": corpus, "root": root, "fold": fold},
        settings.cache_root(),
        progress=lambda m: None,
    )
    out_path = Path(out)
    options = RobustnessSpec(max_utterances=max_utterances).model_dump()
    trainable.robustness_report(
        model.model_dir, data, options, out_path, split=split, title=model_uri
    )
    return out_path
