"""GeoTIFF reading and writing with errors that name the file and the problem.

Every reader goes through :func:`read_raster`, so a corrupt file, a wrong band count or a pair
whose grids differ is caught in one place.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine

from xmodal.data.storage import gdal_options, is_remote
from xmodal.errors import DataError, PairingError


@dataclass(frozen=True)
class RasterGrid:
    """Georeferencing of a raster: CRS, transform and size."""

    crs: str
    transform: tuple[float, ...]
    height: int
    width: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        affine = Affine(*self.transform[:6])
        xs = [affine.c, affine.c + affine.a * self.width]
        ys = [affine.f, affine.f + affine.e * self.height]
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def pixel_size(self) -> float:
        return abs(self.transform[0])


@dataclass
class Raster:
    """Pixels plus georeferencing of one file."""

    data: np.ndarray  # C x H x W
    grid: RasterGrid
    nodata: float | None
    descriptions: tuple[str | None, ...]
    tags: dict[str, str]
    path: str


def crs_string(crs: CRS | None) -> str:
    """A stable text form of a CRS: ``EPSG:n`` where possible, WKT otherwise."""
    if crs is None:
        return ""
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def read_raster(
    path: str | Path,
    *,
    expected_bands: int | None = None,
    dtype: type = np.float32,
    out_shape: tuple[int, int] | None = None,
    resampling: rasterio.enums.Resampling = rasterio.enums.Resampling.nearest,
) -> Raster:
    """Read a whole GeoTIFF.

    Args:
        path: File to read: a local path, an ``s3://`` / ``gs://`` URI (read through GDAL's
            ``/vsis3/`` / ``/vsigs/``, see :func:`~xmodal.data.storage.gdal_options`) or a GDAL
            virtual path such as ``/vsis3/...``.
        expected_bands: Refuse files whose band count differs.
        dtype: Output dtype; float outputs turn the file's no-data value into NaN.
        out_shape: Resample to this (height, width) on read.
        resampling: Resampling used with ``out_shape``.

    Raises:
        DataError: The file is missing, cannot be decoded, or has the wrong band count.
    """
    path = str(path)
    if not path.startswith("/vsi") and not is_remote(path) and not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    try:
        options = gdal_options(path)
        with rasterio.Env(**options) if options else nullcontext(), rasterio.open(path) as src:
            if expected_bands is not None and src.count != expected_bands:
                raise DataError(f"{path}: has {src.count} band(s), expected {expected_bands}")
            kwargs: dict[str, Any] = {}
            if out_shape is not None:
                kwargs = {"out_shape": (src.count, *out_shape), "resampling": resampling}
            data = src.read(**kwargs)
            nodata = src.nodata
            transform = src.transform
            if out_shape is not None:
                transform = transform @ Affine.scale(src.width / out_shape[1], src.height / out_shape[0])
            grid = RasterGrid(
                crs=crs_string(src.crs),
                transform=tuple(transform)[:6],
                height=data.shape[1],
                width=data.shape[2],
            )
            descriptions = src.descriptions
            tags = src.tags()
    except RasterioIOError as exc:
        raise DataError(f"{path}: cannot be read as a GeoTIFF ({exc})") from exc
    if np.issubdtype(dtype, np.floating):
        data = data.astype(dtype, copy=False)
        if nodata is not None and not np.isnan(nodata):
            data[data == nodata] = np.nan
    else:
        data = data.astype(dtype, copy=False)
    return Raster(data=data, grid=grid, nodata=nodata, descriptions=descriptions, tags=tags, path=path)


def check_same_grid(a: RasterGrid, b: RasterGrid, path_a: str, path_b: str, tolerance_px: float = 0.5) -> None:
    """Refuse a pair whose CRS, size or bounds differ (more than ``tolerance_px`` pixels).

    Raises:
        PairingError: Naming both files and what differs.
    """
    if a.crs != b.crs:
        raise PairingError(f"{path_a} and {path_b}: CRS differ ({a.crs} vs {b.crs}); reproject one onto the other's grid")
    if (a.height, a.width) != (b.height, b.width):
        raise PairingError(f"{path_a} and {path_b}: sizes differ ({a.height}x{a.width} vs {b.height}x{b.width})")
    tolerance = tolerance_px * max(a.pixel_size, b.pixel_size)
    if any(abs(x - y) > tolerance for x, y in zip(a.bounds, b.bounds)):
        raise PairingError(f"{path_a} and {path_b}: bounds differ ({a.bounds} vs {b.bounds}) by more than {tolerance_px} px")


def write_raster(
    path: str | Path,
    data: np.ndarray,
    *,
    crs: str,
    transform: Affine,
    nodata: float | None = None,
    descriptions: list[str] | None = None,
    tags: dict[str, str] | None = None,
    band_tags: list[dict[str, str]] | None = None,
    compress: str | None = None,
) -> None:
    """Write a C x H x W (or H x W) array as a tiled GeoTIFF with band names and unit tags."""
    if data.ndim == 2:
        data = data[None]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "crs": CRS.from_user_input(crs),
        "transform": transform,
        "nodata": nodata,
    }
    if data.shape[1] % 16 == 0 and data.shape[2] % 16 == 0 and data.shape[1] >= 64:
        profile.update(tiled=True, blockxsize=min(256, data.shape[2]), blockysize=min(256, data.shape[1]))
    if compress:
        profile["compress"] = compress
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if descriptions:
            for band_index, text in enumerate(descriptions, start=1):
                dst.set_band_description(band_index, text)
        if tags:
            dst.update_tags(**tags)
        if band_tags:
            for band_index, band_tag in enumerate(band_tags, start=1):
                dst.update_tags(band_index, **band_tag)
