"""The fault drills of `sertune bench faults` that issue 26 added, as tests (slow tier: minutes
each): two runs of one name at once, a disk filling mid-search (past a floor, and a real tmpfs
to its last byte), a garbled checkpoint on resume.
Each runs real `sertune` processes in its own home and must lose nothing."""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("name", ["same_name", "disk_low", "disk_full", "bad_checkpoint"])
def test_a_fault_drill_loses_nothing(name):
    from sertune.bench.faults import DRILLS, Drill

    d = Drill(name)
    try:
        lost, detail = DRILLS[name](d)
    finally:
        d.clean()
    if detail.startswith("skipped:"):  # e.g. disk_full where a tmpfs cannot be mounted
        d.remove()
        pytest.skip(detail)
    assert lost == 0, detail
    d.remove()
