"""Ray Data pipeline and packed store: fixed shapes, no NaN, aligned pairs, same tiles either way."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from xmodal.data.labels import LabelSettings
from xmodal.data.manifest import Manifest
from xmodal.data.pipeline import build_dataset
from xmodal.data.prepared import DataSettings, prepare_data
from xmodal.data.store import pack
from xmodal.data.torch_data import iterate_numpy, torch_loader
from xmodal.errors import ConfigError, DataError


def settings(root: Path, **kwargs) -> DataSettings:
    return DataSettings(root=str(root), tile_size=64, batch_size=4, mask_layer="buildings", noisy_layer=None, **kwargs)


@pytest.mark.ray
def test_ray_data_batches_follow_the_contract(tiny_world: Path, ray_local):
    prepared = prepare_data(settings(tiny_world))
    train = prepared.records("train")
    rows = build_dataset(prepared, "train").take_all()
    assert len(rows) == len(train)
    assert {int(r["index"]) for r in rows} == {r["index"] for r in train}
    for row in rows:
        assert row["sar"].shape == (2, 64, 64) and row["optical"].shape == (4, 64, 64)
        assert row["sar"].dtype == np.float32 and row["mask"].dtype == np.int64
        assert np.isfinite(row["sar"]).all() and np.isfinite(row["optical"]).all()
        assert set(np.unique(row["mask"])) <= {0, 1, 255}
    # Evaluation batches are deterministic and equal to the plain loader's.
    ray_test = sorted(build_dataset(prepared, "test").take_all(), key=lambda r: int(r["index"]))
    plain = [b for b in iterate_numpy(prepared, "test")]
    plain_sar = np.concatenate([b["sar"] for b in plain])
    np.testing.assert_allclose(np.stack([r["sar"] for r in ray_test]), plain_sar, rtol=1e-6)


def test_torch_loader_and_label_fraction(tiny_world: Path):
    full = prepare_data(settings(tiny_world))
    few = prepare_data(settings(tiny_world, labels=LabelSettings(fraction=0.3)))
    assert len(few.records("train")) == round(0.3 * len(full.records("train")))
    assert {r["tile_id"] for r in few.records("train")} <= {r["tile_id"] for r in full.records("train")}
    batch = next(iter(torch_loader(full, "train")))
    assert tuple(batch["sar"].shape) == (4, 2, 64, 64) and tuple(batch["mask"].shape) == (4, 64, 64)


def test_packed_store_gives_the_same_tiles(tiny_world: Path, tmp_path: Path):
    packed = pack(Manifest.load(tiny_world), tmp_path / "packed", rows_per_file=7)
    assert len({r["sar_path"] for r in packed.records}) > 2
    native = prepare_data(settings(tiny_world))
    from_store = prepare_data(settings(tmp_path / "packed"))
    a = next(iterate_numpy(native, "test"))
    b = next(iterate_numpy(from_store, "test"))
    for key in ("sar", "optical", "mask", "sar_valid"):
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.ray
def test_ray_data_reads_the_packed_store(tiny_world: Path, tmp_path: Path, ray_local):
    pack(Manifest.load(tiny_world), tmp_path / "packed", rows_per_file=7)
    prepared = prepare_data(settings(tmp_path / "packed"))
    rows = sorted(build_dataset(prepared, "test").take_all(), key=lambda r: int(r["index"]))
    plain = np.concatenate([b["mask"] for b in iterate_numpy(prepared, "test")])
    np.testing.assert_array_equal(np.stack([r["mask"] for r in rows]), plain)
    # The labelled stream from whole Parquet parts: repeated to the main stream's length.
    from xmodal.data.pipeline import build_datasets

    few = prepare_data(settings(tmp_path / "packed", labels=LabelSettings(count=2))).for_method(keep_unlabelled=True, views=1)
    datasets = build_datasets(few, ("train",), streams=("labelled",))
    extra, main = datasets["train_labelled"].take_all(), datasets["train"].take_all()
    assert len(extra) == len(main) and {int(r["index"]) for r in extra} == {r["index"] for r in few.labelled_records()}
    assert sum(int(r["labelled"]) for r in main) == 2 and all(r["labelled"] == 1 for r in extra)


def test_data_settings_errors(tiny_world: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="data.mask_layer='roads'"):
        prepare_data(DataSettings(root=str(tiny_world), mask_layer="roads", tile_size=64))
    with pytest.raises(DataError, match="not found"):
        prepare_data(DataSettings(root=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="labels.fraction"):
        LabelSettings(fraction=0.0)


@pytest.mark.ray
def test_ray_datasets_of_a_run_streams_and_evaluation_shares(tiny_world: Path, ray_local):
    """The labelled stream is as long as the main one and holds labelled tiles only; the main stream
    keeps the unlabelled ones with labels withheld; evaluation splits are exact per-worker shares."""
    from xmodal.data.pipeline import build_datasets

    prepared = prepare_data(settings(tiny_world, labels=LabelSettings(count=3))).for_method(keep_unlabelled=True, views=2)
    datasets = build_datasets(prepared, ("train", "val", "test"), world_size=2, streams=("labelled",))
    assert set(datasets) == {"train", "train_labelled", "val@0", "val@1", "test@0", "test@1"}
    main, extra = datasets["train"].take_all(), datasets["train_labelled"].take_all()
    assert len(main) == len(extra) == len(prepared.records("train"))
    assert main[0]["sar"].shape == (2, 2, 64, 64) and main[0]["mask"].shape == (2, 64, 64)  # two views
    assert all(r["labelled"] == 1 for r in extra) and {int(r["index"]) for r in extra} == {r["index"] for r in prepared.labelled_records()}
    hidden = [r for r in main if r["labelled"] == 0]
    assert len(hidden) == len(main) - 3 and all((r["mask"] == 255).all() and int(r["label"]) == -1 for r in hidden)
    for split in ("val", "test"):
        shares = [{int(r["index"]) for r in datasets[f"{split}@{k}"].take_all()} for k in range(2)]
        assert not shares[0] & shares[1] and shares[0] | shares[1] == {r["index"] for r in prepared.records(split)}
        assert datasets[f"{split}@0"].take(1)[0]["sar"].shape == (2, 64, 64), "evaluation: one view"


def _decode_tasks(dataset) -> int:
    """Tasks the decode stage of an executed dataset ran (from Ray Data's stats)."""
    import re

    lines = [line for line in dataset.stats().splitlines() if "_decode" in line and "tasks executed" in line]
    assert len(lines) == 1, dataset.stats()
    return int(re.search(r"(\d+) tasks executed", lines[0]).group(1))


def test_block_decode_equals_tile_decode(tiny_world: Path):
    """A decode task's block (one GDAL environment for all its files) gives exactly the tiles the
    per-tile decoder gives, field by field and bit for bit."""
    from xmodal.data.pipeline import _decode_batch
    from xmodal.data.transforms import stack

    prepared = prepare_data(settings(tiny_world))
    records = prepared.records("train")[:6]
    # As Ray Data hands a block of from_items records to the task: one numpy column per field.
    batch = {key: np.array([r[key] for r in records]) for key in records[0]}
    got = _decode_batch(batch, prepared)
    decoder = prepared.decoder()
    expected = stack([decoder(r) for r in records])
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(got[key], expected[key])


@pytest.mark.ray
def test_every_block_is_one_decode_task(tiny_world: Path, ray_local):
    """9 blocks were decoded by 5 uneven tasks when map_batches bundled a block smaller than its
    batch size with the next: each block is now one task, so the tasks are even."""
    prepared = prepare_data(settings(tiny_world, blocks=6, cache="never"))
    assert len(prepared.records("train")) == 20  # blocks of 4, 4, 3, 3, 3, 3 tiles: a 3 was always bundled
    dataset = build_dataset(prepared, "train")
    rows = dataset.take_all()
    assert len(rows) == len(prepared.records("train"))
    assert _decode_tasks(dataset) == 6


@pytest.mark.ray
def test_packed_store_is_decoded_in_parallel_and_equals_the_geotiffs(tiny_world: Path, tmp_path: Path, ray_local):
    """One Parquet part was read, decoded and prepared in one task (one core for a whole part);
    its rows are now decoded in blocks of their own, and give the GeoTIFF path's tiles exactly."""
    pack(Manifest.load(tiny_world), tmp_path / "packed", rows_per_file=256)
    packed = prepare_data(settings(tmp_path / "packed", blocks=4, cache="never"))
    assert len({r["sar_path"] for r in packed.records("train")}) == 1
    dataset = build_dataset(packed, "train")
    assert len(dataset.take_all()) == len(packed.records("train"))
    assert _decode_tasks(dataset) == 4
    native = prepare_data(settings(tiny_world, cache="never"))
    # The stores number their tiles apart (a packed manifest lists train first): match by tile id.
    from_store = sorted(build_dataset(packed, "test").take_all(), key=lambda r: packed.tile_id(int(r["index"])))
    from_tiffs = sorted(build_dataset(native, "test").take_all(), key=lambda r: native.tile_id(int(r["index"])))
    assert [packed.tile_id(int(r["index"])) for r in from_store] == [native.tile_id(int(r["index"])) for r in from_tiffs]
    for key in ("sar", "optical", "mask", "sar_valid", "optical_valid", "label"):
        np.testing.assert_array_equal(np.stack([r[key] for r in from_store]), np.stack([r[key] for r in from_tiffs]))


@pytest.mark.ray
def test_decode_workers_are_warmed_once_per_ray_session(tiny_world: Path, ray_local):
    import ray

    from xmodal.data import pipeline

    prepared = prepare_data(settings(tiny_world, cache="never"))
    build_dataset(prepared, "train")
    session = pipeline.warm_key()
    warmed = pipeline._WARMED[session]
    pids = ray.get(warmed, timeout=120)  # the imports ran, in distinct workers
    assert len(warmed) >= 1 and all(isinstance(pid, int) for pid in pids)
    build_dataset(prepared, "val", train=False)
    assert pipeline._WARMED[session] is warmed


@pytest.mark.ray
def test_a_train_runs_first_decode_tasks_run_in_the_warmed_workers(tiny_world: Path, tmp_path: Path, ray_local, monkeypatch):
    """Ray runs a task only in a worker of the same runtime environment, and a Train run's Ray Data
    tasks inherit its controller's: workers warmed in the driver's were never used and epoch 1's
    decoding waited for new processes. Warmed in ``train_task_env()``, they decode epoch 1."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from xmodal.data import pipeline
    from xmodal.engine.session import train_task_env

    # An environment of this test's own (Train propagates this variable to its processes), so no
    # worker left idle by an earlier test's run can take the tasks.
    monkeypatch.setenv("RAY_TRAIN_COLLECTIVE_WARN_INTERVAL_S", f"{60 + (time.time_ns() % 10**6) / 10**7}")
    log = tmp_path / "decode-pids.txt"
    decode = pipeline._decode_batch

    def recording_decode(batch, prepared):  # a closure: Ray pickles it by value into the task
        with open(log, "a") as out:
            out.write(f"{os.getpid()}\n")
        return decode(batch, prepared)

    monkeypatch.setattr(pipeline, "_decode_batch", recording_decode)
    task_env = train_task_env()
    assert task_env is not None and task_env["env_vars"]["RAY_TRAIN_COLLECTIVE_WARN_INTERVAL_S"].startswith("60")
    prepared = prepare_data(settings(tiny_world, cache="never"))
    dataset = build_dataset(prepared, "train", task_env=task_env)
    warmed = set(ray.get(pipeline._WARMED[pipeline.warm_key(task_env)], timeout=120))

    def one_epoch() -> None:
        for _ in ray.train.get_dataset_shard("train").iter_batches(batch_size=4):
            pass

    TorchTrainer(
        one_epoch, scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}), datasets={"train": dataset},
        run_config=ray.train.RunConfig(name="warmed", storage_path=str(tmp_path / "runs")),
    ).fit()
    decoders = {int(line) for line in log.read_text().split()}
    assert decoders and decoders <= warmed, (decoders, warmed)


@pytest.mark.ray
def test_a_broken_packed_part_is_named(tiny_world: Path, tmp_path: Path, ray_local):
    pack(Manifest.load(tiny_world), tmp_path / "packed", rows_per_file=256)
    prepared = prepare_data(settings(tmp_path / "packed", cache="never"))
    part = tmp_path / "packed" / prepared.records("test")[0]["sar_path"]
    part.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=f"{part.name}: cannot be read as a packed Parquet part"):
        build_dataset(prepared, "test").take_all()


@pytest.mark.ray
def test_a_new_execution_knows_its_resources_at_its_first_query(ray_local):
    """Ray Data's coordinator client answers its first query from an empty cache: without
    :mod:`xmodal.data.ray_fixes` every execution (every epoch) ran its first second with a zero
    budget, one task at a time. The executor's own calls, in the same order."""
    from ray.data._internal.cluster_autoscaler.base_autoscaling_coordinator import (
        STANDARD_RESOURCE_TYPES,
    )
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        DefaultAutoscalingCoordinator,
    )

    import xmodal.data.pipeline  # noqa: F401 - installs the fix, as it does in every Ray process

    client = DefaultAutoscalingCoordinator("xmodal-test-first-query")
    try:
        client.request_resources(resources=[], expire_after_s=60, request_remaining=STANDARD_RESOURCE_TYPES)
        reserved = client.get_reserved_resources()
        assert sum(resources.get("CPU", 0) for resources in reserved.values()) > 0, reserved
    finally:
        client.cancel_request()
