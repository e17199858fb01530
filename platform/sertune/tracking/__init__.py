"""The one place that talks to MLflow.

* ``store`` - the store (created once, checked before anything starts) and the ``sertune``
  experiment.
* ``runs`` - :class:`Store`, the handle every other module reads and asks the store through (a
  search's runs as frozen :class:`Run` views, earlier trials, deletions, the experiment's view,
  benchmark runs, registered versions and aliases).
* ``journal`` - every record a search writes goes to an append-only journal on disk first; a
  writer thread applies it to MLflow in order, so an outage neither stops training nor loses a
  record.
* ``models`` - a trial's model logged as a pyfunc, fetched, loaded by MLflow.

Run hierarchy: one parent run per search, one nested child run per trial (see
``sertune.search_logger``). Only the driver writes, so a SQLite store has a single writer per
search and a remote cluster's workers need no MLflow credentials. No module outside this package
imports ``mlflow`` or holds an MLflow client (``tests/test_architecture.py`` checks both);
:func:`client` is here for tests that read what MLflow holds as a user would.
"""

from .journal import Journal, Kind, Op
from .models import download_model, load_pyfunc, log_pyfunc_model
from .runs import DONE, Run, Store
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
    get_experiment_id,
    is_missing,
    is_server,
    sqlite_path,
)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "DONE",
    "EXPERIMENT_ENV",
    "TAG_KIND",
    "TAG_SEARCH",
    "TAG_STATUS",
    "TAG_TRIAL",
    "Journal",
    "Kind",
    "Op",
    "Run",
    "Store",
    "check_store",
    "clean_value",
    "client",
    "configure",
    "download_model",
    "ensure_store",
    "experiment_name",
    "get_experiment_id",
    "is_missing",
    "is_server",
    "load_pyfunc",
    "log_pyfunc_model",
    "sqlite_path",
]
