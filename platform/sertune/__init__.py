"""sertune: distributed hyperparameter search for MTL-AUG speech emotion recognition.

The control plane: CLI, search orchestration (Ray Tune + Optuna over Ray Train trials), MLflow
tracking, registry promotion, storage. It knows the trainable interface (:mod:`sertune.trainable`),
never a particular model. Heavy libraries (torch, ray, mlflow) load lazily, so ``sertune --help``
and spec validation stay instant.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
