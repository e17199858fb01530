"""Per-trial execution (``execution: per_trial``): every Tune trial starts its own Ray Train run.

Ray 2.60's pattern for Tune + Train V2: each trial is a function trainable that launches a
``TorchTrainer``; the workers' reports reach Tune through ``TuneReportCallback``. Each trial pays
for a new Train controller and worker group (processes, imports, CUDA start, the corpus load):
7-15 s on a 2-core machine, ~16-27 s on an H200 host. The default, ``warm`` execution
(``sertune.warm``), pays that once per slot. This mode stays for full isolation (every trial in
fresh processes) and as the baseline ``sertune bench search`` measures against.
"""

from __future__ import annotations

from typing import Any

from . import ray_compat
from .sessions import RayTrainSession
from .trainable import CheckpointEvaluation, get_trainable
from .tuner import TrialPlan, loop_config


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """``TorchTrainer``'s loop: the trainable's ``train`` in a Ray Train session."""
    import os

    run = config.get("run", {})
    if run.get("threads"):
        os.environ.setdefault("OMP_NUM_THREADS", str(run["threads"]))
    trainable = get_trainable(config["trainable"])
    trainable.train(config, RayTrainSession(run.get("device", "auto")))


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """A Tune function trainable: train one configuration with a Ray Train ``TorchTrainer``."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .storage import fs_and_path

    trial_id = ray.tune.get_context().get_trial_id()
    res = plan.resources
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"]}
    if use_gpu:
        per_worker["GPU"] = res["gpus_per_worker"]
    fs, train_path = fs_and_path(plan.train_storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            **loop_config(plan, config, trial_id),
            "trainable": plan.trainable,
        },
        # gloo when the spec pins the CPU (also with GPU resources reserved, e.g. fake GPUs in tests)
        torch_config=TorchConfig(backend="gloo") if plan.run["device"] == "cpu" else None,
        scaling_config=ray.train.ScalingConfig(
            num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=ray.train.RunConfig(
            name=trial_id,  # same name after a driver crash: Train V2 resumes its checkpoint
            storage_path=train_path,
            storage_filesystem=fs,
            callbacks=[kept_report_callback(TuneReportCallback, plan, trial_id)],
            failure_config=ray.train.FailureConfig(max_failures=plan.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    ray_compat.wait_until_reports_are_handed_over()


def kept_report_callback(base: type, plan: TrialPlan, trial_id: str) -> Any:
    """Ray Tune's relay of the workers' reports (``base``: ``TuneReportCallback``), each epoch
    with the trial's kept epoch and figures (``sertune.tuner.KeptCurves``), as the warm proxy
    relays them."""
    from .tuner import KeptCurves

    class KeptReportCallback(base):
        def __init__(self) -> None:
            super().__init__()
            self.curves = KeptCurves(plan, trial_id)

        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            if metrics:
                metrics = [{**metrics[0], **self.curves.add(dict(metrics[0]))}, *metrics[1:]]
            super().after_report(run_context, metrics, checkpoint)

    return KeptReportCallback()


class TaskEvaluator:
    """Evaluates stopped trials' best checkpoints in Ray tasks (per-trial mode)."""

    def __init__(self, plan: TrialPlan):
        self.plan = plan
        self.refs: dict[Any, str] = {}

    @property
    def pending(self) -> int:
        return len(self.refs)

    def submit(self, key: str, checkpoint_uri: str) -> str:
        import ray

        task = ray.remote(num_cpus=0)(evaluate_checkpoint_task)
        self.refs[task.remote(self.plan, checkpoint_uri)] = key
        return checkpoint_uri  # its trial run ended: nothing prunes it any more

    def ready(self, wait_s: float = 0.0) -> list[tuple[str, CheckpointEvaluation]]:
        """(trial, evaluation) of the evaluations that ended, waiting up to ``wait_s`` for one."""
        import ray

        if not self.refs:
            return []
        done, _ = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=wait_s)
        out = []
        for ref in done:
            key = self.refs.pop(ref)
            try:
                out.append((key, ray.get(ref)))
            except Exception as e:  # the evaluation failed; the trial keeps its training record
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                out.append((key, CheckpointEvaluation(error=error)))
        return out


def evaluate_checkpoint_task(plan: TrialPlan, checkpoint_uri: str) -> CheckpointEvaluation:
    """Test + robustness of a checkpoint's best model; the report files come back as bytes."""
    import tempfile
    from pathlib import Path

    from .storage import download_dir

    trainable = get_trainable(plan.trainable)
    with tempfile.TemporaryDirectory(prefix="sertune-eval-") as tmp:
        local = download_dir(checkpoint_uri, Path(tmp) / "ckpt")
        metrics = trainable.evaluate_checkpoint(
            str(local), plan.data, plan.run, plan.run.get("device", "auto")
        )
        report = local / "best" / "robustness"
        files = {p.name: p.read_bytes() for p in report.iterdir()} if report.is_dir() else {}
    return CheckpointEvaluation(metrics=metrics, files=files)
