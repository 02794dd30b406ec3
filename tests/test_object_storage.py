"""Object storage end to end, against an S3-compatible server the tests start (moto's server mode on 127.0.0.1).

Unit tests (no Ray): a data root, a run's results and a sweep's Optuna study on a bucket. The
``ray`` test runs a two-node local cluster whose data and storage all live on the bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gloo import free_port, free_ports

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


def test_a_checkpoint_on_object_storage_keeps_its_scheme(bucket: str):
    """Ray's Checkpoint.path of a checkpoint on S3 is ``bucket/...``: written as such into run.json,
    a later phase or `xmodal predict` took it for a local path."""
    import pyarrow.fs
    import ray.train

    from xmodal.engine.results import checkpoint_location

    fs, path = pyarrow.fs.FileSystem.from_uri(bucket + "/runs/r/checkpoint_1")
    assert checkpoint_location(ray.train.Checkpoint(path, filesystem=fs)) == bucket + "/runs/r/checkpoint_1"
    assert checkpoint_location(ray.train.Checkpoint("/tmp/runs/r/checkpoint_1")) == "/tmp/runs/r/checkpoint_1"


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
    import boto3

    from xmodal.data.prepared import prepare_data
    from xmodal.data.storage import exists, join, upload
    from xmodal.data.torch_data import iterate_numpy

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


# ----------------------------------------------------------------------------- a run's results on a bucket


def run_config(world: Path, storage: str, name: str = "remote-run"):
    from xmodal.engine.config import build_config

    return build_config({
        "name": name, "method": "supervised", "method_settings": {"input": "optical"},
        "data": {"root": str(world), "tile_size": 64, "batch_size": 4},
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        "train": {"epochs": 1}, "run": {"storage": storage},
    })


def test_a_remote_storage_run_keeps_its_results_on_the_bucket(tiny_world: Path, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Results of a run on object storage are staged locally and uploaded (they used to stay in a
    local ``results/`` folder of whichever machine drove the run); the TensorBoard files of a
    worker on another node reach the bucket from that node; a finished run drops the
    ``failed.json`` of an earlier failed launch; a fresh machine reads the finished run back."""
    from xmodal.engine.config import fingerprint
    from xmodal.engine.results import (
        publish_results,
        publish_tensorboard,
        read_run_result,
        record_failure,
        results_dir,
        results_location,
        worker_results_dir,
        write_run_results,
    )
    from xmodal.engine.storage import exists, join, read_text

    monkeypatch.chdir(tmp_path)
    config = run_config(tiny_world, bucket + "/runs")
    location = results_location(config)
    assert location == bucket + "/runs/remote-run"
    assert results_dir(config).is_relative_to(tmp_path / "cache"), "staged in this machine's cache, not in ./results"
    record_failure(config, "a worker died")
    publish_results(config)
    assert "a worker died" in read_text(join(location, "failed.json"))

    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "worker-node-cache"))  # rank 0 on another node
    staged = worker_results_dir(config, str(results_dir(config)))
    assert staged.is_relative_to(tmp_path / "worker-node-cache")
    (staged / "tensorboard").mkdir(parents=True)
    (staged / "tensorboard" / "events.out.tfevents.1.node2").write_bytes(b"curves")
    publish_tensorboard(config, staged)
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "cache"))

    summary = {"name": config.name, "epochs": 1, "metrics": {"test/iou": 0.5}, "checkpoint": bucket + "/runs/remote-run/checkpoint_x",
               "fingerprint": json.loads(json.dumps(fingerprint(config), default=str))}
    write_run_results(results_dir(config), summary, {}, title=config.name)
    publish_results(config)
    assert exists(join(location, "run.json")) and not exists(join(location, "failed.json"))
    assert read_text(join(location, "tensorboard", "events.out.tfevents.1.node2")) == "curves"
    assert not (tmp_path / "results").exists()

    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "fresh-machine"))
    done = read_run_result(config)
    assert done is not None and done.results_dir == location and done.metrics == {"test/iou": 0.5}


def test_a_run_on_a_missing_bucket_is_refused_before_it_starts(tiny_world: Path, bucket: str):
    from xmodal.engine.preflight import check_writable
    from xmodal.errors import ConfigError

    with pytest.raises(ConfigError, match=r"run.storage='s3://no-such-bucket-xmodal/runs': bucket 'no-such-bucket-xmodal' does not exist"):
        check_writable("s3://no-such-bucket-xmodal/runs", "run.storage")


# ----------------------------------------------------------------------------- a sweep's study on a bucket


def remote_sweep_spec(storage: str):
    from xmodal.tune.spec import load_sweep

    repo = Path(__file__).resolve().parents[1]
    return load_sweep({
        "base": str(repo / "experiments" / "baselines" / "sar-buildings.yaml"), "name": "remote",
        "sweep": {"storage": storage, "parameters": {"train.lr": {"type": "loguniform", "low": "1e-4", "high": 1e-2}}},
    })


def test_the_default_study_of_a_remote_sweep_goes_with_the_sweep_folder(bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A sweep on object storage used to run with an in-memory study (lost with the driver; a
    resume started the search over). Now: a SQLite copy in the local cache, uploaded as trials
    end, downloaded on resume, also on a fresh machine whose cache is elsewhere (Tune's pickled
    searcher names the first machine's copy)."""
    import pickle

    import optuna

    from xmodal.tune.sweep import (
        StudyStorage,
        fetch_study,
        study_storage_url,
        sweep_dir,
        upload_study,
    )

    spec = remote_sweep_spec(bucket + "/sweeps")
    folder = sweep_dir(spec)
    fetch_study(folder)
    url = study_storage_url(spec)
    assert url == f"sqlite:///{tmp_path / 'cache'}/" + url.split(str(tmp_path / "cache") + "/", 1)[1]
    storage = StudyStorage(url)
    study = optuna.create_study(storage=storage, study_name=spec.name, direction="maximize")
    study.add_trial(optuna.trial.create_trial(params={"x": 1.0}, distributions={"x": optuna.distributions.FloatDistribution(0, 2)}, value=0.7))
    pickled = pickle.dumps(storage)  # as Tune keeps the searcher
    upload_study(folder)

    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "fresh-machine"))
    import shutil

    shutil.rmtree(tmp_path / "cache")
    fetch_study(folder)  # run_sweep --resume does this before Tune restores the searcher
    restored = pickle.loads(pickled)
    trials = optuna.load_study(study_name=spec.name, storage=restored).trials
    assert [t.value for t in trials] == [0.7]
    assert str(tmp_path / "fresh-machine") in study_storage_url(spec)


def test_trial_results_are_kept_aside_on_a_remote_resume(bucket: str):
    """Tune restarts an interrupted trial with a fresh result.json: the epochs before would be lost
    from a remote sweep folder (the copy aside was skipped there)."""
    from xmodal.engine.storage import join, read_text, write_text
    from xmodal.tune.sweep import keep_trial_results

    folder = bucket + "/sweeps/remote"
    write_text(join(folder, "trial-abc", "result.json"), '{"epoch": 1}\n')
    write_text(join(folder, "runs", "trial-abc", "result.json"), "not a Tune file")
    keep_trial_results(folder)
    import pyarrow.fs

    from xmodal.data.storage import filesystem

    fs, root = filesystem(folder)
    names = sorted(i.path[len(root):] for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)) if i.type == pyarrow.fs.FileType.File)
    kept = [n for n in names if "result-before-" in n]
    assert len(kept) == 1 and kept[0].startswith("/trial-abc/") and read_text(folder + kept[0]) == '{"epoch": 1}\n'


# ----------------------------------------------------------------------------- two nodes, one bucket


def start_node(head: dict | None, env: dict[str, str], cpus: int, temp_dir: str) -> dict:
    """`ray start` of a head (``head`` None) or of a node joining it: its own ports and temp dir."""
    from test_cluster import RAY

    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port"]
    if head is None:
        names += ["port", "dashboard-port", "ray-client-server-port"]
    ports = free_ports(names)
    command = [RAY, "start", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    if head is None:
        command += ["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
    else:
        command += [f"--address={head['gcs']}"]
    started = subprocess.run(command + [f"--{k}={v}" for k, v in ports.items()], env=env, capture_output=True, text=True, timeout=180, check=False)
    assert started.returncode == 0, started.stdout + started.stderr
    return {"gcs": f"127.0.0.1:{ports['port']}", "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}"} if head is None else {}


def xmodal_driver(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """`xmodal ...` as a user runs it against the cluster: its own working dir and cache."""
    cwd.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-m", "xmodal.cli.main", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done


def bucket_files(uri: str) -> list[str]:
    import pyarrow.fs

    from xmodal.data.storage import filesystem

    fs, root = filesystem(uri)
    return sorted(i.path[len(root):].lstrip("/") for i in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)) if i.type == pyarrow.fs.FileType.File)


@pytest.mark.ray
def test_a_two_node_sweep_reads_and_writes_a_bucket_and_resumes_from_it_alone(tiny_world: Path, bucket: str, s3_server: str, tmp_path: Path):
    """A head (1 CPU: the drivers' side) and a second node (the Train workers) on 127.0.0.1,
    each with its own ports, temp dir and xmodal cache, so no file reaches the driver through a
    shared disk: the packed data and the sweep folder live on the bucket. A 2-trial sweep, each
    trial a 2-worker Train run, leaves every trial's run.json, console.log, the rank-0 worker's
    TensorBoard files and checkpoints (named by URI), the Optuna study and the report on the
    bucket, and nothing in the driver's working dir. `--resume` from a fresh folder and cache, with
    the bucket alone, finds both trials finished and the study complete."""
    import secrets

    import optuna
    import yaml
    from test_cluster import stop_marked

    from xmodal.cli.main import main
    from xmodal.data.storage import filesystem, read_text

    main(["data", "pack", str(tiny_world), "--out", bucket + "/world", "--rows-per-file", "16"])
    marker = secrets.token_hex(8)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "XMODAL_"))}
    # A raylet waits 15 s for its dashboard agent by default: not enough on a busy 2-core machine.
    # Token auth as `ray start --head` turns it on (the head took it from ~/.ray/auth_token, and the
    # second node, without a token, was refused).
    base_env.update(
        s3_env(s3_server), XMODAL_TEST_CLUSTER=marker, PYTHONUNBUFFERED="1", RAY_agent_register_timeout_ms="120000",
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
    )
    temp_dirs = [tempfile.mkdtemp(prefix="xon", dir="/tmp") for _ in range(2)]  # short: Unix socket paths are limited
    try:
        head = start_node(None, {**base_env, "XMODAL_CACHE": str(tmp_path / "head-cache")}, 1, temp_dirs[0])
        # 4 logical CPUs on 2 cores: both trials' 2-worker runs at once, so their start-ups overlap.
        start_node(head, {**base_env, "XMODAL_CACHE": str(tmp_path / "node2-cache")}, 4, temp_dirs[1])
        driver_env = {**base_env, "RAY_ADDRESS": head["gcs"], "RAY_API_SERVER_ADDRESS": head["dashboard"]}
        sweep = {
            "name": "two-node", "method": "supervised", "method_settings": {"input": "sar"},
            "data": {"root": bucket + "/world", "tile_size": 64, "batch_size": 4, "check_tiles": 4},
            "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
            "train": {"epochs": 1, "lr": 0.003}, "scaling": {"num_workers": 2, "cpus_per_worker": 1}, "run": {"panels": 0},
            "sweep": {"search": "optuna", "num_samples": 2, "scheduler": "fifo", "max_concurrent_trials": 2, "trial_cpus": 0,
                      "storage": bucket + "/sweeps", "parameters": {"train.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2}}},
        }
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
        started = time.time()
        done = xmodal_driver(["sweep", str(tmp_path / "sweep.yaml")], {**driver_env, "XMODAL_CACHE": str(tmp_path / "driver1-cache")}, tmp_path / "driver1")
        print(f"two-node sweep: {time.time() - started:.0f} s;", *[line for line in done.stdout.splitlines() if "trials/hour" in line])
        assert "sweep two-node: 2 trials (2 terminated)" in done.stdout, done.stdout[-4000:]
        folder = bucket + "/sweeps/two-node"
        files = bucket_files(folder)
        assert {"sweep.json", "optuna.db", "console.log", "report/report.md"} <= set(files), files
        runs = [f for f in files if f.startswith("results/trial-") and f.endswith("/run.json")]
        assert len(runs) == 2, files
        for run in runs:
            trial = run.split("/")[1]
            assert any(f.startswith(f"results/{trial}/tensorboard/events.out.tfevents") for f in files), (trial, files)
            assert any(f.startswith(f"runs/{trial}/checkpoint_") and f.endswith("/state.pt") for f in files), (trial, files)
            summary = json.loads(read_text(f"{folder}/{run}"))
            assert summary["checkpoint"].startswith(f"{folder}/runs/{trial}/checkpoint_"), summary["checkpoint"]
        assert not [p for p in (tmp_path / "driver1").rglob("*") if p.is_file() and "sweep-reports" not in p.parts], "outputs go to the bucket"

        # Resume from another machine's point of view: a fresh working dir and cache, the bucket alone.
        resumed = xmodal_driver(["sweep", str(tmp_path / "sweep.yaml"), "--resume"], {**driver_env, "XMODAL_CACHE": str(tmp_path / "driver2-cache")}, tmp_path / "driver2")
        assert "sweep two-node: 2 trials (2 terminated)" in resumed.stdout, resumed.stdout[-4000:]
        fs, study_path = filesystem(folder + "/optuna.db")
        study_copy = tmp_path / "study.db"
        with fs.open_input_stream(study_path) as stream:
            study_copy.write_bytes(stream.read())
        study = optuna.load_study(study_name="two-node", storage=f"sqlite:///{study_copy}")
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    finally:
        stop_marked(marker)
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
