"""The job board's state machine on its own (the plain class behind the JobBoard actor, no
Ray): submit, take, report, cancel, a slot whose workers died, stop, evaluations, and the typed
messages it hands back."""

import asyncio

from sertune.trainable import EPOCHS_DONE, CheckpointEvaluation
from sertune.warm.board import (
    SHUTDOWN,
    Board,
    EpochReport,
    Job,
    JobEnded,
    JobFailed,
    JobKind,
    JobState,
)


def train(key="t1"):
    return Job(key=key, trainable="linear", config={"params": {}}, checkpoints=f"/ckpt/{key}")


def run(scenario):
    """Run ``scenario(board)`` on one event loop, as the actor does."""
    return asyncio.run(scenario(Board(max_failures=2)))


def test_a_job_goes_pending_running_done_and_its_proxy_reads_every_report():
    async def scenario(b):
        await b.submit(train())
        assert b.jobs["t1"].state is JobState.PENDING
        job = await b.take(slot=0, timeout=1)
        assert job == train() and not job.resumed
        assert b.jobs["t1"].state is JobState.RUNNING and b.slot_job == {0: "t1"}
        for epoch in (1, 2):
            assert await b.report("t1", {EPOCHS_DONE: epoch}) is False
        await b.finish("t1", "done")
        reports = [await b.next_report("t1", 1) for _ in range(3)]
        assert reports == [
            EpochReport({EPOCHS_DONE: 1}),
            EpochReport({EPOCHS_DONE: 2}),
            JobEnded(JobState.DONE),
        ]
        assert await b.next_report("t1", 0.05) is None  # nothing more: the proxy waits
        assert b.jobs["t1"].state is JobState.DONE and b.slot_job == {}
        assert await b.stats() == {"done": 1, "queued": 0, "busy_slots": 0}

    run(scenario)


def test_jobs_are_taken_first_in_first_out_and_a_slot_waits_when_none_is_left():
    async def scenario(b):
        for key in ("a", "b", "c"):
            await b.submit(train(key))
        taken = [(await b.take(slot, 1)).key for slot in (0, 1, 2)]
        assert taken == ["a", "b", "c"]
        assert await b.take(3, 0.05) is None

        async def later():
            await asyncio.sleep(0.05)
            await b.submit(train("d"))

        task = asyncio.create_task(later())
        assert (await b.take(3, 5)).key == "d"  # woken by the submit, not by the timeout
        await task

    run(scenario)


def test_a_cancelled_pending_job_is_never_taken_and_a_running_one_is_told():
    async def scenario(b):
        await b.submit(train("a"))
        await b.submit(train("b"))
        await b.cancel("a")
        assert b.jobs["a"].state is JobState.CANCELLED
        assert (await b.take(0, 1)).key == "b"
        assert await b.cancelled("b") is False
        await b.cancel("b")  # the scheduler stopped it while it trains
        assert await b.cancelled("b") is True
        assert await b.report("b", {EPOCHS_DONE: 1}) is True  # the slot learns at its report
        assert await b.settled("b", 0.05) is False  # still in the slot
        await b.finish("b", "stopped")
        assert await b.settled("b", 0.05) is True
        assert await b.cancel("nope") is None and await b.cancelled("nope") is True

    run(scenario)


def test_a_slot_whose_workers_died_gets_its_job_again_until_the_failure_budget_is_spent():
    async def scenario(b):  # max_failures=2
        await b.submit(train())
        await b.take(0, 1)
        again = [await b.take(0, 0.05) for _ in range(2)]  # the worker group restarted twice
        assert all(j.key == "t1" and j.resumed for j in again)
        assert b.jobs["t1"].attempts == 2
        assert await b.take(0, 0.05) is None  # the third death: the job fails, the slot waits
        assert b.jobs["t1"].state is JobState.FAILED
        failed = await b.next_report("t1", 1)
        assert failed == JobFailed("its workers died 3 times (budget.trial_max_failures = 2)")

    run(scenario)


def test_a_slot_that_died_on_a_cancelled_job_does_not_run_it_again():
    async def scenario(b):
        await b.submit(train("a"))
        await b.submit(train("b"))
        await b.take(0, 1)
        await b.cancel("a")
        assert (await b.take(0, 1)).key == "b"  # the restarted slot moves on
        assert b.jobs["a"].state is JobState.STOPPED
        assert await b.next_report("a", 1) == JobEnded(JobState.STOPPED)

    run(scenario)


def test_submitting_a_trial_again_cancels_its_earlier_job():
    """Population-based training re-submits a trial that took another's checkpoint."""

    async def scenario(b):
        await b.submit(train())
        await b.take(0, 1)
        old = b.jobs["t1"]
        await b.submit(train())
        assert old.cancelled and b.jobs["t1"].state is JobState.PENDING
        assert (await b.take(1, 1)).key == "t1"

    run(scenario)


def test_close_shuts_every_slot_down_and_cancels_what_runs():
    async def scenario(b):
        await b.submit(train("a"))
        await b.take(0, 1)
        await b.submit(train("b"))

        await b.take(1, 1)  # b is taken by slot 1
        waiter = asyncio.create_task(b.take(2, 5))
        await asyncio.sleep(0.05)
        await b.close()
        assert await waiter is SHUTDOWN and SHUTDOWN.kind is JobKind.SHUTDOWN
        assert await b.cancelled("a") and await b.cancelled("b")

    run(scenario)


def test_an_evaluation_is_a_job_whose_result_goes_to_the_evaluator():
    async def scenario(b):
        await b.submit(Job.evaluation("t1", trainable="linear", checkpoint="/c/1", device="cpu"))
        await b.submit(Job.evaluation("t2", trainable="linear", checkpoint="/c/2", device="cpu"))
        first = await b.take(0, 1)
        assert first.kind is JobKind.EVALUATE and first.key == "eval:t1" and first.trial == "t1"
        await b.finish(first.key, "done", "", CheckpointEvaluation(metrics={"test_uar": 0.5}))
        second = await b.take(0, 1)
        await b.finish(second.key, "failed", "OSError: gone")
        assert await b.evaluations(1) == [
            ("t1", CheckpointEvaluation(metrics={"test_uar": 0.5})),
            ("t2", CheckpointEvaluation(error="OSError: gone")),
        ]
        assert await b.evaluations(0) == []

    run(scenario)


def test_an_evaluator_reads_only_its_own_trials_evaluations():
    """A search and its baseline share the board: the baseline's evaluator must not swallow an
    evaluation the search is still waiting for (it would wait its full 600 s, then lose it)."""

    async def scenario(b):
        await b.submit(Job.evaluation("search-t", trainable="linear", checkpoint="/c/1"))
        job = await b.take(0, 1)
        await b.finish(job.key, "done", "", CheckpointEvaluation(metrics={"test_uar": 0.5}))
        assert await b.evaluations(0, ["baseline-t"]) == []  # the baseline's evaluator
        assert await b.evaluations(0, ["search-t"]) == [
            ("search-t", CheckpointEvaluation(metrics={"test_uar": 0.5}))
        ]

    run(scenario)


def test_a_report_for_an_unknown_job_is_refused_and_its_proxy_told():
    async def scenario(b):
        assert await b.report("ghost", {}) is True
        assert await b.next_report("ghost", 0.05) == JobFailed("the job board lost this trial")
        await b.finish("ghost", "done")  # a slot finishing a job the board forgot: nothing
        assert await b.stats() == {"queued": 0, "busy_slots": 0}

    run(scenario)


def test_what_comes_back_is_typed_and_a_diverged_trial_says_so():
    """A proxy matches on the message's type: an epoch, a failure (diverged or not), an end; an
    evaluation comes back as a ``CheckpointEvaluation``."""

    async def scenario(b):
        for key in ("ok", "broken", "nan"):
            await b.submit(train(key))
            await b.take(slot=len(b.slot_job), timeout=1)
        await b.report("ok", {EPOCHS_DONE: 1, "val_uar": 0.4})
        await b.finish("ok", "stopped")
        await b.finish("broken", "failed", "OSError: disk full")
        await b.finish("nan", "failed", "TrialDiverged: loss became nan", diverged=True)

        epoch, end = await b.next_report("ok", 1), await b.next_report("ok", 1)
        assert isinstance(epoch, EpochReport) and epoch.metrics["val_uar"] == 0.4
        assert isinstance(end, JobEnded) and end.outcome is JobState.STOPPED
        broken = await b.next_report("broken", 1)
        assert isinstance(broken, JobFailed) and not broken.diverged
        assert broken.reason == "OSError: disk full"
        nan = await b.next_report("nan", 1)
        assert isinstance(nan, JobFailed) and nan.diverged
        assert nan.reason.startswith("TrialDiverged: ")

        await b.submit(Job.evaluation("ok", trainable="linear", checkpoint="/c/ok", device="cpu"))
        job = await b.take(0, 1)
        figures = CheckpointEvaluation(metrics={"test_uar": 0.5}, files={"robustness.json": b"{}"})
        await b.finish(job.key, "done", "", figures)
        ((trial, evaluation),) = await b.evaluations(1)
        assert trial == "ok" and isinstance(evaluation, CheckpointEvaluation)
        assert evaluation.metrics == {"test_uar": 0.5} and evaluation.error is None
        assert evaluation.files == {"robustness.json": b"{}"}

    run(scenario)
