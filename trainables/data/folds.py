"""Dealing speaker groups into folds: which speakers test, which validate, which train.

A corpus's speaker groups (speakers, or IEMOCAP's and MSP-IMPROV's sessions) are dealt into
``n`` folds by one function, :func:`deal`, for the test/validation split and for the folds of a
cross-validated objective alike. Two dealings:

``balanced`` (the default)
    The groups, sorted, are shuffled with a fixed seed (``SEED``), then each goes greedily to the
    fold it unbalances least: first the folds that lack a gender or a class, then the gender
    counts (speakers), then the class counts (clips), each fold against its share of the corpus.
    Pairwise swaps between folds then polish the result until none helps. Fold sizes (groups per
    fold) are the round-robin's. With at least one speaker of each gender per fold, every fold
    holds both genders and every class the corpus has. Where every fold is one group there is
    nothing to balance: fold ``k`` is the ``k``-th group, as sorted.
``sorted``
    The groups, sorted, dealt round-robin (the dealing before balancing existed; a search
    recorded before then resumes with it).

Deterministic: the same corpus (groups, genders, labels) gives the same folds on every machine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

DEALINGS = ("balanced", "sorted")
SEED = 0  # the balanced dealing's shuffle: fixed, so every trial and search sees the same folds


def check_dealing(dealing: str) -> str:
    if dealing not in DEALINGS:
        raise ValueError(f"data.dealing: {dealing!r} (expected {' or '.join(DEALINGS)})")
    return dealing


def deal(
    groups: Sequence[str],
    speakers: Sequence[str],
    genders: Sequence[str | None],
    labels: Sequence[int],
    n: int,
    dealing: str = "balanced",
    seed: int = SEED,
) -> np.ndarray:
    """The fold (0..n-1) of each utterance, given per-utterance group, speaker, gender, label."""
    names = sorted(set(groups))
    if check_dealing(dealing) == "sorted" or n >= len(names):
        fold_of = {g: i % n for i, g in enumerate(names)}
    else:
        fold_of = _balanced(names, groups, speakers, genders, labels, n, seed)
    return np.array([fold_of[g] for g in groups], dtype=np.int64)


def _balanced(names, groups, speakers, genders, labels, n, seed) -> dict[str, int]:
    gender_of: dict[str, str] = {}
    for s, g in zip(speakers, genders, strict=True):
        if g is not None:
            gender_of.setdefault(s, g)
    gkeys = sorted(set(gender_of.values()))
    ckeys = sorted({int(c) for c in labels if int(c) >= 0})
    members: dict[str, set[str]] = {g: set() for g in names}
    clips: dict[str, Counter] = {g: Counter() for g in names}
    for grp, spk, lab in zip(groups, speakers, labels, strict=True):
        members[grp].add(spk)
        if int(lab) >= 0:
            clips[grp][int(lab)] += 1
    vec = {  # a group: speakers per gender, then clips per class
        g: [sum(gender_of.get(s) == k for s in members[g]) for k in gkeys]
        + [clips[g][c] for c in ckeys]
        for g in names
    }
    ng = len(gkeys)
    total = [sum(vec[g][i] for g in names) for i in range(ng + len(ckeys))]
    sizes = [len(names) // n + (j < len(names) % n) for j in range(n)]
    share = [s / len(names) for s in sizes]

    def cost(v: list[float], j: int) -> tuple[float, float, float]:
        missing = sum(1 for i, t in enumerate(total) if t > 0 and v[i] == 0)
        gdev = sum((v[i] - total[i] * share[j]) ** 2 for i in range(ng))
        cdev = sum((v[i] / total[i] - share[j]) ** 2 for i in range(ng, len(total)) if total[i])
        return missing, round(gdev, 9), round(cdev, 9)

    def plus(a, b, sign=1):
        return [x + sign * y for x, y in zip(a, b, strict=True)]

    def add(a, b):
        return tuple(x + y for x, y in zip(a, b, strict=True))

    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    load = [[0] * len(total) for _ in range(n)]
    fold_of: dict[str, int] = {}
    held = [0] * n
    for g in order:  # greedy: the open fold this group unbalances least
        best = min(
            (j for j in range(n) if held[j] < sizes[j]),
            key=lambda j: (
                tuple(
                    round(x - y, 9)
                    for x, y in zip(cost(plus(load[j], vec[g]), j), cost(load[j], j), strict=True)
                ),
                j,
            ),
        )
        fold_of[g] = best
        held[best] += 1
        load[best] = plus(load[best], vec[g])
    for _ in range(100):  # polish: swap two groups of two folds while that helps
        improved = False
        for a_i, a in enumerate(order):
            for b in order[a_i + 1 :]:
                fa, fb = fold_of[a], fold_of[b]
                if fa == fb:
                    continue
                na = plus(plus(load[fa], vec[a], -1), vec[b])
                nb = plus(plus(load[fb], vec[b], -1), vec[a])
                before = add(cost(load[fa], fa), cost(load[fb], fb))
                after = add(cost(na, fa), cost(nb, fb))
                if tuple(round(x, 9) for x in after) < tuple(round(x, 9) for x in before):
                    load[fa], load[fb] = na, nb
                    fold_of[a], fold_of[b] = fb, fa
                    improved = True
        if not improved:
            break
    return fold_of


def describe(
    name: str,
    idx: np.ndarray,
    speakers: Sequence[str],
    genders: Sequence[str | None],
    labels: np.ndarray,
    label_names: Sequence[str],
) -> str:
    """``test: speakers 03 12 (1 female, 1 male), 61 clips: angry=14 happy=16 neutral=...``"""
    spk = sorted({speakers[i] for i in idx})
    gender_of = {}
    for i in idx:
        gender_of.setdefault(speakers[i], genders[i])
    counts = Counter(gender_of[s] for s in spk)
    known = [f"{counts[g]} {g}" for g in sorted(k for k in counts if k is not None)]
    if counts.get(None):
        known.append(f"{counts[None]} of unknown gender")
    per = Counter(int(labels[i]) for i in idx)
    classes = " ".join(f"{c}={per.get(k, 0)}" for k, c in enumerate(label_names))
    who = f"speakers {' '.join(spk)} ({', '.join(known) or 'no speakers'})"
    return f"{name}: {who}, {len(idx)} clips: {classes}"
