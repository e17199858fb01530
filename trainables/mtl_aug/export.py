"""A trained model as files that load without executing anything: safetensors weights + JSON.

``model.safetensors`` holds the state dict (tensors only); ``model.json`` the config and label
names. :func:`load_model` rebuilds the network from the JSON and loads the tensors, so a model
artifact can never run code from the artifact (unlike a pickled module).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .augment import LogMel
from .config import MTLAugConfig
from .model import MTLAugModel

FORMAT = "sertune.mtl_aug/1"
WEIGHTS, META = "model.safetensors", "model.json"


def save_model(
    directory: str | Path, model: torch.nn.Module, cfg: MTLAugConfig, label_names: tuple[str, ...]
) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    meta = {"format": FORMAT, "config": cfg.to_dict(), "label_names": list(label_names)}
    (directory / META).write_text(json.dumps(meta, indent=2))


class EmotionPredictor:
    """Raw 16 kHz mono float waveforms in, emotion probabilities out."""

    def __init__(self, model: MTLAugModel, cfg: MTLAugConfig, label_names: list[str]):
        self.model = model.eval()
        self.cfg = cfg
        self.label_names = list(label_names)
        self.logmel = LogMel(cfg.features)
        self.min_samples = cfg.features.hop_length * model.pool * 2

    @property
    def sample_rate(self) -> int:
        return self.cfg.features.sample_rate

    @torch.no_grad()
    def predict_proba(self, waveforms: list[np.ndarray]) -> np.ndarray:
        """(n,) list of (L_i,) float arrays -> (n, n_classes) probabilities, rows sum to 1."""
        out = []
        for w in waveforms:
            x = torch.as_tensor(np.asarray(w, dtype=np.float32)).flatten()
            if x.numel() < self.min_samples:
                x = torch.nn.functional.pad(x, (0, self.min_samples - x.numel()))
            logits = self.model(self.logmel(x.unsqueeze(0)))["emotion"]
            out.append(torch.softmax(logits, dim=-1)[0].numpy())
        return np.stack(out)


def load_model(directory: str | Path) -> EmotionPredictor:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = json.loads((directory / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = MTLAugConfig.from_dict(meta["config"])
    model = MTLAugModel(cfg.model, cfg.features.n_mels)
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return EmotionPredictor(model, cfg, meta["label_names"])
