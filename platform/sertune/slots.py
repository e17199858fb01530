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
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

import ray
from ray import tune

from .sessions import PROCESS_CACHE, resolve_device
from .storage import exists, list_dirs, read_text, remove_dir, upload_dir, write_text
from .trainable import TrialStopped, get_trainable
from .tuner import flat_config, loop_config

CHECKPOINT_PREFIX = "checkpoint_"
KEEP_CHECKPOINTS = 2
POLL_S = 0.25


class TrialFailed(RuntimeError):
    """A trial's own training raised; ``str()`` is the worker's reason."""


# -- the board ----------------------------------------------------------------------------------------


@ray.remote(num_cpus=0, max_concurrency=10_000)
class JobBoard:
    """Jobs waiting, jobs in slots, reports waiting for their proxies. An async actor: every
    method runs on one event loop, so no locks."""

    def __init__(self, max_failures: int):
        self.max_failures = max_failures
        self.queue: collections.deque[str] = collections.deque()  # job keys, FIFO
        self.jobs: dict[str, dict[str, Any]] = {}
        self.slot_job: dict[int, str] = {}
        self.evals_done: list[tuple[str, dict[str, Any]]] = []
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
    async def submit(self, key: str, job: dict[str, Any]) -> None:
        old = self.jobs.get(key)
        if old and old["state"] in ("pending", "running"):
            old["cancelled"] = True
        self.jobs[key] = {**job, "key": key, "state": "pending", "reports": collections.deque(),
                          "cancelled": False, "attempts": 0}  # fmt: skip
        self.queue.append(key)
        self._notify()

    async def next_report(self, key: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            job = self.jobs.get(key)
            if job is None:
                return {"kind": "failed", "reason": "the job board lost this trial"}
            if job["reports"]:
                return job["reports"].popleft()
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await self._wait(left)

    async def cancel(self, key: str) -> None:
        job = self.jobs.get(key)
        if job is None:
            return
        job["cancelled"] = True
        if job["state"] == "pending":
            job["state"] = "cancelled"
        self._notify()

    # evaluations of stopped trials
    async def submit_eval(self, key: str, job: dict[str, Any]) -> None:
        ekey = f"eval:{key}"
        self.jobs[ekey] = {**job, "key": ekey, "trial": key, "kind": "evaluate",
                           "state": "pending", "reports": collections.deque(),
                           "cancelled": False, "attempts": 0}  # fmt: skip
        self.queue.append(ekey)
        self._notify()

    async def evaluations(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        if not self.evals_done and timeout > 0:
            await self._wait(timeout)
        out, self.evals_done = self.evals_done, []
        return out

    # slots
    async def take(self, slot: int, timeout: float) -> dict[str, Any] | None:
        """The slot's in-flight job after a worker-group restart, else the next one; None when
        nothing came within ``timeout``; ``{"kind": "shutdown"}`` at the end."""
        key = self.slot_job.get(slot)
        if key is not None:
            job = self.jobs.get(key)
            if job is not None and job["state"] == "running" and not job["cancelled"]:
                job["attempts"] += 1
                if job["attempts"] <= self.max_failures:
                    return self._public(job, resumed=True)
                self._end(job, "failed", f"its workers died {job['attempts']} times "
                                         f"(budget.trial_max_failures = {self.max_failures})")  # fmt: skip
            elif job is not None and job["state"] == "running":
                self._end(job, "stopped")
            self.slot_job.pop(slot, None)
        deadline = time.monotonic() + timeout
        while True:
            if self.closed:
                return {"kind": "shutdown"}
            while self.queue:
                key = self.queue.popleft()
                job = self.jobs.get(key)
                if job is None or job["state"] != "pending" or job["cancelled"]:
                    continue
                job["state"], job["slot"] = "running", slot
                self.slot_job[slot] = key
                return self._public(job)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            await self._wait(left)

    def _public(self, job: dict[str, Any], resumed: bool = False) -> dict[str, Any]:
        skip = ("reports", "state", "cancelled")
        return {**{k: v for k, v in job.items() if k not in skip}, "resumed": resumed}

    async def report(self, key: str, metrics: dict[str, Any]) -> bool:
        """A slot's epoch report; returns True when the trial was cancelled meanwhile."""
        job = self.jobs.get(key)
        if job is None:
            return True
        job["reports"].append({"kind": "result", "metrics": metrics})
        self._notify()
        return job["cancelled"]

    async def settled(self, key: str, timeout: float) -> bool:
        """Wait until no slot is running ``key`` (its cancellation reached the slot)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.jobs.get(key)
            if job is None or job["state"] != "running":
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self._wait(left)

    async def cancelled(self, key: str) -> bool:
        job = self.jobs.get(key)
        return job is None or job["cancelled"] or self.closed

    async def finish(self, key: str, outcome: str, reason: str = "", result=None) -> None:
        job = self.jobs.get(key)
        if job is not None:
            self._end(job, outcome, reason, result)

    def _end(self, job: dict[str, Any], outcome: str, reason: str = "", result=None) -> None:
        job["state"] = outcome
        if self.slot_job.get(job.get("slot")) == job["key"]:
            self.slot_job.pop(job["slot"], None)
        if job.get("kind") == "evaluate":
            self.evals_done.append((job["trial"], result or {"error": reason or outcome}))
        elif outcome == "failed":
            job["reports"].append({"kind": "failed", "reason": reason})
        else:
            job["reports"].append({"kind": "end", "outcome": outcome})
        self._notify()

    async def close(self) -> None:
        self.closed = True
        for job in self.jobs.values():
            job["cancelled"] = True
        self._notify()

    async def stats(self) -> dict[str, int]:
        states = collections.Counter(j["state"] for j in self.jobs.values())
        return dict(states) | {"queued": len(self.queue), "busy_slots": len(self.slot_job)}


# -- the session a slot gives each trial --------------------------------------------------------------


class SlotSession:
    """``sertune.trainable.Session`` for one trial inside a warm slot's Ray Train worker."""

    def __init__(self, job: dict[str, Any], board: Any, device: str):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.job, self.board, self.key = job, board, job["key"]
        self.storage = job["checkpoints"]
        self._device = ray.train.torch.get_device() if device == "auto" else resolve_device(device)
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._polls = 0
        self._tmp: list[str] = []
        threading.Thread(target=self._watch, daemon=True, name="sertune-cancel").start()

    def _watch(self) -> None:
        while not self._done.is_set():
            try:
                if ray.get(self.board.cancelled.remote(self.key), timeout=30):
                    self._cancel.set()
                    return
            except Exception:  # the board is gone: the driver stopped
                self._cancel.set()
                return
            self._done.wait(POLL_S)

    def close(self) -> None:
        self._done.set()
        for d in self._tmp:
            shutil.rmtree(d, ignore_errors=True)

    def torch_device(self):
        return self._device

    def all_reduce_sum(self, t):
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def wrap_model(self, model):
        if self.world_size > 1:
            import ray.train.torch

            return ray.train.torch.prepare_model(model, move_to_device=self._device)
        return model.to(self._device)

    def placement(self) -> dict[str, str]:
        ctx = ray.get_runtime_context()
        return {
            "placement/node": ctx.get_node_id(),
            "placement/gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
        }

    def cache(self) -> dict[str, Any]:
        return PROCESS_CACHE

    def _agreed_stop(self) -> bool:
        """Every rank stops at the same step (a lone rank would hang its peers' all-reduce)."""
        flag = self._cancel.is_set()
        if self.world_size > 1:
            import torch

            t = torch.tensor([1.0 if flag else 0.0], device=self._device)
            flag = bool(self.all_reduce_sum(t).item() > 0)
        return flag

    def poll(self) -> None:
        self._polls += 1
        if self.world_size > 1 and self._polls % 16:
            return  # an all-reduce every step would cost; every 16th is quick enough
        if self._agreed_stop():
            raise TrialStopped(self.key)

    def get_checkpoint_dir(self) -> str | None:
        """The trial's latest complete checkpoint (after a crash or a worker-group restart).

        Its epoch's report is sent again first: the driver may have died after the slot saved
        the checkpoint but before that report reached Tune and MLflow (the journal drops an epoch
        it already has)."""
        done = [d for d in list_dirs(self.storage) if d.startswith(CHECKPOINT_PREFIX)
                and exists(f"{self.storage}/{d}/COMPLETE")]  # fmt: skip
        if not done:
            return None
        from .storage import download_dir

        tmp = tempfile.mkdtemp(prefix="sertune-resume-")
        self._tmp.append(tmp)
        local = download_dir(f"{self.storage}/{done[-1]}", Path(tmp) / done[-1])
        saved = local / "metrics.json"
        if self.rank == 0 and saved.exists():
            metrics = {
                **json.loads(saved.read_text()),
                "checkpoint_path": f"{self.storage}/{done[-1]}",
            }
            if ray.get(self.board.report.remote(self.key, metrics)):
                self._cancel.set()
        return str(local)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if self.rank == 0:
            if checkpoint_dir:
                name = f"{CHECKPOINT_PREFIX}{int(metrics.get('epoch', 0)):06d}"
                uri = f"{self.storage}/{name}"
                upload_dir(checkpoint_dir, uri)
                write_text(f"{uri}/COMPLETE", "")  # last: a half-copied checkpoint never counts
                metrics = {**metrics, "checkpoint_path": uri}
                self._prune()
            if ray.get(self.board.report.remote(self.key, metrics)):
                self._cancel.set()
        if self._agreed_stop():
            raise TrialStopped(self.key)

    def _prune(self) -> None:
        ckpts = [d for d in list_dirs(self.storage) if d.startswith(CHECKPOINT_PREFIX)]
        for old in ckpts[:-KEEP_CHECKPOINTS]:
            remove_dir(f"{self.storage}/{old}")


# -- a slot's loop ------------------------------------------------------------------------------------------


def slot_loop(config: dict[str, Any]) -> None:
    """``TorchTrainer``'s loop in a warm slot: take a job, train it, report, take the next."""
    import ray.train

    board, slot, device = config["board"], config["slot"], config["device"]
    if config.get("threads"):
        os.environ.setdefault("OMP_NUM_THREADS", str(config["threads"]))
        import torch

        torch.set_num_threads(int(config["threads"]))
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    while True:
        job = None
        if rank == 0:
            while job is None:
                job = ray.get(board.take.remote(slot, 30.0))
        if world > 1:
            import torch.distributed as dist

            box = [job]
            dist.broadcast_object_list(box, src=0)
            job = box[0]
        if job.get("kind") == "shutdown":
            return
        if job.get("kind") == "evaluate":
            if rank == 0:
                _evaluate(job, board)
            continue
        _run_job(job, board, device)


def _run_job(job: dict[str, Any], board: Any, device: str) -> None:
    trainable = get_trainable(job["trainable"])
    session = SlotSession(job, board, device)
    try:
        trainable.train(job["config"], session)
        outcome, reason = "done", ""
    except TrialStopped:
        outcome, reason = "stopped", ""
    except Exception as e:  # the trial's own failure: it fails alone, the slot goes on
        outcome = "failed"
        reason = f"{type(e).__name__}: {e}"
        if session.rank == 0:
            print(traceback.format_exc(), flush=True)
    finally:
        session.close()
    if session.rank == 0:
        ray.get(board.finish.remote(job["key"], outcome, reason))


def _evaluate(job: dict[str, Any], board: Any) -> None:
    from .storage import download_dir

    try:
        trainable = get_trainable(job["trainable"])
        with tempfile.TemporaryDirectory(prefix="sertune-eval-") as tmp:
            local = download_dir(job["checkpoint"], Path(tmp) / "ckpt")
            metrics = trainable.evaluate_checkpoint(
                str(local), job["config"]["data"], job["config"]["run"], job["device"]
            )
            report = local / "best" / "robustness"
            files = {p.name: p.read_bytes() for p in report.iterdir()} if report.is_dir() else {}
        outcome = {"metrics": metrics, "files": files}
        ray.get(board.finish.remote(job["key"], "done", "", outcome))
    except Exception as e:
        ray.get(board.finish.remote(job["key"], "failed", f"{type(e).__name__}: {e}"))


def run_slot(slot: int, board: Any, spec_resources: dict[str, Any], device: str, threads: int,
             storage: str, max_restarts: int) -> str:  # fmt: skip
    """A Ray task holding one slot's ``TorchTrainer`` until the board closes."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .storage import fs_and_path

    use_gpu = spec_resources["gpus_per_worker"] > 0
    per_worker = {"CPU": spec_resources["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = spec_resources["gpus_per_worker"]
    fs, path = fs_and_path(storage)
    trainer = TorchTrainer(
        slot_loop,
        train_loop_config={"board": board, "slot": slot, "device": device, "threads": threads},
        torch_config=TorchConfig(backend="gloo") if device == "cpu" else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec_resources["workers"], use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=f"slot-{slot}-{uuid.uuid4().hex[:6]}",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=max_restarts),
        ),
    )
    result = trainer.fit()
    return "ok" if result.error is None else f"{type(result.error).__name__}: {result.error}"


# -- the driver's side --------------------------------------------------------------------------------------


class WarmTrial(tune.Trainable):
    """A Tune trial in warm mode: submits its configuration and relays the slot's reports.

    The job is submitted at the first ``step()``, not in ``setup()``: Tune may restore a
    checkpoint in between (population-based training hands a trial another's checkpoint), which
    must be in the trial's storage before a slot starts on it."""

    def setup(self, config: dict[str, Any], fixed: dict[str, Any] | None = None, board=None):
        self.fixed, self.board = fixed, board
        self._config = config
        self._active: str | None = None
        self._last_epoch = 0
        self._last_uri: str | None = None
        self._exploited: dict[str, Any] | None = None
        # population-based training: [epoch, {param: value}, trained as trial] for every epoch
        # of this trial's model so far, through the trials whose checkpoints it took; it travels
        # with the checkpoints, so a resumed driver gets it back from them
        self._lineage: list[list[Any]] = []

    @property
    def _slot_storage(self) -> str:
        return f"{self.fixed['train_storage']}/{self.trial_id}"

    def _submit(self) -> None:
        key = self.trial_id
        job = {
            "kind": "train",
            "trainable": self.fixed["trainable"],
            "config": loop_config(self.fixed, self._config, key),
            "checkpoints": self._slot_storage,
        }
        ray.get(self.board.settled.remote(key, 120.0))  # a cancelled run of this trial is gone
        ray.get(self.board.submit.remote(key, job))
        self._active = key

    def _schedule(self) -> dict[str, float]:
        """The perturbed parameters' values this epoch trained with (population-based training)."""
        config = flat_config(self._config)
        return {
            f"schedule/{k}": float(config[k])
            for k in self.fixed.get("mutable", ())
            if isinstance(config.get(k), (int, float))
        }

    def step(self) -> dict[str, Any]:
        if self._active is None:
            self._submit()
        while True:
            item = ray.get(self.board.next_report.remote(self._active, 10.0))
            if item is None:
                continue
            if item["kind"] == "result":
                metrics = dict(item["metrics"])
                epoch = int(metrics.get("epochs_done", 0))
                if epoch <= self._last_epoch:  # a restarted worker group re-sent its checkpoint's
                    continue
                self._last_epoch = epoch
                self._last_uri = metrics.get("checkpoint_path") or self._last_uri
                if int(metrics.get("epochs_done", 0)) >= self.fixed["max_epochs"]:
                    metrics["done"] = True
                schedule = self._schedule()
                metrics.update(schedule)
                if schedule:
                    self._extend_lineage(epoch, schedule)
                    metrics["pbt_lineage"] = json.dumps(self._lineage)
                if self._exploited:
                    metrics["pbt_exploited_from"] = self._exploited["trial"]
                    metrics["pbt_exploited_epoch"] = self._exploited["epoch"]
                    self._exploited = None
                return metrics
            if item["kind"] == "failed":
                raise TrialFailed(item["reason"])
            # "end" without a final result: stopped by the board (shutdown)
            raise TrialFailed(f"the slot ended this trial ({item.get('outcome')})")

    def _extend_lineage(self, epoch: int, schedule: dict[str, float]) -> None:
        """Add ``epoch``; epochs since the last one known were trained here with the same
        values (the configuration changes only when a checkpoint is taken, which resets this)."""
        values = {k.removeprefix("schedule/"): v for k, v in schedule.items()}
        kept = [e for e in self._lineage if e[0] < epoch]
        last = kept[-1][0] if kept else 0
        gap = [[e, values, self.trial_id] for e in range(last + 1, epoch)]
        self._lineage = [*kept, *gap, [epoch, values, self.trial_id]]

    def _cancel(self) -> None:
        if getattr(self, "_active", None):
            try:
                ray.get(self.board.cancel.remote(self._active), timeout=10)
            except Exception:  # the board is gone with the driver: nothing left to cancel
                pass
            self._active = None

    def cleanup(self) -> None:
        self._cancel()

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._cancel()
        self._config = new_config
        self._last_epoch, self._last_uri, self._exploited = 0, None, None
        self._lineage = []
        return True

    def save_checkpoint(self, checkpoint_dir: str) -> dict | None:
        """Outside population-based training the slot keeps the trial's checkpoints and Tune
        needs none. Under it, a copy of the last reported epoch's checkpoint, for another trial
        to continue from."""
        from .storage import download_dir

        if self.fixed.get("mutable") and self._last_uri:
            download_dir(self._last_uri, Path(checkpoint_dir) / "slot")
            pointer = {
                "trial": self.trial_id,
                "epoch": self._last_epoch,
                "name": self._last_uri.rstrip("/").rsplit("/", 1)[-1],
                "lineage": self._lineage,
            }
            (Path(checkpoint_dir) / "pbt.json").write_text(json.dumps(pointer))
        return None

    def load_checkpoint(self, checkpoint: Any) -> None:
        """Continue from another trial's checkpoint (population-based training exploits it):
        it replaces this trial's own in the trial's storage, once. The trial's own checkpoint
        (a resumed search) is older than what its storage holds: nothing to do."""
        pointer_file = Path(str(checkpoint)) / "pbt.json" if isinstance(checkpoint, str) else None
        if pointer_file is None or not pointer_file.is_file():
            return
        pointer = json.loads(pointer_file.read_text())
        lineage = [e for e in pointer.pop("lineage", []) if e[0] <= int(pointer["epoch"])]
        if pointer["trial"] == self.trial_id:  # the slot re-sends its latest epoch if newer
            self._last_epoch = max(self._last_epoch, int(pointer["epoch"]))
            self._lineage = lineage
            return
        self._lineage = lineage
        marker = f"{self._slot_storage}/EXPLOITED"
        if exists(marker) and read_text(marker) == json.dumps(pointer):
            return  # applied before a driver crash; the storage has moved on since
        self._cancel()
        ray.get(self.board.settled.remote(self.trial_id, 120.0))
        remove_dir(self._slot_storage)
        upload_dir(str(pointer_file.parent / "slot"), f"{self._slot_storage}/{pointer['name']}")
        write_text(f"{self._slot_storage}/{pointer['name']}/COMPLETE", "")
        write_text(marker, json.dumps(pointer))
        self._last_epoch, self._last_uri = int(pointer["epoch"]), None
        self._exploited = pointer


class SlotPool:
    """The board and the warm slots of a driver (shared by a search's phases and its baseline)."""

    def __init__(self, resources: dict[str, Any], device: str, threads: int, max_failures: int,
                 storage: str, n_slots: int, log=print):  # fmt: skip
        self.resources, self.device, self.threads = resources, device, threads
        self.max_failures, self.storage, self.n, self.log = max_failures, storage, n_slots, log
        self.board = None
        self.slots: dict[Any, int] = {}

    def start(self) -> SlotPool:
        env = {"RAY_ADDRESS": os.environ.get("RAY_ADDRESS", "")}
        self.board = JobBoard.options(runtime_env={"env_vars": env}).remote(self.max_failures)
        task = ray.remote(num_cpus=0)(run_slot).options(runtime_env={"env_vars": env})
        for i in range(self.n):
            ref = task.remote(
                i,
                self.board,
                self.resources,
                self.device,
                self.threads,
                f"{self.storage}/_slots",
                max(1000, self.max_failures + 1),
            )
            self.slots[ref] = i
        return self

    def trainable(self, fixed: dict[str, Any]):
        return tune.with_resources(
            tune.with_parameters(WarmTrial, fixed=fixed, board=self.board),
            {"CPU": 0, "memory": 1 << 20},
        )

    def check(self) -> None:
        """Say so when a slot's trainer ended on its own (it should live until close())."""
        if not self.slots:
            return
        done, _ = ray.wait(list(self.slots), num_returns=len(self.slots), timeout=0)
        for ref in done:
            slot = self.slots.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as e:
                outcome = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            self.log(f"[sertune] warm slot {slot} stopped: {outcome}")

    def close(self, timeout_s: float = 60.0) -> None:
        if self.board is None:
            return
        try:
            ray.get(self.board.close.remote(), timeout=10)
        except Exception:  # the board died with its node: the slots stop on their own
            pass
        if self.slots:
            _, stuck = ray.wait(list(self.slots), num_returns=len(self.slots), timeout=timeout_s)
            for (
                ref
            ) in stuck:  # only unfinished ones: Ray 2.60 aborts on cancelling a finished task
                ray.cancel(ref, force=True)
        self.slots.clear()
        ray.kill(self.board)
        self.board = None
        remove_dir(f"{self.storage}/_slots")


class BoardEvaluator:
    """Evaluates stopped trials' best checkpoints in free slots (warm mode)."""

    def __init__(self, pool: SlotPool, fixed: dict[str, Any]):
        self.pool, self.fixed = pool, fixed
        self.waiting: set[str] = set()

    @property
    def pending(self) -> int:
        return len(self.waiting)

    def submit(self, key: str, checkpoint_uri: str) -> None:
        job = {
            "trainable": self.fixed["trainable"],
            "config": loop_config(self.fixed, {}, key),
            "checkpoint": checkpoint_uri,
            "device": self.pool.device,
        }
        ray.get(self.pool.board.submit_eval.remote(key, job))
        self.waiting.add(key)

    def ready(self, wait_s: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        if not self.waiting:
            return []
        out = ray.get(self.pool.board.evaluations.remote(wait_s))
        for key, _ in out:
            self.waiting.discard(key)
        return out
