"""Every reader feeds the same pipeline and baselines: each fixture streams through Ray Data (the
readers run inside its tasks) and trains one epoch in the plain engine; one of them trains through
Ray Train end to end. (The two engines share their training loop; a Ray Train run per reader costs
about 25 s of start-up each on 2 cores and adds no coverage.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xmodal.data.prepared import write_stats
from xmodal.data.readers import get_reader
from xmodal.engine.config import build_config
from xmodal.engine.runner import run_experiment

pytestmark = pytest.mark.ray

# reader, fixture maker, label layer (None: scene classification), input modality
CASES = [
    ("spacenet6", "fixtures.spacenet6:make_spacenet6", "buildings", "sar"),
    ("so2sat", "fixtures.so2sat:make_so2sat", None, "sar"),
    ("ssl4eo_s12", "fixtures.ssl4eo:make_ssl4eo", "dynamic_world", "sar"),
    ("sen12ms", "fixtures.sen12ms:make_sen12ms", "dfc", "sar"),
    ("dfc2020", "fixtures.dfc2020:make_dfc2020", "dfc", "sar"),
]


def make_fixture(spec: str, root: Path) -> Path:
    module_name, function = spec.split(":")
    module = __import__(module_name, fromlist=[function])
    return getattr(module, function)(root)


def prepared_config(tmp_path: Path, reader_name: str, maker: str, layer: str | None, modality: str):
    """The fixture of a reader, indexed and prepared, and a 1-epoch baseline config on it."""
    root = make_fixture(maker, tmp_path / "raw")
    result = get_reader(reader_name).index(root)
    records = result.manifest.records
    if layer is not None:  # fixtures leave some tiles unlabelled on purpose (e.g. no Dynamic World label)
        records = [r for r in records if layer in json.loads(r["layers"])]
    if not any(r["split"] == "train" for r in records):  # tiny fixtures: train on whatever split exists
        records = [{**r, "split": "train" if i % 2 == 0 else "test"} for i, r in enumerate(records)]
    manifest = result.manifest.with_records(records)
    manifest.save(tmp_path / "prepared")
    write_stats(manifest)
    task = "segmentation" if layer else "classification"
    return build_config(
        {
            "name": f"reader-{reader_name}",
            "method": "supervised",
            "method_settings": {"input": modality, "task": task},
            "data": {"root": str(tmp_path / "prepared"), "mask_layer": layer, "tile_size": 32, "batch_size": 1, "allow_padding": True},
            "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]},
            "train": {"epochs": 1},
            "run": {"storage": str(tmp_path / "runs"), "panels": 1},
        }
    )


def check_result(run) -> None:
    metric = "test/accuracy" if "test/accuracy" in run.metrics else "val/accuracy"
    assert 0.0 <= run.metrics[metric] <= 1.0
    assert (Path(run.results_dir) / "run.json").is_file()


@pytest.mark.parametrize("reader_name, maker, layer, modality", CASES, ids=[c[0] for c in CASES])
def test_each_reader_streams_through_ray_data_and_trains_an_epoch(tmp_path: Path, ray_local, reader_name: str, maker: str, layer: str | None, modality: str):
    from xmodal.data.pipeline import build_dataset
    from xmodal.engine.plain import run_plain
    from xmodal.engine.setup import prepare_run_data

    config = prepared_config(tmp_path, reader_name, maker, layer, modality)
    prepared, spec, _ = prepare_run_data(config)
    rows = build_dataset(prepared, "train").take_all()
    assert len(rows) == len(prepared.records("train"))
    for row in rows:
        assert row["sar"].shape == (spec.sar_channels, 32, 32) and row["optical"].shape == (spec.optical_channels, 32, 32)
        assert np.isfinite(row["sar"]).all() and np.isfinite(row["optical"]).all()
        if layer is not None:
            assert row["mask"].shape == (32, 32)
    (run,) = run_plain(config, log=lambda line: None)
    check_result(run)


def test_a_reader_trains_through_ray_train(tmp_path: Path, ray_local):
    (run,) = run_experiment(prepared_config(tmp_path, *CASES[0]))
    check_result(run)
