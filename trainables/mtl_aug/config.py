"""Typed, frozen configuration for MTL-AUG training.

Every knob a search may tune lives here with a default and a one-line reason. Configs are plain
frozen dataclasses so they pickle cheaply to Ray workers and serialise to JSON for MLflow; unknown
keys are rejected with the full dotted name so a typo in a search spec never trains silently.

Search specs address fields with dotted names: ``loss.w_aug``, ``aug.p_speed``, ``optim.lr``; a
section inside a section one more dot: ``model.ssl.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is unknown or out of range; the message names the dotted field."""


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 16000  # every corpus is decoded to 16 kHz mono in the cache
    n_fft: int = 400  # 25 ms window, the usual for speech
    hop_length: int = 160  # 10 ms hop
    n_mels: int = 64  # 64 log-mel bands: the usual SER front end
    segment_s: float = 3.0  # one model input: training crops it, longer clips are windowed by it


ENCODERS = ("cnn_lstm", "ssl")
LAYER_MODES = ("weighted", "last")


@dataclass(frozen=True)
class SSLConfig:
    """A self-supervised speech encoder (WavLM, HuBERT, wav2vec 2.0) in place of the CNN-BiLSTM
    (``model.encoder: ssl``). Weights are never downloaded: ``checkpoint`` is a local folder in
    Hugging Face format or a model id already in the local Hugging Face cache; spec validation
    refuses one that is not on disk."""

    checkpoint: str = ""  # a local HF folder (config.json + weights) or a cached model id
    finetune_top: int = 0  # top transformer layers trained (optim.encoder_lr); 0 = frozen
    # which hidden states feed the heads: "weighted" (SUPERB: a learnt softmax-weighted sum of
    # every hidden state, the input embedding included), "last", or a list of indices (0 = the
    # input embedding) whose learnt weighted sum is taken
    layers: str | tuple[int, ...] = "weighted"


@dataclass(frozen=True)
class ModelConfig:
    conv_channels: tuple[int, ...] = (
        32,
        64,
        128,
    )  # one conv block each; each halves freq and time
    lstm_hidden: int = 128  # per direction; the BiLSTM gives 2x this per frame
    lstm_layers: int = 1  # one layer is enough on top of the conv front end
    attn_dim: int = 64  # attention-pooling bottleneck
    dropout: float = 0.3  # SER corpora are small: regularise the heads
    n_emotions: int = 4  # (angry, happy, neutral, sad) in the standard 4-class setup
    # cnn_lstm: the conv + BiLSTM front end on log-mels above; ssl: a self-supervised encoder on
    # the waveform (model.ssl.*), whose frames feed the same attention pooling and heads (the
    # emotion head's hidden width is lstm_hidden); conv_channels and lstm_layers are then unused
    encoder: str = "cnn_lstm"
    ssl: SSLConfig = field(default_factory=SSLConfig)


@dataclass(frozen=True)
class AugConfig:
    # The mix: relative probability of each augmentation type (normalised; 0 turns one off).
    # Each p_<type> is a type of the registry (augment.py): append new ones after p_reverb.
    p_clean: float = 0.3  # clean speech stays in the mix: it is what is evaluated
    p_speed: float = 0.15
    p_white_noise: float = 0.15
    p_babble_noise: float = 0.15
    p_file_noise: float = 0.0  # needs data.noise_files
    p_specaugment: float = 0.15
    p_reverb: float = 0.1
    # Strengths.
    speed_factors: tuple[float, ...] = (0.9, 1.1)  # Kaldi-style speed perturbation
    snr_db_low: float = 5.0  # additive noise SNR range (dB), drawn uniformly per sample
    snr_db_high: float = 20.0
    babble_speakers: int = 3  # other utterances summed into babble
    specaug_freq_width: int = 8  # max mel bins per frequency mask
    specaug_time_width: int = 20  # max frames per time mask
    specaug_masks: int = 2  # masks of each kind
    rt60_low: float = 0.2  # reverb time range (s) of the synthetic room impulse response
    rt60_high: float = 0.7

    def mix(self) -> dict[str, float]:
        """Return the normalised probability of each type in :data:`AUG_TYPES` order."""
        raw = {t: float(getattr(self, f"p_{t}")) for t in AUG_TYPES}
        total = sum(raw.values())
        return {t: v / total for t, v in raw.items()}


# The augmentation types the aux head classifies: AugConfig's ``p_<type>`` fields, in order
# ("clean" is a class). The order is part of a trained model's contract (the aug head's output
# index), so a new type's field only ever goes after the last ``p_*``; its function is registered
# in ``augment.py``.
AUG_TYPES: tuple[str, ...] = tuple(
    f.name.removeprefix("p_") for f in dataclasses.fields(AugConfig) if f.name.startswith("p_")
)


@dataclass(frozen=True)
class LossConfig:
    w_emo: float = 1.0  # primary task
    w_aug: float = 0.3  # augmentation-type classification (auxiliary, free labels)
    w_rec: float = 0.3  # unsupervised reconstruction (auxiliary); w_aug = w_rec = 0 is STL


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # Adam default works for this model size
    weight_decay: float = 1e-4  # AdamW decoupled decay
    batch_size: int = 64  # per worker, an upper bound: small corpora get smaller batches
    min_steps_per_epoch: int = 8  # batch shrinks so even ~300 clips give this many steps
    epochs: int = 10  # max epochs; schedulers may stop earlier
    grad_clip: float = 5.0  # LSTMs like a clip
    encoder_lr: float = 1e-5  # the fine-tuned layers of an ssl encoder (model.ssl.finetune_top)


@dataclass(frozen=True)
class MTLAugConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0  # everything random derives from (seed, rank, epoch)

    # -- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """Flatten to dotted keys (``loss.w_aug``), the form search specs and MLflow params use."""
        flat: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                flat[prefix] = value

        walk("", self.to_dict())
        return flat

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None) -> MTLAugConfig:
        """Build from nested and/or dotted keys; unknown keys raise :class:`ConfigError`."""
        nested: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in (data or {}).items():
            if "." in key:
                section, _, name = key.partition(".")
                nested.setdefault(section, {})[name] = value
            elif isinstance(value, dict):
                nested.setdefault(key, {}).update(value)
            else:
                top[key] = value
        sections = {f.name: f for f in dataclasses.fields(cls) if f.name != "seed"}
        kwargs: dict[str, Any] = {}
        for key, value in top.items():
            if key != "seed":
                raise ConfigError(f"Unknown config key: {key}")
            kwargs["seed"] = int(value)
        for section, values in nested.items():
            if section not in sections:
                keys = ", ".join(f"{section}.{k}" for k in values)
                raise ConfigError(
                    f"Unknown config key: {keys} (sections: {', '.join(sorted(sections))}, seed)"
                )
            sub_cls = sections[section].default_factory  # type: ignore[misc]
            kwargs[section] = _build(sub_cls, values, section)
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text: str) -> MTLAugConfig:
        return cls.from_dict(json.loads(text))

    def validate(self) -> None:
        a, m, o, f = self.aug, self.model, self.optim, self.features
        for t in AUG_TYPES:
            if getattr(a, f"p_{t}") < 0:
                raise ConfigError(f"aug.p_{t}: must be >= 0, got {getattr(a, f'p_{t}')}")
        if sum(getattr(a, f"p_{t}") for t in AUG_TYPES) <= 0:
            raise ConfigError("aug: every p_* is 0; at least one type (e.g. p_clean) needs weight")
        if a.snr_db_low > a.snr_db_high:
            raise ConfigError(
                f"aug.snr_db_low ({a.snr_db_low}) > aug.snr_db_high ({a.snr_db_high})"
            )
        if a.rt60_low <= 0 or a.rt60_low > a.rt60_high:
            raise ConfigError(
                f"aug.rt60_low/high: need 0 < low <= high, got {a.rt60_low}..{a.rt60_high}"
            )
        if not a.speed_factors or any(s <= 0 for s in a.speed_factors):
            raise ConfigError(f"aug.speed_factors: need positive factors, got {a.speed_factors}")
        for name in ("w_emo", "w_aug", "w_rec"):
            if getattr(self.loss, name) < 0:
                raise ConfigError(f"loss.{name}: must be >= 0")
        if not m.conv_channels or m.n_emotions < 2:
            raise ConfigError("model: need >= 1 conv block and >= 2 emotions")
        if m.encoder not in ENCODERS:
            raise ConfigError(f"model.encoder: {m.encoder!r} is not one of {', '.join(ENCODERS)}")
        if m.encoder == "cnn_lstm" and f.n_mels % (2 ** len(m.conv_channels)):
            raise ConfigError(
                f"features.n_mels ({f.n_mels}) must be divisible by 2**len(model.conv_channels)"
            )
        if m.encoder == "ssl":
            _validate_ssl(m.ssl)
        if o.encoder_lr <= 0:
            raise ConfigError(f"optim.encoder_lr: must be > 0, got {o.encoder_lr}")
        if o.batch_size < 2 or o.epochs < 1 or o.lr <= 0 or o.min_steps_per_epoch < 1:
            raise ConfigError(
                "optim: need batch_size >= 2, epochs >= 1, lr > 0, min_steps_per_epoch >= 1"
            )


def _validate_ssl(s: SSLConfig) -> None:
    """What can be checked without the checkpoint (``ssl_checkpoint.check`` reads it)."""
    if not s.checkpoint:
        raise ConfigError(
            "model.ssl.checkpoint: required with an ssl encoder (a local Hugging Face folder, "
            "or a model id in the local Hugging Face cache)"
        )
    if s.finetune_top < 0:
        raise ConfigError(f"model.ssl.finetune_top: must be >= 0, got {s.finetune_top}")
    if isinstance(s.layers, str):
        if s.layers not in LAYER_MODES:
            raise ConfigError(
                f"model.ssl.layers: {s.layers!r}: expected weighted, last or a list of indices"
            )
    elif not s.layers or any(i < 0 for i in s.layers) or len(set(s.layers)) != len(s.layers):
        raise ConfigError(
            f"model.ssl.layers: need distinct hidden-state indices >= 0, got {list(s.layers)}"
        )


def _layers(value: Any, name: str) -> str | tuple[int, ...]:
    """``weighted``, ``last``, ``[0, 4, 8]``, ``"0,4,8"`` or ``"(0, 4, 8)"`` (as MLflow stores it)."""
    given = value
    if isinstance(value, str):
        text = value.strip().strip("[]()").strip()
        if text in LAYER_MODES or not text:
            return text
        value = [v for v in text.split(",") if v.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name}: expected weighted, last or a list of indices, got {given!r}"
        ) from None


def _build(sub_cls: type, values: dict[str, Any], section: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(sub_cls)}
    kwargs: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {}  # a section inside this one (model.ssl.*)
    for key, value in values.items():
        head, dot, rest = key.partition(".")
        if head in known and dataclasses.is_dataclass(known[head].default_factory):
            if dot:
                inner.setdefault(head, {})[rest] = value
            elif isinstance(value, dict):
                inner.setdefault(head, {}).update(value)
            else:
                raise ConfigError(
                    f"{section}.{head}: a section; set its fields ({section}.{head}.<name>)"
                )
            continue
        if key not in known:
            raise ConfigError(f"Unknown config key: {section}.{key}")
        default = known[key].default
        if sub_cls is SSLConfig and key == "layers":
            value = _layers(value, f"{section}.{key}")
        elif isinstance(default, tuple):
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        elif isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{section}.{key}: expected an integer, got {value}")
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        elif isinstance(default, str):
            value = str(value)
        kwargs[key] = value
    for head, sub in inner.items():
        kwargs[head] = _build(known[head].default_factory, sub, f"{section}.{head}")  # type: ignore[arg-type]
    return sub_cls(**kwargs)
