"""A second, deliberately small trainable, registered only in tests: a linear classifier on
log-mel statistics (per-band mean and standard deviation of one segment).

It exists to prove the trainable contract is complete: it implements every hook the control
plane calls, passes the shared suite (``tests/trainable_suite.py``) and runs a smoke search,
promotion and prediction end to end (``tests/sertune/test_second_trainable.py``). Registered
through ``SERTUNE_TRAINABLES`` (``tests/conftest.py``), never installed.
"""

from __future__ import annotations

import json
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio

from sertune.trainable import (
    BEST_EPOCH,
    EPOCHS_DONE,
    LOOP_STARTED_AT,
    KeptModel,
    Trainable,
    TrainBench,
)
from trainables.common.corpus_hooks import CorpusHooks
from trainables.common.metrics import confusion, scores
from trainables.common.robustness import (
    evaluate_robustness,
    robust_metric_names,
    write_report,
    write_validation_report,
)
from trainables.common.utterances import (
    Utterances,
    Windowing,
    stratified_subset,
    utterance_logits,
)
from trainables.data.cache import load_cache, speaker_independent_split

DEFAULTS = {
    "features.n_mels": 32,  # mel bands; the classifier sees 2x this many statistics
    "features.segment_s": 1.0,  # one input window
    "optim.lr": 0.05,  # plain SGD on a convex problem: large steps are fine
    "optim.epochs": 3,
    "optim.batch_size": 32,
    "pace.epoch_s": 0.0,  # sleep after each epoch: tests that must act mid-search get the time
    # ``val_probe`` = offset + noise_sd x N(0, 1) drawn from (the configuration, its seed, the
    # epoch): a figure whose between-configuration spread (the searched offset) and run-to-run
    # noise are known by construction, for the tests of noise measurement and of the stop rules
    "probe.offset": 0.0,
    "probe.noise_sd": 0.0,
    # "0.5,0.9,0.6": ``val_uar`` at epoch e is the e-th value (+ probe.offset) instead of the
    # model's: a validation curve a test controls (the kept epoch's choice); "": the model's.
    # "a,b;c,d": cross-validation fold k follows the k-th curve (cycling)
    "probe.curve": "",
    "seed": 0,
}
FORMAT = "sertune.linear/1"


def _config(params: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown config key: {', '.join(unknown)}")
    cfg = {**DEFAULTS, **params}
    if cfg["optim.lr"] <= 0 or int(cfg["optim.epochs"]) < 1:
        raise ValueError("optim.lr must be > 0 and optim.epochs >= 1")
    return cfg


class LinearModel(torch.nn.Module):
    def __init__(self, n_mels: int, n_classes: int = 4):
        super().__init__()
        self.mel = torchaudio.transforms.MelSpectrogram(
            16000, n_fft=400, hop_length=160, n_mels=n_mels
        )
        self.norm = torch.nn.BatchNorm1d(2 * n_mels, affine=False)
        self.linear = torch.nn.Linear(2 * n_mels, n_classes)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, C)
        m = torch.log(self.mel(wav) + 1e-6)  # (B, M, T)
        return self.linear(self.norm(torch.cat([m.mean(-1), m.std(-1)], dim=1)))


class LinearPredictor:
    def __init__(self, model: LinearModel, cfg: dict[str, Any], labels: list[str]):
        self.model, self.cfg, self.label_names = model.eval(), cfg, labels
        self.sample_rate = 16000
        self.windowing = Windowing.for_segment(int(cfg["features.segment_s"] * 16000))

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model(wav)

    @torch.no_grad()
    def predict_proba(self, waveforms: list) -> np.ndarray:
        logits = utterance_logits(
            self.forward, Utterances.from_waveforms(waveforms), self.windowing
        )
        return torch.softmax(logits, -1).numpy()


def save(directory: Path, model: LinearModel, cfg: dict[str, Any], labels, metrics=None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(directory / "model.safetensors"),
    )
    (directory / "model.json").write_text(
        json.dumps({"format": FORMAT, "config": cfg, "labels": list(labels)})
    )
    (directory / "metrics.json").write_text(json.dumps(metrics or {}))


def load(directory: str | Path) -> LinearPredictor:
    from safetensors.torch import load_file

    meta = json.loads((Path(directory) / "model.json").read_text())
    model = LinearModel(int(meta["config"]["features.n_mels"]), len(meta["labels"]))
    model.load_state_dict(load_file(str(Path(directory) / "model.safetensors")))
    return LinearPredictor(model, meta["config"], meta["labels"])


def _scores(predictor: LinearPredictor, utts: Utterances) -> dict[str, float]:
    with torch.no_grad():
        logits = utterance_logits(predictor.forward, utts, predictor.windowing)
    return scores(confusion(logits.argmax(1), utts.labels, 4))


def _final(predictor: LinearPredictor, data: dict, run: dict, out: Path) -> dict[str, float]:
    corpus = load_cache(data["cache"])
    split = speaker_independent_split(
        corpus, data.get("fold", 0), cv=data.get("cv"), dealing=data.get("dealing", "balanced")
    )
    every = Utterances.from_corpus(corpus, torch.device("cpu"))
    utts = every.select(split["test"])
    metrics = {f"test_{k}": v for k, v in _scores(predictor, utts).items()}
    if run.get("robustness"):
        options = run["robustness"]
        report = evaluate_robustness(predictor.forward, utts, predictor.windowing, 4, options)
        write_report(report, out / "robustness", run.get("title", ""), 4)
        metrics.update(report["metrics"])
        # val_robust/*: the same conditions on a capped, class-stratified share of the
        # validation speakers' clips - the figures a search may select on
        val = split["val"]
        val = val[stratified_subset(corpus.labels[val], options.get("max_utterances"))]
        vreport = evaluate_robustness(
            predictor.forward, every.select(val), predictor.windowing, 4, options, split="val"
        )
        write_validation_report(vreport, out / "robustness_val")
        metrics.update(vreport["metrics"])
    return metrics


def _probe(cfg: dict[str, Any], epoch: int) -> float:
    run = repr(sorted((k, v) for k, v in cfg.items() if not k.startswith("pace.")))
    key = zlib.crc32(f"{run}|{epoch}".encode())  # the same run, the same draw, in any process
    z = float(torch.randn(1, generator=torch.Generator().manual_seed(key)))
    return float(cfg["probe.offset"]) + float(cfg["probe.noise_sd"]) * z


class LinearTrainable(CorpusHooks, Trainable):
    name = "linear"
    epoch_metrics = ("val_uar", "val_war", "val_f1", "val_uar_noisy", "val_probe", "train_loss")
    final_metrics = ("test_uar", "test_war", "test_f1")
    # its own words, not MTL-AUG's: the control plane shows whatever a trainable names here
    display_metrics = ("val_f1", "val_war", "test_f1")
    display_robust = ("robust/uar_clean",)
    checkpoint_metric = ("val_uar", "max")
    pbt_defaults = ("optim.lr",)  # the one continuous knob a linear model has
    supports_cv = True

    def param_names(self) -> set[str]:
        return set(DEFAULTS)

    def validate_params(self, params: dict[str, Any]) -> None:
        _config(params)

    def smoke_params(self) -> dict[str, Any]:
        return {"features.n_mels": 16}

    def metric_names(self, robustness=None, cross_corpus=None) -> set[str]:
        return super().metric_names() | robust_metric_names(robustness, cross_corpus)

    def train(self, config: dict[str, Any], session) -> list[dict[str, Any]]:
        t0, started = time.perf_counter(), time.time()
        cfg = _config(config.get("params", {}))
        data, run = config["data"], config.get("run", {})
        corpus = load_cache(data["cache"])
        split = speaker_independent_split(
            corpus, data.get("fold", 0), cv=data.get("cv"), dealing=data.get("dealing", "balanced")
        )
        utts = Utterances.from_corpus(corpus, torch.device("cpu"))
        val = utts.select(split["val"])
        torch.manual_seed(int(cfg["seed"]))
        model = LinearModel(int(cfg["features.n_mels"]))
        opt = torch.optim.SGD(model.parameters(), lr=cfg["optim.lr"], momentum=0.9)
        seg = int(cfg["features.segment_s"] * 16000)
        select = run.get("select", {})
        start, best = 0, {"value": -1.0, "epoch": -1, "state": None, "curve": []}
        states = {}
        ckpt = session.get_checkpoint_dir()
        if ckpt:
            state = torch.load(Path(ckpt) / "state.pt", weights_only=True)
            model.load_state_dict(state["model"])
            start = int(state["epoch"]) + 1
            best = {
                **best,
                **json.loads(state["best"]),
                "state": load(Path(ckpt) / "best").model.state_dict(),
            }
            states = {best["epoch"]: best["state"], start - 1: state["model"]}
        # the kept model: the best epoch of the smoothed select curve (sertune.stats.kept_epoch)
        keeper = KeptModel(
            select.get("metric", "val_uar"), select.get("mode", "max"), best["curve"], states
        )
        curves = str(cfg["probe.curve"]).split(";")
        fold = int((data.get("cv") or {}).get("fold", 0))
        curve = [float(x) for x in curves[fold % len(curves)].split(",") if x.strip()]
        history = []
        for epoch in range(start, int(cfg["optim.epochs"])):
            g = torch.Generator().manual_seed(int(cfg["seed"]) * 100 + epoch)
            order = torch.from_numpy(split["train"])[
                torch.randperm(len(split["train"]), generator=g)
            ]
            model.train()
            losses = []
            for i in range(0, len(order), int(cfg["optim.batch_size"])):
                session.poll()
                idx = order[i : i + int(cfg["optim.batch_size"])]
                wav, _ = utts.crops(idx, seg, g)
                loss = torch.nn.functional.cross_entropy(model(wav), utts.labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
            time.sleep(float(cfg["pace.epoch_s"]))
            predictor = LinearPredictor(model, cfg, list(corpus.label_names))
            v = _scores(predictor, val)
            noise = 0.05 * torch.randn(val.audio.shape, generator=g)
            vn = _scores(predictor, val.with_audio(val.audio + noise))
            if curve:
                v["uar"] = curve[min(epoch, len(curve) - 1)] + float(cfg["probe.offset"])
            metrics = {
                "epoch": epoch,
                EPOCHS_DONE: epoch + 1,
                "val_uar": v["uar"],
                "val_war": v["war"],
                "val_f1": v["f1"],
                "val_uar_noisy": vn["uar"],
                "val_probe": _probe(cfg, epoch),
                "train_loss": float(np.mean(losses)),
                "loop_time_s": time.perf_counter() - t0,
                LOOP_STARTED_AT: started,
            }
            # the select metric as the search asks (val_uar; a refit: the last epoch)
            chosen = float(metrics.get(select.get("metric"), v["uar"]))
            kept = keeper.add(chosen, {k: t.clone() for k, t in model.state_dict().items()})
            best = {
                "value": keeper.value,
                "epoch": keeper.epoch,
                "state": kept,
                "curve": keeper.curve,
            }
            metrics[BEST_EPOCH] = best["epoch"]
            with tempfile.TemporaryDirectory() as tmp:
                best_model = LinearModel(int(cfg["features.n_mels"]))
                best_model.load_state_dict(best["state"])
                save(
                    Path(tmp) / "best",
                    best_model,
                    cfg,
                    corpus.label_names,
                    {"val_uar": best["value"]},
                )
                if epoch == int(cfg["optim.epochs"]) - 1:
                    metrics.update(_final(load(Path(tmp) / "best"), data, run, Path(tmp) / "best"))
                torch.save(
                    {
                        "model": model.state_dict(),
                        "epoch": epoch,
                        "best": json.dumps({k: v for k, v in best.items() if k != "state"}),
                    },
                    Path(tmp) / "state.pt",
                )
                (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
                session.report(metrics, tmp)
            history.append(metrics)
        return history

    def evaluate_checkpoint(self, checkpoint_dir, data, run, device="cpu") -> dict[str, Any]:
        best = Path(checkpoint_dir) / "best"
        return _final(load(best), data, run, best)

    def load_predictor(self, model_dir):
        return load(model_dir)

    def robustness_report(self, model_dir, data, options, out, split="test", title="") -> dict:
        predictor = load(model_dir)
        corpus = load_cache(data["cache"])
        idx = (
            np.nonzero(corpus.labels >= 0)[0]
            if split == "all"
            else speaker_independent_split(
                corpus, data.get("fold", 0), dealing=data.get("dealing", "balanced")
            )["test"]
        )
        utts = Utterances.from_corpus(corpus, torch.device("cpu")).select(idx)
        report = evaluate_robustness(
            predictor.forward, utts, predictor.windowing, 4, options, split=split
        )
        write_report(report, Path(out), title, 4)
        return report

    def bench_train(self, device, batch, steps, rounds, log=print) -> TrainBench:
        model = LinearModel(32)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        wav = torch.randn(batch or 32, 16000)
        y = torch.randint(0, 4, (wav.shape[0],))
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(wav), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        rate = steps * wav.shape[0] / (time.perf_counter() - t0)
        return TrainBench(
            ceiling=rate, pipeline=rate, params=sum(p.numel() for p in model.parameters())
        )


TRAINABLE = LinearTrainable()


def linear_spec(home, name: str, **fields: Any) -> dict[str, Any]:
    """A raw spec for a tiny search with this trainable on a synthetic corpus under ``home``
    (2 trials, 2 at a time, 2 epochs); ``fields`` replace whole top-level fields."""
    return {
        "name": name,
        "trainable": "linear",
        "device": "cpu",
        "data": {
            "corpus": "synthetic",
            "root": str(home / "data" / "lin"),
            "synthetic": {"n_speakers": 5, "per_class": 4, "seed": 0},
        },
        "objective": {"metric": "val_uar", "mode": "max"},
        "budget": {"trials": 2, "concurrency": 2, "max_epochs": 2, "grace_epochs": 1},
        "robustness": None,
        **fields,
    }
