"""Overlapping windows over whole scenes, read and prepared as training prepared its tiles.

Windows of ``size`` pixels step by ``size - overlap``; the last row and column of windows are
shifted to end at the scene's edge, so no window hangs over it (a scene smaller than one window
gets one window, padded with no-data as training pads a small tile). Each window is read with
:func:`~xmodal.data.scenes.read_on_grid` on the scene's own grid (an exact windowed read: no
resampling), its SAR converted with :func:`~xmodal.data.stats.convert_sar` and normalised by the
training pipeline's :class:`~xmodal.data.transforms.Preparer` (no augmentation), so the model sees
exactly what it saw in training.

:class:`WindowPredictor` is the callable Ray Data's ``map_batches`` runs in its actors (and the
plain path runs in this process): a batch of window descriptors in, class probabilities out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch
from torch import nn

from xmodal.data.bands import BandSet
from xmodal.data.geotiff import RasterGrid
from xmodal.data.scenes import read_on_grid, window_grid
from xmodal.data.stats import convert_sar
from xmodal.data.transforms import Preparer
from xmodal.errors import ConfigError, DataError
from xmodal.predict.model import InferenceRecord, class_probabilities, load_segmenter


@dataclass(frozen=True)
class Scene:
    """One input scene: its file, grid and bands (checked against the training data)."""

    path: str
    grid: RasterGrid
    bands: BandSet


@dataclass
class PredictionJob:
    """Everything a predictor needs, sent once to each Ray Data actor.

    Attributes:
        checkpoint: Checkpoint folder holding the export.
        export: Name of the segmenter export.
        modality: What it reads (``sar`` or ``optical``).
        record: How the training data was prepared.
        scenes: The scenes, by index (window descriptors carry the index).
        window: Window height and width in pixels.
        device: Torch device of the model (``cpu``, ``cuda``).
        threads: Torch CPU threads per predictor.
    """

    checkpoint: str
    export: str
    modality: str
    record: InferenceRecord
    scenes: list[Scene]
    window: int
    device: str = "cpu"
    threads: int = 1


def window_starts(length: int, size: int, stride: int) -> list[int]:
    """Starts of windows of ``size`` stepping by ``stride`` over ``length``, the last ending at the edge."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def check_window(size: int, overlap: int) -> None:
    """Refuse a window or overlap that leaves no step.

    Raises:
        ConfigError: Naming the option and what was expected.
    """
    if size < 1:
        raise ConfigError(f"--window {size}; expected a window of at least 1 pixel")
    if not 0 <= overlap < size:
        raise ConfigError(f"--overlap {overlap}; expected 0 <= overlap < the window ({size} px)")


def scene_windows(grid: RasterGrid, size: int, overlap: int) -> list[tuple[int, int]]:
    """(row, col) of every window over a scene of ``grid`` (see the module docstring)."""
    check_window(size, overlap)
    stride = size - overlap
    return [(row, col) for row in window_starts(grid.height, size, stride) for col in window_starts(grid.width, size, stride)]


def blend_weights(size: int, overlap: int) -> np.ndarray:
    """A ``size`` x ``size`` weight that ramps linearly over the ``overlap`` at each edge.

    Overlapping windows are averaged with these weights, so a window's border, where the model
    sees least context, counts least and no seam shows. The floor, ``1 / (overlap + 1)`` at the
    outermost pixel, keeps the scene's own border (covered by edge pixels only) weighted.
    """
    index = np.arange(size)
    distance = np.minimum(index, size - 1 - index) + 1.0
    ramp = np.minimum(distance / (overlap + 1.0), 1.0).astype(np.float32)
    return np.outer(ramp, ramp)


def prepare_window(image: np.ndarray, modality: str, record: InferenceRecord, preparer: Preparer) -> tuple[np.ndarray, np.ndarray]:
    """A window read from a scene (C x S x S, NaN where no data, the training data's stored units)
    -> the model's input (normalised, no-data 0) and its validity (S x S bool).

    The same steps as training: :class:`~xmodal.data.transforms.Decoder`'s SAR conversion and
    validity, then :class:`~xmodal.data.transforms.Preparer` without augmentation (the other
    modality, which a one-modality model does not read, is a zero placeholder there).
    """
    size = image.shape[1:]
    if modality == "sar":
        image = convert_sar(image, record.info.sar_bands, record.sar_db)
    other = "optical" if modality == "sar" else "sar"
    placeholder = np.zeros((len(record.bands(other)), *size), dtype=np.float32)
    sample = {
        modality: image,
        other: placeholder,
        f"{modality}_valid": np.isfinite(image).all(axis=0).astype(np.uint8),
        f"{other}_valid": np.ones(size, dtype=np.uint8),
    }
    prepared = preparer(sample, np.random.default_rng(0))
    return prepared[modality], prepared[f"{modality}_valid"].astype(bool)


class WindowPredictor:
    """Window descriptors -> class probabilities (the ``map_batches`` callable of a Ray Data actor).

    The model is loaded once per actor. A batch holds ``scene``, ``row`` and ``col`` (int arrays);
    the result adds ``probabilities`` (B x K x S x S float32) and ``valid`` (B x S x S uint8).

    Args:
        job: The prediction job.
        model: Use this network instead of loading the job's export (tests: a stub predictor).
    """

    def __init__(self, job: PredictionJob, model: nn.Module | None = None) -> None:
        torch.set_num_threads(max(1, job.threads))
        self.job = job
        self.device = torch.device(job.device)
        self.model = (model if model is not None else load_segmenter(job.checkpoint, job.export, self.device)).to(self.device).eval()
        record = job.record
        self.preparer = Preparer(record.info, record.stats, job.window, None, record.clip_sigma)

    def read(self, scene_index: int, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
        """The prepared window at (``row``, ``col``) of scene ``scene_index``, and its validity."""
        scene = self.job.scenes[scene_index]
        grid = window_grid(scene.grid, row, col, self.job.window, self.job.window)
        units = scene.bands.units if self.job.modality == "sar" else None
        try:
            image = read_on_grid(scene.path, grid, self.job.modality, units=units)
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file fails in GDAL's own words; name the file and window
            raise DataError(f"{scene.path}: the window at row {row}, column {col} cannot be read ({type(exc).__name__}: {exc})") from None
        return prepare_window(image, self.job.modality, self.job.record, self.preparer)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, valid = zip(*(self.read(int(s), int(r), int(c)) for s, r, c in zip(batch["scene"], batch["row"], batch["col"])))
        inputs = torch.from_numpy(np.stack(images)).to(self.device)
        probabilities = class_probabilities(self.model(inputs)).cpu().numpy().astype(np.float32, copy=False)
        return {
            "scene": np.asarray(batch["scene"], dtype=np.int64),
            "row": np.asarray(batch["row"], dtype=np.int64),
            "col": np.asarray(batch["col"], dtype=np.int64),
            "probabilities": probabilities,
            "valid": np.stack(valid).astype(np.uint8),
        }


def describe_path(path: str | Path) -> str:
    """A scene's name in messages and outputs: its file stem."""
    return Path(path).stem
