"""The Ray-free loop: same method, transforms and metrics as the engine, best-on-validation weights tested."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from xmodal.engine.config import build_config
from xmodal.engine.plain import is_better, train_plain


def test_plain_loop_tests_the_best_validation_epoch(tiny_world: Path, tmp_path: Path):
    config = build_config(
        {
            "name": "plain",
            "method": "supervised",
            "method_settings": {"input": "sar"},
            "data": {"root": str(tiny_world), "tile_size": 64, "batch_size": 4, "mask_layer": "buildings"},
            "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]},
            "train": {"epochs": 3, "lr": 0.01, "schedule": "constant"},
            "run": {"storage": str(tmp_path)},
        }
    )
    lines: list[str] = []
    outcome = train_plain(config, log=lines.append)
    assert len(lines) == 3
    per_epoch = [float(line.rsplit("val/iou ", 1)[1]) for line in lines]
    best = max(range(3), key=lambda i: per_epoch[i])
    assert outcome["best_epoch"] == best + 1
    assert outcome["val/iou"] == pytest.approx(per_epoch[best], abs=5e-5)
    assert 0.0 <= outcome["test/iou"] <= 1.0 and len(outcome["epoch_seconds"]) == 3


def test_is_better_follows_the_metric_mode():
    assert is_better(0.5, None, "max") and is_better(0.6, 0.5, "max") and not is_better(0.4, 0.5, "max")
    assert is_better(0.4, 0.5, "min") and not is_better(0.6, 0.5, "min")


def test_plain_loop_imports_no_ray():
    """Machines without Ray (a lone GPU box) can train with it."""
    code = "import sys, xmodal.engine.plain; bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; assert not bad, bad"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
