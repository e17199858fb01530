"""The fault drills of `sertune bench faults` as tests (slow tier: minutes each): two runs of one
name at once, a disk filling mid-search (past a floor, and a real tmpfs to its last byte), a
garbled checkpoint on resume, and the driver SIGKILLed at each moment of a search (after a
scheduler stop under cross-validation, during the closing steps, the confirmation, the baseline,
with repeats, under PBT) then resumed. Each runs real `sertune` processes in its own home and
must lose nothing and hang nowhere. (`make test` runs one killed-driver drill: the study's, in
test_study.py; these run in `make test-slow`.)"""

from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "same_name",
        "disk_low",
        "disk_full",
        "bad_checkpoint",
        "kill_closing",
        "kill_in_confirm",
        "kill_in_baseline",
        "kill_repeats",
        "kill_pbt",
    ],
)
def test_a_fault_drill_loses_nothing(name):
    _drill(name)


@pytest.mark.slow
def test_a_cv_search_killed_after_a_scheduler_stop_resumes_to_the_end():
    """The driver SIGKILLed 3 s after ASHA stopped a cross-validated trial (whose fold jobs
    trained on to their last epoch): the resume ends (no wait without a deadline), finished
    trials are not re-run, no run stays RUNNING, the search and its parent run are finished."""
    _drill("kill_after_stop_cv")


def _drill(name: str) -> None:
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
