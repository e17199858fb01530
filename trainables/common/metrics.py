"""SER metrics from a confusion matrix (rows = true class, columns = predicted).

UAR (unweighted average recall) is the field's primary metric because emotion corpora are
imbalanced; WAR is plain accuracy; macro-F1 is reported too.
"""

from __future__ import annotations

import torch


def confusion(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(N,), (N,) -> (C, C) int64 counts."""
    flat = target.long() * n_classes + pred.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def scores(cm: torch.Tensor) -> dict[str, float]:
    """UAR over classes present in the truth, WAR and macro-F1 from a confusion matrix."""
    cm = cm.double()
    support = cm.sum(1)
    tp = cm.diag()
    present = support > 0
    recall = tp / support.clamp_min(1)
    precision = tp / cm.sum(0).clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    total = float(support.sum())
    return {
        "uar": float(recall[present].mean()) if bool(present.any()) else 0.0,
        "war": float(tp.sum() / total) if total else 0.0,
        "f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
    }
