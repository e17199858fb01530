"""The one place that talks to object storage: local folders and ``s3://`` (boto3 / pyarrow).

S3-compatible stores (MinIO, moto, Ceph) are reached through ``AWS_ENDPOINT_URL`` (or
``SERTUNE_S3_ENDPOINT``). Credentials come only from the standard AWS chain (environment,
config files, instance roles) and are never logged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def endpoint() -> str | None:
    return os.environ.get("SERTUNE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")


def pyarrow_fs(uri: str):
    """(filesystem, path) for ``uri`` — S3 with the endpoint override when one is set."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        ep = endpoint()
        kwargs = {}
        if ep:
            scheme, _, host = ep.partition("://")
            kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :]
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), uri


def fs_and_path(uri: str):
    """(pyarrow filesystem or None, path) as Ray's ``storage_path`` + ``storage_filesystem`` want
    them: remote URIs get an explicit filesystem (endpoint override) and lose their scheme."""
    if is_remote(uri):
        return pyarrow_fs(uri)
    return None, uri


def download_dir(uri: str, dest: str | Path) -> Path:
    """Copy a folder (local or remote) to ``dest``; returns ``dest``."""
    dest = Path(dest)
    if not is_remote(uri):
        src = uri[len("file://") :] if uri.startswith("file://") else uri
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest
    import pyarrow.fs as pafs

    fs, path = pyarrow_fs(uri)
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return dest


def boto3_client():
    import boto3

    return boto3.client("s3", endpoint_url=endpoint())


def list_objects(uri: str) -> list[str]:
    """Every key under ``s3://bucket/prefix`` (for status output and tests)."""
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    keys, token = [], None
    client = boto3_client()
    while True:
        kw = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kw["ContinuationToken"] = token
        page = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def upload_dir(local: str | Path, uri: str) -> str:
    """Copy a local folder to ``uri`` (a local path or ``s3://``); returns ``uri``."""
    if not is_remote(uri):
        dest = uri[len("file://") :] if uri.startswith("file://") else uri
        shutil.copytree(local, dest, dirs_exist_ok=True)
        return uri
    import pyarrow.fs as pafs

    fs, path = pyarrow_fs(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(
        str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )
    return uri


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly under ``uri`` (empty when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = pyarrow_fs(uri) if is_remote(uri) else (pafs.LocalFileSystem(), uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = pyarrow_fs(uri) if is_remote(uri) else (pafs.LocalFileSystem(), uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove_dir(uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = pyarrow_fs(uri) if is_remote(uri) else (pafs.LocalFileSystem(), uri)
    try:
        fs.delete_dir(path)
    except (FileNotFoundError, OSError):
        pass


def write_text(uri: str, text: str) -> None:
    import pyarrow.fs as pafs

    fs, path = pyarrow_fs(uri) if is_remote(uri) else (pafs.LocalFileSystem(), uri)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(uri: str) -> str:
    import pyarrow.fs as pafs

    fs, path = pyarrow_fs(uri) if is_remote(uri) else (pafs.LocalFileSystem(), uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()
