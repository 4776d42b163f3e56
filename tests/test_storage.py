"""sweeper.store.storage: the same six verbs on a local folder and on a real S3 API server (loopback)."""

from __future__ import annotations

import os
import time

import pytest

from sweeper.store import storage
from sweeper.errors import SweeperError


def _round_trip(root: str) -> None:
    a = storage.join(root, "reference_stats", "a.npz")
    b = storage.join(root, "reference_stats", "sub", "b.bin")
    assert not storage.exists(a)
    storage.write_bytes(a, b"alpha")
    storage.write_bytes(b, b"\x00\x01" * 1000)
    storage.write_bytes(a, b"alpha-2")  # replace
    assert storage.exists(a)
    assert storage.read_bytes(a) == b"alpha-2"
    assert storage.read_bytes(b) == b"\x00\x01" * 1000
    assert storage.list(storage.join(root, "reference_stats")) == sorted([a, b])
    storage.delete(a)
    storage.delete(a)  # deleting twice is fine
    assert not storage.exists(a)
    assert storage.list(root) == [b]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(a)


def _folder_semantics(root: str) -> None:
    storage.write_bytes(storage.join(root, "sweep", "a"), b"1")
    storage.write_bytes(storage.join(root, "sweep-2", "b"), b"2")
    assert storage.list(storage.join(root, "sweep")) == [storage.join(root, "sweep", "a")]
    assert storage.list(storage.join(root, "sweep") + "/") == [storage.join(root, "sweep", "a")]
    assert storage.list(storage.join(root, "nothing")) == []


def _download(root: str, dest) -> None:
    storage.write_bytes(storage.join(root, "data", "x.png"), b"png")
    storage.write_bytes(storage.join(root, "data", "sub", "y.png"), b"png2")
    got = storage.download_prefix(storage.join(root, "data"), dest)
    assert (got / "x.png").read_bytes() == b"png" and (got / "sub" / "y.png").read_bytes() == b"png2"


def test_local_round_trip(tmp_path):
    _round_trip(str(tmp_path / "sweep"))


def test_list_is_a_folder_listing_not_a_string_prefix(tmp_path):
    _folder_semantics(str(tmp_path))


def test_download_prefix_mirrors_a_folder(tmp_path):
    _download(str(tmp_path / "src"), tmp_path / "dest")


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = str(tmp_path / "x" / "stats.npz")
    storage.write_bytes(target, b"1" * 10_000)
    storage.write_bytes(target, b"2" * 10)
    assert sorted(os.listdir(tmp_path / "x")) == ["stats.npz"]
    assert storage.read_bytes(target) == b"2" * 10


def test_join_uses_slashes_for_s3():
    assert storage.join("s3://bucket/sweep/", "reference_stats", "k.npz") == "s3://bucket/sweep/reference_stats/k.npz"
    assert storage.join("s3://bucket", "k") == "s3://bucket/k"


def test_s3_round_trip(s3_bucket):
    _round_trip(storage.join(s3_bucket, "sweeps", "demo"))


def test_s3_list_is_a_folder_listing_and_download_mirrors_it(s3_bucket, tmp_path):
    _folder_semantics(s3_bucket)
    _download(s3_bucket, tmp_path / "dest")


def test_s3_missing_bucket_names_the_bucket(moto_server):
    uri = "s3://no-such-bucket-here/sweep/reference_stats/k.npz"
    for call in (lambda: storage.write_bytes(uri, b"x"), lambda: storage.read_bytes(uri),
                 lambda: storage.exists(uri), lambda: storage.list("s3://no-such-bucket-here/sweep")):
        with pytest.raises(SweeperError, match="bucket 'no-such-bucket-here' does not exist; create it or fix storage"):
            call()


def test_s3_unreachable_endpoint_names_the_endpoint_and_fails_fast(moto_server, closed_port, monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    t = time.perf_counter()
    with pytest.raises(SweeperError, match=f"cannot reach the S3 endpoint {endpoint}/?.* after 2 attempt"):
        storage.read_bytes("s3://bucket/key", retries=2)
    assert time.perf_counter() - t < 5


def test_s3_missing_credentials_is_a_clear_error(moto_server, monkeypatch, tmp_path):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    # No credential files or instance metadata either: keep botocore's lookup on this machine.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SweeperError, match="no usable S3 credentials.*AWS_ACCESS_KEY_ID"):
        storage.read_bytes("s3://bucket/key")
