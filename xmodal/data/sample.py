"""The one paired-sample contract used by every reader, the pipeline and every method.

A :class:`PairedSample` holds co-registered SAR and optical arrays of one tile plus its labels
and metadata. Readers produce it; the pipeline turns batches of it into fixed-shape tensors.

Array conventions:
    * ``sar``: C x H x W float32, in the units its :class:`~xmodal.data.bands.BandSet` states.
    * ``optical``: C x H x W float32.
    * ``mask`` / ``noisy_mask``: H x W int64, :data:`IGNORE_INDEX` where unknown.
    * ``label``: scene class (int), :data:`NO_LABEL` when the dataset has none.
    * ``sar_valid`` / ``optical_valid``: H x W bool, False where the reader found no-data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xmodal.errors import DataError

IGNORE_INDEX = 255
NO_LABEL = -1


@dataclass(frozen=True)
class TileMeta:
    """Where a tile lies on the ground.

    Attributes:
        tile_id: Unique id within its dataset.
        region: Geographic group (city, strip, region) used for splits.
        crs: CRS as an authority string (``"EPSG:32631"``) or WKT.
        bounds: (left, bottom, right, top) in ``crs`` units.
    """

    tile_id: str
    region: str
    crs: str
    bounds: tuple[float, float, float, float]

    def overlaps(self, other: TileMeta) -> bool:
        """True when the two footprints share a positive area (same CRS required)."""
        if self.crs != other.crs:
            return False
        left, bottom, right, top = self.bounds
        o_left, o_bottom, o_right, o_top = other.bounds
        return min(right, o_right) > max(left, o_left) and min(top, o_top) > max(bottom, o_bottom)


@dataclass
class PairedSample:
    """One aligned SAR/optical tile with optional labels."""

    sar: np.ndarray
    optical: np.ndarray
    meta: TileMeta
    mask: np.ndarray | None = None
    noisy_mask: np.ndarray | None = None
    label: int = NO_LABEL
    sar_valid: np.ndarray | None = None
    optical_valid: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check dtypes and shapes; raise :class:`DataError` naming the tile and the field."""
        where = f"tile {self.meta.tile_id!r}"
        for name in ("sar", "optical"):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim != 3:
                shape = getattr(array, "shape", None)
                raise DataError(f"{where}: {name} must be a C x H x W array, got shape {shape}")
            if array.dtype != np.float32:
                raise DataError(f"{where}: {name} must be float32, got {array.dtype}")
        height, width = self.sar.shape[1:]
        if self.optical.shape[1:] != (height, width):
            raise DataError(
                f"{where}: sar is {height}x{width} but optical is "
                f"{self.optical.shape[1]}x{self.optical.shape[2]}; pairs must share one pixel grid"
            )
        for name in ("mask", "noisy_mask"):
            array = getattr(self, name)
            if array is None:
                continue
            if array.shape != (height, width):
                raise DataError(f"{where}: {name} shape {array.shape} differs from the image {height}x{width}")
            if array.dtype != np.int64:
                raise DataError(f"{where}: {name} must be int64, got {array.dtype}")
        for name in ("sar_valid", "optical_valid"):
            array = getattr(self, name)
            if array is not None and (array.shape != (height, width) or array.dtype != bool):
                raise DataError(f"{where}: {name} must be a bool {height}x{width} array")

    @property
    def shape(self) -> tuple[int, int]:
        return self.sar.shape[1], self.sar.shape[2]

    def valid(self) -> np.ndarray:
        """Pixels valid in both modalities and finite in every band."""
        ok = np.isfinite(self.sar).all(axis=0) & np.isfinite(self.optical).all(axis=0)
        if self.sar_valid is not None:
            ok &= self.sar_valid
        if self.optical_valid is not None:
            ok &= self.optical_valid
        return ok
