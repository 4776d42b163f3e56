"""Sweep storage as URIs: a local folder or ``s3://bucket/prefix``, behind a few verbs.

The reference-statistics cache uses it now, checkpoints later. Local paths are plain files
(writes are atomic: temp file + rename, so a reader never sees half a file and two trials writing
the same cache entry cannot corrupt it). ``s3://`` goes through boto3, which honours
``AWS_ENDPOINT_URL`` for S3-compatible servers (MinIO, Ceph, moto in tests).

>>> from sweeper import storage
>>> uri = storage.join("s3://my-bucket/sweeps/obama", "reference_stats", "ab12.npz")
>>> storage.write_bytes(uri, b"...")                   # doctest: +SKIP
>>> storage.exists(uri), storage.read_bytes(uri)       # doctest: +SKIP
(True, b'...')
>>> storage.list("s3://my-bucket/sweeps/obama")        # doctest: +SKIP
['s3://my-bucket/sweeps/obama/reference_stats/ab12.npz']
>>> storage.download_prefix("s3://my-bucket/data/obama", "/tmp/obama")   # doctest: +SKIP
PosixPath('/tmp/obama')

Mistakes a user can fix (missing bucket, no credentials, endpoint not reachable) raise
:class:`~sweeper.errors.SweeperError` naming the bucket or endpoint. A missing object raises
``FileNotFoundError``, as for a local file. Transient connection errors are retried with
exponential backoff; ``SWEEPER_STORAGE_RETRIES`` (default 7 attempts, about 16 s of waiting in all)
or the ``retries=`` argument sets the number of attempts.
"""

from __future__ import annotations

import builtins
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from sweeper.errors import SweeperError

T = TypeVar("T")

DEFAULT_RETRIES = 7
_BACKOFF_S = 0.25  # waits 0.25, 0.5, ... 8 s: rides out an endpoint that is gone for several seconds


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise SweeperError(f"{uri!r}: no bucket name; write storage as s3://bucket/prefix")
    return bucket, key


def join(uri: str, *parts: str) -> str:
    """Append path parts; ``/`` for ``s3://`` whatever the OS.

    >>> join("s3://b/sweep", "reference_stats", "k.npz")
    's3://b/sweep/reference_stats/k.npz'
    """
    if is_s3(uri):
        pieces = [uri.rstrip("/")] + [p.strip("/") for p in parts if p]
        return "/".join(pieces)
    return os.path.join(uri, *parts)


def read_bytes(uri: str, retries: int | None = None) -> bytes:
    """The whole object; ``FileNotFoundError`` when it does not exist."""
    if not is_s3(uri):
        with open(_local(uri), "rb") as f:
            return f.read()
    bucket, key = split_s3(uri)

    def get() -> bytes:
        return mlflow_client().get_object(Bucket=bucket, Key=key)["Body"].read()

    return _call(get, uri, retries)


def write_bytes(uri: str, data: bytes, retries: int | None = None) -> None:
    """Create or replace an object; local writes are atomic (temp file in the same folder + rename)."""
    if not is_s3(uri):
        path = _local(uri)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    bucket, key = split_s3(uri)
    _call(lambda: mlflow_client().put_object(Bucket=bucket, Key=key, Body=data), uri, retries)


def exists(uri: str, retries: int | None = None) -> bool:
    if not is_s3(uri):
        return os.path.exists(_local(uri))
    bucket, key = split_s3(uri)

    def head() -> bool:
        try:
            mlflow_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as e:  # botocore.exceptions.ClientError; imported lazily
            if _status(e) != 404:
                raise
        # HEAD answers a bare 404 for a missing bucket too; ask the bucket so that a wrong bucket
        # name is an error rather than a cache that never hits.
        mlflow_client().head_bucket(Bucket=bucket)
        return False

    return _call(head, uri, retries)


def list(uri_prefix: str, retries: int | None = None) -> builtins.list[str]:
    """Every object below the folder ``uri_prefix`` (recursively), as full URIs, sorted.

    Folder semantics on both backends: ``list("s3://b/sweep")`` does not return
    ``s3://b/sweep-2/...``, so deleting what it lists never touches a sibling sweep.
    """
    if not is_s3(uri_prefix):
        root = _local(uri_prefix)
        found = []
        for folder, _dirs, files in os.walk(root):
            found += [os.path.join(folder, name) for name in files if not name.startswith(".tmp-")]
        return sorted(found)
    bucket, key = split_s3(uri_prefix)
    key = key.rstrip("/") + "/" if key.strip("/") else ""

    def listing() -> builtins.list[str]:
        pages = mlflow_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        return sorted(f"s3://{bucket}/{obj['Key']}" for page in pages for obj in page.get("Contents", []))

    return _call(listing, uri_prefix, retries)


def download_prefix(uri_prefix: str, dest_dir: str | os.PathLike, retries: int | None = None) -> Path:
    """Mirror the objects below ``uri_prefix`` into ``dest_dir`` (relative paths kept); returns the folder.

    Files already there with the same size are not fetched again, so a second trial on the same
    node reuses the copy. Local sources are copied the same way.
    """
    dest = Path(dest_dir)
    base = uri_prefix.rstrip("/")
    sizes = _sizes(uri_prefix, retries)
    if not sizes:
        raise SweeperError(f"{uri_prefix}: no files there; check the path (and the bucket) of the data")
    for uri, size in sizes.items():
        target = dest / uri[len(base) :].lstrip("/")
        if target.is_file() and target.stat().st_size == size:
            continue
        write_bytes(str(target), read_bytes(uri, retries))
    return dest


def _sizes(uri_prefix: str, retries: int | None) -> dict[str, int]:
    if not is_s3(uri_prefix):
        return {p: os.path.getsize(p) for p in list(uri_prefix)}
    bucket, key = split_s3(uri_prefix)
    key = key.rstrip("/") + "/" if key.strip("/") else ""

    def listing() -> dict[str, int]:
        pages = mlflow_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        return {f"s3://{bucket}/{o['Key']}": int(o["Size"]) for page in pages for o in page.get("Contents", [])}

    return _call(listing, uri_prefix, retries)


def delete(uri: str, retries: int | None = None) -> None:
    """Remove one object; removing something that does not exist is not an error."""
    if not is_s3(uri):
        try:
            os.remove(_local(uri))
        except FileNotFoundError:
            pass
        return
    bucket, key = split_s3(uri)
    _call(lambda: mlflow_client().delete_object(Bucket=bucket, Key=key), uri, retries)


# ---------------------------------------------------------------------------- S3 plumbing
_clients: dict[tuple, Any] = {}


def mlflow_client() -> Any:
    """One boto3 client per environment (tests change AWS_* between cases)."""
    import boto3
    from botocore.config import Config

    env = tuple(
        os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION")
    )
    if env not in _clients:
        # We retry ourselves (see _call), so botocore's own retries are off: they would multiply.
        cfg = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=60)
        _clients[env] = boto3.session.Session().client("s3", config=cfg)
    return _clients[env]


def _endpoint() -> str:
    try:
        return mlflow_client().meta.endpoint_url
    except Exception:
        return os.environ.get("AWS_ENDPOINT_URL", "the default AWS S3 endpoint")


def _status(e: Exception) -> int | None:
    resp = getattr(e, "response", None) or {}
    return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _call(fn: Callable[[], T], uri: str, retries: int | None) -> T:
    """Run one S3 request; retry connection errors with backoff; turn user-fixable errors into SweeperError."""
    from botocore import exceptions as bx

    attempts = retries if retries is not None else int(os.environ.get("SWEEPER_STORAGE_RETRIES", DEFAULT_RETRIES))
    attempts = max(1, attempts)
    transient = (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError)
    for attempt in range(attempts):
        try:
            return fn()
        except transient as e:
            if attempt + 1 < attempts:
                time.sleep(_BACKOFF_S * 2**attempt)
                continue
            raise SweeperError(
                f"{uri}: cannot reach the S3 endpoint {_endpoint()} after {attempts} attempt(s) ({e}); "
                "check AWS_ENDPOINT_URL and that the server is running and reachable"
            ) from None
        except (bx.NoCredentialsError, bx.PartialCredentialsError) as e:
            raise SweeperError(
                f"{uri}: no usable S3 credentials ({e}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) in the environment of every node"
            ) from None
        except bx.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            bucket, key = split_s3(uri)
            if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and _is_head_bucket(e)):
                raise SweeperError(
                    f"{uri}: bucket {bucket!r} does not exist; create it or fix storage (S3 endpoint: {_endpoint()})"
                ) from None
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{uri}: no such object") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
                raise SweeperError(
                    f"{uri}: the S3 server at {_endpoint()} refused the credentials ({code}); check "
                    f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and that they may access bucket {bucket!r}"
                ) from None
            raise
    raise AssertionError("unreachable")


def _is_head_bucket(e: Exception) -> bool:
    return getattr(e, "operation_name", "") == "HeadBucket"
