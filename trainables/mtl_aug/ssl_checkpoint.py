"""Where a self-supervised encoder's weights are, checked without torch (spec validation).

sertune never downloads weights at run time. ``model.ssl.checkpoint`` is either a local folder in
Hugging Face format (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``, what
``save_pretrained`` or ``huggingface-cli download --local-dir`` writes) or a model id that is
already in the local Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``), resolved with
``local_files_only``. Anything else is refused before a trial starts, naming where it looked.

``${SERTUNE_HOME}``, other environment variables and ``~`` are expanded in a path; a relative
path is refused (trials do not run in the driver's working directory).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .config import ConfigError, SSLConfig

FIELD = "model.ssl.checkpoint"
# the weight files a Hugging Face checkpoint folder may hold (one of them, or shards + index)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ENCODER_TYPES = ("wavlm", "hubert", "wav2vec2", "data2vec-audio", "unispeech-sat", "unispeech")


def expand(name: str) -> str:
    from sertune import settings

    text = name.replace("${SERTUNE_HOME}", str(settings.home()))
    return os.path.expanduser(os.path.expandvars(text))


def _looks_like_id(name: str) -> bool:
    """``microsoft/wavlm-base-plus``: an id, not a path (no leading /, ., ~, at most one /)."""
    return (
        bool(name)
        and not name.startswith(("/", ".", "~", "$"))
        and name.count("/") <= 1
        and "\\" not in name
    )


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # noqa: BLE001 - only for the message
        return os.path.expanduser("~/.cache/huggingface/hub")


def resolve(name: str) -> Path:
    """The local folder of checkpoint ``name``; :class:`ConfigError` naming the path otherwise."""
    path = Path(expand(name))
    if path.is_dir():
        if not path.is_absolute():  # a trial's working directory is not the driver's
            raise ConfigError(
                f"{FIELD}: {name} is a relative path; give it absolute ({path.resolve()})"
            )
        return _checked_folder(path)
    if _looks_like_id(name) and not path.exists():
        cached = _from_hub_cache(name)
        if cached is not None:
            return _checked_folder(cached)
        where = Path(_hub_cache_dir()) / f"models--{name.replace('/', '--')}"
        raise ConfigError(
            f"{FIELD}: {name!r} is no folder and not in the local Hugging Face cache (looked in "
            f"{where}); sertune never downloads weights: huggingface-cli download it first"
        )
    raise ConfigError(
        f"{FIELD}: {path} does not exist (sertune never downloads weights: put a Hugging Face "
        f"checkpoint folder there, or --set params.{FIELD}=DIR)"
    )


def _from_hub_cache(name: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or no hub library): the caller says where
        return None


def _checked_folder(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{FIELD}: {path} has no config.json (not a Hugging Face checkpoint folder)"
        )
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(
            f"{FIELD}: {path} has no weights ({', '.join(WEIGHT_FILES[::2])} or their sharded "
            "index)"
        )
    return path.resolve()


def hf_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{FIELD}: {path / 'config.json'}: unreadable ({e})") from None


def check(ssl: SSLConfig) -> Path:
    """Resolve the checkpoint and check ``finetune_top`` and ``layers`` against its config."""
    path = resolve(ssl.checkpoint)
    cfg = hf_config(path)
    kind = cfg.get("model_type", "?")
    if kind not in ENCODER_TYPES:
        raise ConfigError(
            f"{FIELD}: {path} is a {kind!r} model; expected a speech encoder "
            f"({', '.join(ENCODER_TYPES)})"
        )
    n = int(cfg.get("num_hidden_layers", 0))
    if ssl.finetune_top > n:
        raise ConfigError(
            f"model.ssl.finetune_top: {ssl.finetune_top} > the {n} layers of {path.name}"
        )
    if not isinstance(ssl.layers, str) and max(ssl.layers) > n:
        raise ConfigError(
            f"model.ssl.layers: {list(ssl.layers)}: {path.name} has hidden states 0..{n} "
            "(0 = the input embedding)"
        )
    return path


def normalise_input(path: Path) -> bool:
    """Whether the encoder expects zero-mean unit-variance waveforms: the checkpoint's feature
    extractor says (``preprocessor_config.json``: ``do_normalize``); without one, Hugging Face's
    rule: yes for layer-norm feature encoders (wav2vec 2.0 large), no for group-norm ones."""
    pre = path / "preprocessor_config.json"
    if pre.is_file():
        try:
            return bool(json.loads(pre.read_text()).get("do_normalize", True))
        except (OSError, json.JSONDecodeError):
            pass
    return hf_config(path).get("feat_extract_norm", "group") == "layer"


def content_hash(path: Path) -> str:
    """SHA-256 of the checkpoint's config and weight files (what identifies the encoder a model
    was trained from); computed once per process and file state."""
    files = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
    )
    state = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest(str(path), state)


@functools.lru_cache(maxsize=16)
def _digest(path: str, state: tuple) -> str:
    h = hashlib.sha256()
    for name, _, _ in state:
        h.update(name.encode() + b"\0")
        with open(Path(path) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()
