"""Shards in object storage: s3:// against a moto S3 server and gs:// against a GCS emulator, both on 127.0.0.1."""

import os
import socket
import uuid
from pathlib import Path

import pytest
import s3fs
from gcp_storage_emulator.server import create_server
from moto.server import ThreadedMotoServer

from matryoshka.data import build_dataset, make_loader

from .test_data_streaming import all_ids, config, make_shards, stream_ids

# gcsfs's default filesystem asks the bucket type over gRPC, which the emulator does not serve
# (a 60-second timeout per bucket); the plain JSON API is what reading shards needs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Shards of 4 samples: two workers reading 2 each give whole batches, so an epoch is exactly 4 batches of 4.
COUNTS = [4, 4, 4, 4]
SHARDS = "shard-{000..003}.tar"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upload(fs, folder: Path, bucket: str) -> None:
    for shard in sorted(folder.glob("*.tar")):
        fs.put_file(str(shard), f"{bucket}/shards/{shard.name}")


@pytest.fixture
def s3_bucket(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # What a user of MinIO or another S3-compatible store sets: botocore reads the endpoint from the environment.
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"bucket-{uuid.uuid4().hex[:12]}"  # moto keeps its buckets for the whole process
    fs.mkdir(bucket)
    yield fs, f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def gs_bucket(monkeypatch):
    import gcsfs  # after GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is set: gcsfs reads it on import

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield gcsfs.GCSFileSystem(), "gs://bucket"
    gcsfs.GCSFileSystem.clear_instance_cache()
    server.stop()


@pytest.mark.parametrize("store", ["s3_bucket", "gs_bucket"])
def test_object_storage_shards_match_local_ones(store, tmp_path, request):
    fs, root = request.getfixturevalue(store)
    make_shards(tmp_path, COUNTS)
    upload(fs, tmp_path, root.split("://")[1])
    local = stream_ids(config(str(tmp_path / SHARDS), shuffle_buffer=8), steps=3)
    remote = stream_ids(config(f"{root}/shards/{SHARDS}", shuffle_buffer=8), steps=3)
    assert remote == local
    # forked workers open their own connections: one epoch still reads every sample once
    ds = build_dataset(config(f"{root}/shards/{SHARDS}", shuffle=False))
    loader = make_loader(ds, batch_size=4, seed=0, shuffle=False, num_workers=2)
    try:
        ids = [i for _ in range(4) for i in next(loader)["index"].tolist()]
    finally:
        loader.close()
    assert sorted(ids) == sorted(all_ids(COUNTS))


def test_missing_object_is_retried_skipped_and_named(s3_bucket, tmp_path):
    fs, root = s3_bucket
    make_shards(tmp_path, COUNTS)
    upload(fs, tmp_path, root.split("://")[1])
    ds = build_dataset(config(f"{root}/shards/shard-{{000..004}}.tar", retries=1, retry_delay=0.01, shuffle=False))
    loader = make_loader(ds, batch_size=4, seed=0, shuffle=False)
    try:
        ids = [i for _ in range(8) for i in next(loader)["index"].tolist()]
    finally:
        loader.close()
    assert set(ids) == all_ids(COUNTS)
    assert ds.skipped["by_reason"] == {"unreadable_shard": 1} and f"{root}/shards/shard-004.tar" in ds.skip_report()
