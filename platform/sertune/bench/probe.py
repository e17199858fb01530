"""``scale_probe``: a trainable that trains nothing, for ``sertune bench scale``.

Each epoch sleeps ``probe.epoch_s`` seconds and reports made-up validation figures, so a bench can
run a thousand trials through the real machinery (Tune + Optuna, warm slots, the MLflow journal)
and measure what the control plane costs per trial. It has no data, no model and nothing to serve:
those hooks say so. Registered by the bench itself (``SERTUNE_TRAINABLES``), never in a spec users
write.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..trainable import EPOCHS_DONE, LOOP_STARTED_AT, CorpusCache, Trainable, TrainBench

NAME = "scale_probe"
ENTRY = f"{NAME}=sertune.bench.probe:PROBE"
PARAMS = {"probe.epoch_s": 0.5, "probe.x": 0.5, "probe.y": 0.5, "optim.epochs": 4, "seed": 0}


def _no(what: str):
    raise UsageError(f"the scale probe measures the control plane; it has no {what}")


class ScaleProbe(Trainable):
    name = NAME
    epoch_metrics = ("val_uar", "val_uar_noisy")
    final_metrics = ("test_uar",)

    def param_names(self) -> set[str]:
        return set(PARAMS)

    def validate_params(self, params: dict[str, Any]) -> None:
        unknown = set(params) - set(PARAMS)
        if unknown:
            raise ValueError(f"Unknown config key: {', '.join(sorted(unknown))}")

    def corpora(self) -> tuple[str, ...]:
        return ("synthetic",)

    def prepare_data(self, data, cache_root, progress=None) -> dict[str, Any]:
        return {"fingerprint": "scale-probe", "report": {"used": 0, "found": 0}}

    def train(self, config: dict[str, Any], session) -> list[dict[str, Any]]:
        p = {**PARAMS, **config.get("params", {})}
        started, t0 = time.time(), time.perf_counter()
        # a smooth made-up objective of the two searched numbers: Optuna has something to learn
        score = 0.5 + 0.4 * math.exp(-((p["probe.x"] - 0.7) ** 2 + (p["probe.y"] - 0.3) ** 2) * 8)
        history = []
        for epoch in range(int(p["optim.epochs"])):
            deadline = time.monotonic() + float(p["probe.epoch_s"])
            while time.monotonic() < deadline:
                session.poll()
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            frac = (epoch + 1) / int(p["optim.epochs"])
            m = {
                "epoch": epoch,
                EPOCHS_DONE: epoch + 1,
                "val_uar": score * frac,
                "val_uar_noisy": score * frac * 0.9,
                "loop_time_s": time.perf_counter() - t0,
                LOOP_STARTED_AT: started,
            }
            if epoch == int(p["optim.epochs"]) - 1:
                m["test_uar"] = score * 0.95
            session.report(m, None)
            history.append(m)
        return history

    def evaluate_checkpoint(self, checkpoint_dir, data, run, device="cpu") -> dict[str, Any]:
        return {}

    def cache_corpus(self, corpus, root, cache_root) -> CorpusCache:
        _no("corpora")

    def synthesise_corpus(self, out, **options) -> Path:
        _no("corpora")

    def read_audio(self, path, sample_rate):
        _no("audio input")

    def load_predictor(self, model_dir):
        _no("model")

    def robustness_report(self, model_dir, data, options, out, split="test", title="") -> dict:
        _no("model")

    def bench_train(self, device, batch, steps, rounds, log=print) -> TrainBench:
        _no("model")


PROBE = ScaleProbe()
