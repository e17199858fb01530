"""The one place that talks to MLflow.

* ``store`` - the store (created once, checked before anything starts), the ``sertune``
  experiment and the queries on its runs.
* ``journal`` - every record a search writes goes to an append-only journal on disk first; a
  writer thread applies it to MLflow in order, so an outage neither stops training nor loses a
  record.
* ``models`` - a trial's model logged as a pyfunc, registered, fetched, loaded by MLflow.

Run hierarchy: one parent run per search, one nested child run per trial (see
``sertune.search_logger``). Only the driver writes, so a SQLite store has a single writer per
search and a remote cluster's workers need no MLflow credentials. Other modules get an
``MlflowClient`` from :func:`client` and the names below; none imports ``mlflow`` itself.
"""

from .journal import Journal, Kind, Op
from .models import download_model, load_pyfunc, log_pyfunc_model, register_model
from .store import (
    DEFAULT_EXPERIMENT,
    EXPERIMENT_ENV,
    TAG_KIND,
    TAG_SEARCH,
    TAG_STATUS,
    TAG_TRIAL,
    check_store,
    clean_value,
    client,
    configure,
    ensure_store,
    experiment_name,
    finished_trials,
    get_experiment_id,
    is_missing,
    is_server,
    log_bench_run,
    runs_of,
    sqlite_path,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "EXPERIMENT_ENV",
    "TAG_KIND",
    "TAG_SEARCH",
    "TAG_STATUS",
    "TAG_TRIAL",
    "Journal",
    "Kind",
    "Op",
    "check_store",
    "clean_value",
    "client",
    "configure",
    "download_model",
    "ensure_store",
    "experiment_name",
    "finished_trials",
    "get_experiment_id",
    "is_missing",
    "is_server",
    "load_pyfunc",
    "log_bench_run",
    "log_pyfunc_model",
    "register_model",
    "runs_of",
    "sqlite_path",
]
