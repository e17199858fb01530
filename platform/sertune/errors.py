"""One error family for everything a user can get wrong or run into.

Each :class:`SertuneError` carries the exit code the CLI returns and a message of one or two lines
that names what failed and where (a file and field, a search, a URL). ``sertune.cli.main`` catches
the family once, prints ``sertune: error: <message>`` and exits with the code; ``--debug`` shows
the traceback too. Anything else that escapes is a bug and keeps its traceback.

| exit | class                 | when                                                        |
|------|-----------------------|-------------------------------------------------------------|
| 1    | SearchFailed          | a search ran but every trial failed                         |
| 2    | UsageError and below  | bad spec, unknown name, missing file, unreachable service,  |
|      |                       | a broken environment (``sertune doctor``)                   |
| 3    | GateFailed            | a promotion gate did not pass                               |
| 130  | Interrupted           | Ctrl-C / SIGTERM; what ran is saved and resumable           |
"""

from __future__ import annotations


class SertuneError(Exception):
    """Base of every user-facing failure; ``str()`` is the message printed."""

    exit_code = 1


class UsageError(SertuneError):
    """The input cannot work: fix it and run again. Nothing was started."""

    exit_code = 2


class NotFound(UsageError):
    """A named thing (search, model, file) does not exist."""


class DataError(UsageError):
    """A corpus, a manifest or an audio file cannot be used."""


class ResourceError(UsageError):
    """What one trial needs cannot be placed on the cluster."""


class ServiceError(UsageError):
    """A service (MLflow tracking server, Ray cluster, S3) is unreachable or refuses us."""


class ModelError(UsageError):
    """A saved model cannot be loaded (missing, truncated or corrupt files)."""


class ModelNeedsFiles(ModelError):
    """A saved model is whole but names files outside itself that are not here (a trial's model
    on a frozen pretrained encoder: the checkpoint it was trained from)."""


class EnvironmentProblem(UsageError):
    """This Python environment (or a cluster node's) cannot run a trial: a library that does not
    load, a torch/torchaudio pair that does not match, versions that differ from the lock."""


class GateFailed(SertuneError):
    """A robustness gate did not pass; ``str()`` is the gate table."""

    exit_code = 3


class SearchFailed(SertuneError):
    """A search ran to its end but no trial finished, or stopped early because its first trials
    all failed the same way (or one failed on the environment)."""

    exit_code = 1


class Interrupted(SertuneError):
    """The user (or the system) stopped the run; its state is saved for ``resume``."""

    exit_code = 130
