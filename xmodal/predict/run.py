"""``xmodal predict``: any exported segmenter over whole scenes, blended, georeferenced and scored.

The driver checks everything a prediction can be refused for before any window is read: the
checkpoint and its segmenter export, how its training data was prepared, each scene's bands and
units against it, the label files. Then a Ray Data dataset of window descriptors (scene, row,
col) over all scenes runs through ``map_batches`` with :class:`~xmodal.predict.windows.WindowPredictor`
actors (the model loaded once per actor, on CPU or GPU); the driver blends the results as they
arrive into each scene's on-disk accumulators and writes a scene's outputs as soon as its last
window is in. ``plain=True`` runs the same predictor in this process without Ray.

Ray is joined at ``RAY_ADDRESS`` when set, else started locally through the engine's
:func:`~xmodal.engine.session.connect` (the same console and log file handling as runs: Ray's own
output goes to ``console.log`` in the output folder). On a cluster, the scenes and the checkpoint
must be readable from every node (a shared folder, or GDAL ``/vsis3/``-style scene paths).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from xmodal.data.geotiff import RasterGrid
from xmodal.data.scenes import scene_bands, scene_grid
from xmodal.errors import ConfigError, DataError, error_line, permanent_cause
from xmodal.predict.model import (
    InferenceRecord,
    SegmenterInfo,
    choose_export,
    describe_segmenter,
    load_record,
    load_segmenter,
    resolve_source,
)
from xmodal.predict.outputs import SceneCanvas, SceneOutput, check_classes, finish_scene
from xmodal.predict.windows import PredictionJob, Scene, WindowPredictor, blend_weights, check_window, scene_windows
from xmodal.progress import bars_enabled
from xmodal.settings import json_safe

SUMMARY_FILE = "predict.json"
DEVICES = ("cpu", "cuda")


@dataclass
class PredictSettings:
    """What ``xmodal predict`` was asked to do.

    Attributes:
        source: A run's results folder or a checkpoint folder.
        scenes: Raster scenes to predict.
        out: Output folder.
        export: Segmenter export to use (default: the checkpoint's only one, or ``model``).
        window: Window size in pixels (default: the run's tile size).
        overlap: Overlap of neighbouring windows in pixels (default: a quarter of the window).
        probabilities: Also write the per-class probabilities.
        labels: Label rasters or vector files: one per scene, or one covering them all.
        label_field: Attribute of a vector label file holding the class (default: burn 1).
        bands: The scenes' band names when their files do not say.
        unit: The scenes' unit when their files do not say.
        device: ``cpu`` or ``cuda`` (``cuda:N`` in the plain path).
        workers: Predictor actors (default: one per CPU, or per GPU with ``cuda``).
        batch_size: Windows per model call.
        plain: Run in this process without Ray.
        address: Ray cluster to join (default: ``RAY_ADDRESS``, else a local Ray).
    """

    source: str
    scenes: list[str]
    out: str
    export: str | None = None
    window: int | None = None
    overlap: int | None = None
    probabilities: bool = False
    labels: list[str] = field(default_factory=list)
    label_field: str | None = None
    bands: list[str] | None = None
    unit: str | None = None
    device: str = "cpu"
    workers: int | None = None
    batch_size: int = 8
    plain: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.scenes:
            raise ConfigError("predict: no scene given; give one or more raster files")
        if self.device.split(":")[0] not in DEVICES:
            raise ConfigError(f"--device {self.device!r}; expected cpu or cuda (cuda:N with --plain)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size}; expected >= 1")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers {self.workers}; expected >= 1")
        if self.labels and len(self.labels) not in (1, len(self.scenes)):
            raise ConfigError(f"--labels: {len(self.labels)} files for {len(self.scenes)} scenes; give one per scene, or one covering them all")


def check_scene(path: str, modality: str, record: InferenceRecord, names: list[str] | None = None, unit: str | None = None) -> Scene:
    """A scene whose bands and units are the training data's, in the same order.

    Raises:
        DataError: Naming the file and what differs (band names, or each band whose unit differs).
    """
    grid = scene_grid(path)
    bands = scene_bands(path, modality, names, unit)
    trained = record.bands(modality)
    if bands.names != trained.names:
        raise DataError(
            f"{path}: {modality} bands {bands.names}, the model was trained on {trained.names} ({record.source}); "
            "give a scene with those bands in that order (or state its band names with --bands)"
        )
    differ = [f"{band.name} is {band.unit}, trained on {want.unit}" for band, want in zip(bands.bands, trained.bands) if band.unit != want.unit]
    if differ:
        raise DataError(
            f"{path}: {modality} units differ from the training data's ({'; '.join(differ)}; {record.source}); "
            "convert the scene to the training unit (or state its unit with --unit when the file's tag is wrong)"
        )
    return Scene(str(Path(path).absolute()), grid, bands)  # not resolved: a link keeps its own name for the outputs


def check_window_fits(checkpoint: Path, export: str, segmenter: SegmenterInfo, window: int, tile_size: int) -> None:
    """Refuse a window the network cannot take (an encoder that halves the size 5 times needs a
    multiple of 32, some decoders more): one zero window through it, in the driver, before any actor starts.

    Raises:
        ConfigError: Naming the window and the size training used.
    """
    network = load_segmenter(checkpoint, export)
    try:
        with torch.inference_mode():
            shape = tuple(network(torch.zeros(1, segmenter.in_channels, window, window)).shape)
    except Exception as exc:  # noqa: BLE001 - any failure of the network on this size is the same refusal
        raise ConfigError(f"--window {window}: export {export!r} cannot take {window} x {window} windows ({type(exc).__name__}: {exc}); its training tiles were {tile_size} px") from None
    if shape[-2:] != (window, window):
        raise ConfigError(f"--window {window}: export {export!r} turns {window} x {window} windows into {shape[-2]} x {shape[-1]} maps; its training tiles were {tile_size} px")


def _check_labels(labels: list[str]) -> None:
    for path in labels:
        if not path.startswith("/vsi") and not Path(path).is_file():
            raise DataError(f"{path}: label file not found")


def _batches(windows: list[tuple[int, int, int]], size: int) -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, len(windows), size):
        chunk = np.asarray(windows[start : start + size], dtype=np.int64)
        yield {"scene": chunk[:, 0], "row": chunk[:, 1], "col": chunk[:, 2]}


def _plain_results(job: PredictionJob, windows: list[tuple[int, int, int]], batch_size: int, model: nn.Module | None) -> Iterator[dict[str, np.ndarray]]:
    """The predictor in this process, batch after batch."""
    predictor = WindowPredictor(job, model)
    for batch in _batches(windows, batch_size):
        yield predictor(batch)


def _ray_results(job: PredictionJob, windows: list[tuple[int, int, int]], settings: PredictSettings, log: Callable[[str], None]) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch inference: window descriptors -> ``map_batches`` over predictor actors."""
    import ray

    from xmodal.engine.console import CONSOLE, LOG_FILE
    from xmodal.engine.session import connect

    started = connect(settings.address, os.cpu_count() or 1, dashboard=False)
    CONSOLE.log_to(Path(settings.out) / LOG_FILE)  # Ray's own output, kept out of the console as for runs
    try:
        resources = ray.cluster_resources()
        gpu = settings.device.startswith("cuda")
        available = int(resources.get("GPU" if gpu else "CPU", 0))
        if available < 1:
            raise ConfigError(
                f"--device {settings.device}: the Ray cluster has no {'GPU' if gpu else 'CPU'} "
                f"(CPU {resources.get('CPU', 0):g}, GPU {resources.get('GPU', 0):g})"
            )
        workers = min(settings.workers or available, max(1, math.ceil(len(windows) / settings.batch_size)))
        log(f"predict: {workers} Ray Data predictor actor(s) x 1 {'GPU' if gpu else 'CPU'}, batches of {settings.batch_size} windows")
        items = [{"scene": s, "row": r, "col": c} for s, r, c in windows]
        # One block per batch: results stream back batch by batch, not after a whole block.
        dataset = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / settings.batch_size)))
        dataset = dataset.map_batches(
            WindowPredictor,
            fn_constructor_kwargs={"job": job},
            batch_size=settings.batch_size,
            batch_format="numpy",
            concurrency=workers,
            num_cpus=1,
            num_gpus=1 if gpu else 0,
        )
        try:
            yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
        except Exception as exc:
            line = error_line(exc) if permanent_cause(exc) is not None else _refusal_in(str(exc))
            if line is None:
                raise
            raise DataError(line) from exc  # a predictor's refusal, in one line through Ray's wrappers
    finally:
        CONSOLE.log_to(None)
        if started:
            ray.shutdown()


_REFUSAL = re.compile(r"xmodal\.errors\.(?:DataError|ConfigError): (.+)")


def _refusal_in(text: str) -> str | None:
    """An actor's DataError / ConfigError line in a Ray Data error, which keeps the actor's
    traceback as text only (``UserCodeException`` carries no cause)."""
    found = _REFUSAL.search(text)
    return found.group(1).strip() if found else None


class _Progress:
    """A bar over windows on a terminal (nothing in a log: the scene lines say enough)."""

    def __init__(self, total: int) -> None:
        self.bar = None
        if bars_enabled():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="predict", unit="window", leave=False, dynamic_ncols=True)

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def write(self, line: str, log: Callable[[str], None]) -> None:
        if self.bar is not None:
            self.bar.clear()
        log(line)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def describe_scores(scores: dict[str, Any]) -> str:
    """One line of a scene's scores: IoU / F1 for a binary map, mean IoU and per-class IoU otherwise."""
    metrics = scores["metrics"]
    if scores.get("labelled_pixels", 1) == 0:
        return f"no labelled pixel of {scores['labels']} lies under the scene's valid data: nothing to score"
    if "iou" in metrics:
        shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("iou", "f1", "precision", "recall", "accuracy"))
    else:
        per_class = ", ".join(f"{name} {v['iou']:.3f}" for name, v in scores["per_class"].items() if not math.isnan(v["iou"]))
        shown = f"miou {metrics['miou']:.3f}, accuracy {metrics['accuracy']:.3f}, average accuracy {metrics['average_accuracy']:.3f}; IoU {per_class}"
    return f"{shown} ({scores['labelled_pixels']} labelled pixels of {scores['labels']})"


def predict(settings: PredictSettings, *, log: Callable[[str], None] = print, model: nn.Module | None = None) -> dict[str, Any]:
    """Predict every scene, write its outputs and ``predict.json``; return that summary.

    Args:
        settings: What to predict and how.
        log: Where the console lines go.
        model: Predict with this network instead of the export's weights (tests; plain only).

    Raises:
        ConfigError: Bad options.
        DataError: A checkpoint, export, scene or label file that cannot be used (naming it).
    """
    started = time.time()
    source = resolve_source(settings.source)
    record = load_record(source, log)
    export = choose_export(source.checkpoint, settings.export)
    segmenter = describe_segmenter(source.checkpoint, export, record)
    class_names = list(record.class_names)
    check_classes(class_names, str(source.checkpoint))
    window = settings.window or record.tile_size
    overlap = settings.overlap if settings.overlap is not None else window // 4
    check_window(window, overlap)
    if window != record.tile_size and model is None:
        check_window_fits(source.checkpoint, export, segmenter, window, record.tile_size)
    scenes = [check_scene(path, segmenter.modality, record, settings.bands, settings.unit) for path in settings.scenes]
    stems = [Path(scene.path).stem for scene in scenes]
    if len(set(stems)) != len(stems):
        raise ConfigError(f"scenes {settings.scenes}: two share a file name ({sorted(s for s in stems if stems.count(s) > 1)[0]!r}); their outputs would overwrite each other")
    _check_labels(settings.labels)
    if settings.device.startswith("cuda") and settings.plain and not torch.cuda.is_available():
        raise ConfigError(f"--device {settings.device}: this machine has no CUDA GPU that torch can use")
    if model is not None and not settings.plain:
        raise ConfigError("a stub model runs in this process only: use plain=True")
    out = Path(settings.out).absolute()  # predict.json names its files wherever it is read from
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    windows = [(index, row, col) for index, scene in enumerate(scenes) for row, col in scene_windows(scene.grid, window, overlap)]
    job = PredictionJob(
        checkpoint=str(source.checkpoint), export=export, modality=segmenter.modality, record=record, scenes=scenes, window=window,
        device=settings.device, threads=(torch.get_num_threads() if settings.plain else 1),
    )
    engine = f"in this process on {settings.device}" if settings.plain else f"Ray Data batch inference on {settings.device}"
    log(
        f"predict: export {export!r} ({segmenter.description or 'segmenter'}) of {source.checkpoint}; {segmenter.modality} "
        f"{record.bands(segmenter.modality).names}, classes {class_names}; {len(scenes)} scene(s), {len(windows)} windows of "
        f"{window} px overlapping {overlap} px; {engine}"
    )
    results = _plain_results(job, windows, settings.batch_size, model) if settings.plain else _ray_results(job, windows, settings, log)
    outputs = _blend_and_write(scenes, windows, results, segmenter, record, settings, window, overlap, out, log)
    seconds = time.time() - started
    summary = {
        "run": str(source.run_dir) if source.run_dir else None,
        "checkpoint": str(source.checkpoint),
        "export": export,
        "modality": segmenter.modality,
        "record": record.source,
        "classes": class_names,
        "window": window,
        "overlap": overlap,
        "device": settings.device,
        "engine": "plain" if settings.plain else "ray",
        "batch_size": settings.batch_size,
        "scenes": [asdict(o) for o in outputs["scenes"]],
        "windows": len(windows),
        "seconds": round(seconds, 2),
        "inference_seconds": round(outputs["seconds"], 2),
        "tiles_per_s": round(len(windows) / max(outputs["seconds"], 1e-9), 2),
        # Until the first window came back (Ray and actor start, model load), and the rate after it.
        "startup_seconds": round(outputs["startup"], 2) if outputs["startup"] is not None else None,
        "steady_tiles_per_s": round(outputs["steady"], 2) if outputs["steady"] is not None else None,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(json_safe(summary), indent=2, default=str))
    log(
        f"predict: {len(windows)} windows of {len(scenes)} scene(s) in {outputs['seconds']:.1f} s ({summary['tiles_per_s']:.1f} tiles/s"
        + (f"; {summary['steady_tiles_per_s']:.1f} tiles/s after {summary['startup_seconds']:.1f} s of start-up" if summary["steady_tiles_per_s"] else "")
        + f"; {seconds:.1f} s in all); summary {out / SUMMARY_FILE}"
    )
    return summary


def _blend_and_write(
    scenes: list[Scene], windows: list[tuple[int, int, int]], results: Iterator[dict[str, np.ndarray]], segmenter: SegmenterInfo,
    record: InferenceRecord, settings: PredictSettings, window: int, overlap: int, out: Path, log: Callable[[str], None],
) -> dict[str, Any]:
    """Consume window results as they arrive; finish each scene when its last window is in."""
    weights = blend_weights(window, overlap)
    expected = np.bincount([s for s, _, _ in windows], minlength=len(scenes))
    written: dict[int, SceneOutput] = {}
    progress = _Progress(len(windows))
    began, first = time.time(), None
    with tempfile.TemporaryDirectory(prefix=".predict-scratch-", dir=out) as scratch:
        canvases: dict[int, SceneCanvas] = {}
        try:
            for batch in results:
                if first is None:  # the predictors are up (Ray start, actor start, model load)
                    first = (time.time(), len(batch["scene"]))
                complete = []
                for index in range(len(batch["scene"])):
                    scene_index = int(batch["scene"][index])
                    if scene_index not in canvases:
                        canvases[scene_index] = SceneCanvas(scenes[scene_index].grid, segmenter.num_classes, Path(scratch), f"scene{scene_index}")
                    canvas = canvases[scene_index]
                    canvas.add(int(batch["row"][index]), int(batch["col"][index]), batch["probabilities"][index], batch["valid"][index], weights)
                    if canvas.windows == expected[scene_index]:
                        complete.append(scene_index)
                progress.update(len(batch["scene"]))
                for scene_index in complete:
                    written[scene_index] = _finish(canvases[scene_index], scenes[scene_index], settings, record, out, progress, log, scene_index)
                    canvases.pop(scene_index).close()  # its accumulators leave the disk now
        finally:
            progress.close()
            for canvas in canvases.values():
                canvas.close()
    missing = [scenes[i].path for i in range(len(scenes)) if i not in written]
    if missing:
        raise DataError(f"predict: the predictors returned no result for every window of {missing}")
    ended = time.time()
    steady = (len(windows) - first[1]) / (ended - first[0]) if first and ended > first[0] and len(windows) > first[1] else None
    return {"scenes": [written[i] for i in range(len(scenes))], "seconds": ended - began, "startup": first[0] - began if first else None, "steady": steady}


def _finish(
    canvas: SceneCanvas, scene: Scene, settings: PredictSettings, record: InferenceRecord, out: Path, progress: _Progress,
    log: Callable[[str], None], index: int,
) -> SceneOutput:
    labels = settings.labels[index if len(settings.labels) > 1 else 0] if settings.labels else None
    output = finish_scene(
        canvas, scene.path, out, list(record.class_names), ignore_index=record.ignore_index,
        probabilities=settings.probabilities, labels=labels, label_field=settings.label_field,
    )
    grid: RasterGrid = scene.grid
    progress.write(
        f"{Path(scene.path).name}: {output.classes} ({grid.height} x {grid.width} px, {grid.crs}), "
        f"{output.valid_fraction:.0%} with valid input{', probabilities too' if output.probabilities else ''}",
        log,
    )
    if output.scores is not None:
        progress.write(f"  scores: {describe_scores(output.scores)}", log)
    return output
