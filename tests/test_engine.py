"""The engine end to end on a tiny synthetic world through Ray Train (local Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.data.pipeline import iterate_numpy
from xmodal.data.prepared import DataSettings, prepare_data
from xmodal.engine.config import build_config
from xmodal.engine.runner import run_experiment
from xmodal.errors import XmodalError

pytestmark = pytest.mark.ray


def tiny_config(world: Path, storage: Path, **sections) -> dict:
    config = {
        "name": "tiny",
        "method": "supervised",
        "method_settings": {"input": "optical"},
        "data": {"root": str(world), "tile_size": 64, "batch_size": 2, "mask_layer": "landcover"},
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
        "train": {"epochs": 4, "lr": 0.01, "schedule": "constant"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "run": {"storage": str(storage), "panels": 2},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


def majority_share(world: Path, layer: str) -> float:
    """Accuracy of always predicting the most frequent class of the test split."""
    prepared = prepare_data(DataSettings(root=str(world), tile_size=64, mask_layer=layer))
    counts = np.zeros(256, dtype=np.int64)
    for batch in iterate_numpy(prepared, "test"):
        counts += np.bincount(batch["mask"].ravel(), minlength=256)
    counts[255] = 0
    return counts.max() / counts.sum()


def test_two_worker_landcover_baseline_beats_chance_and_writes_results(tiny_world: Path, tmp_path: Path, ray_local):
    config = build_config(tiny_config(tiny_world, tmp_path))
    (result,) = run_experiment(config)
    # Chance: always predicting the test split's most frequent land-cover class.
    chance = majority_share(tiny_world, "landcover")
    assert result.metrics["test/accuracy"] > chance + 0.05, (result.metrics, chance)
    assert 0 < result.metrics["test/miou"] <= 1
    summary = json.loads((Path(result.results_dir) / "metrics.json").read_text())
    assert summary["method_settings"]["input"] == "optical" and summary["epochs"] == 4
    assert (Path(result.results_dir) / "panels_test.png").stat().st_size > 10_000
    assert list((Path(result.results_dir) / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = Path(result.checkpoint)
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    assert state["epoch"] == 3 and (checkpoint / "exports" / "model.pt").is_file()

    # Relaunching the same run resumes from its last checkpoint instead of retraining.
    again = build_config(tiny_config(tiny_world, tmp_path, train={"epochs": 5, "lr": 0.01, "schedule": "constant"}))
    (resumed,) = run_experiment(again)
    state = torch.load(Path(resumed.checkpoint) / "state.pt", weights_only=False)
    # 20 training tiles over 2 workers in batches of 2: 5 steps per epoch, 4 resumed + 1 new epoch.
    assert state["epoch"] == 4 and state["global_step"] == 5 * 5

    # ...but never on top of a different model.
    clash = build_config(tiny_config(tiny_world, tmp_path, model={"arch": "fpn", "decoder_channels": None}))
    with pytest.raises(XmodalError, match="another method, model or data"):
        run_experiment(clash)
