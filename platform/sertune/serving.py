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

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

META = "sertune_model.json"
MODEL_FILES = ("model.safetensors", "model.json")  # what a trainable's save_model writes


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


def file_digests(folder: Path, names: tuple[str, ...] = MODEL_FILES) -> dict[str, str]:
    """SHA-256 of a model's files (what ``sertune_model.json`` carries and loading verifies)."""
    out = {}
    for name in names:
        h = hashlib.sha256()
        with (folder / name).open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[name] = h.hexdigest()
    return out


def read_meta(folder: Path) -> dict[str, Any]:
    """A model folder's ``sertune_model.json``, its files checked against the SHA-256 it holds;
    anything wrong is one :class:`ModelError` line naming the file."""
    from .errors import ModelError

    path = folder / META
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(meta, dict) or not isinstance(meta.get("trainable"), str):
            raise ValueError("no trainable named")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path}: not a sertune model description ({str(e)[:120]})") from None
    want = meta.get("sha256") or {}  # models logged before digests were kept have none
    try:
        got = file_digests(folder, tuple(want))
    except OSError as e:
        raise ModelError(
            f"{folder}: a model file is missing ({e.strerror}: {e.filename})"
        ) from None
    for name, digest in want.items():
        if got[name] != digest:
            raise ModelError(
                f"{folder / name}: damaged (its SHA-256 is not the one recorded in {META} when "
                "the model was logged)"
            )
    return meta


def _load_pyfunc(data_path: str) -> SERPyfuncModel:
    """MLflow's loader_module hook: rebuild the network from JSON, load safetensors weights."""
    from .trainable import get_trainable

    meta = read_meta(Path(data_path))
    return SERPyfuncModel(
        get_trainable(meta["trainable"]).load_predictor(data_path), meta["trainable"], data_path
    )


def requirements(model_dir: str | Path | None = None) -> list[str]:
    """What a served model needs: public packages only, torch and torchaudio at the versions
    that trained it (exactly: torchaudio's native library loads only against its own torch),
    plus what the model's own ``model.json`` lists under ``requirements`` (a self-supervised
    encoder: ``transformers``)."""
    import json
    from importlib import metadata

    extra: list[str] = []
    if model_dir is not None and (Path(model_dir) / "model.json").is_file():
        try:
            extra = list(
                json.loads((Path(model_dir) / "model.json").read_text()).get("requirements") or []
            )
        except (ValueError, AttributeError):
            extra = []
    torch, torchaudio = metadata.version("torch"), metadata.version("torchaudio")
    return extra + [
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
