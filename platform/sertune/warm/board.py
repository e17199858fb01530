"""The job board: one actor per driver between the Tune proxies and the warm slots.

Proxies submit jobs and read their reports; slots take jobs, report epochs and finish them.
What crosses between them is frozen: a :class:`Job` one way, a :data:`Report` (an epoch's
metrics, then how the job ended) the other; the board keeps each job's state.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import ray

from ..trainable import CheckpointEvaluation


class TrialFailed(RuntimeError):
    """A trial's own training raised; ``str()`` is the worker's reason."""


class JobKind(StrEnum):
    TRAIN = "train"  # a trial's training loop
    EVALUATE = "evaluate"  # a stopped trial's best checkpoint: test and robustness figures
    SHUTDOWN = "shutdown"  # the board closed: the slot's loop ends


class JobState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Job:
    """What a slot runs. ``key`` is the trial id (``eval:<trial>`` for an evaluation)."""

    key: str
    kind: JobKind = JobKind.TRAIN
    trainable: str = ""
    config: dict[str, Any] = field(default_factory=dict)  # the loop config (sertune.tuner)
    checkpoints: str = ""  # TRAIN: where the trial's epoch checkpoints live
    checkpoint: str = ""  # EVALUATE: the checkpoint to evaluate
    device: str = "cpu"  # EVALUATE
    trial: str = ""  # EVALUATE: the trial it is for
    resumed: bool = False  # handed out again after the slot's worker group restarted

    @classmethod
    def evaluation(cls, trial: str, **fields: Any) -> Job:
        return cls(key=f"eval:{trial}", kind=JobKind.EVALUATE, trial=trial, **fields)


SHUTDOWN = Job(key="", kind=JobKind.SHUTDOWN)


# -- what a trial's proxy reads from the board, in order: epochs, then one end --------------------
@dataclass(frozen=True)
class EpochReport:
    """One epoch's metrics, as the slot's session reported them."""

    metrics: dict[str, Any]


@dataclass(frozen=True)
class JobFailed:
    """The job failed: its training raised, or its workers died too often. ``diverged``: the
    trainable raised ``TrialDiverged`` (the configuration's fault; the proxy raises it again)."""

    reason: str
    diverged: bool = False


@dataclass(frozen=True)
class JobEnded:
    """The job ended without failing and without a last epoch to report (stopped, shut down)."""

    outcome: JobState


Report = EpochReport | JobFailed | JobEnded


@dataclass
class _Entry:
    """The board's own record of a job."""

    job: Job
    state: JobState = JobState.PENDING
    reports: collections.deque[Report] = field(default_factory=collections.deque)
    cancelled: bool = False
    attempts: int = 0
    slot: int | None = None


class Board:
    """Jobs waiting, jobs in slots, reports waiting for their proxies. Run as the actor
    :data:`JobBoard` (async: every method runs on one event loop, so no locks); a plain object
    in the unit tests.

    A job's state: pending -> running -> done | stopped | failed, or cancelled while pending.
    A slot whose worker group restarts gets its running job again (``resumed``), at most
    ``max_failures`` times."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures
        self.queue: collections.deque[str] = collections.deque()  # job keys, FIFO
        self.jobs: dict[str, _Entry] = {}
        self.slot_job: dict[int, str] = {}
        self.evals_done: list[tuple[str, CheckpointEvaluation]] = []
        self.closed = False
        self.changed = asyncio.Event()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def _wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
        except TimeoutError:
            pass

    # proxies
    async def submit(self, job: Job) -> None:
        """Queue a job (a trial's training, or a stopped trial's evaluation); a job of the same
        key still pending or running is cancelled (a trial re-submitted after PBT's hand-over)."""
        old = self.jobs.get(job.key)
        if old and old.state in (JobState.PENDING, JobState.RUNNING):
            old.cancelled = True
        self.jobs[job.key] = _Entry(job)
        self.queue.append(job.key)
        self._notify()

    async def next_report(self, key: str, timeout: float) -> Report | None:
        """The job's next report; None when none came within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.jobs.get(key)
            if job is None:
                return JobFailed("the job board lost this trial")
            if job.reports:
                return job.reports.popleft()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await self._wait(left)

    async def next_of(self, keys: list[str], timeout: float) -> tuple[str, Report] | None:
        """The next report of any of ``keys`` (a cross-validated trial's fold jobs), with its
        key, in the order of ``keys``; None when none came within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for key in keys:
                job = self.jobs.get(key)
                if job is None:
                    return key, JobFailed("the job board lost this trial")
                if job.reports:
                    return key, job.reports.popleft()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await self._wait(left)

    async def states(self, keys: list[str]) -> dict[str, str]:
        """Each job's state (``pending`` while it waits for a slot, ``running`` on one)."""
        return {k: (self.jobs[k].state.value if k in self.jobs else "gone") for k in keys}

    async def cancel(self, key: str) -> None:
        job = self.jobs.get(key)
        if job is None:
            return
        job.cancelled = True
        if job.state == JobState.PENDING:
            job.state = JobState.CANCELLED
        self._notify()

    # evaluations of stopped trials (submitted as jobs of kind EVALUATE)
    async def evaluations(
        self, timeout: float, trials: list[str] | None = None
    ) -> list[tuple[str, CheckpointEvaluation]]:
        """(trial, evaluation) of every evaluation of ``trials`` (all when None) that ended since
        the last call; waits up to ``timeout`` when there is none yet. Another evaluator's are
        kept for it: a search and its baseline share the board."""

        def mine(e: tuple[str, CheckpointEvaluation]) -> bool:
            return trials is None or e[0] in trials

        if not any(mine(e) for e in self.evals_done) and timeout > 0:
            await self._wait(timeout)
        out = [e for e in self.evals_done if mine(e)]
        self.evals_done = [e for e in self.evals_done if not mine(e)]
        return out

    # slots
    async def take(self, slot: int, timeout: float) -> Job | None:
        """The slot's in-flight job after a worker-group restart, else the next one; None when
        nothing came within ``timeout``; a job of kind SHUTDOWN at the end."""
        key = self.slot_job.get(slot)
        if key is not None:
            job = self.jobs.get(key)
            if job is not None and job.state == JobState.RUNNING and not job.cancelled:
                job.attempts += 1
                if job.attempts <= self.max_failures:
                    return replace(job.job, resumed=True)
                reason = (
                    f"its workers died {job.attempts} times "
                    f"(budget.trial_max_failures = {self.max_failures})"
                )
                self._end(job, JobState.FAILED, reason)
            elif job is not None and job.state == JobState.RUNNING:
                self._end(job, JobState.STOPPED)
            self.slot_job.pop(slot, None)
        deadline = time.monotonic() + timeout
        while True:
            if self.closed:
                return SHUTDOWN
            while self.queue:
                key = self.queue.popleft()
                job = self.jobs.get(key)
                if job is None or job.state != JobState.PENDING or job.cancelled:
                    continue
                job.state, job.slot = JobState.RUNNING, slot
                self.slot_job[slot] = key
                return job.job
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await self._wait(left)

    async def report(self, key: str, metrics: dict[str, Any]) -> bool:
        """A slot's epoch report; returns True when the trial was cancelled meanwhile."""
        job = self.jobs.get(key)
        if job is None:
            return True
        job.reports.append(EpochReport(metrics))
        self._notify()
        return job.cancelled

    async def settled(self, key: str, timeout: float) -> bool:
        """Wait until no slot is running ``key`` (its cancellation reached the slot)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.jobs.get(key)
            if job is None or job.state != JobState.RUNNING:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self._wait(left)

    async def cancelled(self, key: str) -> bool:
        job = self.jobs.get(key)
        return job is None or job.cancelled or self.closed

    async def finish(
        self,
        key: str,
        outcome: str,
        reason: str = "",
        result: CheckpointEvaluation | None = None,
        diverged: bool = False,
    ) -> None:
        """A slot is done with ``key``: outcome ``done``, ``stopped`` or ``failed`` (``diverged``
        when the trainable raised ``TrialDiverged``); ``result``: an evaluation's figures."""
        job = self.jobs.get(key)
        if job is not None:
            self._end(job, JobState(outcome), reason, result, diverged)

    def _end(
        self, job: _Entry, outcome: JobState, reason: str = "", result=None, diverged=False
    ) -> None:
        """Record how ``job`` ended (arguments as :meth:`finish`'s) for its proxy or evaluator."""
        job.state = outcome
        if job.slot is not None and self.slot_job.get(job.slot) == job.job.key:
            self.slot_job.pop(job.slot, None)
        if job.job.kind == JobKind.EVALUATE:
            if result is None:
                result = CheckpointEvaluation(error=reason or outcome.value)
            self.evals_done.append((job.job.trial, result))
        elif outcome == JobState.FAILED:
            job.reports.append(JobFailed(reason, diverged))
        else:
            job.reports.append(JobEnded(outcome))
        self._notify()

    async def close(self) -> None:
        self.closed = True
        for job in self.jobs.values():
            job.cancelled = True
        self._notify()

    async def stats(self) -> dict[str, int]:
        states = collections.Counter(j.state.value for j in self.jobs.values())
        return dict(states) | {"queued": len(self.queue), "busy_slots": len(self.slot_job)}


JobBoard = ray.remote(num_cpus=0, max_concurrency=10_000)(Board)
