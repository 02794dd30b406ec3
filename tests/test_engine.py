"""The engine end to end on a tiny synthetic world through Ray Train (local Ray)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal.data.manifest import Manifest
from xmodal.data.torch_data import iterate_numpy
from xmodal.data.prepared import DataSettings, prepare_data, write_stats
from xmodal.data.splits import check_no_leakage, split_by_blocks
from xmodal.engine.config import build_config
from xmodal.engine.runner import run_experiment
from xmodal.errors import XmodalError

pytestmark = pytest.mark.ray


def tiny_config(world: Path, storage: Path, **sections) -> dict:
    config = {
        "name": "tiny",
        "method": "supervised",
        "method_settings": {"input": "optical"},
        # No augmentation: the test checks that the engine learns, not that jitter helps.
        "data": {
            "root": str(world), "tile_size": 64, "batch_size": 2, "mask_layer": "landcover",
            "augment": {"geometric": "none", "photometric": False},
        },
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
        "train": {"epochs": 10, "lr": 0.005, "schedule": "constant"},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "run": {"storage": str(storage), "panels": 2, "eval_every": 5},
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


def block_split_world(world: Path, out: Path) -> Path:
    """The tiny world re-split by ground blocks inside its regions: held-out tiles then share the
    training regions' class mix, so majority-class chance is a fair bar for a 50-step model
    (a whole held-out region can have a class mix no training region shows)."""
    manifest = Manifest.load(world)
    records = split_by_blocks(manifest.records, block_size=256.0, val_fraction=0.2, test_fraction=0.3, seed=1)
    check_no_leakage(records)
    prepared = manifest.with_records(records)
    prepared.info.data_root = str(world)
    prepared.save(out)
    write_stats(prepared)
    return out


def test_two_worker_landcover_baseline_beats_chance_and_writes_results(tiny_world: Path, tmp_path: Path, ray_local):
    tiny_world = block_split_world(tiny_world, tmp_path / "world")
    config = build_config(tiny_config(tiny_world, tmp_path))
    (result,) = run_experiment(config)
    # Chance: always predicting the test split's most frequent land-cover class.
    chance = majority_share(tiny_world, "landcover")
    assert result.metrics["test/accuracy"] > chance + 0.05, (result.metrics, chance)
    assert 0 < result.metrics["test/miou"] <= 1
    summary = json.loads((Path(result.results_dir) / "run.json").read_text())
    assert summary["method_settings"]["input"] == "optical" and summary["epochs"] == 10
    assert (Path(result.results_dir) / "panels_test.png").stat().st_size > 10_000
    assert list((Path(result.results_dir) / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = Path(result.last_checkpoint)
    state = torch.load(checkpoint / "state.pt", weights_only=False)
    assert state["epoch"] == 9 and (checkpoint / "exports" / "model.pt").is_file()
    # Beside the exports, what `xmodal predict` needs to prepare a scene as training did.
    record = json.loads((checkpoint / "inference.json").read_text())
    assert record["mask_layer"] == config.data.mask_layer and record["stats"]["tiles"] > 0 and record["tile_size"] == config.data.tile_size
    # The checkpoint later phases receive is the one that was tested.
    tested = torch.load(Path(result.checkpoint) / "state.pt", weights_only=False)
    assert tested["epoch"] + 1 == summary["tested_epoch"]
    first_steps = state["global_step"]
    # The test split is scored with the weights that did best on validation (epoch 5 or 10).
    best = state["best"]
    assert summary["tested_epoch"] == best["epoch"] in (5, 10)
    assert {k: v for k, v in result.metrics.items() if k.startswith("val/")} == best["val"]

    # A kill between a checkpoint folder reaching storage and Ray recording it: an epoch-11
    # checkpoint Ray does not know (here a copy of epoch 10's, one epoch further on), and a
    # checkpoint cut short while being written.
    per_epoch = first_steps // 10
    stray = checkpoint.with_name("checkpoint_2999-01-01_00-00-00.000000")
    shutil.copytree(checkpoint, stray)
    torch.save({**state, "epoch": 10, "global_step": first_steps + per_epoch}, stray / "state.pt")
    damaged = checkpoint.with_name("checkpoint_2999-01-01_00-00-01.000000")
    shutil.copytree(checkpoint, damaged)
    (damaged / "state.pt").write_bytes((damaged / "state.pt").read_bytes()[:1000])
    # Relaunching the same run resumes from the last complete checkpoint: the adopted one.
    again = build_config(tiny_config(tiny_world, tmp_path, train={"epochs": 12, "lr": 0.005, "schedule": "constant"}))
    (resumed,) = run_experiment(again)
    state = torch.load(Path(resumed.last_checkpoint) / "state.pt", weights_only=False)
    # 11 epochs resumed + 1 new one, each with the same number of steps.
    assert state["epoch"] == 11 and state["global_step"] == 12 * per_epoch
    assert not stray.exists() and not damaged.exists()  # adopted then superseded; cleaned
    # The best epoch survives the resume (its weights come back from Ray's kept checkpoint).
    assert resumed.summary["tested_epoch"] == state["best"]["epoch"] >= best["epoch"]
    assert {k: v for k, v in resumed.metrics.items() if k.startswith("val/")} == state["best"]["val"]
    # TensorBoard keeps every validation point across the resume (none purged): from the first
    # validation (epoch 5) on, every epoch logs the last validated metrics.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(resumed.results_dir) / "tensorboard")).Reload()
    assert sorted({e.step for e in events.Scalars("val/loss")}) == [per_epoch * k for k in range(5, 11)] + [12 * per_epoch]

    # ...but never on top of a different model: the refusal lists what changed.
    clash = build_config(tiny_config(tiny_world, tmp_path, model={"arch": "fpn", "decoder_channels": None}))
    with pytest.raises(XmodalError, match=r"with other settings \(model.arch: 'unet' -> 'fpn'; model.decoder_channels: .* -> None\)"):
        run_experiment(clash)
