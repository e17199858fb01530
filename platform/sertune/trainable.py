"""The trainable interface: what sertune needs from anything it searches.

A trainable is found by name through the ``sertune.trainables`` entry point group (the project
registers ``mtl_aug``), so the control plane never imports a particular model at module level.
Every trainable passes the shared suite in ``tests/trainable_suite.py``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

# Fallback when the distribution's entry points are not installed (e.g. a Ray working_dir).
_BUILTIN = {"mtl_aug": "trainables.mtl_aug.trainable:TRAINABLE"}


class Trainable(ABC):
    """A model family that sertune can search, train, evaluate and serve."""

    #: registry name, as written in a spec's ``trainable:`` field
    name: str = ""
    #: metrics reported after every epoch (candidates for objectives and schedulers)
    epoch_metrics: tuple[str, ...] = ()
    #: metrics reported once at the end of a trial (test set, robustness)
    final_metrics: tuple[str, ...] = ()

    @abstractmethod
    def param_names(self) -> set[str]:
        """Every dotted parameter name a spec may set or search (``loss.w_aug``)."""

    @abstractmethod
    def validate_params(self, params: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the field when ``params`` cannot train."""

    @abstractmethod
    def corpora(self) -> tuple[str, ...]:
        """Corpus adapter names this trainable reads."""

    @abstractmethod
    def prepare_data(
        self, data: dict[str, Any], cache_root: str, progress: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """Build or reuse the decoded caches on the driver; return the loop's ``data`` config,
        with ``fingerprint`` and ``report`` (a data report dict) added."""

    @abstractmethod
    def train_loop_per_worker(self) -> Callable[[dict[str, Any]], None]:
        """The ``train_loop_per_worker`` for ``ray.train.torch.TorchTrainer``."""

    @abstractmethod
    def run_local(self, config: dict[str, Any]) -> list[dict[str, Any]]:
        """Train in this process (no Ray); return the per-epoch metrics."""

    @abstractmethod
    def load_predictor(self, model_dir: str) -> Any:
        """Load a saved model without pickle: an object with ``predict_proba(list of (L,) float
        arrays) -> (n, C)``, ``label_names`` and ``sample_rate``."""

    def smoke_params(self) -> dict[str, Any]:
        """Parameters that make a trial tiny (``--smoke``): seconds on one CPU core."""
        return {}

    def metric_names(self) -> set[str]:
        return set(self.epoch_metrics) | set(self.final_metrics)


class UnknownTrainable(KeyError):
    pass


def available() -> dict[str, str]:
    """Name -> ``module:attribute`` of every registered trainable."""
    found = dict(_BUILTIN)
    for ep in entry_points(group="sertune.trainables"):
        found[ep.name] = ep.value
    return found


def get_trainable(name: str) -> Trainable:
    registry = available()
    if name not in registry:
        raise UnknownTrainable(f"unknown trainable {name!r}; known: {', '.join(sorted(registry))}")
    module, _, attr = registry[name].partition(":")
    obj = getattr(importlib.import_module(module), attr)
    return obj() if isinstance(obj, type) else obj
