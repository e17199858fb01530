"""Decoded caches in object storage (``s3://``): published once by the driver, pulled to each
node's local disk once, verified by checksum.

A remote cache folder holds the same files as a local one plus ``CHECKSUMS.json`` (sha256 of each
file); ``COMPLETE`` is uploaded last. A node keeps its copy under ``$SERTUNE_NODE_CACHE``
(default ``/tmp/sertune-node-cache``); a file lock makes concurrent workers on one node download
once, and a copy whose checksums no longer match the remote's is fetched again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

FILES = ("audio.npy", "index.json", "report.json")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key.rstrip("/")


def _client():
    from sertune.storage import boto3_client

    return boto3_client()


def remote_complete(uri: str) -> bool:
    bucket, key = _split(uri)
    try:
        _client().head_object(Bucket=bucket, Key=f"{key}/COMPLETE")
        return True
    except Exception:
        return False


def publish_cache(local: Path, remote_root: str) -> str:
    """Upload a complete local cache folder under ``remote_root``; returns its URI."""
    uri = f"{remote_root.rstrip('/')}/{local.name}"
    if remote_complete(uri):
        return uri
    bucket, key = _split(uri)
    client = _client()
    sums = {f: sha256(local / f) for f in FILES}
    for f in FILES:
        client.upload_file(str(local / f), bucket, f"{key}/{f}")
    client.put_object(Bucket=bucket, Key=f"{key}/CHECKSUMS.json", Body=json.dumps(sums).encode())
    client.put_object(Bucket=bucket, Key=f"{key}/COMPLETE", Body=(local / "COMPLETE").read_bytes())
    return uri


def node_cache_root() -> Path:
    return Path(os.environ.get("SERTUNE_NODE_CACHE", "/tmp/sertune-node-cache"))


def ensure_local(uri: str) -> Path:
    """The node-local copy of a remote cache, downloaded and verified at most once per node."""
    bucket, key = _split(uri)
    root = node_cache_root()
    root.mkdir(parents=True, exist_ok=True)
    local = root / Path(key).name
    with open(root / f".{local.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; others wait, then reuse it
        client = _client()
        remote_sums = json.loads(
            client.get_object(Bucket=bucket, Key=f"{key}/CHECKSUMS.json")["Body"].read()
        )
        if (local / "COMPLETE").exists() and _verified(local, remote_sums):
            return local
        tmp = root / f".{local.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in FILES:
            client.download_file(bucket, f"{key}/{f}", str(tmp / f))
            if sha256(tmp / f) != remote_sums[f]:
                raise OSError(f"{uri}/{f}: checksum mismatch after download")
        (tmp / "CHECKSUMS.json").write_text(json.dumps(remote_sums))
        client.download_file(bucket, f"{key}/COMPLETE", str(tmp / "COMPLETE"))
        shutil.rmtree(local, ignore_errors=True)
        tmp.rename(local)
        return local


def _verified(local: Path, remote_sums: dict[str, str]) -> bool:
    mine = local / "CHECKSUMS.json"
    return mine.exists() and json.loads(mine.read_text()) == remote_sums
