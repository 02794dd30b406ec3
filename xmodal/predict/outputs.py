"""Blending window predictions into whole scenes on disk, and writing what a prediction leaves.

A scene's accumulators (per-class weighted probability sums and the weight sum) are numpy memmaps
in a scratch folder: a scene larger than memory is never held whole. When every window is in, the
scene is read back in strips of rows, each strip turned into the class map (argmax of the sums;
255 where no window saw valid input), written into the GeoTIFF(s) block by block, drawn into the
preview, and scored against labels when given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window

from xmodal.data.geotiff import RasterGrid
from xmodal.data.scenes import VECTOR_SUFFIXES, rasterise_vector, read_on_grid, window_grid
from xmodal.errors import DataError
from xmodal.methods.metrics import SegmentationMeter

NO_DATA_CLASS = 255  # class-map value where the input had no valid data
PREVIEW_PIXELS = 1024  # longest side of the preview PNG
STRIP_BYTES = 64 * 2**20  # accumulator bytes read back per strip
BLOCK = 256  # GeoTIFF block size


class SceneCanvas:
    """Weighted sums of one scene's window probabilities, kept in memmaps under ``scratch``.

    Args:
        grid: The scene's grid.
        classes: Classes of the class map.
        scratch: Folder for the memmaps (removed by the caller).
        name: File prefix of this scene's memmaps.
    """

    def __init__(self, grid: RasterGrid, classes: int, scratch: Path, name: str) -> None:
        self.grid = grid
        self.classes = classes
        shape = (grid.height, grid.width)
        # Fresh memmaps are sparse files of zeros: only the pages windows touch take disk.
        self.sums = np.lib.format.open_memmap(scratch / f"{name}.sums.npy", mode="w+", dtype=np.float32, shape=(classes, *shape))
        self.weights = np.lib.format.open_memmap(scratch / f"{name}.weights.npy", mode="w+", dtype=np.float32, shape=shape)
        self.windows = 0
        self.files = [scratch / f"{name}.sums.npy", scratch / f"{name}.weights.npy"]

    def close(self) -> None:
        """Drop the accumulators and their files."""
        del self.sums, self.weights
        for path in self.files:
            path.unlink(missing_ok=True)

    def add(self, row: int, col: int, probabilities: np.ndarray, valid: np.ndarray, weights: np.ndarray) -> None:
        """Blend one window (K x S x S probabilities, S x S validity) in at (``row``, ``col``);
        the part beyond the scene (a scene smaller than the window) is dropped."""
        height, width = min(valid.shape[0], self.grid.height - row), min(valid.shape[1], self.grid.width - col)
        weight = weights[:height, :width] * valid[:height, :width]
        self.sums[:, row : row + height, col : col + width] += probabilities[:, :height, :width] * weight
        self.weights[row : row + height, col : col + width] += weight
        self.windows += 1

    def strip_rows(self) -> int:
        """Rows read back at once: a multiple of the GeoTIFF block within :data:`STRIP_BYTES`."""
        rows = max(1, STRIP_BYTES // max(1, self.grid.width * (self.classes + 1) * 4))
        return max(BLOCK, rows // BLOCK * BLOCK) if rows >= BLOCK else rows

    def strips(self):
        """(first row, class map strip uint8, probability strip K x h x W float32 with NaN at no-data)."""
        step = self.strip_rows()
        for top in range(0, self.grid.height, step):
            bottom = min(top + step, self.grid.height)
            sums = np.asarray(self.sums[:, top:bottom])
            weights = np.asarray(self.weights[top:bottom])
            seen = weights > 0
            classes = np.where(seen, sums.argmax(axis=0), NO_DATA_CLASS).astype(np.uint8)
            with np.errstate(invalid="ignore", divide="ignore"):
                probabilities = np.where(seen, sums / weights, np.nan).astype(np.float32)
            yield top, classes, probabilities


def _profile(grid: RasterGrid, count: int, dtype: str, nodata: float) -> dict[str, Any]:
    profile: dict[str, Any] = {
        "driver": "GTiff", "height": grid.height, "width": grid.width, "count": count, "dtype": dtype,
        "crs": CRS.from_user_input(grid.crs), "transform": Affine(*grid.transform[:6]), "nodata": nodata, "compress": "deflate",
    }
    if grid.height >= BLOCK and grid.width >= BLOCK:
        profile.update(tiled=True, blockxsize=BLOCK, blockysize=BLOCK)
    return profile


def labels_on(path: str | Path, grid: RasterGrid, ignore_index: int, field_name: str | None = None) -> np.ndarray:
    """Labels (H x W int64) of a raster (any CRS and resolution) or a vector file on ``grid``."""
    if Path(path).suffix.lower() in VECTOR_SUFFIXES:
        return rasterise_vector(path, grid, field=field_name, ignore_index=ignore_index)
    return read_on_grid(path, grid, "classes", ignore_index=ignore_index)


@dataclass
class SceneOutput:
    """What was written for one scene: its files, its grid (CRS, rows x columns, bounds in the CRS),
    windows, share of pixels with valid input, class shares and scores."""

    scene: str
    classes: str
    preview: str
    crs: str
    size: tuple[int, int]
    bounds: tuple[float, float, float, float]
    windows: int
    probabilities: str | None = None
    valid_fraction: float = 0.0
    class_fractions: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Any] | None = None


def finish_scene(
    canvas: SceneCanvas,
    scene_path: str,
    out_dir: Path,
    class_names: list[str],
    *,
    ignore_index: int,
    probabilities: bool = False,
    labels: str | None = None,
    label_field: str | None = None,
) -> SceneOutput:
    """Write ``<stem>.tif`` (uint8 classes, 255 no-data), ``<stem>_probabilities.tif`` on request
    and ``<stem>.png``; score against ``labels`` with training's :class:`SegmentationMeter`.

    Labels are gated by input validity as in training: where the scene had no valid data, the
    prediction is no-data and the label is ignored.
    """
    grid = canvas.grid
    stem = Path(scene_path).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    class_path, preview_path = out_dir / f"{stem}.tif", out_dir / f"{stem}.png"
    probability_path = out_dir / f"{stem}_probabilities.tif" if probabilities else None
    meter = SegmentationMeter(len(class_names), list(class_names), ignore_index) if labels else None
    stride = max(1, math.ceil(max(grid.height, grid.width) / PREVIEW_PIXELS))
    preview_rows: list[np.ndarray] = []
    counts = np.zeros(len(class_names) + 1, dtype=np.int64)
    destinations = [rasterio.open(class_path, "w", **_profile(grid, 1, "uint8", NO_DATA_CLASS))]
    if probability_path is not None:
        destinations.append(rasterio.open(probability_path, "w", **_profile(grid, canvas.classes, "float32", float("nan"))))
    try:
        classes_out = destinations[0]
        classes_out.set_band_description(1, "class")
        classes_out.update_tags(classes=",".join(class_names), nodata_meaning="no valid input")
        if probability_path is not None:
            for index, name in enumerate(class_names, start=1):
                destinations[1].set_band_description(index, f"p({name})")
        for top, class_strip, probability_strip in canvas.strips():
            window = Window(0, top, grid.width, class_strip.shape[0])
            classes_out.write(class_strip, 1, window=window)
            if probability_path is not None:
                destinations[1].write(probability_strip, window=window)
            counts += np.bincount(np.where(class_strip == NO_DATA_CLASS, len(class_names), class_strip).ravel(), minlength=len(counts))
            preview_rows.append(class_strip[(-top) % stride :: stride, ::stride])
            if meter is not None:
                strip_grid = window_grid(grid, top, 0, class_strip.shape[0], grid.width)
                target = labels_on(labels, strip_grid, ignore_index, label_field)
                target = np.where(class_strip == NO_DATA_CLASS, ignore_index, target)
                meter.update(torch.from_numpy(class_strip.astype(np.int64)), torch.from_numpy(target))
    finally:
        for destination in destinations:
            destination.close()
    draw_preview(np.concatenate(preview_rows), len(class_names), preview_path)
    total = max(1, int(counts.sum()))
    valid = int(counts[:-1].sum())
    output = SceneOutput(
        scene=str(scene_path), classes=str(class_path), preview=str(preview_path), crs=grid.crs, size=(grid.height, grid.width),
        bounds=grid.bounds, windows=canvas.windows,
        probabilities=str(probability_path) if probability_path else None,
        valid_fraction=valid / total,
        class_fractions={name: float(counts[i] / max(1, valid)) for i, name in enumerate(class_names)},
    )
    if meter is not None:
        metrics, per_class = meter.compute()
        output.scores = {"labels": str(labels), "labelled_pixels": int(meter.matrix.sum()), "metrics": metrics, "per_class": per_class}
    return output


def draw_preview(classes: np.ndarray, num_classes: int, path: Path) -> None:
    """A PNG of a class map in the colours of the run's test panels; no-data is transparent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10" if num_classes <= 10 else "tab20", max(num_classes, 2))
    rgba = colours(np.minimum(classes, num_classes - 1))
    rgba[classes == NO_DATA_CLASS] = (0.0, 0.0, 0.0, 0.0)
    plt.imsave(path, rgba)


def check_classes(class_names: list[str], where: str) -> None:
    """Refuse more classes than a uint8 class map with 255 as no-data holds."""
    if len(class_names) >= NO_DATA_CLASS:
        raise DataError(f"{where}: {len(class_names)} classes; a class map holds at most {NO_DATA_CLASS - 1} (255 is no-data)")
