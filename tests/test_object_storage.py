"""Object storage end to end, against an S3-compatible server the tests start (moto's server mode on 127.0.0.1).

Unit tests (no Ray): a data root, a run's results and a sweep's Optuna study on a bucket. The
``ray`` test runs a two-node local cluster whose data and storage all live on the bucket.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from gloo import free_port

BUCKET = "xmodal-test"


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """An S3-compatible server (moto) on a free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """What every process (this one, Ray's nodes) needs to reach the test server."""
    return {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture
def bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """An empty bucket (a new one per test); the environment points at the server, and the local cache is fresh."""
    import boto3

    for key, value in s3_env(s3_server).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))
    name = f"{BUCKET}-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


def data_settings(root: str):
    from xmodal.data.prepared import DataSettings

    return DataSettings(root=root, tile_size=64, batch_size=4, mask_layer="buildings", noisy_layer=None)


# ----------------------------------------------------------------------------- storage helpers


def test_join_keeps_a_uri_query_at_the_end_and_local_paths_local(tmp_path: Path):
    from xmodal.data.storage import join

    assert join("s3://b/world?endpoint_override=h:9&scheme=http", "train", "part-0.parquet") == "s3://b/world/train/part-0.parquet?endpoint_override=h:9&scheme=http"
    assert join("s3://b/world/", ".") == "s3://b/world"
    assert join(tmp_path, "a", "b") == str(tmp_path / "a" / "b")


def test_a_missing_bucket_is_refused_naming_the_uri(bucket: str):
    from xmodal.data.prepared import prepare_data
    from xmodal.data.storage import check_reachable
    from xmodal.errors import ConfigError

    missing = "s3://no-such-bucket-xmodal/world"
    with pytest.raises(ConfigError, match=r"data.root=.s3://no-such-bucket-xmodal/world.: bucket .no-such-bucket-xmodal. does not exist"):
        prepare_data(data_settings(missing))
    with pytest.raises(ConfigError, match="run.storage='s3://no-such-bucket-xmodal/runs'"):
        check_reachable("s3://no-such-bucket-xmodal/runs", "run.storage")
    check_reachable(bucket + "/not-yet-written", "run.storage")  # an existing bucket, an empty prefix: fine


def test_a_bucket_prefix_without_a_prepared_dataset_says_how_to_make_one(bucket: str):
    from xmodal.data.prepared import prepare_data
    from xmodal.errors import DataError

    with pytest.raises(DataError, match=r"dataset.json: not found.*xmodal data pack"):
        prepare_data(data_settings(bucket + "/nothing-here"))


# ----------------------------------------------------------------------------- data roots on a bucket


def test_a_packed_store_on_the_bucket_gives_the_same_tiles(tiny_world: Path, bucket: str, tmp_path: Path):
    """`xmodal data pack <world> --out s3://...` uploads the store; a run reads it from there,
    its small files through the cache and its parts where they lie."""
    from xmodal.cli.main import main
    from xmodal.data.manifest import Manifest
    from xmodal.data.prepared import prepare_data
    from xmodal.data.torch_data import iterate_numpy

    uri = bucket + "/packed"
    main(["data", "pack", str(tiny_world), "--out", uri, "--rows-per-file", "7"])
    remote = prepare_data(data_settings(uri))
    assert remote.manifest.location == uri and str(remote.manifest.data_root) == uri
    assert not list(remote.manifest.folder.glob("*/part-*.parquet")), "parts are read from the bucket, not copied"
    native = prepare_data(data_settings(str(tiny_world)))
    a, b = next(iterate_numpy(native, "test")), next(iterate_numpy(remote, "test"))
    for key in ("sar", "optical", "mask", "sar_valid"):
        np.testing.assert_array_equal(a[key], b[key])
    # The cache is a copy: a store packed again under the same URI is read anew.
    main(["data", "pack", str(tiny_world), "--out", uri, "--rows-per-file", "50"])
    assert len({r["sar_path"] for r in Manifest.load(uri).records}) < len({r["sar_path"] for r in remote.manifest.records})


def test_a_geotiff_tree_on_the_bucket_is_read_through_gdal(tiny_world: Path, bucket: str):
    """A prepared GeoTIFF folder uploaded as it is: rasterio reads each tile with /vsis3/ from the
    endpoint in AWS_ENDPOINT_URL (GDAL reads none of it itself); its statistics, computed here, go
    back to the bucket."""
    from xmodal.data.prepared import prepare_data
    from xmodal.data.storage import exists, join, upload
    from xmodal.data.torch_data import iterate_numpy

    import boto3

    uri = bucket + "/world"
    upload(tiny_world, uri)
    for name in ("stats.json", "stats.split.json"):  # computed from the bucket's tiles, then written back there
        boto3.client("s3").delete_object(Bucket=bucket.removeprefix("s3://"), Key=f"world/{name}")
    remote = prepare_data(data_settings(uri))
    assert exists(join(uri, "stats.json")) and exists(join(uri, "stats.split.json"))
    native = prepare_data(data_settings(str(tiny_world)))
    a, b = next(iterate_numpy(native, "val")), next(iterate_numpy(remote, "val"))
    for key in ("sar", "optical", "mask"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
    assert json.loads((remote.manifest.folder / "stats.json").read_text()).keys() == json.loads((tiny_world / "stats.json").read_text()).keys()
