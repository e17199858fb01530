"""Trained models as MLflow pyfunc models that load without pickle and serve anywhere.

``log_pyfunc_model`` stores the trial's best ``model.safetensors`` + ``model.json`` with
``loader_module="sertune.serving"`` and the code that loads it (``code/sertune`` and
``code/trainables``, a few hundred kB of Python) beside it, so the model needs nothing from this
checkout: its requirements are public packages (torch, torchaudio, safetensors, numpy, pandas,
mlflow), and ``mlflow models serve`` or a fresh virtualenv with ``pip install -r
requirements.txt`` loads it. Nothing in the artifact is unpickled; the loader rebuilds the
network from JSON and reads tensors.

Input: a DataFrame with a ``waveform`` column (16 kHz mono float arrays, any length); output:
``emotion`` plus one ``p_<label>`` column per class (rows sum to 1). Clips go through the same
windows as validation, test and the robustness report (``trainables.common.utterances``).
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
    def __init__(self, predictor: Any, trainable: str, model_dir: str | Path):
        self.predictor = predictor
        self.trainable = trainable
        self.model_dir = Path(model_dir)
        self.label_names = list(predictor.label_names)

    def get_raw_model(self) -> SERPyfuncModel:
        """MLflow's ``PyFuncModel.get_raw_model()`` hook: this wrapper (predictor + trainable)."""
        return self

    def predict(self, model_input: Any, params: dict | None = None):
        import pandas as pd

        if isinstance(model_input, (pd.DataFrame, dict)):
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
        get_trainable(meta["trainable"]).load_predictor(data_path), meta["trainable"], data_path
    )


def requirements() -> list[str]:
    """What a served model needs: public packages only, torch and torchaudio at the versions
    that trained it (exactly: torchaudio's native library loads only against its own torch)."""
    from importlib import metadata

    import mlflow

    torch, torchaudio = metadata.version("torch"), metadata.version("torchaudio")
    return [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.split('+')[0]}",
        f"torchaudio=={torchaudio.split('+')[0]}",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pandas>=2",
    ]


def code_dirs(dest: Path) -> list[str]:
    """Copies of the ``sertune`` and ``trainables`` packages (sources only) for ``code_paths``."""
    from importlib.util import find_spec

    out = []
    for pkg in ("sertune", "trainables"):  # located, not imported: the control plane never does
        src = Path(find_spec(pkg).origin).parent
        target = dest / src.name
        shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        out.append(str(target))
    return out


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
            shutil.copy(Path(model_dir) / name, data / name)
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
                code_paths=code_dirs(Path(tmp) / "code"),
                signature=signature,
                input_example=example,  # serving_input_example.json shows callers the format
                pip_requirements=requirements(),
            )
        return info.model_uri
