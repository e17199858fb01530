"""A trained model as files that load without executing anything: safetensors weights + JSON.

``model.safetensors`` holds the state dict (tensors only); ``model.json`` the config and label
names. :func:`load_model` rebuilds the network from the JSON and loads the tensors, so a model
artifact can never run code from the artifact (unlike a pickled module). Truncated or corrupt
files raise :class:`sertune.errors.ModelError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from sertune.errors import ModelError
from trainables.common.utterances import Utterances, Windowing, utterance_logits

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


def windowing_for(cfg: MTLAugConfig) -> Windowing:
    """The model's input windows: one training segment each (see trainables.common.utterances)."""
    return Windowing.for_segment(int(round(cfg.features.segment_s * cfg.features.sample_rate)))


def forward_fn(model: torch.nn.Module, logmel: torch.nn.Module):
    """Waveform windows (B, segment) -> emotion logits (B, C): what every evaluation calls."""
    return lambda wav: model(logmel(wav))["emotion"]


class EmotionPredictor:
    """Raw 16 kHz mono float waveforms in, emotion probabilities out — through the same windows
    and logit averaging as validation, test and the robustness report."""

    def __init__(self, model: MTLAugModel, cfg: MTLAugConfig, label_names: list[str]):
        self.model = model.eval()
        self.cfg = cfg
        self.label_names = list(label_names)
        self.logmel = LogMel(cfg.features)
        self.windowing = windowing_for(cfg)

    @property
    def sample_rate(self) -> int:
        return self.cfg.features.sample_rate

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model(self.logmel(wav))["emotion"]

    @torch.no_grad()
    def predict_proba(self, waveforms: list[np.ndarray]) -> np.ndarray:
        """(n,) list of (L_i,) float arrays -> (n, n_classes) probabilities, rows sum to 1."""
        utts = Utterances.from_waveforms(waveforms)
        logits = utterance_logits(self.forward, utts, self.windowing)
        return torch.softmax(logits, dim=-1).numpy()


def load_model(directory: str | Path) -> EmotionPredictor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (META, WEIGHTS):
        if not (directory / name).is_file():
            raise ModelError(f"{directory / name}: missing (not a saved sertune model)")
    try:
        meta = json.loads((directory / META).read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{directory / META}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"{directory / META}: format {meta.get('format')!r}, expected {FORMAT!r}")
    cfg = MTLAugConfig.from_dict(meta["config"])
    model = MTLAugModel(cfg.model, cfg.features.n_mels)
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ModelError(
            f"{directory / WEIGHTS}: cannot load the weights (truncated or corrupt?): "
            f"{str(e).splitlines()[0][:200]}"
        ) from None
    return EmotionPredictor(model, cfg, meta["label_names"])
