"""The MTL-AUG model: one shared encoder, three heads.

    log-mel (B, M, T)
      └─ input norm ─ conv blocks (each: conv3x3 → BN → ReLU → pool 2x2) ─ BiLSTM ─┐  frames h (B, T', 2H)
            ┌────────────────────────────────────────────────────────────────────┘
            ├─ attention pooling ─ z (B, 2H) ─┬─ emotion head   → (B, n_emotions)
            │                                 └─ aug-type head  → (B, n_aug_types)
            └─ reconstruction decoder (per frame) → (B, M, T' · 2^blocks): rebuilds the input features

Loss = w_emo·CE(emotion, labelled rows only) + w_aug·CE(aug type) + w_rec·MSE(reconstruction).
Unlabelled utterances (label -1) feed only the two auxiliary losses: their auxiliary labels are free.
With w_aug = w_rec = 0 the same code trains the single-task baseline.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AUG_TYPES, LossConfig, ModelConfig

UNLABELLED = -1


class AttentionPool(nn.Module):
    def __init__(self, dim: int, attn_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, attn_dim)
        self.score = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(self.score(torch.tanh(self.proj(h))), dim=1)  # (B, T', 1)
        return (a * h).sum(dim=1)  # (B, D)


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)``, the same values and gradients, faster on a CPU.

    PyTorch's CPU ``max_pool2d`` on a contiguous (NCHW) tensor is about 10x slower than two
    element-wise maxima over the row pairs and the column pairs, and that kernel was most of the
    forward pass (the robustness report's conditions, each epoch's validation). Without autograd
    (inference, noisy conditions) the element-wise maxima run; with it (training, attacks) and on
    other devices ``max_pool2d`` as is (its backward is the cheaper one: measured in the model,
    not only the kernel). Odd sizes drop their last row/column, as ``MaxPool2d(2)`` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
            return F.max_pool2d(x, 2)
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        rows = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def add_heads(m: nn.Module, d: int, cfg: ModelConfig) -> None:
    """The heads every shared encoder feeds (``d``-dim frames): attention pooling, dropout, the
    emotion head and the aug-type head, under the names saved models carry."""
    m.attn = AttentionPool(d, cfg.attn_dim)
    m.dropout = nn.Dropout(cfg.dropout)
    m.emotion_head = nn.Sequential(
        nn.Linear(d, cfg.lstm_hidden),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.lstm_hidden, cfg.n_emotions),
    )
    m.aug_head = nn.Linear(d, len(AUG_TYPES))


class MTLAugModel(nn.Module):
    def __init__(self, cfg: ModelConfig, n_mels: int):
        super().__init__()
        self.cfg = cfg
        self.n_mels = n_mels
        self.pool = 2 ** len(cfg.conv_channels)  # time and frequency reduction of the front end
        self.input_norm = nn.BatchNorm2d(1, affine=False)  # global feature normalisation
        blocks, c_in = [], 1
        for c in cfg.conv_channels:
            blocks += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                MaxPool2x2(),
            ]
            c_in = c
        self.conv = nn.Sequential(*blocks)
        lstm_in = c_in * (n_mels // self.pool)
        self.lstm = nn.LSTM(
            lstm_in,
            cfg.lstm_hidden,
            num_layers=cfg.lstm_layers,
            batch_first=True,
            bidirectional=True,
        )
        d = 2 * cfg.lstm_hidden
        add_heads(self, d, cfg)
        self.decoder = nn.Sequential(
            nn.Linear(d, d), nn.ReLU(), nn.Linear(d, n_mels * self.pool)
        )  # one frame of h rebuilds `pool` input frames

    def normalise(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, M, T) -> normalised (B, M, T') with T' cropped to a multiple of the pooling."""
        t = feats.shape[-1] - feats.shape[-1] % self.pool
        return self.input_norm(feats[..., :t].unsqueeze(1)).squeeze(1)

    def encode(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised input (B, M, T), frames (B, T/p, 2H)): the shared encoder."""
        x = self.normalise(feats)  # (B, M, T)
        b, m, t = x.shape
        h = self.conv(x.unsqueeze(1))  # (B, C, M/p, T/p)
        h = h.permute(0, 3, 1, 2).reshape(b, t // self.pool, -1)  # (B, T/p, C·M/p)
        h, _ = self.lstm(h)  # (B, T/p, 2H)
        return x, h

    def emotion(self, feats: torch.Tensor) -> torch.Tensor:
        """``forward(feats)["emotion"]`` without the auxiliary heads' work: what evaluation reads
        (validation, test, every robustness condition)."""
        return self.emotion_head(self.dropout(self.attn(self.encode(feats)[1])))

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        x, h = self.encode(feats)
        b, m, t = x.shape
        z = self.dropout(self.attn(h))  # (B, 2H)
        rec = self.decoder(h)  # (B, T/p, M·p)
        rec = rec.reshape(b, t // self.pool, self.pool, m).reshape(b, t, m).transpose(1, 2)
        return {
            "emotion": self.emotion_head(z),  # (B, n_emotions)
            "aug": self.aug_head(z),  # (B, n_aug_types)
            "reconstruction": rec,  # (B, M, T)
            "target": x.detach(),  # what the decoder should rebuild
        }


@dataclass
class Losses:
    total: torch.Tensor
    emotion: torch.Tensor
    aug: torch.Tensor
    reconstruction: torch.Tensor


def mtl_aug_loss(
    out: dict[str, torch.Tensor],
    emotion: torch.Tensor,
    aug_type: torch.Tensor,
    weights: LossConfig,
) -> Losses:
    """The MTL-AUG objective. ``emotion`` is -1 for unlabelled rows, which add no emotion loss.

    Each term stays connected to the graph even when its weight or its labelled count is 0, so
    DDP sees gradients for every parameter and zero-weight terms contribute exactly zero.
    """
    labelled = (emotion != UNLABELLED).float()
    ce = F.cross_entropy(out["emotion"], emotion.clamp_min(0), reduction="none")
    emo = (ce * labelled).sum() / labelled.sum().clamp_min(1.0)
    aug = F.cross_entropy(out["aug"], aug_type)
    rec = F.mse_loss(out["reconstruction"], out["target"])
    total = weights.w_emo * emo + weights.w_aug * aug + weights.w_rec * rec
    return Losses(total=total, emotion=emo, aug=aug, reconstruction=rec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def folded_for_evaluation(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of ``model`` whose convolution blocks have each BatchNorm folded
    into the convolution before it (``torch.nn.utils.fusion.fuse_conv_bn_eval``): the same
    function in eval mode, to float rounding, one pass fewer per block forward and backward. The
    end-of-trial report runs on it (a gradient pass per attack step); it is never saved. A model
    without conv blocks (an ssl encoder's) comes back as is."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    core = getattr(model, "module", model)
    if not isinstance(core, MTLAugModel):
        return model
    folded = copy.deepcopy(core).eval()
    layers = list(folded.conv)
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, nn.Conv2d) and isinstance(layers[i + 1], nn.BatchNorm2d):
            layers[i], layers[i + 1] = fuse_conv_bn_eval(layer, layers[i + 1]), nn.Identity()
    folded.conv = nn.Sequential(*layers)
    folded.requires_grad_(False)
    return folded
