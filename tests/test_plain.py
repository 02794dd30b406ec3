"""The Ray-free loop: same method, transforms and metrics as the engine, best-on-validation weights tested."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from xmodal.engine.config import build_config
from xmodal.engine.plain import run_plain
from xmodal.methods.base import is_better


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
    (result,) = run_plain(config, log=lines.append)
    epochs = [line for line in lines if "] epoch " in line]
    assert len(epochs) == 3
    printed = [float(line.split("val/iou ", 1)[1].split()[0]) for line in epochs]
    per_epoch = [row["val/iou"] for row in result.summary["history"]]  # exact: printed values may tie when rounded
    assert printed == pytest.approx(per_epoch, abs=5e-5)
    best = max(range(3), key=lambda i: (per_epoch[i], -i))  # the first of equal epochs stays best
    assert result.summary["tested_epoch"] == best + 1
    assert result.metrics["val/iou"] == pytest.approx(per_epoch[best], abs=5e-5)
    assert 0.0 <= result.metrics["test/iou"] <= 1.0 and len(result.summary["history"]) == 3
    # When it ran, how long set-up took before the first step, and with what.
    summary = result.summary
    started, ended = (datetime.fromisoformat(summary[k]) for k in ("started", "ended"))
    assert started.tzinfo is not None and 0 <= (ended - started).total_seconds() <= summary["wall_seconds"] + 1
    assert 0 < summary["startup_seconds"] < summary["wall_seconds"]
    assert summary["versions"]["torch"] == torch.__version__.split("+")[0]  # the distribution's version, without the local build tag
    assert set(summary["versions"]) == {"python", "xmodal", "torch", "ray"} and summary["versions"]["xmodal"]
    # The tested checkpoint is the best epoch's; the last one is kept beside it.
    state = torch.load(Path(result.checkpoint) / "state.pt", weights_only=True)
    assert state["epoch"] + 1 == best + 1 and (Path(result.last_checkpoint) / "exports" / "model.pt").is_file()
    # Relaunching resumes from checkpoint_last: nothing to train, the same test result.
    (again,) = run_plain(config, log=lines.append)
    assert any("resumed from epoch 3" in line for line in lines) and again.metrics["test/iou"] == pytest.approx(result.metrics["test/iou"])
    assert again.summary["startup_seconds"] is None  # it trained no step


def test_is_better_follows_the_metric_mode():
    assert is_better(0.5, None, "max") and is_better(0.6, 0.5, "max") and not is_better(0.4, 0.5, "max")
    assert is_better(0.4, 0.5, "min") and not is_better(0.6, 0.5, "min")


def test_plain_loop_imports_no_ray():
    """Machines without Ray (a lone GPU box) can train with it."""
    code = "import sys, xmodal.engine.plain; bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; assert not bad, bad"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
