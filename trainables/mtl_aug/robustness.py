"""Robustness evaluation: additive noise × SNR, adversarial attacks × ε, cross-corpus.

MTL-AUG's claim is robustness, so every trial ends with this report, and ``sertune report`` runs it
on demand. Output (``robustness.json``, schema ``sertune.robustness/1``)::

    {"schema": "sertune.robustness/1",
     "data": {"corpus": "...", "split": "test", "utterances": N},
     "clean": {"uar": .., "war": .., "f1": ..},
     "noise": [{"type": "white"|"babble"|"file", "snr_db": 10.0, "uar": .., "war": .., "f1": ..}, ...],
     "adversarial": [{"attack": "fgsm"|"pgd", "eps": 0.005, "steps": 1|k, "uar": .., ...}, ...],
     "cross_corpus": [{"name": "...", "utterances": N, "uar": .., ...}, ...],
     "metrics": {"robust/uar_snr10_babble": .., ...}}

plus ``uar_vs_snr.png``, ``uar_vs_eps.png`` and ``summary.md``. ε is in waveform units (full scale
is 1.0). The key figures are also metrics (``robust/uar_snr10_babble``, ``robust/uar_fgsm0.005``,
``robust/uar_cross_<name>``) so they sort in the MLflow UI and can be objectives and gates.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .augment import add_noise_at_snr
from .metrics import confusion, scores

SCHEMA = "sertune.robustness/1"
Logits = Callable[[torch.Tensor], torch.Tensor]  # waveforms (B, L) -> logits (B, C)


def _batches(wav: torch.Tensor, y: torch.Tensor, bs: int):
    for i in range(0, wav.shape[0], bs):
        yield wav[i : i + bs], y[i : i + bs]


def _score(
    logits_fn: Logits, wav: torch.Tensor, y: torch.Tensor, n_classes: int, bs: int = 64
) -> dict:
    cm = torch.zeros(n_classes, n_classes, dtype=torch.long)
    with torch.no_grad():
        for xb, yb in _batches(wav, y, bs):
            cm += confusion(logits_fn(xb).argmax(1).cpu(), yb.cpu(), n_classes)
    return scores(cm)


def _attack(
    logits_fn: Logits, wav: torch.Tensor, y: torch.Tensor, eps: float, steps: int, bs: int = 32
) -> torch.Tensor:
    """FGSM (steps=1) or PGD (steps>1) under an L∞ budget ``eps`` on the waveform."""
    out = []
    alpha = eps if steps == 1 else 2.5 * eps / steps
    for xb, yb in _batches(wav, y, bs):
        x0 = xb.detach()
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            with torch.backends.cudnn.flags(enabled=False):  # cuDNN RNN backward needs train mode
                loss = F.cross_entropy(logits_fn(x), yb)
            (grad,) = torch.autograd.grad(loss, x)
            x = x.detach() + alpha * grad.sign()
            x = (x0 + (x - x0).clamp(-eps, eps)).clamp(-1.0, 1.0)
        out.append(x.detach())
    return torch.cat(out)


def evaluate_robustness(
    logits_fn: Logits,
    wav: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    options: dict[str, Any],
    noise_bank: torch.Tensor | None = None,
    cross: list[tuple[str, torch.Tensor, torch.Tensor]] | None = None,
    corpus_name: str = "",
    seed: int = 0,
) -> dict[str, Any]:
    """The full report for waveforms ``wav`` (N, L) with labels ``y`` (N,)."""
    dev = wav.device
    g = torch.Generator(device=dev).manual_seed(seed)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "data": {"corpus": corpus_name, "split": "test", "utterances": int(wav.shape[0])},
        "clean": _score(logits_fn, wav, y, n_classes),
        "noise": [],
        "adversarial": [],
        "cross_corpus": [],
    }
    for kind in options.get("noises", ["white", "babble"]):
        if kind == "white":
            noise = torch.randn(wav.shape, generator=g, device=dev)
        elif kind == "babble":
            noise = sum(torch.roll(wav, k, dims=0) for k in (1, 2, 3))
        elif kind == "file":
            if noise_bank is None or noise_bank.numel() == 0:
                continue
            bank = noise_bank.to(dev)
            starts = torch.randint(
                0, max(1, bank.numel() - wav.shape[1]), (wav.shape[0],), generator=g, device=dev
            )
            noise = bank[
                (starts.unsqueeze(1) + torch.arange(wav.shape[1], device=dev)) % bank.numel()
            ]
        else:
            raise ValueError(f"robustness.noises: unknown noise type {kind!r}")
        for snr in options.get("snrs_db", [20, 10, 5, 0]):
            snr_t = torch.full((wav.shape[0],), float(snr), device=dev)
            noisy = add_noise_at_snr(wav, noise, snr_t)
            report["noise"].append(
                {"type": kind, "snr_db": float(snr), **_score(logits_fn, noisy, y, n_classes)}
            )
    for attack, eps_list, steps in (
        ("fgsm", options.get("fgsm_eps", []), 1),
        ("pgd", options.get("pgd_eps", []), int(options.get("pgd_steps", 5))),
    ):
        for eps in eps_list:
            adv = _attack(logits_fn, wav, y, float(eps), steps)
            report["adversarial"].append(
                {
                    "attack": attack,
                    "eps": float(eps),
                    "steps": steps,
                    **_score(logits_fn, adv, y, n_classes),
                }
            )
    for name, cw, cy in cross or []:
        report["cross_corpus"].append(
            {"name": name, "utterances": int(cw.shape[0]), **_score(logits_fn, cw, cy, n_classes)}
        )
    report["metrics"] = flatten_metrics(report)
    return report


def flatten_metrics(report: dict[str, Any]) -> dict[str, float]:
    m = {"robust/uar_clean": report["clean"]["uar"]}
    for r in report["noise"]:
        m[f"robust/uar_snr{int(r['snr_db'])}_{r['type']}"] = r["uar"]
    if report["noise"]:
        m["robust/uar_noise_mean"] = float(np.mean([r["uar"] for r in report["noise"]]))
    for r in report["adversarial"]:
        m[f"robust/uar_{r['attack']}{r['eps']:g}"] = r["uar"]
    for r in report["cross_corpus"]:
        m[f"robust/uar_cross_{r['name']}"] = r["uar"]
    return m


def write_report(report: dict[str, Any], out: Path) -> None:
    """robustness.json, uar_vs_snr.png, uar_vs_eps.png and summary.md into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(report, indent=2))
    clean = report["clean"]["uar"]
    if report["noise"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for kind in dict.fromkeys(r["type"] for r in report["noise"]):
            pts = sorted((r["snr_db"], r["uar"]) for r in report["noise"] if r["type"] == kind)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind)
        ax.axhline(clean, ls="--", c="gray", label="clean")
        ax.set_xlabel("SNR (dB)")
        ax.set_ylabel("UAR")
        ax.set_ylim(0, 1)
        ax.set_title("UAR vs SNR")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "uar_vs_snr.png", dpi=100)
        plt.close(fig)
    if report["adversarial"]:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for attack in dict.fromkeys(r["attack"] for r in report["adversarial"]):
            pts = sorted(
                (r["eps"], r["uar"]) for r in report["adversarial"] if r["attack"] == attack
            )
            ax.plot([0.0] + [p[0] for p in pts], [clean] + [p[1] for p in pts], "o-", label=attack)
        ax.set_xlabel("ε (waveform L∞)")
        ax.set_ylabel("UAR")
        ax.set_ylim(0, 1)
        ax.set_title("UAR vs adversarial ε")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "uar_vs_eps.png", dpi=100)
        plt.close(fig)
    lines = [
        f"# Robustness report ({report['data']['corpus']}, {report['data']['utterances']} test utterances)",
        "",
        f"Clean UAR **{clean:.3f}** (WAR {report['clean']['war']:.3f}, macro-F1 {report['clean']['f1']:.3f}).",
        "",
    ]
    if report["noise"]:
        lines += ["| noise | SNR (dB) | UAR |", "|---|---|---|"]
        lines += [f"| {r['type']} | {r['snr_db']:g} | {r['uar']:.3f} |" for r in report["noise"]]
        lines.append("")
    if report["adversarial"]:
        lines += ["| attack | ε | UAR |", "|---|---|---|"]
        lines += [
            f"| {r['attack']} | {r['eps']:g} | {r['uar']:.3f} |" for r in report["adversarial"]
        ]
        lines.append("")
    if report["cross_corpus"]:
        lines += ["| cross-corpus | utterances | UAR |", "|---|---|---|"]
        lines += [
            f"| {r['name']} | {r['utterances']} | {r['uar']:.3f} |" for r in report["cross_corpus"]
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def logits_fn_for(model: torch.nn.Module, logmel: torch.nn.Module) -> Logits:
    model.eval()
    return lambda wav: model(logmel(wav))["emotion"]


def center_crops(
    corpus: Any, indices: np.ndarray, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    from .train import DeviceCorpus

    data = DeviceCorpus(corpus, device)
    idx = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(device)
    return data.crops(idx, length), data.labels[idx]


def trial_robustness(
    core: torch.nn.Module,
    cfg: Any,
    corpus: Any,
    split: dict,
    data_cfg: dict,
    options: dict,
    device: torch.device,
) -> dict[str, Any]:
    """The end-of-trial report on the test speakers (rank 0 only)."""
    from trainables.data.cache import load_cache

    from .augment import LogMel
    from .train import load_noise_bank

    seg = int(round(cfg.features.segment_s * cfg.features.sample_rate))
    test = split["test"]
    if options.get("max_utterances"):
        test = test[: int(options["max_utterances"])]
    wav, y = center_crops(corpus, test, seg, device)
    logmel = LogMel(cfg.features).to(device)
    was_training = core.training
    cross = []
    for c in data_cfg.get("cross_corpus") or []:
        cc = load_cache(c["cache"])
        lab = np.nonzero(cc.labels >= 0)[0]
        if options.get("max_utterances"):
            lab = lab[: int(options["max_utterances"])]
        cw, cy = center_crops(cc, lab, seg, device)
        cross.append((c["name"], cw, cy))
    bank = load_noise_bank(data_cfg.get("noise_files") or [], cfg.features.sample_rate)
    report = evaluate_robustness(
        logits_fn_for(core, logmel),
        wav,
        y,
        cfg.model.n_emotions,
        options,
        bank,
        cross,
        corpus_name=str(corpus.path.name),
        seed=cfg.seed,
    )
    core.train(was_training)
    return report
