"""Models in MLflow: logging a trial's model as a pyfunc, fetching its files and MLflow's own
loader (registering a version is :meth:`sertune.tracking.Store.register`). The model format
itself (what loads it, what it needs) is ``sertune.serving``'s; here are only the calls that
move it in and out of MLflow."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np


def log_pyfunc_model(run_id: str, model_dir: Path, trainable: str, tracking_uri: str) -> str:
    """Log the model on ``run_id``; return its URI (``models:/m-...``) for registration."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from .. import __version__
    from ..serving import META, MODEL_FILES, _load_pyfunc, code_dirs, file_digests, requirements

    with tempfile.TemporaryDirectory(prefix="sertune-pyfunc-") as tmp:
        data = Path(tmp) / "model"
        data.mkdir()
        for name in MODEL_FILES:
            shutil.copy(Path(model_dir) / name, data / name)
        meta = {"trainable": trainable, "sertune_version": __version__}
        (data / META).write_text(json.dumps({**meta, "sha256": file_digests(data)}))
        model = _load_pyfunc(str(data))
        sr = model.predictor.sample_rate
        t = np.arange(sr // 2) / sr
        example = pd.DataFrame(
            {"waveform": [(0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float64).tolist()]}
        )
        signature = infer_signature(example, model.predict(example))
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module="sertune.serving",
                data_path=str(data),
                code_paths=code_dirs(Path(tmp) / "code"),
                signature=signature,
                input_example=example,  # serving_input_example.json shows callers the format
                pip_requirements=requirements(model_dir),
            )
        return info.model_uri


def download_model(artifact_uri: str, dst: Path) -> Path:
    """A model's files (``models:/...``, ``runs:/...``) copied to ``dst``."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))


def load_pyfunc(model_uri: str):
    """MLflow's generic pyfunc loader (what ``mlflow models serve`` runs)."""
    import mlflow

    return mlflow.pyfunc.load_model(model_uri)
