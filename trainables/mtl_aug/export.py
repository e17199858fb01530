"""A trained model as files that load without executing anything: safetensors weights + JSON.

``model.safetensors`` holds the state dict (tensors only); ``model.json`` the config and label
names. :func:`load_model` rebuilds the network from the JSON and loads the tensors, so a model
artifact can never run code from the artifact (unlike a pickled module). Truncated or corrupt
files raise :class:`sertune.errors.ModelError` naming the file.

A model on a self-supervised encoder (``model.encoder: ssl``) is packaged whole: the encoder's
weights are in ``model.safetensors`` with the heads', its Hugging Face config in ``model.json``
(``ssl.config``, beside the checkpoint it came from and that checkpoint's SHA-256), so it loads
where the checkpoint is not (``AutoModel.from_config`` + the saved weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sertune.errors import ModelError
from trainables.common.utterances import Utterances, Windowing, utterance_logits

from .augment import LogMel
from .config import MTLAugConfig
from .model import MTLAugModel

FORMAT = "sertune.mtl_aug/1"
WEIGHTS, META = "model.safetensors", "model.json"


def new_model(cfg: MTLAugConfig, cache: dict[str, Any] | None = None) -> torch.nn.Module:
    """A fresh model of ``cfg`` (initial weights from ``cfg.seed``). An ssl encoder comes from
    ``cache`` (the session's: a warm slot loads a checkpoint once for all its trials)."""
    torch.manual_seed(cfg.seed)
    if cfg.model.encoder == "ssl":
        from .ssl_encoder import build_ssl_model

        return build_ssl_model(cfg.model, cfg.features, {} if cache is None else cache, cfg.seed)
    return MTLAugModel(cfg.model, cfg.features.n_mels)


def save_model(
    directory: str | Path,
    model: torch.nn.Module,
    cfg: MTLAugConfig,
    label_names: tuple[str, ...],
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """``model``'s weights (or ``state``, a state dict of ``model``'s kind) and ``model.json``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(directory / WEIGHTS))
    meta = {"format": FORMAT, "config": cfg.to_dict(), "label_names": list(label_names)}
    if hasattr(model, "meta"):  # an ssl encoder: what rebuilds it without its checkpoint
        from importlib.metadata import version

        meta["ssl"] = model.meta()
        # what a served copy needs beyond sertune's own (read by sertune.serving.requirements)
        meta["requirements"] = [f"transformers=={version('transformers')}"]
    (directory / META).write_text(json.dumps(meta, indent=2))


def windowing_for(cfg: MTLAugConfig) -> Windowing:
    """The model's input windows: one training segment each (see trainables.common.utterances)."""
    return Windowing.for_segment(int(round(cfg.features.segment_s * cfg.features.sample_rate)))


def takes_waveform(model: torch.nn.Module) -> bool:
    """An ssl model takes waveforms; the CNN-BiLSTM log-mels (a DDP wrapper: its module's)."""
    return bool(getattr(getattr(model, "module", model), "takes_waveform", False))


def forward_fn(model: torch.nn.Module, logmel: torch.nn.Module):
    """Waveform windows (B, segment) -> emotion logits (B, C): what every evaluation calls."""
    if takes_waveform(model):
        return lambda wav: model(wav)["emotion"]
    return lambda wav: model(logmel(wav))["emotion"]


class EmotionPredictor:
    """Raw 16 kHz mono float waveforms in, emotion probabilities out — through the same windows
    and logit averaging as validation, test and the robustness report."""

    def __init__(self, model: torch.nn.Module, cfg: MTLAugConfig, label_names: list[str]):
        self.model = model.eval()
        self.cfg = cfg
        self.label_names = list(label_names)
        self.logmel = LogMel(cfg.features)
        self.windowing = windowing_for(cfg)
        self._forward = forward_fn(self.model, self.logmel)

    @property
    def sample_rate(self) -> int:
        return self.cfg.features.sample_rate

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self._forward(wav)

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
    if cfg.model.encoder == "ssl":
        from .ssl_encoder import SSLMTLAugModel, encoder_from_config

        ssl = meta.get("ssl")
        if not isinstance(ssl, dict) or not isinstance(ssl.get("config"), dict):
            raise ModelError(f"{directory / META}: an ssl model without its encoder's config")
        info = {k: ssl.get(k) for k in ("checkpoint", "sha256", "normalize")}
        model = SSLMTLAugModel(cfg.model, cfg.features, encoder_from_config(ssl["config"]), info)
    else:
        model = MTLAugModel(cfg.model, cfg.features.n_mels)
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ModelError(
            f"{directory / WEIGHTS}: cannot load the weights (truncated or corrupt?): "
            f"{str(e).splitlines()[0][:200]}"
        ) from None
    return EmotionPredictor(model, cfg, meta["label_names"])
