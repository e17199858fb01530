"""MTL-AUG as a sertune trainable (registered as ``mtl_aug``).

Module level imports only the config (no torch), so spec validation stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sertune.trainable import Trainable

from .config import ConfigError, MTLAugConfig

SYNTHETIC = "synthetic"


class MTLAugTrainable(Trainable):
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

    def param_names(self) -> set[str]:
        return set(MTLAugConfig().to_flat())

    def validate_params(self, params: dict[str, Any]) -> None:
        try:
            MTLAugConfig.from_dict(params)
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

    def corpora(self) -> tuple[str, ...]:
        from trainables.data.corpora import ADAPTERS

        return (*sorted(ADAPTERS), SYNTHETIC)

    def prepare_data(
        self, data: dict[str, Any], cache_root: str, progress: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        from trainables.data.cache import build_cache, load_cache

        def cache(corpus: str, root: str) -> str:
            if corpus == SYNTHETIC:
                corpus, root = "manifest", str(ensure_synthetic(root, data.get("synthetic", {})))
            return str(build_cache(corpus, root, cache_root, progress=progress))

        main = cache(data["corpus"], data["root"])
        loaded = load_cache(main)
        out: dict[str, Any] = {
            "cache": main,
            "fold": int(data.get("fold", 0)),
            "n_folds": data.get("n_folds"),
            "noise_files": [str(Path(p).expanduser()) for p in data.get("noise_files") or []],
            "fingerprint": loaded.fingerprint,
            "report": loaded.report.to_dict(),
        }
        if data.get("unlabelled"):
            u = data["unlabelled"]
            out["unlabelled_cache"] = cache(u["corpus"], u["root"])
        out["cross_corpus"] = [
            {"name": c.get("name", c["corpus"]), "cache": cache(c["corpus"], c["root"])}
            for c in data.get("cross_corpus") or []
        ]
        return out

    def train_loop_per_worker(self) -> Callable[[dict[str, Any]], None]:
        from .train import train_loop_per_worker

        return train_loop_per_worker

    def run_local(self, config: dict[str, Any]) -> list[dict[str, Any]]:
        from .train import LocalSession, train

        return train(config, LocalSession(device=config.get("run", {}).get("device", "auto")))

    def load_predictor(self, model_dir: str | Path):
        from .export import load_model

        return load_model(model_dir)

    def robustness_report(
        self, predictor: Any, data: dict[str, Any], options: dict[str, Any], out: Path
    ) -> dict:
        """Evaluate a loaded predictor on ``data``'s test speakers; write the report to ``out``."""
        import torch

        from trainables.data.cache import load_cache, speaker_independent_split

        from .robustness import center_crops, evaluate_robustness, logits_fn_for, write_report
        from .train import load_noise_bank

        cfg = predictor.cfg
        corpus = load_cache(data["cache"])
        test = speaker_independent_split(corpus, data.get("fold", 0), data.get("n_folds"))["test"]
        if options.get("max_utterances"):
            test = test[: int(options["max_utterances"])]
        seg = int(round(cfg.features.segment_s * cfg.features.sample_rate))
        wav, y = center_crops(corpus, test, seg, torch.device("cpu"))
        bank = load_noise_bank(data.get("noise_files") or [], cfg.features.sample_rate)
        report = evaluate_robustness(
            logits_fn_for(predictor.model, predictor.logmel),
            wav,
            y,
            cfg.model.n_emotions,
            options,
            bank,
            corpus_name=corpus.path.name,
            seed=cfg.seed,
        )
        write_report(report, Path(out))
        return report

    def bench_train(self, device: str, batch: int | None, steps: int, rounds: int, log=print):
        from .bench import run_bench

        return run_bench(device=device, batch=batch, steps=steps, rounds=rounds, log=log)


def ensure_synthetic(root: str | Path, options: dict[str, Any] | None = None) -> Path:
    """The synthetic corpus at ``root``, generated there first if it is not there yet."""
    from trainables.data.synth import synthesise_corpus

    root = Path(root).expanduser()
    manifest = root / "manifest.csv"
    if not manifest.exists():
        synthesise_corpus(root, **(options or {}))
    return manifest


TRAINABLE = MTLAugTrainable()
