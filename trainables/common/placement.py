"""How many bytes of corpus a slot may keep on its device.

The rule (``resources.corpus_on_device: auto``, the default): a slot's share of its device is
what the device has free, but no more than its total divided by the slots that share it
(``1 / gpus_per_worker`` on a packed GPU; on the CPU, the node's CPUs over ``cpus_per_worker``),
of which ``HEADROOM`` is kept back for the model, optimiser, activations and batches. A corpus that
fits what is left of that share is copied to the device once; one that does not is streamed.

Overrides, first match wins: ``resources.corpus_budget_mb`` in the spec, then the environment
variable ``SERTUNE_CORPUS_BUDGET_MB`` of the worker processes; ``corpus_on_device: always|never``
skips the budget altogether.
"""

from __future__ import annotations

import os
from typing import Any

HEADROOM = 0.3  # of a slot's share: the model, optimiser state, activations, batches in flight
CPU_SHARE = 0.5  # of the host memory available per CPU slot: the rest is the OS's and Ray's
ENV = "SERTUNE_CORPUS_BUDGET_MB"


def slot_budget(device: Any, options: dict[str, Any] | None = None) -> tuple[int, str]:
    """(bytes, why) for one slot on ``device`` (a ``torch.device``)."""
    options = options or {}
    if options.get("corpus_budget_mb") is not None:
        mb = float(options["corpus_budget_mb"])
        return int(mb * 1e6), "set by resources.corpus_budget_mb"
    env = os.environ.get(ENV, "").strip()
    if env:
        try:
            return int(float(env) * 1e6), f"set by {ENV}"
        except ValueError:
            raise ValueError(f"{ENV}={env!r}: not a number of megabytes") from None
    slots = int(options.get("slots_per_device") or slots_per_device(options))
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        share = min(free, total / slots)
        why = (
            f"{(1 - HEADROOM):.0%} of min({free / 2**30:.1f} GiB free, "
            f"{total / 2**30:.1f} GiB / {slots} slot(s))"
        )
        return int(share * (1 - HEADROOM)), why
    avail = _available_host_bytes()
    share = avail / slots * CPU_SHARE
    why = f"{CPU_SHARE:.0%} of {avail / 2**30:.1f} GiB available host memory / {slots} slot(s)"
    return int(share), why


def _available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return 4 << 30  # unknown: a modest 4 GiB


def slots_per_device(resources: dict[str, Any], cpus: int | None = None) -> int:
    """How many slots share one device under ``resources`` (the spec's)."""
    g = float(resources.get("gpus_per_worker") or 0)
    if 0 < g < 1:
        return max(1, int(round(1 / g)))
    if g >= 1:
        return 1
    cpus = cpus or os.cpu_count() or 1
    return max(1, int(cpus // max(float(resources.get("cpus_per_worker") or 1), 1e-9)))
