"""Robustness evaluation: additive noise × SNR, adversarial attacks × ε, cross-corpus.

MTL-AUG's claim is robustness, so every trial ends with this report (on its best-validation
model), and ``sertune report`` runs it on demand. It sees clips exactly as the served model does
(:mod:`.utterances`: windows of one segment, logits averaged), and noise is scaled to the SNR over
each clip's own samples. Output (``robustness.json``, schema ``sertune.robustness/1``)::

    {"schema": "sertune.robustness/1",
     "data": {"corpus": "...", "split": "test", "utterances": N},
     "clean": {"uar": .., "war": .., "f1": ..},
     "noise": [{"type": "white"|"babble"|"file", "snr_db": 10.0, "uar": .., "war": .., "f1": ..}, ...],
     "adversarial": [{"attack": "fgsm"|"pgd", "eps": 0.005, "steps": 1|k, "uar": .., ...}, ...],
     "cross_corpus": [{"name": "...", "utterances": N, "uar": .., ...}, ...],
     "warnings": ["..."],
     "metrics": {"robust/uar_snr10_babble": .., ...}}

plus ``uar_vs_snr.png``, ``uar_vs_eps.png`` (chance level drawn, the model named) and
``summary.md``. ε is in waveform units (full scale is 1.0). The key figures are also metrics
(``robust/uar_snr10_babble``, ``robust/uar_fgsm0.005``, ``robust/uar_cross_<name>``) so they sort in
the MLflow UI; they are *reported* figures of the chosen model, never selected on.

Selection (objectives, constraints, choosing gates) uses the same conditions measured on the
validation speakers: ``evaluate_robustness(..., split="val")`` (a class-stratified capped subset of
the validation clips, no cross-corpus part) gives the ``val_robust/*`` twins
(``val_robust/uar_snr10_white``, ...), computed beside the test report on the same kept model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sertune.trainable import ROBUSTNESS_DEFAULTS

from .metrics import confusion, scores
from .noise import add_noise_flat
from .utterances import Forward, Utterances, Windowing, utterance_logits

SCHEMA = "sertune.robustness/1"
# the one table of defaults (a spec's ``robustness:`` starts from it too)
DEFAULTS = {k: list(v) if isinstance(v, tuple) else v for k, v in ROBUSTNESS_DEFAULTS.items()}


REPORTED = "robust/"  # measured on the test speakers: reported, never selected on
SELECTION = "val_robust/"  # the same conditions on the validation speakers: what may select


def val_twin(name: str) -> str:
    """``robust/uar_snr10_white`` -> ``val_robust/uar_snr10_white`` (its validation twin)."""
    return SELECTION + name.removeprefix(REPORTED)


def robust_metric_names(
    options: dict[str, Any] | None, cross: list[str] | None = None, validation: bool = True
) -> set:
    """The ``robust/*`` metrics a report with these options produces, and (``validation``) their
    ``val_robust/*`` twins measured on the validation speakers (no cross-corpus twins)."""
    if options is None:
        return set()
    o = {**DEFAULTS, **options}
    names = {f"robust/uar_snr{int(s)}_{n}" for s in o["snrs_db"] for n in o["noises"]}
    names |= {f"robust/uar_fgsm{e:g}" for e in o["fgsm_eps"]}
    names |= {f"robust/uar_pgd{e:g}" for e in o["pgd_eps"]}
    names |= {"robust/uar_clean", "robust/uar_noise_mean"}
    twins = {val_twin(n) for n in names} if validation else set()
    return names | twins | {f"robust/uar_cross_{c}" for c in cross or []}


def _score(forward: Forward, utts: Utterances, windowing: Windowing, n_classes: int) -> dict:
    with torch.no_grad():
        logits = utterance_logits(forward, utts, windowing)
    cm = confusion(logits.argmax(1).cpu(), utts.labels.cpu(), n_classes)
    return scores(cm)


def make_noise(
    kind: str, utts: Utterances, generator: torch.Generator, bank: torch.Tensor | None
) -> torch.Tensor | None:
    """A noise signal (T,) as long as each clip of contiguous float ``utts``."""
    dev = utts.device
    owner = utts.owner()
    rel = torch.arange(owner.numel(), device=dev) - utts.offsets[owner]
    if kind == "white":
        return torch.randn(owner.numel(), generator=generator, device=dev)
    if kind == "babble":  # three other clips of the set, each looped to this clip's length
        noise = torch.zeros_like(utts.audio)
        for k in (1, 2, 3):
            src = (owner + k) % len(utts)
            noise += utts.audio[utts.offsets[src] + rel % utts.lengths[src]]
        return noise
    if kind == "file":
        if bank is None or bank.numel() == 0:
            return None
        bank = bank.to(dev)
        starts = torch.randint(0, bank.numel(), (len(utts),), generator=generator, device=dev)
        return bank[(starts[owner] + rel) % bank.numel()]
    raise ValueError(f"robustness.noises: unknown noise type {kind!r}")


def _attack(
    forward: Forward,
    utts: Utterances,
    windowing: Windowing,
    eps: float,
    steps: int,
    batch_utts: int = 32,
) -> Utterances:
    """FGSM (steps=1) or PGD (steps>1) under an L∞ budget ``eps`` on each clip's waveform."""
    out = utts.audio.detach().clone()
    alpha = eps if steps == 1 else 2.5 * eps / steps
    for i in range(0, len(utts), batch_utts):
        sub = utts.select(torch.arange(i, min(i + batch_utts, len(utts)), device=utts.device))
        x0 = sub.audio.detach()
        x = x0.clone()
        for _ in range(steps):
            x.requires_grad_(True)
            with torch.backends.cudnn.flags(enabled=False):  # cuDNN RNN backward needs train mode
                loss = F.cross_entropy(
                    utterance_logits(forward, sub.with_audio(x), windowing), sub.labels
                )
            (grad,) = torch.autograd.grad(loss, x)
            x = x.detach() + alpha * grad.sign()
            x = (x0 + (x - x0).clamp(-eps, eps)).clamp(-1.0, 1.0)
        start = int(utts.offsets[i])
        out[start : start + x.numel()] = x.detach()
    return utts.with_audio(out)


def evaluate_robustness(
    forward: Forward,
    utts: Utterances,
    windowing: Windowing,
    n_classes: int,
    options: dict[str, Any],
    noise_bank: torch.Tensor | None = None,
    cross: list[tuple[str, Utterances]] | None = None,
    corpus_name: str = "",
    split: str = "test",
    seed: int = 0,
) -> dict[str, Any]:
    """The full report for labelled clips ``utts`` (any storage; copied contiguously here)."""
    o = {**DEFAULTS, **options}
    base = utts.select(torch.arange(len(utts), device=utts.device))
    g = torch.Generator(device=base.device).manual_seed(seed)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "data": {"corpus": corpus_name, "split": split, "utterances": len(base)},
        "clean": _score(forward, base, windowing, n_classes),
        "noise": [],
        "adversarial": [],
        "cross_corpus": [],
    }
    owner = base.owner()
    for kind in o["noises"]:
        noise = make_noise(kind, base, g, noise_bank)
        if noise is None:
            continue
        for snr in o["snrs_db"]:
            noisy = base.with_audio(add_noise_flat(base.audio, noise, owner, len(base), snr))
            report["noise"].append(
                {
                    "type": kind,
                    "snr_db": float(snr),
                    **_score(forward, noisy, windowing, n_classes),
                }
            )
    for attack, eps_list, steps in (
        ("fgsm", o["fgsm_eps"], 1),
        ("pgd", o["pgd_eps"], int(o["pgd_steps"])),
    ):
        for eps in eps_list:
            adv = _attack(forward, base, windowing, float(eps), steps)
            report["adversarial"].append(
                {
                    "attack": attack,
                    "eps": float(eps),
                    "steps": steps,
                    **_score(forward, adv, windowing, n_classes),
                }
            )
    for name, cu in cross or []:
        report["cross_corpus"].append(
            {"name": name, "utterances": len(cu), **_score(forward, cu, windowing, n_classes)}
        )
    report["warnings"] = masking_warnings(report)
    report["metrics"] = flatten_metrics(report, SELECTION if split == "val" else REPORTED)
    return report


def masking_warnings(report: dict[str, Any], tolerance: float = 0.02) -> list[str]:
    """FGSM accuracy that rises with ε is the signature of gradient masking: say so."""
    out = []
    clean = report["clean"]["uar"]
    for attack in dict.fromkeys(r["attack"] for r in report["adversarial"]):
        pts = sorted((r["eps"], r["uar"]) for r in report["adversarial"] if r["attack"] == attack)
        seq = [(0.0, clean), *pts]
        rises = [(a, b) for a, b in zip(seq, seq[1:], strict=False) if b[1] > a[1] + tolerance]
        if rises and attack == "fgsm":
            (e0, u0), (e1, u1) = rises[0]
            out.append(
                f"FGSM UAR rises with ε ({u0:.3f} at ε={e0:g} -> {u1:.3f} at ε={e1:g}): "
                "likely gradient masking; trust the PGD figures"
            )
    return out


def flatten_metrics(report: dict[str, Any], prefix: str = REPORTED) -> dict[str, float]:
    """The report's key figures as metrics: ``robust/*`` (the test speakers), or with
    ``prefix=SELECTION`` the validation report's ``val_robust/*``."""
    m = {f"{prefix}uar_clean": report["clean"]["uar"]}
    for r in report["noise"]:
        m[f"{prefix}uar_snr{int(r['snr_db'])}_{r['type']}"] = r["uar"]
    if report["noise"]:
        m[f"{prefix}uar_noise_mean"] = float(np.mean([r["uar"] for r in report["noise"]]))
    for r in report["adversarial"]:
        m[f"{prefix}uar_{r['attack']}{r['eps']:g}"] = r["uar"]
    for r in report["cross_corpus"]:
        m[f"{prefix}uar_cross_{r['name']}"] = r["uar"]
    return m


def write_validation_report(report: dict[str, Any], out: Path) -> None:
    """The validation speakers' report (``split="val"``, ``val_robust/*``): only its
    ``robustness.json`` (no plots: it selects, the test report is the one people read)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(report, indent=2))


def write_report(
    report: dict[str, Any], out: Path, title: str = "", n_classes: int | None = None
) -> None:
    """robustness.json, uar_vs_snr.png, uar_vs_eps.png and summary.md into ``out``.

    ``title`` names the model (a trial id, a registered version) on the plots; the chance level
    (1 / classes) is drawn so a reader sees at a glance where a curve means nothing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps(report, indent=2))
    clean = report["clean"]["uar"]
    chance = 1.0 / n_classes if n_classes else None
    who = f" — {title}" if title else ""
    warnings = report.get("warnings", [])

    def finish(ax, fig, name: str, note: str = "") -> None:
        if chance:
            ax.axhline(chance, ls=":", c="k", lw=1, label=f"chance ({chance:.2f})")
        ax.set_ylabel("UAR")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        if note:
            fig.text(0.01, 0.01, note, fontsize=7, color="C3", wrap=True)
        fig.tight_layout(rect=(0, 0.06 if note else 0, 1, 1))
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    if report["noise"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for kind in dict.fromkeys(r["type"] for r in report["noise"]):
            pts = sorted((r["snr_db"], r["uar"]) for r in report["noise"] if r["type"] == kind)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind)
        ax.axhline(clean, ls="--", c="gray", label=f"clean ({clean:.2f})")
        ax.set_xlabel("SNR over the utterance (dB)")
        ax.set_title(f"UAR vs SNR{who}", fontsize=10)
        finish(ax, fig, "uar_vs_snr.png")
    if report["adversarial"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for attack in dict.fromkeys(r["attack"] for r in report["adversarial"]):
            pts = sorted(
                (r["eps"], r["uar"]) for r in report["adversarial"] if r["attack"] == attack
            )
            ax.plot([0.0] + [p[0] for p in pts], [clean] + [p[1] for p in pts], "o-", label=attack)
        ax.set_xlabel("ε (waveform L∞)")
        ax.set_title(f"UAR vs adversarial ε{who}", fontsize=10)
        finish(ax, fig, "uar_vs_eps.png", "WARNING: " + warnings[0] if warnings else "")
    d = report["data"]
    lines = [
        f"# Robustness report{who} ({d['corpus']}, {d['utterances']} {d.get('split', 'test')} utterances)",
        "",
        f"Clean UAR **{clean:.3f}** (WAR {report['clean']['war']:.3f}, macro-F1 {report['clean']['f1']:.3f})"
        + (f"; chance is {chance:.3f}." if chance else "."),
        "",
    ]
    lines += [f"> **Warning:** {w}" for w in warnings] + ([""] if warnings else [])
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
