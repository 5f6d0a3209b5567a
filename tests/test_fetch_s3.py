"""s3:// through the real s3fs/botocore client against moto's S3 server on loopback."""

from __future__ import annotations

import hashlib
import os

import pytest

from llama_core.fetch import Credentials, FetchError, RetryPolicy, fetch
from llama_core.launch.preflight import free_port

moto_server = pytest.importorskip("moto.server")

KEY, SECRET = "AKIAFETCHTEST", "fetch-test-secret-value"


@pytest.fixture(scope="module")
def endpoint():
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint):
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    bucket = f"b{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    return client, bucket, Credentials(key=KEY, secret=SECRET, endpoint_url=endpoint, region="us-east-1")


def test_object_is_fetched_then_a_cache_hit_then_refetched_when_changed(s3, tmp_path):
    client, bucket, creds = s3
    body = os.urandom(3 << 20)  # > CHUNK: several ranged reads
    client.put_object(Bucket=bucket, Key="llama2/llama2_7b.ckpt", Body=body)
    url = f"s3://{bucket}/llama2/llama2_7b.ckpt"
    first = fetch(url, tmp_path, credentials=creds)
    f = first.files[0]
    assert (f.path, f.size, f.sha256, f.cached) == (
        tmp_path / "llama2_7b.ckpt",
        len(body),
        hashlib.sha256(body).hexdigest(),
        False,
    )
    assert f.path.read_bytes() == body
    inode = f.path.stat().st_ino
    assert fetch(url, tmp_path, credentials=creds).cached and f.path.stat().st_ino == inode
    client.put_object(Bucket=bucket, Key="llama2/llama2_7b.ckpt", Body=b"v2")
    third = fetch(url, tmp_path, credentials=creds)
    assert not third.cached and third.files[0].path.read_bytes() == b"v2"


def test_prefix_fetches_every_object_below_it(s3, tmp_path):
    client, bucket, creds = s3
    objects = {
        "data/alpaca/train.json": b"[1]",
        "data/alpaca/sub/tokenizer.model": b"spm",
        "data/other.txt": b"x",
    }
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    result = fetch(f"s3://{bucket}/data/alpaca/", tmp_path, credentials=creds)
    assert result.path == tmp_path / "alpaca"
    assert [(f.path.relative_to(tmp_path).as_posix(), f.sha256) for f in result.files] == [
        ("alpaca/sub/tokenizer.model", hashlib.sha256(b"spm").hexdigest()),
        ("alpaca/train.json", hashlib.sha256(b"[1]").hexdigest()),
    ]
    assert [f.source for f in result.files] == [
        f"s3://{bucket}/data/alpaca/sub/tokenizer.model",
        f"s3://{bucket}/data/alpaca/train.json",
    ]


def test_missing_object_fails_at_once_and_secret_is_not_shown(s3, tmp_path):
    _client, bucket, creds = s3
    with pytest.raises(FetchError, match=f"s3://{bucket}/nope.bin") as err:
        fetch(
            f"s3://{bucket}/nope.bin", tmp_path, credentials=creds, retry=RetryPolicy(retries=5, backoff=30)
        )
    assert SECRET not in str(err.value) and SECRET not in repr(creds)


def test_credentials_from_the_environment(s3, tmp_path, monkeypatch):
    client, bucket, creds = s3
    client.put_object(Bucket=bucket, Key="t.model", Body=b"tok")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    result = fetch(
        f"s3://{bucket}/t.model", tmp_path, credentials=Credentials(endpoint_url=creds.endpoint_url)
    )
    assert result.files[0].path.read_bytes() == b"tok"
