"""MTL-AUG as a sertune trainable (registered as ``mtl_aug``).

Module level imports only the config (no torch), so spec validation stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sertune.trainable import Session, Trainable, TrainBench
from trainables.common.corpus_hooks import CorpusHooks

from .config import ConfigError, MTLAugConfig


class MTLAugTrainable(CorpusHooks, Trainable):
    name = "mtl_aug"
    epoch_metrics = (
        "val_uar",
        "val_war",
        "val_f1",
        "val_loss_emo",
        "val_uar_noisy",
        "train_loss",
        "train_loss_emo",
        "train_loss_aug",
        "train_loss_rec",
    )
    final_metrics = ("test_uar", "test_war", "test_f1")
    # unweighted average recall is the field's headline figure (classes are imbalanced)
    display_metrics = ("val_uar", "val_uar_noisy", "test_uar")
    display_robust = (
        "robust/uar_snr10_white",  # the robustness gate users reach for first
        "robust/uar_snr10_babble",
        "robust/uar_snr0_white",
        "robust/uar_pgd0.005",
        "robust/uar_clean",
    )
    checkpoint_metric = ("val_uar", "max")
    # the auxiliary-loss weights and the augmentation mix: what MTL-AUG's schedule is about
    pbt_defaults = ("loss.w_aug", "loss.w_rec", "aug.p_")
    supports_cv = True  # train.py passes data["cv"] to the speaker-independent split

    def param_names(self) -> set[str]:
        return set(MTLAugConfig().to_flat())

    def validate_params(self, params: dict[str, Any]) -> None:
        """Also checks that an ssl encoder's checkpoint is on this disk (never downloaded)."""
        try:
            cfg = MTLAugConfig.from_dict(params)
            if cfg.model.encoder == "ssl":
                from .ssl_checkpoint import check

                check(cfg.model.ssl)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad parameter value: {e}") from None

    def smoke_params(self) -> dict[str, Any]:
        return {
            "model.conv_channels": [4, 8],
            "model.lstm_hidden": 16,
            "model.attn_dim": 8,
            "features.n_mels": 32,
            "features.segment_s": 1.0,
            "optim.batch_size": 16,
        }

    def baselines(self) -> dict[str, dict[str, Any]]:
        # The single-task baseline: the same model, data, augmentation and budget, with both
        # auxiliary heads switched off. Augmented input still trains it; it is not told which
        # augmentation it saw, and unlabelled clips teach it nothing.
        return {"stl_baseline": {"loss.w_aug": 0.0, "loss.w_rec": 0.0}}

    def metric_names(
        self, robustness: dict[str, Any] | None = None, cross_corpus: list[str] | None = None
    ) -> set[str]:
        from trainables.common.robustness import robust_metric_names

        return super().metric_names() | robust_metric_names(robustness, cross_corpus)

    # -- training -----------------------------------------------------------------------------
    def train(self, config: dict[str, Any], session: Session) -> list[dict[str, Any]]:
        from .train import train

        return train(config, session)

    def evaluate_checkpoint(
        self, checkpoint_dir: str, data: dict[str, Any], run: dict[str, Any], device: str = "cpu"
    ) -> dict[str, Any]:
        from .train import evaluate_checkpoint

        return evaluate_checkpoint(checkpoint_dir, data, run, device, cache={})

    # -- serving and reports ----------------------------------------------------------------------
    def load_predictor(self, model_dir: str | Path):
        from .export import load_model

        return load_model(model_dir)

    def check_model(self, params: dict[str, Any]) -> list[tuple[bool, str]]:
        from .ssl_encoder import check_checkpoint

        return check_checkpoint(params)

    def package_model(self, model_dir: str | Path, out: str | Path) -> bool:
        from .export import package_model

        return package_model(model_dir, out)

    def robustness_report(
        self,
        model_dir: str | Path,
        data: dict[str, Any],
        options: dict[str, Any],
        out: Path,
        split: str = "test",
        title: str = "",
    ) -> dict[str, Any]:
        """A saved model on ``data``'s test speakers (``split="test"``) or on every labelled clip of
        the corpus (``"all"``, e.g. a cross corpus); a cap takes a class-stratified sample."""
        import numpy as np
        import torch

        from trainables.common.robustness import evaluate_robustness, write_report
        from trainables.common.utterances import Utterances, stratified_subset
        from trainables.data.cache import load_cache, speaker_independent_split

        from .train import Resident

        predictor = self.load_predictor(model_dir)
        cfg = predictor.cfg
        corpus = load_cache(data["cache"])
        if split == "all":
            idx = np.nonzero(corpus.labels >= 0)[0]
        else:
            idx = speaker_independent_split(
                corpus,
                data.get("fold", 0),
                data.get("n_folds"),
                dealing=data.get("dealing", "balanced"),
            )["test"]
        idx = idx[stratified_subset(corpus.labels[idx], options.get("max_utterances"), cfg.seed)]
        utts = Utterances.from_corpus(corpus, torch.device("cpu")).select(idx)
        report = evaluate_robustness(
            predictor.forward,
            utts,
            predictor.windowing,
            cfg.model.n_emotions,
            options,
            Resident({}, torch.device("cpu")).noise_bank(
                data.get("noise_files") or [], cfg.features.sample_rate
            ),
            corpus_name=corpus.path.name,
            split=split,
            seed=cfg.seed,
        )
        write_report(report, Path(out), title, cfg.model.n_emotions)
        return report

    def bench_train(
        self, device: str, batch: int | None, steps: int, rounds: int, log: Callable = print
    ) -> TrainBench:
        from .bench import run_bench

        return run_bench(device=device, batch=batch, steps=steps, rounds=rounds, log=log)

    def bench_encoder(self, log: Callable = print, **options: Any) -> list[dict[str, Any]]:
        from .bench_ssl import run

        return run(log=log, **options)

    def bench_data(self, log: Callable = print, **options: Any) -> dict[str, Any]:
        from .bench_data import run

        return run(log=log, **options)


TRAINABLE = MTLAugTrainable()
