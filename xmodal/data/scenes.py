"""Whole scenes on a common grid: the primitives of the scenes reader and of ``xmodal predict``.

A user's own SAR scene, optical scene and labels come in any CRS and resolution. Everything here
works on a target :class:`~xmodal.data.geotiff.RasterGrid` (usually one tile window of the SAR
scene's grid) and reads only the part of a file that covers it, so a scene larger than memory is
never read whole.

Resampling follows what each kind of value is:

* SAR intensity (``linear``, ``dB``, ``amplitude``) is resampled in linear power, then returned in
  the file's unit: averaging dB values would bias backscatter low (the mean of logs is below the
  log of the mean). Other SAR units (complex parts, log intensity) are resampled as stored.
* Optical values (reflectance, DN) are resampled as stored.
* Both use bilinear interpolation when the source is about as fine as the target or coarser, and
  the area average when the source is finer than the target by more than
  :data:`AVERAGE_ABOVE` (bilinear would alias: it reads 4 of the many source pixels under a target
  pixel).
* Classes use the nearest source pixel (``mode`` when much finer), never an interpolation.

No-data (the file's nodata value, NaN, and anything outside the file's footprint) comes back as
NaN for images and as ``ignore_index`` for classes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import CRSError, RasterioIOError
from rasterio.transform import Affine
from rasterio.warp import calculate_default_transform, reproject, transform_bounds, transform_geom
from rasterio.windows import Window, from_bounds

from xmodal.data.bands import BandSet, DB_FLOOR_LINEAR
from xmodal.data.geotiff import RasterGrid, crs_string
from xmodal.data.sample import IGNORE_INDEX
from xmodal.errors import DataError

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt")
VECTOR_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp")
IMAGE_KINDS = ("sar", "optical")
KINDS = (*IMAGE_KINDS, "classes")
# Source pixels finer than the target by more than this factor are averaged (mode for classes).
AVERAGE_ABOVE = 1.5
# Vector label files up to this size are read once per process and indexed; larger ones per tile.
VECTOR_CACHE_BYTES = 256 * 2**20
# Source pixels read beyond the target's footprint, so interpolation at the edges has neighbours.
_MARGIN_PX = 2
# RFC 7946: a GeoJSON without a ``crs`` member is WGS 84 longitude/latitude.
_GEOJSON_DEFAULT_CRS = "EPSG:4326"


def _open(path: str | Path) -> rasterio.io.DatasetReader:
    path = str(path)
    if not path.startswith("/vsi") and not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    try:
        return rasterio.open(path)
    except RasterioIOError as exc:
        raise DataError(f"{path}: cannot be read as a raster ({exc})") from exc


def _grid_of(src: rasterio.io.DatasetReader, path: str | Path) -> RasterGrid:
    if src.crs is None:
        raise DataError(f"{path}: has no CRS; a scene must be georeferenced (write its CRS, e.g. with gdal_edit.py -a_srs)")
    if src.transform.is_identity:
        raise DataError(f"{path}: has no geotransform (pixel coordinates only); a scene must be georeferenced")
    return RasterGrid(crs=crs_string(src.crs), transform=tuple(src.transform)[:6], height=src.height, width=src.width)


def scene_grid(path: str | Path) -> RasterGrid:
    """The grid (CRS, transform, size) of a raster scene, from its header only.

    Raises:
        DataError: Naming the file, when it is missing, not a raster, or not georeferenced.
    """
    with _open(path) as src:
        return _grid_of(src, path)


def scene_bands(
    path: str | Path, modality: str, names: Sequence[str] | None = None, unit: str | Sequence[str] | None = None
) -> BandSet:
    """The bands of a scene: stated by the user, else read from the file.

    Band names come from ``names`` or the file's band descriptions; units from ``unit`` (one for
    all bands or one per band), else each band's ``unit`` tag (as xmodal writes it), else the
    file's own ``unit`` tag. xmodal never guesses a unit.

    Raises:
        DataError: Naming the file, when a name or unit is neither stated nor in the file, or the
            stated count differs from the file's band count, or a unit is not one of the
            modality's units.
    """
    with _open(path) as src:
        count = src.count
        descriptions = list(src.descriptions)
        band_units = [src.tags(index).get("unit") for index in range(1, count + 1)]
        file_unit = src.tags().get("unit")
    if names is not None:
        names = [str(name) for name in names]
        if len(names) != count:
            raise DataError(f"{path}: {len(names)} band name(s) stated {names}, the file has {count} band(s)")
    else:
        if not all(descriptions):
            raise DataError(
                f"{path}: band names unknown (band descriptions {descriptions}); state them, e.g. "
                f"`{modality}: {{bands: [...]}}` in scenes.yaml"
            )
        names = [str(text) for text in descriptions]
    if unit is not None:
        units = [unit] * count if isinstance(unit, str) else [str(u) for u in unit]
    elif all(band_units):
        units = [str(u) for u in band_units]
    elif file_unit:
        units = [file_unit] * count
    else:
        raise DataError(
            f"{path}: {modality} unit unknown (no 'unit' tag on the file or its bands); state it, e.g. "
            f"`{modality}: {{unit: ...}}` in scenes.yaml"
        )
    try:
        return BandSet.of(modality, names, units)  # type: ignore[arg-type]
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None


def target_grid(grid: RasterGrid, crs: str | None = None, resolution: float | None = None) -> RasterGrid:
    """The ground of ``grid`` on another CRS and/or pixel size (north-up, square pixels).

    Args:
        grid: The grid whose footprint is kept.
        crs: Target CRS (authority string or WKT); ``None`` keeps the grid's.
        resolution: Target pixel size in the target CRS's units; ``None``: GDAL's default choice,
            which keeps about the same number of pixels.
    """
    if crs is None and resolution is None:
        return grid
    try:
        src_crs, dst_crs = CRS.from_user_input(grid.crs), CRS.from_user_input(crs or grid.crs)
    except CRSError as exc:
        raise DataError(f"target crs {crs!r} is not a CRS GDAL knows ({exc})") from None
    if resolution is not None and not resolution > 0:
        raise DataError(f"target resolution {resolution!r}; expected a pixel size > 0")
    transform, width, height = calculate_default_transform(
        src_crs, dst_crs, grid.width, grid.height, *grid.bounds, resolution=resolution
    )
    return RasterGrid(crs=crs_string(dst_crs), transform=tuple(transform)[:6], height=int(height), width=int(width))


def window_grid(grid: RasterGrid, row: int, col: int, height: int, width: int) -> RasterGrid:
    """The grid of the window (``row``, ``col``, ``height``, ``width``) of ``grid``, in its pixels."""
    transform = Affine(*grid.transform[:6]) * Affine.translation(col, row)
    return RasterGrid(crs=grid.crs, transform=tuple(transform)[:6], height=int(height), width=int(width))


def footprint_in(grid: RasterGrid, crs: str) -> tuple[float, float, float, float]:
    """Bounds (left, bottom, right, top) of ``grid`` in ``crs``, its edges densified so that a
    curved projected edge is still enclosed."""
    if CRS.from_user_input(grid.crs) == CRS.from_user_input(crs):
        return grid.bounds
    return transform_bounds(CRS.from_user_input(grid.crs), CRS.from_user_input(crs), *grid.bounds, densify_pts=21)


def _to_power(values: np.ndarray, unit: str) -> np.ndarray:
    if unit == "dB":
        return np.power(10.0, values / 10.0)
    if unit == "amplitude":
        return np.square(values)
    return values


def _from_power(values: np.ndarray, unit: str) -> np.ndarray:
    if unit == "dB":
        return 10.0 * np.log10(np.maximum(values, DB_FLOOR_LINEAR))
    if unit == "amplitude":
        return np.sqrt(np.maximum(values, 0.0))
    return values


def _aligned_offset(src: rasterio.io.DatasetReader, grid: RasterGrid) -> tuple[int, int] | None:
    """(row, col) of ``grid``'s origin in the source's pixels when both share CRS and pixel lattice."""
    if crs_string(src.crs) != grid.crs:
        return None
    a, b, c, d, e, f = grid.transform[:6]
    s = src.transform
    if not (math.isclose(a, s.a, rel_tol=1e-9) and math.isclose(e, s.e, rel_tol=1e-9) and b == s.b == 0 and d == s.d == 0):
        return None
    col, row = (c - s.c) / s.a, (f - s.f) / s.e
    if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
        return None
    return int(round(row)), int(round(col))


def _exact_read(src: rasterio.io.DatasetReader, grid: RasterGrid, row: int, col: int, fill: float) -> tuple[np.ndarray, np.ndarray]:
    """The window of an aligned source, cells outside the file set to ``fill`` (and marked invalid)."""
    out = np.full((src.count, grid.height, grid.width), fill, dtype=np.float64)
    inside = np.zeros((grid.height, grid.width), dtype=bool)
    top, left = max(row, 0), max(col, 0)
    bottom, right = min(row + grid.height, src.height), min(col + grid.width, src.width)
    if bottom > top and right > left:
        data = src.read(window=Window(left, top, right - left, bottom - top))
        out[:, top - row : bottom - row, left - col : right - col] = data
        inside[top - row : bottom - row, left - col : right - col] = True
    return out, inside


def _source_window(src: rasterio.io.DatasetReader, grid: RasterGrid) -> Window | None:
    """The source pixels under ``grid``'s footprint plus a margin, clipped to the file (``None``: none)."""
    left, bottom, right, top = footprint_in(grid, crs_string(src.crs))
    window = from_bounds(left, bottom, right, top, transform=src.transform)
    col0 = max(int(math.floor(window.col_off)) - _MARGIN_PX, 0)
    row0 = max(int(math.floor(window.row_off)) - _MARGIN_PX, 0)
    col1 = min(int(math.ceil(window.col_off + window.width)) + _MARGIN_PX, src.width)
    row1 = min(int(math.ceil(window.row_off + window.height)) + _MARGIN_PX, src.height)
    if col1 <= col0 or row1 <= row0:
        return None
    return Window(col0, row0, col1 - col0, row1 - row0)


@functools.lru_cache(maxsize=256)
def _pixel_in(source: RasterGrid, crs: str) -> float:
    """The side of a source pixel measured in ``crs`` units (its footprint's area per pixel).
    Cached: every tile of a scene asks the same, and each transform costs milliseconds."""
    left, bottom, right, top = footprint_in(source, crs)
    return math.sqrt(max((right - left) * (top - bottom), 0.0) / max(source.width * source.height, 1))


def _resampling(src: rasterio.io.DatasetReader, grid: RasterGrid, kind: str) -> Resampling:
    # Compare pixel sizes on the ground, both in the target CRS.
    source_px = _pixel_in(RasterGrid(crs_string(src.crs), tuple(src.transform)[:6], src.height, src.width), grid.crs)
    finer = grid.pixel_size / source_px if source_px > 0 else 1.0
    if kind == "classes":
        return Resampling.mode if finer > AVERAGE_ABOVE else Resampling.nearest
    return Resampling.average if finer > AVERAGE_ABOVE else Resampling.bilinear


def read_on_grid(
    path: str | Path, grid: RasterGrid, kind: str, *, units: Sequence[str] | None = None, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """The values of a raster on ``grid``, reading only the part of the file that covers it.

    Args:
        path: Raster file (local path or GDAL virtual path).
        grid: Target grid (CRS, transform, size), e.g. one tile window of a SAR scene.
        kind: ``sar`` or ``optical`` (C x H x W float32, NaN where there is no data) or
            ``classes`` (H x W int64 from band 1, ``ignore_index`` where there is no data).
        units: For ``sar``, each band's unit, so intensities resample in linear power.
        ignore_index: Class value for no-data and for pixels outside the file.

    Raises:
        DataError: Naming the file, when it is missing, not georeferenced, ``units`` does not
            match its bands, or ``kind`` is unknown.
    """
    if kind not in KINDS:
        raise DataError(f"read_on_grid: kind={kind!r}; expected one of {KINDS}")
    with _open(path) as src:
        _grid_of(src, path)
        if units is not None and len(units) != src.count:
            raise DataError(f"{path}: {len(units)} unit(s) given for {src.count} band(s)")
        nodata = src.nodata
        offset = _aligned_offset(src, grid)
        if offset is not None:
            values, inside = _exact_read(src, grid, *offset, fill=np.nan)
        else:
            values, inside = _warped_read(src, grid, kind, units, nodata)
    if kind == "classes":
        band = values[0]
        invalid = ~inside | ~np.isfinite(band)
        if nodata is not None:
            invalid |= band == nodata
        out = np.where(invalid, ignore_index, np.nan_to_num(band)).astype(np.int64)
        return out
    if nodata is not None and not np.isnan(nodata):
        values[values == nodata] = np.nan
    values[:, ~inside] = np.nan
    return values.astype(np.float32)


def _warped_read(
    src: rasterio.io.DatasetReader, grid: RasterGrid, kind: str, units: Sequence[str] | None, nodata: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Reproject the covering source window onto ``grid`` (float64 values, and where it had data)."""
    out = np.full((src.count, grid.height, grid.width), np.nan, dtype=np.float64)
    window = _source_window(src, grid)
    if window is None:
        return out, np.zeros((grid.height, grid.width), dtype=bool)
    source = src.read(window=window).astype(np.float64)
    if nodata is not None and not np.isnan(nodata):
        source[source == nodata] = np.nan
    band_units = list(units) if units is not None else [""] * src.count
    if kind == "sar":
        source = np.stack([_to_power(band, unit) for band, unit in zip(source, band_units)])
    resampling = _resampling(src, grid, kind)
    reproject(
        source=source,
        destination=out,
        src_transform=src.window_transform(window),
        src_crs=src.crs,
        src_nodata=np.nan,
        dst_transform=Affine(*grid.transform[:6]),
        dst_crs=CRS.from_user_input(grid.crs),
        dst_nodata=np.nan,
        resampling=resampling,
    )
    if kind == "sar":
        out = np.stack([_from_power(band, unit) for band, unit in zip(out, band_units)])
    return out, np.isfinite(out).all(axis=0) if kind != "classes" else np.isfinite(out[0])


def _file_key(path: str | Path) -> tuple[str, int, int]:
    """A cache key that changes when the file does (path, modification time, size)."""
    try:
        stat = Path(path).stat()
    except OSError:
        raise DataError(f"{path}: file not found") from None
    return str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size


def vector_crs(path: str | Path) -> str:
    """The CRS of a vector file; a GeoJSON without one is WGS 84 lon/lat (RFC 7946).

    Raises:
        DataError: Naming the file, when it cannot be read, has no CRS (other than GeoJSON), or
            its coordinates lie outside the lon/lat range while its CRS is lon/lat (projected
            metres in a GeoJSON without a ``crs`` member would land nowhere).
    """
    return _vector_crs(*_file_key(path))


@functools.lru_cache(maxsize=64)
def _vector_crs(path: str, _mtime_ns: int, _size: int) -> str:
    import pyogrio

    try:
        info = pyogrio.read_info(path, force_total_bounds=True)
    except Exception as exc:  # noqa: BLE001 - pyogrio raises its own errors for unreadable files
        raise DataError(f"{path}: cannot be read as a vector file ({type(exc).__name__}: {exc})") from None
    crs = str(info["crs"]) if info.get("crs") else None
    if crs is None:
        if Path(path).suffix.lower() not in (".geojson", ".json"):
            raise DataError(f"{path}: has no CRS (no .prj / srs); a label file must say where it lies")
        crs = _GEOJSON_DEFAULT_CRS
    bounds = info.get("total_bounds")
    if CRS.from_user_input(crs).is_geographic and bounds is not None and info.get("features"):
        left, bottom, right, top = bounds
        if left < -180 or right > 180 or bottom < -90 or top > 90:
            raise DataError(
                f"{path}: its CRS is lon/lat ({crs}, as for a GeoJSON with no 'crs' member: RFC 7946) but its coordinates "
                f"are not lon/lat (x {left:.6g} to {right:.6g}, y {bottom:.6g} to {top:.6g}; expected |x| <= 180, |y| <= 90); "
                "name their CRS (a 'crs' member, a .prj) or write lon/lat"
            )
    return crs


@dataclass(frozen=True)
class _VectorLayer:
    """A vector file's features in one CRS, with a spatial index (read once per process)."""

    geometries: np.ndarray  # shapely geometries in the target CRS
    values: np.ndarray  # int64 burn value per geometry
    tree: Any  # shapely.STRtree over ``geometries``


def _read_features(path: str, field: str | None, bbox: tuple[float, float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Geometries (shapely) and burn values of a vector file, optionally inside ``bbox`` only."""
    import pyogrio
    import shapely

    try:
        _meta, _fids, wkb, field_data = pyogrio.raw.read(path, bbox=bbox, columns=[field] if field else [])
    except Exception as exc:  # noqa: BLE001
        if field and field in str(exc):
            raise DataError(f"{path}: has no attribute field {field!r}") from None
        raise DataError(f"{path}: cannot be read as a vector file ({type(exc).__name__}: {exc})") from None
    geometries = shapely.from_wkb(wkb) if wkb is not None else np.array([], dtype=object)
    values = np.ones(len(geometries), dtype=np.int64)
    if field:
        raw = np.asarray(field_data[0])
        try:
            numbers = raw.astype(np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{path}: field {field!r} holds non-numeric values (e.g. {raw[:3].tolist()})") from None
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers)) | (numbers < 0) | (numbers > 255)
        if bad.any():
            raise DataError(f"{path}: field {field!r} value {raw[bad][0]!r} is not an integer class in 0..255")
        values = numbers.astype(np.int64)
    keep = ~(shapely.is_missing(geometries) | shapely.is_empty(geometries)) if len(geometries) else np.zeros(0, bool)
    return geometries[keep], values[keep]


def _reproject_geometries(geometries: np.ndarray, source_crs: str, target_crs: str) -> np.ndarray:
    import shapely

    if len(geometries) == 0 or CRS.from_user_input(source_crs) == CRS.from_user_input(target_crs):
        return geometries
    # One call for every feature: GDAL builds the coordinate transformation once.
    moved = transform_geom(source_crs, target_crs, [shapely.geometry.mapping(g) for g in geometries])
    return np.array([shapely.geometry.shape(g) for g in moved], dtype=object)


@functools.lru_cache(maxsize=8)
def _vector_layer(path: str, _mtime_ns: int, _size: int, field: str | None, target_crs: str) -> _VectorLayer:
    import shapely

    geometries, values = _read_features(path, field)
    geometries = _reproject_geometries(geometries, _vector_crs(path, _mtime_ns, _size), target_crs)
    return _VectorLayer(geometries=geometries, values=values, tree=shapely.STRtree(geometries))


def rasterise_vector(
    path: str | Path, grid: RasterGrid, *, field: str | None = None, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Burn the features of a vector file that fall on ``grid``.

    A file up to :data:`VECTOR_CACHE_BYTES` is read once per process, reprojected once onto the
    grid's CRS and indexed (STRtree), so each tile costs a spatial query and a burn: GeoJSON has no
    spatial index, and reading it per tile took ~1 s for 5,000 buildings. A larger file is read per
    tile by bounding box, which needs a format with a spatial index (GeoPackage, or a Shapefile
    with its .qix); a larger GeoJSON is refused.

    Args:
        path: GeoJSON, GeoPackage or Shapefile (anything GDAL/OGR reads through pyogrio).
        grid: Target grid.
        field: Attribute whose integer value is burned; ``None`` burns 1 (e.g. buildings on 0).
        ignore_index: A field value equal to it marks unknown ground (burned as it is).

    Returns:
        H x W int64: the burned value where a feature covers a pixel centre, 0 elsewhere.

    Raises:
        DataError: Naming the file, when it cannot be read, has no CRS (other than GeoJSON), a
            CRS-less GeoJSON is not lon/lat, ``field`` is missing, a value is not an integer
            in 0..255, or it is too large to cache and has no spatial index.
    """
    from rasterio import features
    import shapely

    key = _file_key(path)
    if key[2] <= VECTOR_CACHE_BYTES:
        layer = _vector_layer(*key, field, grid.crs)
        hits = layer.tree.query(shapely.box(*grid.bounds))
        geometries, values = layer.geometries[hits], layer.values[hits]
    else:
        import pyogrio

        if not pyogrio.read_info(str(path)).get("capabilities", {}).get("fast_spatial_filter"):
            raise DataError(
                f"{path}: {key[2] / 2**20:.0f} MiB of features in a format without a spatial index; convert it to a "
                f"GeoPackage (ogr2ogr labels.gpkg {Path(path).name}) so each tile reads only its features"
            )
        source_crs = vector_crs(path)
        geometries, values = _read_features(str(path), field, bbox=footprint_in(grid, source_crs))
        geometries = _reproject_geometries(geometries, source_crs, grid.crs)
    if len(geometries) == 0:
        return np.zeros((grid.height, grid.width), dtype=np.int64)
    burned = features.rasterize(
        zip(geometries, (int(v) for v in values)), out_shape=(grid.height, grid.width),
        transform=Affine(*grid.transform[:6]), fill=0, dtype="uint8",
    )
    return burned.astype(np.int64)
