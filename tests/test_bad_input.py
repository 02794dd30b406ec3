"""Bad input, as a user meets it on the command line: one case per row, each exit 2 with one line
naming the file or key, the value and what was expected, and no traceback.

A case is a change to a copy of a small generated world (or none), the overrides of the run, and
the message expected; a new case is one more row.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from specs import small_segmentation_run

from xmodal.cli.main import main
from xmodal.engine.training import check_finite_losses
from xmodal.errors import TrainingError


def _set_stat(modality: str, band: int, field: str, value: float) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        path = root / "stats.json"
        stats = json.loads(path.read_text())
        stats[modality][band][field] = value
        path.write_text(json.dumps(stats))  # json writes NaN / Infinity, as a broken tool would

    return change


CASES = [
    # case, change to the world, overrides, expected message
    ("stats: NaN mean", _set_stat("sar", 0, "mean", float("nan")), [], r"stats.json: sar band 'VV' has mean=nan; expected a finite number"),
    ("stats: infinite p99", _set_stat("optical", 2, "p99", float("inf")), [], r"stats.json: optical band '\w+' has p99=inf; expected a finite number"),
    ("stats: zero std", _set_stat("sar", 1, "std", 0.0), [], r"stats.json: sar band 'VH' has std=0.0; expected > 0"),
    ("stats: negative std", _set_stat("optical", 0, "std", -1.0), [], r"stats.json: optical band '\w+' has std=-1.0; expected > 0"),
]


@pytest.mark.parametrize("case, change, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_before_training_with_one_line(tiny_world: Path, tmp_path: Path, capsys, case, change, overrides, message):
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    change(root)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_segmentation_run("bad", str(root), str(tmp_path / "runs"), input="sar")))
    code = main(["run", str(config), "--plain", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    assert not list((tmp_path / "runs").rglob("checkpoint_*"))  # refused before any training


def test_a_non_finite_loss_stops_training_naming_the_step_and_tiles():
    batch = {"index": torch.tensor([4, 17])}
    check_finite_losses({"loss": 0.3, "accuracy": float("nan")}, 1, 10, batch)  # a NaN metric is not a loss
    with pytest.raises(TrainingError, match=r"non-finite training loss \(loss=nan\) at epoch 2, step 11; batch tiles .* \[4, 17\]"):
        check_finite_losses({"loss": float("nan")}, 2, 11, batch)
    with pytest.raises(TrainingError, match=r"loss/sw=inf"):
        check_finite_losses({"loss": 1.0, "loss/sw": float("inf")}, 1, 1, batch)


class _RunsCode:
    """Unpickling this calls ``Path.touch`` on a marker file: code run by a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_or_export_that_would_run_code_is_refused_without_running_it(tmp_path: Path):
    from xmodal.errors import DataError
    from xmodal.methods.exports import EXPORTS_DIR, read_export, read_torch_file

    marker = tmp_path / "code-ran"
    state = tmp_path / "state.pt"
    torch.save({"method": {"networks": {}}, "epoch": 0, "payload": _RunsCode(marker)}, state)
    with pytest.raises(DataError, match=r"state.pt: holds objects other than tensors and plain values, refused"):
        read_torch_file(state)
    (tmp_path / EXPORTS_DIR).mkdir()
    torch.save({"format": 2, "state_dict": {}, "recipe": _RunsCode(marker)}, tmp_path / EXPORTS_DIR / "model.pt")
    with pytest.raises(DataError, match=r"model.pt: holds objects other than tensors"):
        read_export(tmp_path, "model")
    assert not marker.exists()
    # What xmodal writes itself loads: tensors, nested dicts, lists and plain values.
    torch.save({"method": {"networks": {"m": {"w": torch.ones(2)}}}, "metrics": {"val/iou": 0.5, "epoch": 1}, "best": None}, state)
    assert read_torch_file(state)["metrics"]["val/iou"] == 0.5


def test_metrics_files_hold_strict_json_a_nan_metric_is_null():
    from xmodal.settings import json_safe

    metrics = {"val/iou": float("nan"), "per_class": [float("inf"), 0.5], "epoch": 3, "nested": {"x": float("-inf")}}
    text = json.dumps(json_safe(metrics), allow_nan=False)
    assert json.loads(text) == {"val/iou": None, "per_class": [None, 0.5], "epoch": 3, "nested": {"x": None}}
