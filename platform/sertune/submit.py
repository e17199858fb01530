"""Submitting searches to a Ray cluster through Ray Jobs.

``sertune search submit SPEC --address http://HEAD:8265`` ships the project in the job's runtime
environment (``py_modules``: the ``sertune``, ``trainables`` and ``search_spaces`` packages; the
spec in ``working_dir``) and runs ``sertune search run`` as the job's entrypoint on the cluster,
so a submitted search is the same code path as a local one. Where results go is configuration
(``SERTUNE_STORAGE``, ``SERTUNE_CACHE``, ``MLFLOW_TRACKING_URI``, ``AWS_ENDPOINT_URL``) and travels
in the job's environment; credentials never do: each node uses its own AWS credential chain, and
MLflow credentials are set on the cluster.

Ray 2.60 clusters are token-authenticated by default. The token is taken from Ray's standard
places - ``RAY_AUTH_TOKEN``, the file in ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token`` - and sent
only as the HTTP ``Authorization`` header: it is never logged, recorded or part of the job.
Right after a head starts its job agent may not be up yet ("No available agent"): submission
retries that for up to ``SUBMIT_RETRY_S`` seconds.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import NotFound, ServiceError, UsageError
from .ray_compat import FAST_ENV
from .records import SearchRecord, load_record, now, save_record

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
SUBMIT_RETRY_S = 60.0
TOKEN_PLACES = "RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"


def auth_token() -> str | None:
    """The cluster token from Ray's standard places, or None."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path and Path(path).expanduser().is_file():
            text = Path(path).expanduser().read_text().strip()
            if text:
                return text
    return None


def without_userinfo(uri: str) -> str:
    """``https://user:secret@host/`` -> ``https://host/``: credentials never travel in a URI."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://)[^/@]*@", r"\1", uri)


def _explain(e: Exception, address: str) -> ServiceError:
    text = str(e)
    if (
        "401" in text
        or "Missing authentication token" in text
        or "Authentication required" in text
    ):
        return ServiceError(
            f"Ray cluster {address} requires an auth token and none was found; set {TOKEN_PLACES} "
            "(on the head: `ray get-auth-token`)"
        )
    if "403" in text or "Invalid authentication token" in text or "Authentication failed" in text:
        return ServiceError(f"Ray cluster {address} refused the auth token from {TOKEN_PLACES}")
    if (
        isinstance(e, ConnectionError)
        or "Failed to connect" in text
        or "Connection refused" in text
    ):
        return ServiceError(
            f"Ray cluster {address}: unreachable (is the dashboard at this address?)"
        )
    return ServiceError(
        f"Ray cluster {address}: {text.splitlines()[0][:300] if text else type(e).__name__}"
    )


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the cause
        raise _explain(e, address) from None


def _call(address: str, fn, *args, **kwargs):
    """A Jobs API call with the transient 'no agent yet' error retried for SUBMIT_RETRY_S."""
    deadline = time.monotonic() + SUBMIT_RETRY_S
    delay = 1.0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            transient = "No available agent" in str(e) or "try again later" in str(e)
            if transient and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(8.0, delay * 2)
                continue
            raise _explain(e, address) from None


def _package_dirs() -> list[str]:
    from importlib.util import find_spec

    # located, not imported: the control plane never imports a trainable
    return [
        str(Path(find_spec(p).origin).parent) for p in ("sertune", "trainables", "search_spaces")
    ]


def job_env(name: str, tracking_uri: str | None = None) -> dict[str, str]:
    """A submitted job's environment: the settings in :data:`FORWARDED` (never a credential; a
    URI without its userinfo), Ray's fast settings, and ``SERTUNE_SUBMITTED``: the name whose
    submitted record the job's driver takes over."""
    env = {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    if "MLFLOW_TRACKING_URI" in env:
        env["MLFLOW_TRACKING_URI"] = without_userinfo(env["MLFLOW_TRACKING_URI"])
    env.update(FAST_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    env["SERTUNE_SUBMITTED"] = name
    return env


def submit(
    spec: Any,
    spec_path: str,
    address: str,
    wait: bool = False,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Submit ``spec`` as a Ray Job; record it locally; return the submission id."""
    client = _client(address)
    stage = Path(tempfile.mkdtemp(prefix="sertune-job-"))
    src = Path(spec_path)
    shutil.copy(src, stage / src.name)
    if spec.define_by_run:  # the define-by-run file travels beside the spec
        file = spec.define_by_run.partition(":")[0]
        shutil.copy(src.parent / file, stage / Path(file).name)
    env = job_env(spec.name, tracking_uri)  # the job's `search run` takes the record's name
    entrypoint = f"python -m sertune.cli search run {src.name} --name {spec.name}"
    try:  # the working dir is uploaded by submit_job; the local copy is not needed after
        sid = _call(
            address,
            client.submit_job,
            entrypoint=entrypoint,
            submission_id=f"sertune-{spec.name}-{int(time.time())}",
            runtime_env={
                "working_dir": str(stage),
                "py_modules": _package_dirs(),
                "env_vars": env,
            },
            metadata={"sertune.search": spec.name, "sertune.spec": src.name},
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    save_record(
        spec.name,
        SearchRecord(
            name=spec.name,
            spec=spec,
            source=str(src),
            created=now(),
            path=f"{env.get('SERTUNE_STORAGE', '(on the cluster)')}/{spec.name}",
            tracking_uri=env.get("MLFLOW_TRACKING_URI", "(the cluster's default)"),
            status="submitted",
            submission_id=sid,
            address=address,
        ),
    )
    log(f"submitted search {spec.name!r} to {address} as job {sid}")
    log(f"follow it: sertune search logs {spec.name}   status: sertune search status {spec.name}")
    if wait:
        return sid if follow(spec.name) == "SUCCEEDED" else ""
    return sid


def _submitted(name: str) -> SearchRecord:
    record = load_record(name)
    if not record.submission_id:
        raise UsageError(
            f"{name!r} ran locally, not as a Ray Job; its output went to the terminal that ran it"
        )
    return record


def follow(name: str, poll_s: float = 2.0) -> str:
    """Print the job's logs as they come until it ends; return its final status."""
    record = _submitted(name)
    address = record.address
    client = _client(address)
    seen = 0
    while True:
        logs = _call(address, client.get_job_logs, record.submission_id)
        if len(logs) > seen:
            print(logs[seen:], end="", flush=True)
            seen = len(logs)
        status = str(_call(address, client.get_job_status, record.submission_id))
        if status.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            logs = _call(address, client.get_job_logs, record.submission_id)
            print(logs[seen:], end="", flush=True)
            save_record(name, record.but(status=status.split(".")[-1].lower()))
            return status.split(".")[-1]
        time.sleep(poll_s)


def job_status(record: SearchRecord) -> str:
    address = record.address
    client = _client(address)
    try:
        info = _call(address, client.get_job_info, record.submission_id)
    except ServiceError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise NotFound(f"job {record.submission_id} is not known to {address}") from None
        raise
    return f"job {record.submission_id} on {address}: {info.status} {info.message or ''}".strip()


def job_logs(name: str) -> str:
    record = _submitted(name)
    return _call(record.address, _client(record.address).get_job_logs, record.submission_id)


def job_stop(name: str) -> str:
    record = _submitted(name)
    ok = _call(record.address, _client(record.address).stop_job, record.submission_id)
    return f"stop requested for job {record.submission_id}" if ok else "the job had already ended"


def submit_study(
    spec: Any,
    vs: str,
    outer: str,
    name: str | None,
    sets: list[str],
    address: str,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """Submit a study as a Ray Job (its driver runs ``sertune study run`` on the cluster, the
    same code path as a local study); record it locally; return the submission id."""
    import shlex

    from .records import check_name
    from .study import StudyRecord, arms_of, save_study

    name = check_name(name or f"{spec.name}-study")
    vspec, vlabel = arms_of(spec, vs, sets)
    client = _client(address)
    stage = Path(tempfile.mkdtemp(prefix="sertune-job-"))
    files = [(Path(spec.source), spec)]
    if Path(vs).suffix in (".yaml", ".yml") and Path(vs).is_file():
        files.append((Path(vs), vspec))
    for src, s in files:
        shutil.copy(src, stage / src.name)
        if s.define_by_run:
            file = s.define_by_run.partition(":")[0]
            shutil.copy(src.parent / file, stage / Path(file).name)
    env = job_env(name, tracking_uri)
    vs_arg = Path(vs).name if len(files) > 1 else vs
    args = ["study", "run", Path(spec.source).name, "--vs", vs_arg, "--outer", str(outer)]
    args += ["--name", name] + [x for s in sets for x in ("--set", s)]
    entrypoint = "python -m sertune.cli " + " ".join(shlex.quote(x) for x in args)
    try:
        sid = _call(
            address,
            client.submit_job,
            entrypoint=entrypoint,
            submission_id=f"sertune-{name}-{int(time.time())}",
            runtime_env={
                "working_dir": str(stage),
                "py_modules": _package_dirs(),
                "env_vars": env,
            },
            metadata={"sertune.study": name, "sertune.spec": Path(spec.source).name},
        )
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    save_study(
        StudyRecord(
            name=name,
            spec=spec,
            vs=vs,
            vs_spec=vspec,
            arms=[spec.name, vlabel],
            n_outer=0,
            outer=[],
            created=now(),
            status="submitted",
            tracking_uri=env.get("MLFLOW_TRACKING_URI", "(the cluster's default)"),
            submission_id=sid,
            address=address,
        )
    )
    log(f"submitted study {name!r} to {address} as job {sid} ({entrypoint})")
    log(f"its outer folds and table are on the cluster's MLflow: the {name!r} study run")
    return sid
