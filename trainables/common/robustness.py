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

Cost: a trial pays this at its end, so each condition is one pass over the clips and nothing is
computed twice. Conditions share batched forward passes (:func:`_pass`); the gradient at the clean
input is computed once for every FGSM ε and every PGD first step, and its forward pass is the
clean figure; PGD's later steps run every ε together; the noisy copies reuse the clips' measured
power. The figures are those of one pass per condition, to float rounding
(``tests/trainables/test_robustness.py`` checks it against that plain computation).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sertune.trainable import ROBUSTNESS_DEFAULTS

from .metrics import confusion, scores
from .utterances import Forward, Utterances, Windowing

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


def _score_logits(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict:
    return scores(confusion(logits.argmax(1).cpu(), labels.cpu(), n_classes))


def _score(forward: Forward, utts: Utterances, windowing: Windowing, n_classes: int) -> dict:
    return _score_logits(clip_logits(forward, utts, windowing), utts.labels, n_classes)


def _batch_windows(device: torch.device, grad: bool) -> int:
    """Windows per forward call. A CPU is fastest with batches that stay in its caches (the
    demo model, measured: 16-32 windows with a backward pass, 64-128 without, 256 slower); a GPU
    wants large ones, smaller when the activations are kept for a backward pass."""
    if device.type == "cuda":  # about a training step's memory (optim.batch_size 256)
        return 256 if grad else 512
    return 16 if grad else 64


def _windows(
    padded: torch.Tensor, utts: Utterances, clip: torch.Tensor, start: torch.Tensor, segment: int
) -> torch.Tensor:
    """(W, segment) windows of clips ``clip`` from ``start``, zeros past a clip's end: exactly
    :meth:`Windowing.gather` of contiguous float audio, by one strided copy from ``padded`` (the
    audio with ``segment`` zeros after it) instead of a gather of W x segment positions."""
    x = padded.unfold(0, segment, 1)[utts.offsets[clip] + start]
    left = utts.lengths[clip] - start
    short = torch.nonzero(left < segment).squeeze(1)
    if short.numel():
        ar = torch.arange(segment, device=x.device)
        x[short] = x[short] * (ar < left[short].unsqueeze(1))
    return x


def _pass(
    forward: Forward,
    utts: Utterances,
    windowing: Windowing,
    audios: Iterable[torch.Tensor],
    grad: bool = False,
    batch: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per audio of ``audios`` ((T,) each, in place of the contiguous ``utts.audio``): the clips'
    logits (U, C) as :func:`utterance_logits` gives them (windows, logits averaged), and with
    ``grad`` the gradient of the clips' summed cross-entropy with respect to that audio.

    Windows of consecutive audios (conditions) share forward calls of about ``batch`` windows,
    each call whole clips (a clip's loss needs all its windows). ``audios`` is read lazily and
    results come in its order as soon as they are complete: only the conditions of the call in
    flight are held.
    """
    dev, seg, n = utts.device, windowing.segment, len(utts)
    batch = batch or _batch_windows(dev, grad)
    owner, start = windowing.plan(utts.lengths)
    per_clip = torch.bincount(owner, minlength=n)
    counts = per_clip.clamp_min(1).unsqueeze(1)
    chunks = _chunks(per_clip.tolist(), batch)
    if grad:  # where each window's samples lie: its gradient goes back there
        first = (utts.offsets[owner] + start).tolist()
        valid = (utts.lengths[owner] - start).clamp_max(seg).tolist()
    results: dict[int, list] = {}  # audio index -> [logits, gradient, chunks not run yet]
    call: list[tuple[int, torch.Tensor, tuple[int, int, int, int]]] = []  # (audio, padded, chunk)

    def run() -> None:
        x = torch.cat(
            [_windows(p, utts, owner[w0:w1], start[w0:w1], seg) for _, p, (_, _, w0, w1) in call]
        )
        with _with_grad(dev) if grad else torch.inference_mode():
            out = forward(x.requires_grad_(grad))
            row, loss = 0, 0.0
            for k, _, (u0, u1, w0, w1) in call:
                sums = torch.zeros(u1 - u0, out.shape[1], device=out.device)
                logits = (
                    sums.index_add(0, owner[w0:w1] - u0, out[row : row + w1 - w0]) / counts[u0:u1]
                )
                row += w1 - w0
                if results[k][0] is None:
                    results[k][0] = torch.empty(n, out.shape[1], device=out.device)
                results[k][0][u0:u1] = logits.detach()
                if grad:
                    loss = loss + F.cross_entropy(logits, utts.labels[u0:u1], reduction="sum")
            if grad:
                (gx,) = torch.autograd.grad(loss, x)
        row = 0
        for k, _, (_, _, w0, w1) in call:
            if grad:
                g = results[k][1]
                for w in range(w0, w1):  # overlapping windows add up, in window order
                    g[first[w] : first[w] + valid[w]] += gx[row + w - w0, : valid[w]]
            row += w1 - w0
            results[k][2] -= 1
        call.clear()

    def complete(k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        while k in results and results[k][2] == 0:
            logits, g, _ = results.pop(k)
            yield (torch.zeros(0, 0, device=dev) if logits is None else logits), g
            k += 1

    emitted = 0
    for k, audio in enumerate(audios):
        padded = F.pad(audio.detach(), (0, seg))
        results[k] = [None, torch.zeros_like(audio) if grad else None, len(chunks)]
        for chunk in chunks:
            if call and sum(c[3] - c[2] for _, _, c in call) + chunk[3] - chunk[2] > batch:
                run()
            call.append((k, padded, chunk))
        for out in complete(emitted):
            yield out
            emitted += 1
    if call:
        run()
    yield from complete(emitted)


def _chunks(windows_per_clip: list[int], batch: int) -> list[tuple[int, int, int, int]]:
    """(u0, u1, w0, w1): runs of whole clips of at most ``batch`` windows (a longer clip alone)."""
    out, u0, w0, w = [], 0, 0, 0
    for u, m in enumerate(windows_per_clip):
        if u > u0 and w + m - w0 > batch:
            out.append((u0, u, w0, w))
            u0, w0 = u, w
        w += m
    if windows_per_clip:
        out.append((u0, len(windows_per_clip), w0, w))
    return out


@contextlib.contextmanager
def _with_grad(device: torch.device) -> Iterator[None]:
    """Autograd on, whatever the caller's mode; on a GPU without cuDNN, whose RNN backward needs
    train mode (the model is evaluated in eval mode)."""
    off = torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else None
    with torch.enable_grad(), off or contextlib.nullcontext():
        yield


def clip_logits(
    forward: Forward, utts: Utterances, windowing: Windowing, idx: Any = None
) -> torch.Tensor:
    """Logits (len(idx), C) of clips ``idx`` (default: all) of ``utts`` (any storage), as
    :func:`utterance_logits` gives them, in the batches this device runs fastest, no gradient."""
    base = utts.select(np.arange(len(utts)) if idx is None else idx)  # contiguous float
    return next(_pass(forward, base, windowing, [base.audio]))[0]


def make_noise(
    kind: str, utts: Utterances, generator: torch.Generator, bank: torch.Tensor | None
) -> torch.Tensor | None:
    """A noise signal (T,) as long as each clip of contiguous float ``utts``."""
    dev = utts.device
    if kind == "white":
        return torch.randn(utts.audio.numel(), generator=generator, device=dev)
    if kind == "babble":  # three other clips of the set, each looped to this clip's length
        noise = torch.zeros_like(utts.audio)
        offsets, lengths = utts.offsets.tolist(), utts.lengths.tolist()
        for k in (1, 2, 3):  # one clip at a time: no (T,) index arithmetic
            for u, (o, n) in enumerate(zip(offsets, lengths, strict=True)):
                s = (u + k) % len(offsets)
                src = utts.audio[offsets[s] : offsets[s] + lengths[s]]
                noise[o : o + n] += src.repeat(-(-n // lengths[s]))[:n]
        return noise
    if kind == "file":
        if bank is None or bank.numel() == 0:
            return None
        bank = bank.to(dev)
        owner = utts.owner()
        rel = torch.arange(owner.numel(), device=dev) - utts.offsets[owner]
        starts = torch.randint(0, bank.numel(), (len(utts),), generator=generator, device=dev)
        return bank[(starts[owner] + rel) % bank.numel()]
    raise ValueError(f"robustness.noises: unknown noise type {kind!r}")


def _noisy(
    base: Utterances, noises: Iterable[tuple[torch.Tensor, list[float]]], eps: float = 1e-10
) -> Iterator[torch.Tensor]:
    """``add_noise_flat(base.audio, noise, owner, U, snr)`` for each noise and each of its SNRs,
    the same arithmetic, with the clips' powers measured once instead of once per SNR."""
    audio, owner, n = base.audio, base.owner(), len(base)
    count = base.lengths.to(audio.dtype).clamp_min(1)  # what summing ones over a clip gives
    p_sig = torch.zeros(n, device=audio.device).index_add_(0, owner, audio.pow(2)) / count
    for noise, snrs in noises:
        p_noise = torch.zeros(n, device=audio.device).index_add_(0, owner, noise.pow(2)) / count
        for snr_db in snrs:
            scale = torch.sqrt(p_sig / (p_noise.clamp_min(eps) * 10.0 ** (snr_db / 10.0)))
            yield audio + noise * scale[owner]


def _step(x: torch.Tensor, x0: torch.Tensor, sign: torch.Tensor, alpha: float, eps: float):
    """One signed-gradient step of size ``alpha``, projected on the L∞ ball ``eps`` around ``x0``
    and on full scale."""
    x = x + alpha * sign
    return (x0 + (x - x0).clamp(-eps, eps)).clamp(-1.0, 1.0)


def _adversarial(
    forward: Forward,
    base: Utterances,
    windowing: Windowing,
    attacks: list[tuple[str, float, int]],
) -> tuple[torch.Tensor | None, Iterator[torch.Tensor]]:
    """(clean logits, the adversarial audio of each ``(attack, eps, steps)`` in turn): FGSM (one
    step of ε) or PGD (``steps`` steps of 2.5·ε/steps) under an L∞ budget ε on each clip's
    waveform.

    The gradient at the clean input is computed once, in one pass whose forward also gives the
    clean logits: every FGSM ε and every PGD first step use it. PGD's later steps run every ε's
    copy through the same batched passes. FGSM copies are made when read."""
    if not attacks:
        return None, iter(())
    x0 = base.audio
    logits, g0 = next(_pass(forward, base, windowing, [x0], grad=True))
    sign0 = g0.sign()
    del g0

    def alpha(eps: float, steps: int) -> float:
        return eps if steps == 1 else 2.5 * eps / steps

    pgd = {  # position -> [x, alpha, eps, steps left]
        i: [_step(x0, x0, sign0, alpha(eps, steps), eps), alpha(eps, steps), eps, steps - 1]
        for i, (_, eps, steps) in enumerate(attacks)
        if steps > 1
    }
    while left := [p for p in pgd.values() if p[3] > 0]:
        grads = _pass(forward, base, windowing, [p[0] for p in left], grad=True)
        for p, (_, g) in zip(left, grads, strict=True):
            p[0] = _step(p[0], x0, g.sign(), p[1], p[2])
            p[3] -= 1

    def audios() -> Iterator[torch.Tensor]:
        for i, (_, eps, steps) in enumerate(attacks):
            if i in pgd:
                yield pgd.pop(i)[0]
            else:  # FGSM (no step at all: the clean input)
                yield _step(x0, x0, sign0, eps, eps) if steps == 1 else x0

    return logits, audios()


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
    *,
    clean_logits: torch.Tensor | None = None,
    only: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The full report for labelled clips ``utts`` (any storage; copied contiguously here).

    ``clean_logits``: the logits (U, C) of ``utts`` when the caller already has them (its test
    pass over these clips): the clean figure reads them instead of a pass of its own.

    ``only``: the metric names wanted (``val_robust/uar_snr10_white``, ...): the conditions no
    name needs are not run (the clean figure always is; ``uar_noise_mean`` needs every noisy
    condition). Each measured figure is the one the full report gives: the noises are drawn from
    the seeded generator in the same order whether used or not.

    Every condition is one pass over the clips, conditions batched together (:func:`_pass`);
    the attacks' gradient at the clean input is computed once for every ε (:func:`_adversarial`).
    """
    o = {**DEFAULTS, **options}
    prefix = SELECTION if split == "val" else REPORTED
    wanted = None if only is None else set(only)

    def needed(name: str) -> bool:
        return wanted is None or prefix + name in wanted

    base = utts.select(np.arange(len(utts)))
    g = torch.Generator(device=base.device).manual_seed(seed)
    attacks = [("fgsm", float(e), 1) for e in o["fgsm_eps"] if needed(f"uar_fgsm{float(e):g}")]
    attacks += [
        ("pgd", float(e), int(o["pgd_steps"]))
        for e in o["pgd_eps"]
        if needed(f"uar_pgd{float(e):g}")
    ]
    if clean_logits is not None and clean_logits.shape[0] != len(base):
        raise ValueError(f"clean_logits: {clean_logits.shape[0]} rows for {len(base)} clips")
    grad_logits, adversarial = _adversarial(forward, base, windowing, attacks)
    if clean_logits is None:
        clean_logits = grad_logits  # the attacks' clean forward pass
    clean_pass = clean_logits is None  # no attack: the clean audio is one more condition

    noise_rows: list[dict[str, Any]] = []

    def noises() -> Iterator[tuple[torch.Tensor, list[float]]]:
        for kind in o["noises"]:  # drawn in this order from the seeded generator
            snrs = [
                float(s)
                for s in o["snrs_db"]
                if needed(f"uar_snr{int(s)}_{kind}") or needed("uar_noise_mean")
            ]
            noise = make_noise(kind, base, g, noise_bank)
            if noise is not None and snrs:
                noise_rows.extend({"type": kind, "snr_db": s} for s in snrs)
                yield noise, snrs

    def conditions() -> Iterator[torch.Tensor]:
        if clean_pass:
            yield base.audio
        yield from _noisy(base, noises())
        yield from adversarial

    logits = [lg for lg, _ in _pass(forward, base, windowing, conditions())]
    if clean_pass:
        clean_logits = logits.pop(0)

    def score(lg: torch.Tensor) -> dict:
        return _score_logits(lg, base.labels, n_classes)

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "data": {"corpus": corpus_name, "split": split, "utterances": len(base)},
        "clean": score(clean_logits),
        "noise": [{**r, **score(lg)} for r, lg in zip(noise_rows, logits, strict=False)],
        "adversarial": [
            {"attack": a, "eps": e, "steps": s, **score(lg)}
            for (a, e, s), lg in zip(attacks, logits[len(noise_rows) :], strict=True)
        ],
        "cross_corpus": [
            {"name": name, "utterances": len(cu), **_score(forward, cu, windowing, n_classes)}
            for name, cu in cross or []
        ],
    }
    report["warnings"] = masking_warnings(report)
    metrics = flatten_metrics(report, prefix)
    if wanted is not None:  # a mean over the noisy conditions measured is no figure of the report
        metrics = {k: v for k, v in metrics.items() if k in wanted or k == prefix + "uar_clean"}
        report["measured"] = "only the conditions its figures need: " + ", ".join(sorted(metrics))
    report["metrics"] = metrics
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

    def finish(ax, fig, name: str, xs: Iterable[float], note: str = "") -> None:
        # ticks where the conditions are (and fixed UAR ticks): no tick locator to run, about a
        # quarter of the drawing time, and the axis reads the measured SNRs / ε directly
        ticks = sorted(set(xs))
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
        if chance:
            ax.axhline(chance, ls=":", c="k", lw=1, label=f"chance ({chance:.2f})")
        ax.set_ylabel("UAR")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        if note:
            fig.text(0.01, 0.01, note, fontsize=7, color="C3", wrap=True)
        # fixed margins for this one layout: tight_layout measured every text box first and was
        # most of the plots' cost, paid at each trial's end
        fig.subplots_adjust(left=0.12, right=0.97, top=0.91, bottom=0.2 if note else 0.13)
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
        finish(ax, fig, "uar_vs_snr.png", [r["snr_db"] for r in report["noise"]])
    if report["adversarial"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for attack in dict.fromkeys(r["attack"] for r in report["adversarial"]):
            pts = sorted(
                (r["eps"], r["uar"]) for r in report["adversarial"] if r["attack"] == attack
            )
            ax.plot([0.0] + [p[0] for p in pts], [clean] + [p[1] for p in pts], "o-", label=attack)
        ax.set_xlabel("ε (waveform L∞)")
        ax.set_title(f"UAR vs adversarial ε{who}", fontsize=10)
        eps = [0.0] + [r["eps"] for r in report["adversarial"]]
        finish(ax, fig, "uar_vs_eps.png", eps, "WARNING: " + warnings[0] if warnings else "")
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
