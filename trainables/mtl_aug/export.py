"""A trained model as files that load without executing anything: safetensors weights + JSON.

``model.safetensors`` holds the state dict (tensors only); ``model.json`` the config and label
names. :func:`load_model` rebuilds the network from the JSON and loads the tensors, so a model
artifact can never run code from the artifact (unlike a pickled module). Truncated or corrupt
files raise :class:`sertune.errors.ModelError` naming the file.

A model on a self-supervised encoder (``model.encoder: ssl``) comes in two forms, said by
``model.json``'s ``ssl.encoder_weights``:

* ``external`` (what every trial saves): ``model.safetensors`` holds what training changed - the
  heads, the layer weights, the fine-tuned top layers - and ``model.json`` the checkpoint's path
  and SHA-256. A WavLM Large is 1.2 GB; a trial's model a few MB. It loads where that checkpoint
  is (the same content hash), and names the missing folder where it is not.
* ``packaged`` (what ``sertune promote`` registers, :func:`package_model`): the frozen encoder's
  weights too, its Hugging Face config in ``model.json`` (``ssl.config``), so it loads and serves
  on any machine (``AutoModel.from_config`` + the saved weights).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sertune.errors import ModelError, ModelNeedsFiles
from trainables.common.utterances import Utterances, Windowing, utterance_logits

from .augment import LogMel
from .config import MTLAugConfig
from .model import MTLAugModel

FORMAT = "sertune.mtl_aug/1"
_PRISTINE: dict[str, Any] = {}  # encoders that trial models name, loaded once per process
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
    package_encoder: bool = False,
) -> None:
    """``model``'s weights (or ``state``, a state dict of ``model``'s kind) and ``model.json``.
    An ssl model's frozen encoder weights only with ``package_encoder`` (else its checkpoint's
    path and hash stand for them)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    frozen = set() if package_encoder or not hasattr(model, "meta") else model.frozen_state_keys()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in frozen}
    save_file(state, str(directory / WEIGHTS))
    meta = {"format": FORMAT, "config": cfg.to_dict(), "label_names": list(label_names)}
    if hasattr(model, "meta"):  # an ssl encoder: what rebuilds it without its checkpoint
        from importlib.metadata import version

        meta["ssl"] = {**model.meta(), "encoder_weights": "external" if frozen else "packaged"}
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
    core = getattr(model, "module", model)
    if hasattr(core, "emotion"):  # the emotion head alone (no decoder, no aug-type head)
        return lambda wav: core.emotion(logmel(wav))
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
        external = ssl.get("encoder_weights") == "external"
        encoder = _external_encoder(directory, ssl) if external else None
        if encoder is None:
            encoder = encoder_from_config(ssl["config"])
        model = SSLMTLAugModel(cfg.model, cfg.features, encoder, info)
    else:
        external = False
        model = MTLAugModel(cfg.model, cfg.features.n_mels)
    try:
        weights = load_file(str(directory / WEIGHTS))
        missing, unexpected = model.load_state_dict(weights, strict=not external)
        if set(missing) - (model.frozen_state_keys() if external else set()) or unexpected:
            raise RuntimeError(
                f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
            )
    except (SafetensorError, RuntimeError, OSError) as e:
        raise ModelError(
            f"{directory / WEIGHTS}: cannot load the weights (truncated or corrupt?): "
            f"{str(e).splitlines()[0][:200]}"
        ) from None
    return EmotionPredictor(model, cfg, meta["label_names"])


def _external_encoder(directory: Path, ssl: dict[str, Any]) -> torch.nn.Module:
    """The frozen encoder a trial's model names (``ssl.checkpoint``, ``ssl.sha256``), from disk:
    :class:`ModelError` naming the folder when it is not on this machine or holds other weights."""
    from . import ssl_checkpoint
    from .config import ConfigError
    from .ssl_encoder import pristine_encoder

    where, digest = str(ssl.get("checkpoint") or ""), str(ssl.get("sha256") or "")
    hint = (
        "a trial's model keeps its frozen encoder outside (ssl.encoder_weights: external); "
        "register it (sertune promote packages the encoder) to serve it elsewhere, or put the "
        "checkpoint back"
    )
    try:
        path = ssl_checkpoint.resolve(where)
    except ConfigError:
        raise ModelNeedsFiles(
            f"{directory / META}: its encoder's weights are in {where}, which is missing "
            f"({Path(where) / 'config.json'} not found): {hint}"
        ) from None
    if digest and ssl_checkpoint.content_hash(path) != digest:
        raise ModelNeedsFiles(
            f"{directory / META}: trained on the encoder of SHA-256 {digest[:12]}, but {path} now "
            f"holds {ssl_checkpoint.content_hash(path)[:12]}: {hint}"
        )
    encoder, _ = pristine_encoder(where, _PRISTINE)  # read once per process (a driver logs many)
    return copy.deepcopy(encoder)  # this model's fine-tuned layers load into its own copy


def package_model(model_dir: str | Path, out: str | Path) -> bool:
    """A self-contained copy of a saved model in ``out`` (its frozen encoder's weights included)
    when ``model_dir``'s keeps them outside; False (nothing written) when it needs nothing."""
    import shutil

    model_dir, out = Path(model_dir), Path(out)
    meta = json.loads((model_dir / META).read_text())
    if (meta.get("ssl") or {}).get("encoder_weights") != "external":
        return False
    predictor = load_model(model_dir)  # the checkpoint must be here, with the same hash
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():  # metrics, notes: what else the folder holds
        if f.is_file() and f.name not in (WEIGHTS, META):
            shutil.copy(f, out / f.name)
    save_model(out, predictor.model, predictor.cfg, predictor.label_names, package_encoder=True)
    return True
