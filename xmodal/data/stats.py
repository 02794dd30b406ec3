"""Per-band normalisation statistics, computed once on the training split and stored beside the data.

``xmodal data stats`` writes ``stats.json``; the pipeline reads it and never recomputes. Only
valid (finite, not no-data) pixels count, and only the training split, so test data never leaks
into normalisation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.bands import BandSet, sar_to_db
from xmodal.data.manifest import STATS_FILE, Manifest, read_json, spread
from xmodal.data.readers.base import LoadOptions, get_reader
from xmodal.errors import DataError
from xmodal.progress import track

# Pixels kept per band for percentile estimates.
_RESERVOIR = 200_000


@dataclass
class BandStats:
    """Statistics of one band over the valid pixels of the training split."""

    name: str
    unit: str
    mean: float
    std: float
    p01: float
    p99: float
    valid_fraction: float


@dataclass
class DatasetStats:
    """Statistics of every band of both modalities.

    Attributes:
        sar_db: Whether SAR intensity bands were converted to dB before counting (must match the
            pipeline's setting).
        tiles: Number of tiles the statistics come from.
    """

    sar: list[BandStats]
    optical: list[BandStats]
    sar_db: bool
    tiles: int

    def mean_std(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        bands = getattr(self, modality)
        mean = np.array([b.mean for b in bands], dtype=np.float32)
        std = np.array([max(b.std, 1e-6) for b in bands], dtype=np.float32)
        return mean, std

    def to_dict(self) -> dict[str, Any]:
        return {
            "sar": [vars(b) for b in self.sar],
            "optical": [vars(b) for b in self.optical],
            "sar_db": self.sar_db,
            "tiles": self.tiles,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = STATS_FILE) -> DatasetStats:
        try:
            stats = cls(
                sar=[BandStats(**b) for b in data["sar"]],
                optical=[BandStats(**b) for b in data["optical"]],
                sar_db=bool(data["sar_db"]),
                tiles=int(data["tiles"]),
            )
        except (KeyError, TypeError) as exc:
            raise DataError(f"{source}: malformed statistics ({exc}); recompute with `xmodal data stats`") from exc
        stats.check_values(source)
        return stats

    def check_values(self, source: str) -> None:
        """Refuse statistics that would normalise a band into garbage: a non-finite value (every
        pixel becomes NaN) or a standard deviation that is not positive (a constant band)."""
        for modality in ("sar", "optical"):
            for band in getattr(self, modality):
                for name in ("mean", "std", "p01", "p99"):
                    value = getattr(band, name)
                    if not isinstance(value, (int, float)) or not math.isfinite(value):
                        raise DataError(f"{source}: {modality} band {band.name!r} has {name}={value!r}; expected a finite number (recompute with `xmodal data stats`)")
                if band.std <= 0:
                    raise DataError(
                        f"{source}: {modality} band {band.name!r} has std={band.std!r}; expected > 0 (a band constant over the "
                        "training split cannot be normalised: recompute with `xmodal data stats`, or drop the band)"
                    )

    def check_bands(self, manifest: Manifest, source: str) -> None:
        """Refuse statistics computed for other bands than the manifest's."""
        for modality, band_set in (("sar", manifest.info.sar_bands), ("optical", manifest.info.optical_bands)):
            names = [b.name for b in getattr(self, modality)]
            if names != band_set.names:
                raise DataError(f"{source}: {modality} statistics are for bands {names}, the data has {band_set.names}")


def convert_sar(sar: np.ndarray, bands: BandSet, to_db: bool) -> np.ndarray:
    """Convert intensity bands (linear, amplitude) to dB when ``to_db``; other bands pass through."""
    if not to_db:
        return sar
    out = sar.copy() if any(u in ("linear", "amplitude") for u in bands.units) else sar
    for index, unit in enumerate(bands.units):
        if unit in ("linear", "amplitude"):
            out[index] = sar_to_db(sar[index], unit)
    return out


class _Accumulator:
    """Streaming mean/variance (in float64) plus a reservoir for percentiles, per band."""

    def __init__(self, bands: BandSet, rng: np.random.Generator, converted_to_db: bool = False) -> None:
        self.bands = bands
        self.converted_to_db = converted_to_db
        count = len(bands)
        self.total = np.zeros(count)
        self.sum = np.zeros(count)
        self.sum_sq = np.zeros(count)
        self.seen = np.zeros(count)
        self.reservoir: list[list[np.ndarray]] = [[] for _ in range(count)]
        self.rng = rng

    def add(self, image: np.ndarray, valid: np.ndarray) -> None:
        for index in range(image.shape[0]):
            band = image[index]
            ok = valid & np.isfinite(band)
            values = band[ok].astype(np.float64)
            self.total[index] += band.size
            self.seen[index] += values.size
            self.sum[index] += values.sum()
            self.sum_sq[index] += np.square(values).sum()
            if values.size:
                take = min(values.size, 4096)
                self.reservoir[index].append(self.rng.choice(values, size=take, replace=False))

    def result(self) -> list[BandStats]:
        out = []
        for index, band in enumerate(self.bands.bands):
            if self.seen[index] == 0:
                raise DataError(f"band {band.name!r}: no valid pixel in the training split; cannot normalise it")
            mean = self.sum[index] / self.seen[index]
            var = max(self.sum_sq[index] / self.seen[index] - mean**2, 0.0)
            pool = np.concatenate(self.reservoir[index])
            if pool.size > _RESERVOIR:
                pool = self.rng.choice(pool, size=_RESERVOIR, replace=False)
            out.append(
                BandStats(
                    name=band.name,
                    unit="dB" if self.converted_to_db and band.unit in ("linear", "amplitude") else band.unit,
                    mean=float(mean),
                    std=float(np.sqrt(var)),
                    p01=float(np.percentile(pool, 1)),
                    p99=float(np.percentile(pool, 99)),
                    valid_fraction=float(self.seen[index] / self.total[index]),
                )
            )
        return out


def compute_stats(
    manifest: Manifest,
    *,
    sar_db: bool = True,
    split: str = "train",
    max_tiles: int | None = 2000,
    seed: int = 0,
) -> DatasetStats:
    """Compute per-band statistics over the valid pixels of ``split``.

    Args:
        manifest: A split manifest (records carry ``split``).
        sar_db: Convert SAR intensity bands to dB first (must match the pipeline).
        split: Which split to count; ``"all"`` counts every record (only for unsplit data).
        max_tiles: Upper bound on tiles read (evenly spaced); ``None`` reads all.
        seed: Seed for the percentile reservoir.
    """
    records = manifest.records if split == "all" else manifest.split(split)
    if not records:
        raise DataError(f"no records in split {split!r}; assign splits before computing statistics")
    if max_tiles is not None:
        records = spread(records, max_tiles)
    reader = get_reader(manifest.info.reader)
    rng = np.random.default_rng(seed)
    sar_acc = _Accumulator(manifest.info.sar_bands, rng, converted_to_db=sar_db)
    opt_acc = _Accumulator(manifest.info.optical_bands, rng)
    for record in track(records, "statistics", unit="tile"):
        sample = reader.load(record, manifest.info, manifest.data_root, LoadOptions())
        sar = convert_sar(sample.sar, manifest.info.sar_bands, sar_db)
        sar_valid = sample.sar_valid if sample.sar_valid is not None else np.ones(sample.shape, bool)
        opt_valid = sample.optical_valid if sample.optical_valid is not None else np.ones(sample.shape, bool)
        sar_acc.add(sar, sar_valid)
        opt_acc.add(sample.optical, opt_valid)
    return DatasetStats(sar=sar_acc.result(), optical=opt_acc.result(), sar_db=sar_db, tiles=len(records))


def save_stats(stats: DatasetStats, folder: str | Path) -> Path:
    path = Path(folder) / STATS_FILE
    path.write_text(json.dumps(stats.to_dict(), indent=2))
    return path


def load_stats(folder: str | Path) -> DatasetStats:
    """Read ``stats.json`` from a prepared dataset folder."""
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; compute it once with `xmodal data stats {folder}`")
    return DatasetStats.from_dict(read_json(path), source=str(path))
