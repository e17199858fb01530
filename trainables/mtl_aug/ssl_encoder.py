"""MTL-AUG on a self-supervised speech encoder (``model.encoder: ssl``).

    waveform (B, L), augmented
      └─ [normalise] ─ WavLM / HuBERT / wav2vec 2.0 (hidden states 0..N, 50 Hz) ─ layer mix ─┐
            ┌── frames h (B, T', D) ──────────────────────────────────────────────────────────┘
            ├─ attention pooling ─ z (B, D) ─┬─ emotion head   → (B, n_emotions)
            │                                └─ aug-type head  → (B, n_aug_types)
            └─ reconstruction decoder (per frame: stride/hop log-mel frames, 2 at 320/160)
                 → (B, M, 2T'): rebuilds the log-mel of the augmented waveform (the target)

The layer mix (``model.ssl.layers``) is SUPERB's: a learnt softmax-weighted sum of the hidden
states (``weighted``: all of them, the input embedding included; a list: those), or ``last``.

Frozen or partly fine-tuned (``model.ssl.finetune_top``): the encoder's parameters are frozen with
``requires_grad_(False)`` except its top ``finetune_top`` transformer layers. A frozen encoder
(0) runs under ``torch.no_grad()`` when its input needs no gradient (training, evaluation), and
with autograd when it does: robustness attacks (FGSM, PGD) differentiate the loss with respect to
the waveform through the frozen encoder (no parameter gets a gradient, the input does). The
encoder is always in ``eval()`` mode (no layer drop, no time masking, no dropout) except the
fine-tuned layers while training. bf16 autocast on CUDA only.

The encoder is loaded with ``AutoModel.from_pretrained(path, local_files_only=True)`` once per
process and checkpoint (:func:`pristine_encoder`, kept in the session's cache: a warm slot loads it
once for all its trials); every trial trains a copy of the pristine weights. A saved model holds
the whole encoder (weights in ``model.safetensors``, its Hugging Face config in ``model.json``),
so it loads without the checkpoint (:func:`encoder_from_config`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import ssl_checkpoint
from .config import FeatureConfig, ModelConfig
from .model import add_heads

CACHE_KEY = "mtl_aug.ssl_encoders"
KEEP = 2  # pristine encoders kept per process (a search over checkpoints alternates)
# checkpoint folder -> times loaded from disk in this process (tests and the slot note read it)
LOADS: collections.Counter[str] = collections.Counter()


def pristine_encoder(checkpoint: str, cache: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder of ``checkpoint`` as loaded from disk (never trained: callers copy it) and what
    describes it (``path``, ``sha256``, ``normalize``), kept in ``cache`` under its folder and
    content hash."""
    path = ssl_checkpoint.resolve(checkpoint)
    digest = ssl_checkpoint.content_hash(path)
    store: collections.OrderedDict = cache.setdefault(CACHE_KEY, collections.OrderedDict())
    key = f"{path}|{digest}"
    if key in store:
        store.move_to_end(key)
        return store[key]
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a worker's log is no terminal
    try:
        model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval().requires_grad_(False)
    LOADS[str(path)] += 1
    info = {
        "checkpoint": str(path),
        "sha256": digest,
        "normalize": ssl_checkpoint.normalise_input(path),
    }
    while len(store) >= KEEP:
        store.popitem(last=False)
    store[key] = (model, info)
    return store[key]


def encoder_from_config(config: dict[str, Any]) -> nn.Module:
    """An encoder of this Hugging Face config (weights to be loaded): a saved model's."""
    from transformers import AutoConfig, AutoModel

    kind = config.get("model_type")
    hf = AutoConfig.for_model(kind).__class__.from_dict(dict(config))
    return AutoModel.from_config(hf).eval().requires_grad_(False)


def _stride(encoder: nn.Module) -> int:
    out = 1
    for s in encoder.config.conv_stride:
        out *= int(s)
    return out


class SSLMTLAugModel(nn.Module):
    """The MTL-AUG heads on a self-supervised encoder; takes waveforms (B, L)."""

    takes_waveform = True

    def __init__(
        self, cfg: ModelConfig, features: FeatureConfig, encoder: nn.Module, info: dict[str, Any]
    ):
        super().__init__()
        self.cfg = cfg
        self.info = dict(info)  # checkpoint, sha256, normalize: recorded in model.json
        self.normalize = bool(info.get("normalize", False))
        self.encoder = encoder
        n_states = int(encoder.config.num_hidden_layers) + 1
        layers = cfg.ssl.layers
        if layers == "weighted":
            self.layer_ids = tuple(range(n_states))
        elif layers == "last":
            self.layer_ids = (n_states - 1,)
        else:
            bad = [i for i in layers if i >= n_states]
            if bad:
                raise ValueError(
                    f"model.ssl.layers: {bad} out of range (hidden states 0..{n_states - 1})"
                )
            self.layer_ids = tuple(layers)
        self.layer_weights = nn.Parameter(torch.zeros(len(self.layer_ids)))  # softmax -> uniform
        d = int(encoder.config.hidden_size)
        add_heads(self, d, cfg)
        self.n_mels = features.n_mels
        # log-mel frames per encoder frame: 320 / 160 = 2 (a non-integer ratio rounds up and the
        # rebuilt frames are cropped to the target's)
        self.up = max(1, -(-_stride(encoder) // features.hop_length))
        self.decoder = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Linear(d, self.n_mels * self.up)
        )
        self.target_norm = nn.BatchNorm2d(1, affine=False)  # the target on the CNN path's scale
        self.tuned = self._freeze(cfg.ssl.finetune_top)

    # -- what trains ------------------------------------------------------------------------------
    def _freeze(self, top: int) -> tuple[int, ...]:
        """Freeze the encoder but its top ``top`` transformer layers; their indices."""
        self.encoder.requires_grad_(False)
        if hasattr(self.encoder, "freeze_feature_encoder"):
            self.encoder.freeze_feature_encoder()  # no gradient hook on the waveform in training
        n = len(self.encoder.encoder.layers)
        ids = tuple(range(n - top, n)) if top else ()
        # (a pre-norm "stable layer norm" encoder's final layer norm, the Large models', acts
        # only on last_hidden_state: transformers collects hidden_states before it, so it never
        # reaches the heads and there is nothing of it to train)
        for i in ids:
            self.encoder.encoder.layers[i].requires_grad_(True)
        return ids

    def tuned_layers(self) -> list[nn.Module]:
        """The encoder's transformer layers that train (the top ``finetune_top``)."""
        return [self.encoder.encoder.layers[i] for i in self.tuned]

    @property
    def frozen(self) -> bool:
        return not self.tuned

    def encoder_parameters(self) -> list[nn.Parameter]:
        """The fine-tuned encoder layers' parameters (``optim.encoder_lr``)."""
        return [p for m in self.tuned_layers() for p in m.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        """Everything else that trains: layer weights, pooling, heads, decoder (``optim.lr``)."""
        tuned = {id(p) for p in self.encoder_parameters()}
        return [
            p
            for n, p in self.named_parameters()
            if p.requires_grad and id(p) not in tuned and not n.startswith("encoder.")
        ]

    def frozen_state_keys(self) -> set[str]:
        """State-dict keys that never change while training (a frozen encoder's weights)."""
        tuned = {id(p) for p in self.encoder_parameters()}
        keys = {f"encoder.{n}" for n, p in self.encoder.named_parameters() if id(p) not in tuned}
        keys |= {f"encoder.{n}" for n, _ in self.encoder.named_buffers()}
        return keys & set(self.state_dict())

    def train(self, mode: bool = True) -> SSLMTLAugModel:
        super().train(mode)
        self.encoder.eval()  # no layer drop or time masking; the frozen part never drops out
        if mode:
            for m in self.tuned_layers():
                m.train()
        return self

    # -- forward ----------------------------------------------------------------------------------
    def layer_mix(self) -> torch.Tensor:
        """The weights of the hidden states :attr:`layer_ids` (softmax: they sum to 1)."""
        return torch.softmax(self.layer_weights, dim=0)

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """(B, L) waveforms -> (B, T', D) frames: the hidden states' weighted sum."""
        x = wav
        if self.normalize:
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-7)
        quiet = self.frozen and not x.requires_grad  # an attack's input keeps its graph
        with (
            torch.no_grad() if quiet else contextlib.nullcontext(),
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda),
        ):
            states = self.encoder(x, output_hidden_states=True).hidden_states
        picked = torch.stack([states[i].float() for i in self.layer_ids])  # (S, B, T', D)
        return (self.layer_mix().view(-1, 1, 1, 1) * picked).sum(0)

    def forward(
        self, wav: torch.Tensor, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``target``: the log-mel (B, M, T) of ``wav`` (training); without it no reconstruction."""
        h = self.encode(wav)
        z = self.dropout(self.attn(h))
        out = {"emotion": self.emotion_head(z), "aug": self.aug_head(z)}
        if target is not None:
            b, t, _ = h.shape
            rec = self.decoder(h).reshape(b, t * self.up, self.n_mels).transpose(1, 2)
            tgt = self.target_norm(target.unsqueeze(1)).squeeze(1)
            # encoder frame j is centred about 320j + 200 samples, log-mel frame k at 160k: the
            # frames 2j+1, 2j+2 it rebuilds start one frame in
            tgt = tgt[..., 1:] if tgt.shape[-1] > 1 else tgt
            n = min(rec.shape[-1], tgt.shape[-1])
            out["reconstruction"] = rec[..., :n]
            out["target"] = tgt[..., :n].detach()
        return out

    # -- records ----------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """What ``model.json`` keeps to rebuild the encoder without its checkpoint."""
        return {
            "config": self.encoder.config.to_dict(),
            "normalize": self.normalize,
            "checkpoint": self.info.get("checkpoint"),
            "sha256": self.info.get("sha256"),
        }

    def layer_report(self) -> dict[str, Any]:
        w = self.layer_mix().detach().cpu().tolist()
        return {
            "layers": list(self.layer_ids),  # hidden-state indices (0 = the input embedding)
            "weights": w,
            "checkpoint": self.info.get("checkpoint"),
            "finetune_top": len(self.tuned),
        }


def build_ssl_model(cfg: ModelConfig, features: FeatureConfig, cache: dict[str, Any], seed: int):
    """A trial's model: a copy of the resident pristine encoder, then heads seeded by ``seed``
    (the same initial weights whether the encoder was loaded now or earlier)."""
    pristine, info = pristine_encoder(cfg.ssl.checkpoint, cache)
    encoder = copy.deepcopy(pristine)
    torch.manual_seed(seed)
    return SSLMTLAugModel(cfg, features, encoder, info)


def write_layer_weights(model: nn.Module, out: Path, title: str = "") -> None:
    """``layer_weights.json`` and ``layer_weights.png`` (a bar per hidden state) into ``out``."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = model.layer_report()
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_weights.json").write_text(json.dumps(report, indent=2))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar([str(i) for i in report["layers"]], report["weights"], color="C0")
    ax.axhline(1.0 / len(report["layers"]), ls=":", c="k", lw=1, label="uniform")
    ax.set_xlabel("hidden state (0 = input embedding)")
    ax.set_ylabel("softmax weight")
    name = Path(report["checkpoint"] or "").name
    ax.set_title(f"Layer weights {name}{' — ' + title if title else ''}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "layer_weights.png", dpi=100)
    plt.close(fig)


def check_checkpoint(params: dict[str, Any]) -> list[tuple[bool, str]]:
    """``sertune doctor SPEC``: with ``model.encoder: ssl``, load the checkpoint the way a slot
    does and run one second of audio through it; ``[(ok, line)]`` (none for the CNN)."""
    import time

    from .config import MTLAugConfig

    cfg = MTLAugConfig.from_dict(params)
    if cfg.model.encoder != "ssl":
        return []
    where = cfg.model.ssl.checkpoint
    try:
        t0 = time.perf_counter()
        encoder, info = pristine_encoder(where, {})
        loaded = time.perf_counter() - t0
        with torch.no_grad():
            frames = encoder(torch.zeros(1, cfg.features.sample_rate)).last_hidden_state.shape[1]
    except Exception as e:  # noqa: BLE001 - what is wrong with the checkpoint, in one line
        return [
            (False, f"{where}: does not load ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        ]
    c = encoder.config
    n = sum(p.numel() for p in encoder.parameters())
    return [
        (
            True,
            f"{info['checkpoint']}: {c.model_type}, {c.num_hidden_layers} layers, hidden "
            f"{c.hidden_size}, {n / 1e6:.2f} M parameters, SHA-256 {info['sha256'][:12]}; loaded "
            f"in {loaded:.1f} s; 1 s of audio -> {frames} frames",
        )
    ]
