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

import numpy as np
import pytest
import rasterio
import rasterio.crs
import torch
import yaml
from affine import Affine
from specs import small_segmentation_run

from xmodal.cli.main import main
from xmodal.engine.training import check_finite_losses
from xmodal.errors import TrainingError


# A change to a copy of the world; it may return extra overrides (paths inside the copy).
Change = Callable[[Path], "list[str] | None"]
TILE = "r01_dense_core/r01_t0003"  # a training tile of the tiny world


def _set_stat(modality: str, band: int, field: str, value: float) -> Change:
    def change(root: Path) -> None:
        path = root / "stats.json"
        stats = json.loads(path.read_text())
        stats[modality][band][field] = value
        path.write_text(json.dumps(stats))  # json writes NaN / Infinity, as a broken tool would

    return change


def _truncate(name: str) -> Change:
    def change(root: Path) -> None:
        path = root / TILE / name
        path.write_bytes(path.read_bytes()[:500])

    return change


def _random_bytes(root: Path) -> None:
    (root / TILE / "optical.tif").write_bytes(np.random.default_rng(0).bytes(20_000))


def _rewrite_raster(name: str, edit: Callable[[dict, np.ndarray], tuple[dict, np.ndarray]]) -> Change:
    def change(root: Path) -> None:
        path = root / TILE / name
        with rasterio.open(path) as source:
            profile, data = source.profile, source.read()
        profile, data = edit(dict(profile), data)
        with rasterio.open(path, "w", **profile) as target:
            target.write(data)

    return change


def _one_band(profile: dict, data: np.ndarray) -> tuple[dict, np.ndarray]:
    return {**profile, "count": 1}, data[:1]


def _other_crs(profile: dict, data: np.ndarray) -> tuple[dict, np.ndarray]:
    return {**profile, "crs": rasterio.crs.CRS.from_epsg(32633)}, data


def _shifted(profile: dict, data: np.ndarray) -> tuple[dict, np.ndarray]:
    t = profile["transform"]
    return {**profile, "transform": Affine(t.a, t.b, t.c + 500, t.d, t.e, t.f)}, data


def _dataset_json(edit: Callable[[str], str | bytes]) -> Change:
    def change(root: Path) -> None:
        path = root / "dataset.json"
        text = edit(path.read_text())
        path.write_bytes(text if isinstance(text, bytes) else text.encode())

    return change


def _storage_under_a_file(root: Path) -> list[str]:
    (root / "a-file").write_text("not a folder")
    return [f"run.storage={root / 'a-file' / 'runs'}"]


def _overrides(*items: str) -> Change:
    return lambda root: list(items)


CASES = [
    # case, change to the world (returns extra overrides), expected one-line message
    ("stats: NaN mean", _set_stat("sar", 0, "mean", float("nan")), r"stats.json: sar band 'VV' has mean=nan; expected a finite number"),
    ("stats: infinite p99", _set_stat("optical", 2, "p99", float("inf")), r"stats.json: optical band '\w+' has p99=inf; expected a finite number"),
    ("stats: zero std", _set_stat("sar", 1, "std", 0.0), r"stats.json: sar band 'VH' has std=0.0; expected > 0"),
    ("stats: negative std", _set_stat("optical", 0, "std", -1.0), r"stats.json: optical band '\w+' has std=-1.0; expected > 0"),
    ("tile: truncated GeoTIFF", _truncate("sar.tif"), rf"{TILE}/sar.tif: cannot be read as a GeoTIFF"),
    ("tile: random bytes", _random_bytes, rf"{TILE}/optical.tif: cannot be read as a GeoTIFF"),
    ("tile: wrong band count", _rewrite_raster("sar.tif", _one_band), rf"{TILE}/sar.tif: has 1 band\(s\), expected 2"),
    ("pair: CRS mismatch", _rewrite_raster("optical.tif", _other_crs), r"sar.tif and .*optical.tif: CRS differ \(EPSG:\d+ vs EPSG:32633\)"),
    ("pair: bounds mismatch", _rewrite_raster("optical.tif", _shifted), r"sar.tif and .*optical.tif: bounds differ .* by more than 0.5 px"),
    ("dataset.json: unknown reader", _dataset_json(lambda t: t.replace('"reader": "xmodal"', '"reader": "nope"')), r"dataset.json: reader='nope' is not a known reader; expected one of \[.*'xmodal'\]"),
    ("dataset.json: binary", _dataset_json(lambda t: bytes(range(128, 256))), r"dataset.json: not a text file \(byte 0 is not UTF-8\); expected JSON"),
    ("model.encoder unknown", _overrides("model.encoder=resnet1800"), r"model.encoder='resnet1800' is not an smp encoder; closest: \['resnet18'"),
    ("model.encoder unknown timm", _overrides("model.encoder=tu-resnet1800"), r"model.encoder='tu-resnet1800': timm has no model 'resnet1800'"),
    ("model.arch unknown", _overrides("model.arch=unetx"), r"model.arch='unetx' is not an architecture; expected one of \[.*'unet'"),
    ("model: depth vs decoder", _overrides("model.encoder_depth=4"), r"decoder_channels=\(16, 8, 8\): unet needs one width per decoder block, i.e. encoder_depth=4 values, got 3"),
    ("data.tile_size > tiles", _overrides("data.tile_size=128"), r"data.tile_size=128 is larger than the 64 px tiles of dataset 'synthetic' \(.*dataset.json\); expected <= 64, or data.allow_padding: true to pad them with no-data \(75% of each tile\)"),
    ("train.lr negative", _overrides("train.lr=-0.01"), r"train.lr=-0.01; expected > 0"),
    ("data.check_tiles negative", _overrides("data.check_tiles=-1"), r"data.check_tiles=-1; expected >= 0"),
    ("run.storage under a file", _storage_under_a_file, r"run.storage='.*a-file/runs': .*a-file is a file, not a folder; expected a folder xmodal can write"),
]


def _run(tiny_world: Path, tmp_path: Path, change: Change, *options: str) -> tuple[int, str]:
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    overrides = change(root) or []
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_segmentation_run("bad", str(root), str(tmp_path / "runs"), input="sar")))
    return main(["run", str(config), *overrides, *options]), str(root)


def _one_line(err: str, message: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(message, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("case, change, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_ray_starts_with_one_line(tiny_world: Path, tmp_path: Path, capsys, monkeypatch, case, change, message):
    """A Ray run: each case is refused in the driver by the pre-flight, before Ray is started."""
    import xmodal.engine.runner as runner

    monkeypatch.setattr(runner, "ensure_ray", lambda config: pytest.fail("Ray was started"))
    code, _ = _run(tiny_world, tmp_path, change)
    err = capsys.readouterr().err
    assert code == 2, err
    _one_line(err, message)
    assert not list((tmp_path / "runs").rglob("checkpoint_*"))


@pytest.mark.parametrize("case, change, message", CASES[:6], ids=[c[0] for c in CASES[:6]])
def test_the_plain_engine_runs_the_same_preflight(tiny_world: Path, tmp_path: Path, capsys, case, change, message):
    code, _ = _run(tiny_world, tmp_path, change, "--plain")
    assert code == 2
    _one_line(capsys.readouterr().err, message)
    assert not (tmp_path / "runs" / "bad" / "tensorboard").exists()  # refused before training began


def test_a_non_finite_loss_stops_the_run_naming_step_and_tiles(tiny_world: Path, tmp_path: Path, capsys):
    code, _ = _run(tiny_world, tmp_path, _overrides("train.lr=1e30"), "--plain")
    assert code == 2
    _one_line(capsys.readouterr().err, r"non-finite training loss \(loss=nan.*\) at epoch 1, step \d+; batch tiles \['r\d\d_t\d{4}'")
    assert not list((tmp_path / "runs").rglob("checkpoint_*"))  # nothing NaN was saved
    # The report lists the failed run with its error, beside a run stopped after epoch 2.
    stopped = tmp_path / "runs" / "stopped" / "checkpoint_last"
    stopped.mkdir(parents=True)
    (stopped / "metrics.json").write_text(json.dumps({"epoch": 2, "train/loss": 0.5}))
    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs")]) == 0
    report = (tmp_path / "runs" / "report.md").read_text()
    assert "0 finished run(s), 2 failed or unfinished." in report
    assert re.search(r"\| bad \| failed \| none \| non-finite training loss \(loss=nan", report), report
    assert "| stopped | unfinished | epoch 2 |  |" in report and "relaunch the command that started it" in report


def test_a_large_dataset_is_checked_by_an_evenly_spread_sample(tiny_world: Path, tmp_path: Path):
    from xmodal.engine.config import load_config
    from xmodal.engine.preflight import check_decodes
    from xmodal.engine.setup import prepare_run_data

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_segmentation_run("ok", str(tiny_world), str(tmp_path / "runs"))))
    prepared, _, _ = prepare_run_data(load_config(config, ["data.check_tiles=7"]))
    assert check_decodes(prepared) == (7, 40)
    prepared, _, _ = prepare_run_data(load_config(config, ["data.check_tiles=0"]))
    assert check_decodes(prepared) == (0, 40)


def test_a_non_finite_loss_stops_training_naming_the_step_and_tiles():
    batch = {"index": torch.tensor([4, 17])}
    check_finite_losses({"loss": 0.3, "accuracy": float("nan")}, 1, 10, batch)  # a NaN metric is not a loss
    with pytest.raises(TrainingError, match=r"non-finite training loss \(loss=nan\) at epoch 2, step 11; batch tiles .* \[4, 17\]"):
        check_finite_losses({"loss": float("nan")}, 2, 11, batch)
    with pytest.raises(TrainingError, match=r"batch tiles \['t4', 't17'\]"):
        check_finite_losses({"loss": float("nan")}, 2, 11, batch, tile_id=lambda i: f"t{i}")
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


# ----------------------------------------------------------------------------- faults


class _RayTaskErrorLike(Exception):
    """As Ray passes a task's error on: its own text first (a traceback), the original in ``cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray::MapBatches(_decode_batch)() (pid=1)\nTraceback (most recent call last):\n  File x\n" + str(cause))
        self.cause = cause


class _UserExceptionLike(Exception):
    def __init__(self, base: BaseException) -> None:
        super().__init__("Traceback (most recent call last): ...")
        self._base_exc = base


class _WorkerGroupErrorLike(Exception):
    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors:\n[Rank 0 Error Snippet]: ...")
        self.worker_failures = failures


def test_the_error_line_is_the_permanent_cause_however_ray_wraps_it():
    from xmodal.errors import DataError, error_line, permanent_cause

    cause = DataError("/d/t/sar.tif: cannot be read as a GeoTIFF (truncated)\nTo change retry attempts, configure ...")
    wrapped = _WorkerGroupErrorLike({1: RuntimeError("collective aborted"), 0: _UserExceptionLike(_RayTaskErrorLike(cause))})
    assert permanent_cause(wrapped) is cause
    assert error_line(wrapped) == "/d/t/sar.tif: cannot be read as a GeoTIFF (truncated)"
    # Nothing permanent: the innermost error, by type, without Ray's traceback lines.
    lost = _WorkerGroupErrorLike({0: _UserExceptionLike(ConnectionResetError("peer closed"))})
    assert permanent_cause(lost) is None
    assert error_line(lost) == "ConnectionResetError: peer closed"


def test_ray_train_does_not_retry_an_error_that_would_come_back():
    import ray.train
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    from xmodal.engine.runner import NoRetryOfPermanentErrors
    from xmodal.errors import ConfigError

    policy = NoRetryOfPermanentErrors(ray.train.FailureConfig(max_failures=2))
    permanent = ray.train.WorkerGroupError("failed", {0: UserExceptionWithTraceback(ConfigError("model.encoder='x': ..."), "tb")})
    lost_node = ray.train.WorkerGroupError("failed", {0: UserExceptionWithTraceback(RuntimeError("node died"), "tb")})
    assert policy.make_decision(permanent) == FailureDecision.RAISE
    assert [policy.make_decision(lost_node) for _ in range(3)] == [FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RAISE]
    # CUDA out of memory comes back on the same GPU share: the run ends at once (a sweep records the trial as failed).
    import torch

    policy = NoRetryOfPermanentErrors(ray.train.FailureConfig(max_failures=2))
    out_of_memory = ray.train.WorkerGroupError("failed", {1: UserExceptionWithTraceback(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "tb")})
    assert policy.make_decision(out_of_memory) == FailureDecision.RAISE


def test_a_sweep_trial_that_failed_permanently_is_not_run_again_by_tunes_retries(tmp_path: Path, monkeypatch):
    import ray.tune

    import xmodal.tune.sweep as sweep
    from xmodal.errors import DataError, RunFailedError

    calls = []

    def failing_trial(tune_config, plan, trial_id):
        calls.append(trial_id)
        raise RunFailedError("run 'trial-t1' failed: /d/sar.tif: cannot be read as a GeoTIFF", permanent=True) from DataError("/d/sar.tif: cannot be read")

    monkeypatch.setattr(sweep, "_sweep_trial", failing_trial)
    monkeypatch.setattr(ray.tune, "get_context", lambda: type("Context", (), {"get_trial_id": staticmethod(lambda: "t1")})())
    plan = sweep.TrialPlan(spec=None, sweep_dir=str(tmp_path), results_root=str(tmp_path / "results"))  # type: ignore[arg-type]
    with pytest.raises(RunFailedError):
        sweep.sweep_trial({}, plan)
    with pytest.raises(RunFailedError, match=r"^/d/sar.tif: cannot be read$"):  # Tune's retry: the same error, at once
        sweep.sweep_trial({}, plan)
    assert calls == ["t1"]
    # A lost worker is retried as before.
    monkeypatch.setattr(sweep, "_sweep_trial", lambda *args: (calls.append("t2"), (_ for _ in ()).throw(RunFailedError("node lost")))[1])
    monkeypatch.setattr(ray.tune, "get_context", lambda: type("Context", (), {"get_trial_id": staticmethod(lambda: "t2")})())
    for _ in range(2):
        with pytest.raises(RunFailedError, match="node lost"):
            sweep.sweep_trial({}, plan)
    assert calls == ["t1", "t2", "t2"]


def _fake_ray_run(folder: Path, tracked: dict[str, int], others: dict[str, int | None]) -> None:
    """A Ray Train run folder: checkpoints Ray's snapshot records (name -> epoch), and others
    it does not (epoch, or None for one cut short while being written)."""
    folder.mkdir(parents=True)
    for name, epoch in {**tracked, **others}.items():
        (folder / name).mkdir()
        if epoch is None:
            (folder / name / "state.pt").write_bytes(b"PK\x03\x04 cut short")
        else:
            torch.save({"epoch": epoch - 1, "global_step": 3 * epoch, "method": {}, "fingerprint": {}}, folder / name / "state.pt")
    results = [{"checkpoint_dir_name": name, "metrics": {"epoch": epoch}} for name, epoch in tracked.items()]
    snapshot = {"ray_version": "2.60.0", "checkpoint_results": results, "latest_checkpoint_result": results[-1] if results else None}
    (folder / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))


def _run_config(tmp_path: Path):
    from xmodal.engine.config import build_config

    return build_config(small_segmentation_run("r", str(tmp_path / "world"), str(tmp_path / "runs")))


def test_a_checkpoint_ray_never_recorded_is_adopted_and_damaged_ones_are_cleaned(tmp_path: Path):
    from xmodal.engine.runner import reconcile_checkpoints

    config = _run_config(tmp_path)
    folder = tmp_path / "runs" / "r"
    _fake_ray_run(folder, {"checkpoint_a": 1, "checkpoint_b": 2}, {"checkpoint_c": 3, "checkpoint_d": None, "checkpoint_old": 1})
    lines: list[str] = []
    assert reconcile_checkpoints(config, lines.append) == str(folder / "checkpoint_c")
    assert sorted(p.name for p in folder.glob("checkpoint_*") if p.is_dir()) == ["checkpoint_a", "checkpoint_b", "checkpoint_c"]
    assert any("resuming from checkpoint_c (epoch 3)" in line for line in lines)
    assert any("removed checkpoint_d: an incomplete checkpoint" in line for line in lines)
    # Killed before Ray recorded any checkpoint at all (no snapshot yet).
    shutil.rmtree(folder)
    _fake_ray_run(folder, {}, {"checkpoint_e": 1})
    (folder / "checkpoint_manager_snapshot.json").unlink()
    assert reconcile_checkpoints(config, lines.append) == str(folder / "checkpoint_e")


def test_the_worker_resumes_from_the_later_of_rays_checkpoint_and_the_adopted_one(tmp_path: Path, monkeypatch):
    import ray.train

    from xmodal.engine import loop

    _fake_ray_run(tmp_path / "run", {"checkpoint_a": 2}, {"checkpoint_c": 3})
    plan = type("Plan", (), {"adopted_checkpoint": str(tmp_path / "run" / "checkpoint_c")})()
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(tmp_path / "run" / "checkpoint_a")))
    assert loop._latest_state(plan, torch.device("cpu"))["epoch"] == 2  # 0-based: epoch 3
    # After a worker restart later in the same run, Ray's newer checkpoint wins.
    plan.adopted_checkpoint = str(tmp_path / "run" / "checkpoint_a")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint(str(tmp_path / "run" / "checkpoint_c")))
    assert loop._latest_state(plan, torch.device("cpu"))["epoch"] == 2


def test_a_plain_checkpoint_moved_aside_when_the_run_was_killed_is_put_back(tmp_path: Path):
    from xmodal.engine.plain import LAST_DIR, recover_checkpoints

    (tmp_path / f"{LAST_DIR}.previous").mkdir()
    (tmp_path / f"{LAST_DIR}.previous" / "state.pt").write_bytes(b"x")
    (tmp_path / f".{LAST_DIR}-abc").mkdir()  # the replacement, unfinished
    lines: list[str] = []
    recover_checkpoints(tmp_path, lines.append)
    assert (tmp_path / LAST_DIR / "state.pt").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_DIR] and lines


def test_a_resumed_run_keeps_every_tensorboard_point_and_a_changed_one_is_refused_naming_the_change(tiny_world: Path, tmp_path: Path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_segmentation_run("tb", str(tiny_world), str(tmp_path / "runs"), input="sar")))
    assert main(["run", str(config), "--plain"]) == 0
    assert main(["run", str(config), "train.epochs=2", "--plain"]) == 0
    events = EventAccumulator(str(tmp_path / "runs" / "tb" / "tensorboard")).Reload()
    steps = [event.step for event in events.Scalars("val/loss")]
    assert len(steps) == 2 and steps[1] == 2 * steps[0]  # epoch 1's point survived the resume
    capsys.readouterr()
    assert main(["run", str(config), "train.epochs=3", "model.encoder=resnet34", "train.lr=0.01", "--plain"]) == 2
    _one_line(capsys.readouterr().err, r"run 'tb' already exists in .* with other settings \(model.encoder: 'resnet18' -> 'resnet34'; train.lr: 0.002 -> 0.01\)")
