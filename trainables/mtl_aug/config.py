"""Typed, frozen configuration for MTL-AUG training.

Every knob a search may tune lives here with a default and a one-line reason. Configs are plain
frozen dataclasses so they pickle cheaply to Ray workers and serialise to JSON for MLflow; unknown
keys are rejected with the full dotted name so a typo in a search spec never trains silently.

Search specs address fields with dotted names: ``loss.w_aug``, ``aug.p_speed``, ``optim.lr``.
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
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    flat[f"{k}.{kk}"] = vv
            else:
                flat[k] = v
        return flat

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None) -> MTLAugConfig:
        """Build from nested and/or dotted keys; unknown keys raise :class:`ConfigError`."""
        nested: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for key, value in (data or {}).items():
            if isinstance(value, dict):
                nested.setdefault(key, {}).update(value)
            elif "." in key:
                section, _, name = key.partition(".")
                nested.setdefault(section, {})[name] = value
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
        if f.n_mels % (2 ** len(m.conv_channels)):
            raise ConfigError(
                f"features.n_mels ({f.n_mels}) must be divisible by 2**len(model.conv_channels)"
            )
        if o.batch_size < 2 or o.epochs < 1 or o.lr <= 0 or o.min_steps_per_epoch < 1:
            raise ConfigError(
                "optim: need batch_size >= 2, epochs >= 1, lr > 0, min_steps_per_epoch >= 1"
            )


def _build(sub_cls: type, values: dict[str, Any], section: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(sub_cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"Unknown config key: {section}.{key}")
        default = known[key].default
        if isinstance(default, tuple):
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        elif isinstance(default, bool):
            value = bool(value)
        elif isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"{section}.{key}: expected an integer, got {value}")
            value = int(value)
        elif isinstance(default, float):
            value = float(value)
        kwargs[key] = value
    return sub_cls(**kwargs)
