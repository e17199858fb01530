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


def test_the_evaluation_copy_is_the_model_with_its_batchnorms_folded(device):
    """``emotion`` is ``forward()["emotion"]``; ``folded_for_evaluation`` (what the end-of-trial
    report runs) gives the eval-mode model's logits and input gradient, to float rounding, with
    no BatchNorm left in its conv blocks, and leaves the model itself untouched."""
    from trainables.mtl_aug.model import folded_for_evaluation

    torch.manual_seed(0)
    model = MTLAugModel(CFG, 32).to(device)
    feats, y, aug = batch(device)
    mtl_aug_loss(model(feats), y, aug, LossConfig()).total.backward()  # BN running stats move
    model.eval()
    for bn in (m for m in model.conv if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-0.5, 0.5)  # non-trivial statistics to fold
        bn.running_var.uniform_(0.5, 2.0)
    folded = folded_for_evaluation(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.conv)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.conv)  # the original kept
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in folded.parameters())
    x1 = feats.clone().requires_grad_(True)
    x2 = feats.clone().requires_grad_(True)
    ref = model(x1)["emotion"]
    assert torch.allclose(model.emotion(x1), ref)
    out = folded.emotion(x2)
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    (g1,) = torch.autograd.grad(ref.pow(2).sum(), x1)
    (g2,) = torch.autograd.grad(out.pow(2).sum(), x2)
    assert torch.allclose(g1, g2, atol=1e-5 * g1.abs().max().item()), (g1 - g2).abs().max()
