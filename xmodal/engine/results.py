"""What a finished run leaves for people and for later phases: ``run.json``, panels, artifacts.

A run's results folder (``run.results`` or the run's storage, then the run name; a folder or an
object-store URI) holds:

* ``run.json``: the run summary (what ran, on what data and labelled subset, from which input
  checkpoints, which epoch was tested, its metrics, the tested and last checkpoints; when it
  started and ended, its start-up time before the first step, its wall time, and the versions of
  Python, xmodal, torch and Ray it ran with). Checkpoint
  folders hold a different file, ``metrics.json``: that epoch's flat metrics, and ``inference.json``:
  what ``xmodal predict`` needs to prepare a scene as training did (:func:`inference_record`).
* ``panels_test.png``: the method's test panel; ``artifacts/``: the test artifacts (arrays, PNGs).
* ``tensorboard/``: per-step and per-epoch curves.
* ``console.log``: the run's console and Ray's output.

Results on object storage are written to a local staging folder (:func:`results_dir`) and uploaded
(:func:`publish_results` when the run ends or fails, :func:`publish_tensorboard` by the rank-0
worker after every epoch, wherever it runs), so nothing a user needs stays on one node's disk.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from xmodal.engine.config import ExperimentConfig
from xmodal.engine.storage import cache_folder, delete_tree, is_remote, join, location_of, read_text, upload
from xmodal.settings import json_safe, to_dict

RUN_FILE = "run.json"
PANELS_FILE = "panels_test.png"
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints
FAILED_FILE = "failed.json"  # a run that stopped on an error: what it was (removed when the run finishes)
RESUME_HINT = "relaunch the command that started it (same name and run.storage) to resume from its last checkpoint"
# Beside every checkpoint's exports: what inference needs to feed a model as training did.
INFERENCE_FILE = "inference.json"
INFERENCE_FORMAT = 1
TENSORBOARD_DIR = "tensorboard"


@dataclass
class RunResult:
    """What one training run produced.

    Attributes:
        name: Run name (``chain/phase`` for a phase).
        metrics: ``val/...`` and ``test/...`` metrics of the tested weights.
        checkpoint: The tested checkpoint (best on the method's selection, or the last with
            ``run.select: last``); what later phases receive by default.
        last_checkpoint: The last epoch's checkpoint.
        results_dir: Its results folder (a URI for results on object storage).
        summary: The contents of ``run.json``.
    """

    name: str
    metrics: dict[str, float]
    checkpoint: str | None
    results_dir: str
    last_checkpoint: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    def checkpoint_for(self, which: str) -> str | None:
        """``tested`` or ``last``."""
        return self.checkpoint if which == "tested" else self.last_checkpoint


def storage_path(config: ExperimentConfig) -> str:
    """The run storage as Ray Train takes it (absolute local path or URI)."""
    storage = config.run.storage
    return storage if is_remote(storage) else str(Path(storage).expanduser().resolve())


def results_location(config: ExperimentConfig) -> str:
    """Where this run's results are kept: ``run.results``, else ``run.storage`` (each a folder or a
    URI), then the run name."""
    base = config.run.results or config.run.storage
    if is_remote(base):
        return join(base, config.name)
    return str((Path(base) / config.name).expanduser().resolve())


def results_dir(config: ExperimentConfig) -> Path:
    """Local folder run.json, panels, artifacts, TensorBoard and the console log are written to: the
    results folder itself, or for results on object storage a staging copy of it on this machine
    (uploaded by :func:`publish_results`)."""
    location = results_location(config)
    return cache_folder(location) if is_remote(location) else Path(location)


def publish_results(config: ExperimentConfig) -> None:
    """Upload a run's staged results to its results location on object storage (nothing for a local one).

    Called when a run ends, finished or failed: a finished run's bucket copy loses the
    ``failed.json`` an earlier failed launch left there.
    """
    location = results_location(config)
    if not is_remote(location):
        return
    staged = results_dir(config)
    upload(staged, location)
    if not (staged / FAILED_FILE).is_file():
        delete_tree(join(location, FAILED_FILE))


def checkpoint_location(checkpoint: Any) -> str:
    """Where a Ray Train checkpoint is, as xmodal names places: its local folder or its URI (Ray's
    ``Checkpoint.path`` drops the scheme of a checkpoint on object storage, and the run summary's
    ``checkpoint`` must still lead there: later phases and ``xmodal predict`` read it)."""
    return location_of(checkpoint.filesystem, checkpoint.path)


def worker_results_dir(config: ExperimentConfig, planned: str) -> Path:
    """Where a Train worker writes its TensorBoard files: the ``planned`` results folder (the
    driver's), or for results on object storage this node's own staging copy (the driver's
    staging folder is on another machine, or another user's cache)."""
    return results_dir(config) if is_remote(results_location(config)) else Path(planned)


def publish_tensorboard(config: ExperimentConfig, folder: str | Path) -> None:
    """Upload the TensorBoard files a worker wrote in ``folder`` (its staged results folder) to the
    run's results location on object storage: the rank-0 worker may run on any node."""
    location = results_location(config)
    if is_remote(location):
        upload(Path(folder) / TENSORBOARD_DIR, join(location, TENSORBOARD_DIR))


def summarise(
    config: ExperimentConfig,
    outcome: dict[str, Any],
    *,
    spec: Any,
    checkpoint: str | None,
    last_checkpoint: str | None,
    started: float,
    inputs: dict[str, dict[str, Any]] | None = None,
    engine: str = "ray",
) -> dict[str, Any]:
    """The run summary (``run.json``).

    Args:
        started: When the run was launched (``time.time()``); with the loop's first training
            step (``outcome["first_step_time"]``) it gives the start-up time, and with now the
            wall time.
    """
    from xmodal.engine.config import fingerprint
    from xmodal.methods.registry import get_method

    ended, first_step = time.time(), outcome.get("first_step_time")
    metrics = {f"{split}/{k}": v for split in ("val", "test") for k, v in (outcome.get(split) or {}).items()}
    metric = get_method(config.method).metrics(config.method_settings, spec)
    return {
        "name": config.name,
        "method": config.method,
        "method_settings": to_dict(config.method_settings),
        "model": to_dict(config.model),
        "train": {k: v for k, v in to_dict(config.train).items()},
        "data": {
            "root": config.data.root,
            "mask_layer": config.data.mask_layer,
            "noisy_layer": config.data.noisy_layer,
            "labels": config.data.labels.describe(),
            "train_tiles": getattr(spec, "train_tiles", None),
            "labelled_tiles": getattr(spec, "labelled_tiles", None),
            "batch_size": config.data.batch_size,
            "batch_scope": config.data.batch_scope,
            "workers": 1 if engine == "plain" else config.scaling.num_workers,
        },
        "epochs": outcome.get("epochs"),
        "metric": outcome.get("metric", metric.select),
        "metric_mode": outcome.get("metric_mode", metric.mode),
        "metric_labelled": metric.labelled,
        "report_metrics": list(metric.report),
        "select": config.run.select,
        "tested_epoch": outcome.get("tested_epoch"),
        "metrics": metrics,
        "per_class": {split: outcome.get(f"{split}_per_class", {}) for split in ("val", "test")},
        "checkpoint": checkpoint,
        "last_checkpoint": last_checkpoint,
        "inputs": inputs or {},
        "artifacts": sorted(outcome.get("artifacts") or {}),
        "history": outcome.get("history", []),
        "engine": engine,
        "fingerprint": json.loads(json.dumps(fingerprint(config), default=str)),
        "started": _utc(started),
        "ended": _utc(ended),
        "wall_seconds": round(ended - started, 1),
        # Set-up before the first optimiser step: data preparation, worker start, model build.
        "startup_seconds": round(first_step - started, 1) if isinstance(first_step, (int, float)) else None,
        "versions": versions(),
    }


def inference_record(prepared: Any) -> dict[str, Any]:
    """What inference needs to prepare a scene as training prepared the tiles (``inference.json``).

    Written beside every checkpoint's exports by both engines, so a checkpoint folder alone is
    enough for ``xmodal predict``: the dataset description (bands and units of both modalities,
    label layers, ignore value), the training split's statistics, and the pipeline's settings.

    Args:
        prepared: The run's :class:`~xmodal.data.prepared.PreparedData`.
    """
    settings = prepared.settings
    return {
        "format": INFERENCE_FORMAT,
        "dataset": prepared.info.to_dict(),
        "stats": prepared.stats.to_dict(),
        "sar_db": settings.sar_db,
        "clip_sigma": settings.clip_sigma,
        "tile_size": settings.tile_size,
        "mask_layer": settings.mask_layer,
        "class_names": prepared.class_names(),
        "ignore_index": prepared.info.ignore_index,
        "data_root": str(settings.root),
    }


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    """Versions of what a run ran with (read from the installed distributions, nothing imported)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("xmodal", "torch", "ray"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def write_run_results(folder: str | Path, summary: dict[str, Any], outcome: dict[str, Any], title: str) -> None:
    """Write ``run.json``, the test panel and the test artifacts of a finished run."""
    from xmodal.figures import ARTIFACTS_DIR, render_panels, save_artifacts

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if outcome.get("panels"):
        render_panels(outcome["panels"], out / PANELS_FILE, title=title)
    save_artifacts(outcome.get("artifacts") or {}, out / ARTIFACTS_DIR)
    (out / RUN_FILE).write_text(json.dumps(json_safe(summary), indent=2, default=str, allow_nan=False))
    (out / FAILED_FILE).unlink(missing_ok=True)


def read_snapshot(folder: Path) -> tuple[set[str], int | None]:
    """Ray Train's record of a run folder's checkpoints: the folders it tracks, and the epoch of
    its latest one (empty and ``None`` when there is no readable record)."""
    try:
        snapshot = json.loads((folder / SNAPSHOT_FILE).read_text())
    except (OSError, ValueError):
        return set(), None
    tracked = {entry["checkpoint_dir_name"] for entry in snapshot.get("checkpoint_results", [])}
    latest = (snapshot.get("latest_checkpoint_result") or {}).get("metrics", {}).get("epoch")
    return tracked, latest if isinstance(latest, int) else None


def record_failure(config: ExperimentConfig, error: str) -> None:
    """Keep why a run stopped (``failed.json`` in its results folder) for ``xmodal report``."""
    out = results_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    record = {"name": config.name, "method": config.method, "status": "failed", "error": error, "ended": time.time(), "resume": RESUME_HINT}
    (out / FAILED_FILE).write_text(json.dumps(record, indent=2))


def read_run_result(config: ExperimentConfig) -> RunResult | None:
    """The finished run of this config (its ``run.json``), or ``None`` when it has not finished.

    A summary of another method, model or data under the same name does not count.
    """
    from xmodal.engine.config import same_fingerprint

    location = results_location(config)
    text = read_text(join(location, RUN_FILE))
    if text is None:
        return None
    try:
        summary = json.loads(text)
    except ValueError:
        return None
    if not same_fingerprint(summary.get("fingerprint"), config) or summary.get("epochs") != config.train.epochs:
        return None
    return RunResult(
        name=summary["name"], metrics=summary.get("metrics", {}), checkpoint=summary.get("checkpoint"),
        last_checkpoint=summary.get("last_checkpoint"), results_dir=location, summary=summary,
    )
