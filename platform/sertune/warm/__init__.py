"""Warm execution (the default): Ray Train worker groups that outlive trials.

Ray 2.60 has no supported way to reuse a Train V2 worker group across ``fit()`` calls, and a
per-trial ``TorchTrainer`` costs 7-15 s of process start, imports, CUDA init, corpus load and
polling on every trial (docs/architecture.md). So a search starts one long-lived
``TorchTrainer`` per concurrency *slot*; its loop takes trial after trial from a job board:

    Tune + Optuna (driver) ── WarmTrial proxy (one per trial, a thin Tune Trainable)
         │ submit / next_report / cancel                │
         └──────────────► JobBoard (actor) ◄────────────┘
                              ▲ take / report / finish
    slot 0: TorchTrainer ─ workers: while job := take(): trainable.train(job, SlotSession)
    slot 1: ...

* Ray Tune and Optuna still decide what runs and what stops: a proxy submits its configuration
  and relays each epoch's report to Tune; when ASHA (or Ctrl-C) stops the proxy, its job is
  cancelled and the slot's loop stops at its next step.
* The training of every trial still runs in Ray Train workers (DDP when a trial has several),
  through the trainable's one loop ``train(config, session)`` with a :class:`SlotSession`.
* The corpus stays resident on the device across the trials of a slot (the session's cache).
* A slot persists each epoch's checkpoint under ``<search>/_train/<trial>/``; a dead worker group
  is restarted by Train's ``FailureConfig`` and the in-flight trial continues from its last
  checkpoint (at most ``budget.trial_max_failures`` times); a crashed driver's search resumes the
  same way. A trial that raises fails alone; the slot goes on with the next one.
* Trials a scheduler stopped are evaluated on their best checkpoint by a free slot (test and
  robustness figures for every trial, not only those that ran to the end).

Modules by the process they run in: ``board`` (the JobBoard actor, the :class:`Job` it hands
out and the reports it hands back: :class:`EpochReport`, :class:`JobFailed`, :class:`JobEnded`),
``slot`` (a slot's Train workers; their session is ``sertune.sessions.SlotSession``),
``proxy`` (the driver: Tune's proxies, the pool, the evaluator).
"""

from .board import (
    EpochReport,
    Job,
    JobBoard,
    JobEnded,
    JobFailed,
    JobKind,
    JobState,
    Report,
    TrialFailed,
)
from .proxy import BoardEvaluator, SlotPool, WarmTrial

__all__ = [
    "BoardEvaluator",
    "EpochReport",
    "Job",
    "JobBoard",
    "JobEnded",
    "JobFailed",
    "JobKind",
    "JobState",
    "Report",
    "SlotPool",
    "TrialFailed",
    "WarmTrial",
]
