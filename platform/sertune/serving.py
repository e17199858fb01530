"""Trained models as MLflow pyfunc models, loaded without pickle.

``log_pyfunc_model`` stores the trial's ``model.safetensors`` + ``model.json`` with
``loader_module="sertune.serving"``: MLflow loads it by calling :func:`_load_pyfunc` from the
installed package, so nothing in the artifact is unpickled or executed. Input: a DataFrame with a
``waveform`` column (16 kHz mono float arrays); output: ``emotion`` plus one ``p_<label>`` column
per class (rows sum to 1).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

META = "sertune_model.json"


class SERPyfuncModel:
    def __init__(self, predictor: Any, trainable: str):
        self.predictor = predictor
        self.trainable = trainable
        self.label_names = list(predictor.label_names)

    def get_raw_model(self) -> SERPyfuncModel:
        """MLflow's ``PyFuncModel.get_raw_model()`` hook: this wrapper (predictor + trainable)."""
        return self

    def predict(self, model_input: Any, params: dict | None = None):
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            waves = list(model_input["waveform"])
        elif isinstance(model_input, dict):
            waves = list(model_input["waveform"])
        else:
            waves = list(model_input)
        probs = self.predictor.predict_proba([np.asarray(w, dtype=np.float32) for w in waves])
        out = pd.DataFrame(probs, columns=[f"p_{n}" for n in self.label_names])
        out.insert(0, "emotion", [self.label_names[i] for i in probs.argmax(1)])
        return out


def _load_pyfunc(data_path: str) -> SERPyfuncModel:
    """MLflow's loader_module hook: rebuild the network from JSON, load safetensors weights."""
    from .trainable import get_trainable

    meta = json.loads((Path(data_path) / META).read_text())
    return SERPyfuncModel(
        get_trainable(meta["trainable"]).load_predictor(data_path), meta["trainable"]
    )


def log_pyfunc_model(run_id: str, model_dir: Path, trainable: str, tracking_uri: str) -> str:
    """Log the model on ``run_id``; return its URI (``models:/m-...``) for registration."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from . import __version__

    with tempfile.TemporaryDirectory(prefix="sertune-pyfunc-") as tmp:
        data = Path(tmp) / "model"
        data.mkdir()
        for name in ("model.safetensors", "model.json"):
            shutil.copy(model_dir / name, data / name)
        (data / META).write_text(
            json.dumps({"trainable": trainable, "sertune_version": __version__})
        )
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
                signature=signature,
                input_example=example,
                pip_requirements=[f"sertune=={__version__}"],
            )
        return info.model_uri
