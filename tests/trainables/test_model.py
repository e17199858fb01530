"""The MTL-AUG objective: zero weights are single-task, unlabelled rows never touch emotion."""

import torch

from trainables.mtl_aug.config import AUG_TYPES, LossConfig, ModelConfig
from trainables.mtl_aug.model import UNLABELLED, MTLAugModel, mtl_aug_loss

CFG = ModelConfig(conv_channels=(4, 8), lstm_hidden=8, attn_dim=4, dropout=0.0)


def batch(device, b=6, labels=None):
    g = torch.Generator(device=device).manual_seed(0)
    feats = torch.randn(b, 32, 50, generator=g, device=device)
    y = labels if labels is not None else torch.arange(b, device=device) % 4
    aug = torch.arange(b, device=device) % len(AUG_TYPES)
    return feats, y, aug


def grads(model):
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def backward(model, feats, y, aug, w):
    model.zero_grad()
    mtl_aug_loss(model(feats), y, aug, w).total.backward()
    return grads(model)


def test_shapes(device):
    model = MTLAugModel(CFG, 32).to(device)
    out = model(torch.randn(3, 32, 101, device=device))
    assert out["emotion"].shape == (3, 4)
    assert out["aug"].shape == (3, len(AUG_TYPES))
    assert out["reconstruction"].shape == out["target"].shape == (3, 32, 100)  # cropped to x4


def test_zero_aux_weights_are_single_task_training(device):
    torch.manual_seed(0)
    model = MTLAugModel(CFG, 32).to(device).eval()  # eval: BN/dropout fixed between the passes
    feats, y, aug = batch(device)
    stl = backward(model, feats, y, aug, LossConfig(w_emo=1.0, w_aug=0.0, w_rec=0.0))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(feats)["emotion"], y).backward()
    plain_ce = grads(model)
    for name, g in stl.items():
        assert torch.allclose(g, plain_ce[name], atol=1e-6), name
        if name.startswith(("aug_head", "decoder")):
            assert torch.count_nonzero(g) == 0, name
    mtl = backward(model, feats, y, aug, LossConfig(w_emo=1.0, w_aug=0.5, w_rec=0.5))
    assert (
        torch.count_nonzero(mtl["aug_head.weight"]) > 0
        and torch.count_nonzero(mtl["decoder.0.weight"]) > 0
    )


def test_unlabelled_rows_never_touch_the_emotion_loss(device):
    torch.manual_seed(0)
    model = MTLAugModel(CFG, 32).to(device).eval()
    feats, _, aug = batch(device)
    y = torch.full((6,), UNLABELLED, device=device)
    losses = mtl_aug_loss(model(feats), y, aug, LossConfig())
    assert losses.emotion.item() == 0.0
    g = backward(model, feats, y, aug, LossConfig())
    assert all(torch.count_nonzero(v) == 0 for k, v in g.items() if k.startswith("emotion_head"))
    assert torch.count_nonzero(g["conv.0.weight"]) > 0  # the encoder still learns from aux tasks
    # a mixed batch: the emotion loss is the mean over labelled rows only
    mixed = torch.tensor([0, 1, UNLABELLED, 3, UNLABELLED, 2], device=device)
    out = model(feats)
    lab = mixed != UNLABELLED
    expect = torch.nn.functional.cross_entropy(out["emotion"][lab], mixed[lab])
    assert torch.allclose(mtl_aug_loss(out, mixed, aug, LossConfig()).emotion, expect)
