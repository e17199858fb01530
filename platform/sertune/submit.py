"""Submitting searches to a Ray cluster through Ray Jobs.

``sertune search submit SPEC --address http://HEAD:8265`` ships the project in the job's runtime
environment (``py_modules``: the ``sertune``, ``trainables`` and ``search_spaces`` packages; the
spec in ``working_dir``) and runs ``sertune search run`` as the job's entrypoint on the head, so a
submitted search is the same code path as a local one. Where results go is configuration
(``SERTUNE_STORAGE``, ``SERTUNE_CACHE``, ``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``) and travels
in the job's environment; credentials do not — each node uses its own AWS credential chain, and
MLflow credentials must be set on the cluster.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .search import FAST_ENV, load_record, save_record

# Settings (not secrets) a submitted search takes from the submitter's environment.
FORWARDED = (
    "SERTUNE_STORAGE",
    "SERTUNE_CACHE",
    "SERTUNE_ARTIFACT_ROOT",
    "SERTUNE_EXPERIMENT",
    "MLFLOW_TRACKING_URI",
    "AWS_ENDPOINT_URL",
    "SERTUNE_S3_ENDPOINT",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def _package_dirs() -> list[str]:
    import search_spaces
    import sertune
    import trainables

    return [str(Path(m.__file__).parent) for m in (sertune, trainables, search_spaces)]


def submit(
    spec: Any, spec_path: str, address: str, wait: bool = False, tracking_uri: str | None = None
) -> str:
    """Submit ``spec`` as a Ray Job; record it locally; return the submission id."""
    client = _client(address)
    stage = Path(tempfile.mkdtemp(prefix="sertune-job-"))
    src = Path(spec_path)
    shutil.copy(src, stage / src.name)
    if spec.define_by_run:  # the define-by-run file travels beside the spec
        file = spec.define_by_run.partition(":")[0]
        shutil.copy(src.parent / file, stage / Path(file).name)
    env = {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.update(FAST_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    entrypoint = f"python -m sertune.cli search run {src.name} --name {spec.name}"
    sid = client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"sertune-{spec.name}-{int(time.time())}",
        runtime_env={"working_dir": str(stage), "py_modules": _package_dirs(), "env_vars": env},
        metadata={"sertune.search": spec.name, "sertune.spec": src.name},
    )
    save_record(
        spec.name,
        {
            "name": spec.name,
            "spec": spec.model_dump(),
            "source": str(src),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "path": f"{env.get('SERTUNE_STORAGE', '(on the cluster)')}/{spec.name}",
            "tracking_uri": env.get("MLFLOW_TRACKING_URI", "(the cluster's default)"),
            "status": "submitted",
            "submission_id": sid,
            "address": address,
            "data": {},
        },
    )
    print(f"submitted search {spec.name!r} to {address} as job {sid}")
    print(
        f"follow it: sertune search logs {spec.name}   status: sertune search status {spec.name}"
    )
    if wait:
        return sid if follow(spec.name) == "SUCCEEDED" else ""
    return sid


def follow(name: str, poll_s: float = 2.0) -> str:
    """Print the job's logs as they come until it ends; return its final status."""
    record = load_record(name)
    client = _client(record["address"])
    seen = 0
    while True:
        logs = client.get_job_logs(record["submission_id"])
        if len(logs) > seen:
            print(logs[seen:], end="", flush=True)
            seen = len(logs)
        status = str(client.get_job_status(record["submission_id"]))
        if status.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            logs = client.get_job_logs(record["submission_id"])
            print(logs[seen:], end="", flush=True)
            record["status"] = status.split(".")[-1].lower()
            save_record(name, record)
            return status.split(".")[-1]
        time.sleep(poll_s)


def job_status(record: dict[str, Any]) -> str:
    client = _client(record["address"])
    info = client.get_job_info(record["submission_id"])
    return f"job {record['submission_id']} on {record['address']}: {info.status} {info.message or ''}".strip()


def job_logs(name: str) -> str:
    record = load_record(name)
    if not record.get("submission_id"):
        return f"{name} ran locally; its output went to the terminal that ran it"
    return _client(record["address"]).get_job_logs(record["submission_id"])


def job_stop(name: str) -> str:
    record = load_record(name)
    if not record.get("submission_id"):
        return f"{name} is not a submitted search"
    ok = _client(record["address"]).stop_job(record["submission_id"])
    return (
        f"stop requested for job {record['submission_id']}" if ok else "the job had already ended"
    )
