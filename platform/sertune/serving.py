"""Trained models as MLflow pyfunc models that load without pickle and serve anywhere.

``sertune.tracking.models.log_pyfunc_model`` stores the trial's best ``model.safetensors`` +
``model.json`` with ``loader_module="sertune.serving"`` and the code that loads it (``code/sertune`` and
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

    torch, torchaudio = metadata.version("torch"), metadata.version("torchaudio")
    return [
        f"mlflow=={metadata.version('mlflow')}",
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
