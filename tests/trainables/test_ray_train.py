"""Ray Train V2 with 2 CPU workers (gloo DDP) trains the real loop; rank 0 reports all workers."""

import json
from pathlib import Path

import pytest


@pytest.mark.usefixtures("ray_2cpu")
def test_two_cpu_workers_train_with_gloo(synth_corpus, tmp_path, tiny):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from sertune.trials import train_loop_per_worker

    config = {
        "trainable": "mtl_aug",
        "params": {**tiny, "optim.epochs": 2, "optim.min_steps_per_epoch": 1},
        "data": {"cache": str(synth_corpus["cache"]), "fold": 0},
        "run": {"device": "cpu", "threads": 1, "max_steps_per_epoch": 3},
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}
        ),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path)),
    )
    result = trainer.fit()
    assert result.error is None
    m = result.metrics
    assert m["epoch"] == 1 and 0.0 <= m["val_uar"] <= 1.0
    # the loss sums cover both workers' samples: 2 workers x 3 steps x batch 16 per epoch
    assert m["train_samples"] == 2 * 3 * 16
    ckpt = Path(result.checkpoint.path)
    assert (ckpt / "state.pt").exists() and (ckpt / "best" / "model.safetensors").exists()
    saved = json.loads((ckpt / "metrics.json").read_text())
    assert saved["val_uar"] == m["val_uar"]
