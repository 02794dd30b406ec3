"""A user's own scenes: SAR scene(s), optical scene(s) and label files in any CRS and resolution.

Three ways in (``xmodal data index PATH``, ``data.root: PATH``)::

    PATH = scenes.yaml (or any .yaml / .yml file)    # a listing, see :class:`ScenesReader`
    PATH = <folder>/scenes.yaml                      # the same, found in the folder
    PATH = <folder>/sar/*.tif
           <folder>/optical/*.tif
           <folder>/labels/<layer>.{tif,gpkg,geojson,shp}   or   <folder>/labels/<layer>/<files>

See :class:`ScenesReader` for the YAML keys, the conventions and the options.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import yaml
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine
from rasterio.warp import reproject, transform_bounds

from xmodal.data.bands import BandSet
from xmodal.data.geotiff import RasterGrid
from xmodal.data.manifest import DatasetInfo, LabelLayer, Manifest, make_record, record_extra, record_meta
from xmodal.data.readers.base import IndexResult, LoadOptions, Reader, Skipped, register_reader
from xmodal.data.sample import IGNORE_INDEX, PairedSample
from xmodal.data.scenes import (
    RASTER_SUFFIXES,
    VECTOR_SUFFIXES,
    footprint_in,
    rasterise_vector,
    read_on_grid,
    scene_bands,
    scene_grid,
    target_grid,
    vector_crs,
    window_grid,
)
from xmodal.data.splits import check_no_leakage, find_leaks, split_by_blocks, split_by_region, SplitSettings
from xmodal.errors import ConfigError, DataError

SCENES_FILE = "scenes.yaml"
YAML_SUFFIXES = (".yaml", ".yml")
SAR_FOLDER, OPTICAL_FOLDER, LABELS_FOLDER = "sar", "optical", "labels"

_TOP_KEYS = ("name", "sar", "optical", "labels", "target", "tiles", "split", "sar_look")
_MODALITY_KEYS = ("files", "bands", "unit")
_LABEL_KEYS = ("files", "classes", "field", "coverage")
_TARGET_KEYS = ("crs", "resolution")
_TILE_KEYS = ("size", "stride", "min_valid")
# Flat reader options (``--option tile_size=128``) and the YAML key each one sets.
_OPTION_ALIASES = {
    "tile_size": ("tiles", "size"),
    "stride": ("tiles", "stride"),
    "min_valid": ("tiles", "min_valid"),
    "crs": ("target", "crs"),
    "resolution": ("target", "resolution"),
    "block_size": ("split", "block_size"),
}
COVERAGES = ("bounds", "all")
LOOK_DIRECTIONS = ("east", "west", "north", "south")
DEFAULT_TILE_SIZE = 256
DEFAULT_MIN_VALID = 0.5
# Default split block: a whole number of tiles of ground on a side, at most this many, and small
# enough that the largest scene spans about MIN_BLOCKS blocks (a small scene still gets val/test).
MAX_BLOCK_TILES = 8
MIN_BLOCKS = 10
# The validity test at index time reads scenes decimated to about this many cells per tile side.
VALIDITY_CELLS_PER_TILE = 8


# ----------------------------------------------------------------------------- the listing


@dataclass
class ModalitySpec:
    """Scenes of one modality: their files and, when the files' tags do not say, bands and unit."""

    files: list[Path]
    bands: list[str] | None = None
    unit: str | list[str] | None = None


@dataclass
class LabelSpec:
    """One label layer: its files (rasters of class values, or vectors burnt as 1 / ``field``)."""

    name: str
    files: list[Path]
    classes: list[str]
    field: str | None = None
    coverage: str = "bounds"


@dataclass
class ScenesSpec:
    """The validated listing (YAML and/or reader options)."""

    name: str
    base: Path
    source: str
    sar: ModalitySpec
    optical: ModalitySpec
    labels: dict[str, LabelSpec]
    target_crs: str | None
    target_resolution: float | None
    tile_size: int
    stride: int
    min_valid: float
    split: dict[str, Any]
    sar_look: str | None = None
    listing: dict[str, Any] = field(default_factory=dict)


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override``'s values winning, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _options_as_listing(options: Mapping[str, Any]) -> dict[str, Any]:
    """Reader options in the YAML's shape (flat aliases such as ``tile_size`` moved to their section)."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in _OPTION_ALIASES:
            section, inner = _OPTION_ALIASES[key]
            out = _deep_merge(out, {section: {inner: value}})
        else:
            out = _deep_merge(out, {key: value})
    return out


def _check_keys(mapping: Any, known: tuple[str, ...], where: str) -> dict[str, Any]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {list(known)}, got {mapping!r}")
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; expected keys among {list(known)}")
    return dict(mapping)


def _files(value: Any, base: Path, where: str, suffixes: tuple[str, ...]) -> list[Path]:
    """Files named by a listing entry: a path, a glob pattern, or a list of them (relative to ``base``)."""
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, os.PathLike)) for v in value):
        raise ConfigError(f"{where}: expected a file path or a non-empty list of paths (globs allowed), got {value!r}")
    found: list[Path] = []
    for entry in value:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else base / path
        if glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).suffix.lower() in suffixes)
            if not matches:
                raise ConfigError(f"{where}: pattern {entry!r} matches no {'/'.join(suffixes)} file under {base}")
            found += matches
            continue
        if not path.is_file():
            raise ConfigError(f"{where}: {path} not found")
        if path.suffix.lower() not in suffixes:
            raise ConfigError(f"{where}: {path} is not one of {list(suffixes)}")
        found.append(path)
    if len(set(found)) != len(found):
        raise ConfigError(f"{where}: a file is listed twice ({[str(p) for p in found]})")
    return found


def _modality(raw: Any, modality: str, base: Path, source: str) -> ModalitySpec:
    where = f"{source}: {modality}"
    entry = _check_keys(raw, _MODALITY_KEYS, where)
    if "files" not in entry:
        raise ConfigError(f"{where}.files: required (the {modality} scene files)")
    bands = entry.get("bands")
    if bands is not None and (not isinstance(bands, list) or not bands or not all(isinstance(b, str) for b in bands)):
        raise ConfigError(f"{where}.bands: expected a list of band names, got {bands!r}")
    unit = entry.get("unit")
    if unit is not None and not (isinstance(unit, str) or (isinstance(unit, list) and all(isinstance(u, str) for u in unit))):
        raise ConfigError(f"{where}.unit: expected a unit name or one per band, got {unit!r}")
    return ModalitySpec(_files(entry["files"], base, f"{where}.files", RASTER_SUFFIXES), bands, unit)


def _label(name: str, raw: Any, base: Path, source: str) -> LabelSpec:
    where = f"{source}: labels.{name}"
    entry = _check_keys(raw, _LABEL_KEYS, where)
    if "files" not in entry:
        raise ConfigError(f"{where}.files: required (raster or vector label files)")
    files = _files(entry["files"], base, f"{where}.files", RASTER_SUFFIXES + VECTOR_SUFFIXES)
    kinds = {_is_vector(path) for path in files}
    if len(kinds) > 1:
        raise ConfigError(f"{where}.files: mixes raster and vector files; make one layer of each")
    vector = kinds.pop()
    label_field = entry.get("field")
    if label_field is not None and (not vector or not isinstance(label_field, str)):
        raise ConfigError(f"{where}.field: an attribute name of vector labels, got {label_field!r}")
    classes = entry.get("classes")
    if classes is None:
        if not vector or label_field is not None:
            raise ConfigError(
                f"{where}.classes: required for {'raster labels' if not vector else 'labels burnt from a field'} "
                "(class names, index = stored value)"
            )
        classes = ["background", name]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"{where}.classes: expected a list of at least 2 class names, got {classes!r}")
    if len(classes) > IGNORE_INDEX:
        raise ConfigError(f"{where}.classes: at most {IGNORE_INDEX} classes ({IGNORE_INDEX} means unknown)")
    coverage = entry.get("coverage", "bounds")
    if coverage not in COVERAGES:
        raise ConfigError(f"{where}.coverage: {coverage!r}; expected one of {list(COVERAGES)}")
    return LabelSpec(name, files, list(classes), label_field, coverage)


def _positive(value: Any, where: str, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (kind is int and value != int(value)):
        raise ConfigError(f"{where}: expected a positive {'integer' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def parse_listing(raw: Any, base: Path, source: str) -> ScenesSpec:
    """Validate a scenes listing (YAML contents merged with reader options).

    Args:
        raw: The mapping (see :class:`ScenesReader`).
        base: Folder relative paths are relative to.
        source: What to name in errors (the YAML path or the folder).

    Raises:
        ConfigError: Naming the key at fault and what was expected.
    """
    listing = _check_keys(raw, _TOP_KEYS, source)
    for key in ("sar", "optical"):
        if key not in listing:
            raise ConfigError(f"{source}: {key}: required (a mapping with files and, optionally, bands and unit)")
    sar = _modality(listing["sar"], "sar", base, source)
    optical = _modality(listing["optical"], "optical", base, source)
    labels_raw = listing.get("labels") or {}
    if not isinstance(labels_raw, Mapping):
        raise ConfigError(f"{source}: labels: expected a mapping of layer name -> {{files, classes, ...}}")
    labels = {str(name): _label(str(name), entry, base, source) for name, entry in labels_raw.items()}

    target = _check_keys(listing.get("target"), _TARGET_KEYS, f"{source}: target")
    target_crs = target.get("crs")
    if target_crs is not None:
        try:
            CRS.from_user_input(target_crs)
        except Exception as exc:  # rasterio raises CRSError; a non-string raises others
            raise ConfigError(f"{source}: target.crs {target_crs!r} is not a CRS rasterio knows ({exc})") from None
        target_crs = str(target_crs)
    resolution = target.get("resolution")
    if resolution is not None:
        resolution = _positive(resolution, f"{source}: target.resolution")

    tiles = _check_keys(listing.get("tiles"), _TILE_KEYS, f"{source}: tiles")
    size = _positive(tiles.get("size", DEFAULT_TILE_SIZE), f"{source}: tiles.size", int)
    stride = _positive(tiles.get("stride", size), f"{source}: tiles.stride", int)
    min_valid = tiles.get("min_valid", DEFAULT_MIN_VALID)
    if isinstance(min_valid, bool) or not isinstance(min_valid, (int, float)) or not 0 <= min_valid <= 1:
        raise ConfigError(f"{source}: tiles.min_valid: expected a share in [0, 1], got {min_valid!r}")

    split = listing.get("split") or {}
    if not isinstance(split, Mapping):
        raise ConfigError(f"{source}: split: expected a mapping (by, block_size, val_fraction, test_fraction, seed, ...)")
    try:  # checked now, before any pixel is read; the default block size is set once the grid is known
        SplitSettings.from_dict({"by": "blocks", "block_size": 1.0, **split})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    sar_look = listing.get("sar_look")
    if sar_look is not None and sar_look not in LOOK_DIRECTIONS:
        raise ConfigError(f"{source}: sar_look: {sar_look!r}; expected one of {list(LOOK_DIRECTIONS)} or null")
    name = listing.get("name", base.name or "scenes")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: name: expected a non-empty string, got {name!r}")
    return ScenesSpec(
        name=name,
        base=base,
        source=source,
        sar=sar,
        optical=optical,
        labels=labels,
        target_crs=target_crs,
        target_resolution=resolution,
        tile_size=size,
        stride=stride,
        min_valid=float(min_valid),
        split=dict(split),
        sar_look=sar_look,
        listing=dict(listing),
    )


def _is_vector(path: Path) -> bool:
    return path.suffix.lower() in VECTOR_SUFFIXES


def _scene_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_file() and Path(e.name).suffix.lower() in RASTER_SUFFIXES)


def _folder_listing(root: Path) -> dict[str, Any]:
    """The listing a ``sar/``, ``optical/``, ``labels/`` folder stands for."""
    listing: dict[str, Any] = {
        "sar": {"files": [f"{SAR_FOLDER}/{name}" for name in _scene_files(root / SAR_FOLDER)]},
        "optical": {"files": [f"{OPTICAL_FOLDER}/{name}" for name in _scene_files(root / OPTICAL_FOLDER)]},
    }
    for key, folder in (("sar", SAR_FOLDER), ("optical", OPTICAL_FOLDER)):
        if not listing[key]["files"]:
            raise DataError(f"{root / folder}: no {'/'.join(RASTER_SUFFIXES)} scene found")
    labels: dict[str, Any] = {}
    folder = root / LABELS_FOLDER
    suffixes = RASTER_SUFFIXES + VECTOR_SUFFIXES
    if folder.is_dir():
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.is_dir():
                files = sorted(f"{LABELS_FOLDER}/{path.name}/{p.name}" for p in path.iterdir() if p.suffix.lower() in suffixes)
                if files:
                    labels[path.name] = {"files": files}
            elif path.suffix.lower() in suffixes and not path.name.startswith("."):
                labels.setdefault(path.stem, {"files": []})["files"].append(f"{LABELS_FOLDER}/{path.name}")
    if labels:
        listing["labels"] = labels
    return listing


def _raster_classes_from_tags(spec_raw: dict[str, Any], base: Path) -> None:
    """Class names of raster label layers lacking ``classes``, from their first file's ``classes`` tag."""
    for name, entry in (spec_raw.get("labels") or {}).items():
        if not isinstance(entry, Mapping) or "classes" in entry or not entry.get("files"):
            continue
        first = entry["files"][0] if isinstance(entry["files"], list) else entry["files"]
        path = base / first
        if path.suffix.lower() not in RASTER_SUFFIXES or not path.is_file():
            continue
        try:
            with rasterio.open(path) as src:
                tag = src.tags().get("classes")
        except RasterioIOError as exc:
            raise DataError(f"{path}: cannot be read as a raster ({exc})") from None
        if tag:
            try:
                names = yaml.safe_load(tag) if tag.strip().startswith("[") else [c.strip() for c in tag.split(",")]
            except yaml.YAMLError:
                raise DataError(f"{path}: 'classes' tag {tag!r} is neither a list nor comma-separated names") from None
            spec_raw["labels"][name] = {**entry, "classes": names}


def read_listing(root: Path, options: Mapping[str, Any]) -> ScenesSpec:
    """The validated listing of ``root`` (a YAML file, a folder holding one, or a scenes folder).

    Reader options override the YAML's values key by key (``tile_size=128`` sets ``tiles.size``).

    Raises:
        ConfigError: A bad key or value (named). DataError: ``root`` holds no scenes.
    """
    root = Path(root)
    overrides = _options_as_listing(options)
    if root.is_file() or (root.is_dir() and _yaml_in(root) is not None):
        path = root if root.is_file() else _yaml_in(root)
        assert path is not None
        if path.suffix.lower() not in YAML_SUFFIXES:
            raise DataError(f"{path}: not a scenes listing; expected a {'/'.join(YAML_SUFFIXES)} file or a folder")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a mapping with keys {list(_TOP_KEYS)}")
        base, source = path.parent.resolve(), str(path)
    elif root.is_dir():
        raw, base, source = _folder_listing(root), root.resolve(), str(root)
    else:
        raise DataError(f"{root}: neither a folder nor a {'/'.join(YAML_SUFFIXES)} scenes listing")
    merged = _deep_merge(dict(raw), overrides)
    _raster_classes_from_tags(merged, base)
    return parse_listing(merged, base, source)


def _yaml_in(folder: Path) -> Path | None:
    for name in (SCENES_FILE, "scenes.yml"):
        if (folder / name).is_file():
            return folder / name
    return None


# ----------------------------------------------------------------------------- geometry


def grid_to_dict(grid: RasterGrid) -> dict[str, Any]:
    return {"crs": grid.crs, "transform": [float(v) for v in grid.transform[:6]], "height": grid.height, "width": grid.width}


def grid_from_dict(data: Mapping[str, Any]) -> RasterGrid:
    return RasterGrid(str(data["crs"]), tuple(float(v) for v in data["transform"]), int(data["height"]), int(data["width"]))


def coarse_grid(grid: RasterGrid, factor: int) -> RasterGrid:
    """``grid`` with pixels ``factor`` times larger, same origin, covering at least the same ground."""
    transform = Affine(*grid.transform[:6]) * Affine.scale(factor)
    return RasterGrid(grid.crs, tuple(transform)[:6], math.ceil(grid.height / factor), math.ceil(grid.width / factor))


def _boxes_intersect(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


class _Coverage:
    """Where scenes hold data, from decimated reads (never a whole-scene read at full resolution).

    A scene is read once at about the coarse cell size (GDAL uses overviews when the file has
    them) and its validity (every band finite and not the file's no-data) is warped, nearest, onto
    each coarse target grid that asks.
    """

    def __init__(self) -> None:
        self._decimated: dict[tuple[str, int], tuple[np.ndarray, RasterGrid]] = {}

    def _read(self, path: Path, factor: int) -> tuple[np.ndarray, RasterGrid]:
        key = (str(path), factor)
        if key not in self._decimated:
            try:
                with rasterio.open(path) as src:
                    height, width = max(1, src.height // factor), max(1, src.width // factor)
                    data = src.read(out_shape=(src.count, height, width), resampling=Resampling.nearest)
                    valid = np.isfinite(data).all(axis=0) if data.dtype.kind == "f" else np.ones((height, width), bool)
                    if src.nodata is not None and not np.isnan(src.nodata):
                        valid &= (data != src.nodata).all(axis=0)
                    transform = src.transform * Affine.scale(src.width / width, src.height / height)
                    crs = src.crs.to_string() if src.crs else ""
            except RasterioIOError as exc:
                raise DataError(f"{path}: cannot be read as a raster ({exc})") from exc
            self._decimated[key] = (valid.astype(np.uint8), RasterGrid(crs, tuple(transform)[:6], height, width))
        return self._decimated[key]

    def on(self, path: Path, grid: RasterGrid) -> np.ndarray:
        """Boolean validity of ``path`` on ``grid`` (a coarse grid), False outside the scene."""
        source_grid = scene_grid(path)
        # The source's pixel size in the grid's units (a lon/lat scene read for a UTM grid).
        footprint = footprint_in(source_grid, grid.crs)
        source_pixel = (footprint[2] - footprint[0]) / max(1, source_grid.width)
        factor = max(1, int(grid.pixel_size / max(source_pixel, 1e-12)))
        valid, decimated = self._read(path, factor)
        out = np.zeros((grid.height, grid.width), dtype=np.uint8)
        reproject(
            source=valid,
            destination=out,
            src_transform=Affine(*decimated.transform),
            src_crs=CRS.from_user_input(decimated.crs),
            dst_transform=Affine(*grid.transform),
            dst_crs=CRS.from_user_input(grid.crs),
            src_nodata=0,
            dst_nodata=0,
            resampling=Resampling.nearest,
        )
        return out.astype(bool)


def tile_windows(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of every ``size`` window on the ``stride`` lattice inside a grid."""
    rows = range(0, height - size + 1, stride)
    cols = range(0, width - size + 1, stride)
    return [(row, col) for row in rows for col in cols]


def window_fractions(valid: np.ndarray, windows: list[tuple[int, int]], size: int, factor: int) -> np.ndarray:
    """Share of valid coarse cells under each fine-grid window (a summed-area table, so O(windows))."""
    table = np.zeros((valid.shape[0] + 1, valid.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = valid.astype(np.int64).cumsum(0).cumsum(1)
    if not windows:
        return np.zeros(0, dtype=np.float64)
    rows, cols = np.asarray(windows, dtype=np.int64).T
    r0 = np.minimum(rows // factor, valid.shape[0] - 1)
    c0 = np.minimum(cols // factor, valid.shape[1] - 1)
    r1 = np.minimum(np.maximum(r0 + 1, -(-(rows + size) // factor)), valid.shape[0])
    c1 = np.minimum(np.maximum(c0 + 1, -(-(cols + size) // factor)), valid.shape[1])
    total = table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0]
    return total / np.maximum(1, (r1 - r0) * (c1 - c0))


def _label_extent(path: Path, crs: str) -> tuple[float, float, float, float] | None:
    """Bounds of a label file in ``crs`` (features' bounds for a vector; ``None`` when empty)."""
    if not _is_vector(path):
        return footprint_in(scene_grid(path), crs)
    import pyogrio

    try:
        info = pyogrio.read_info(path, force_total_bounds=True)
    except Exception as exc:  # pyogrio raises its own DataSourceError / DataLayerError
        raise DataError(f"{path}: cannot be read as a vector file ({exc})") from None
    bounds = info.get("total_bounds")
    if bounds is None or not np.all(np.isfinite(bounds)) or not info.get("features"):
        return None
    source_crs = vector_crs(path)  # refuses a file without CRS (a GeoJSON without one is lon/lat)
    return tuple(transform_bounds(CRS.from_user_input(source_crs), CRS.from_user_input(crs), *bounds, densify_pts=21))


# ----------------------------------------------------------------------------- splits


def assign_splits(records: list[dict[str, Any]], settings: SplitSettings) -> tuple[list[dict[str, Any]], int]:
    """Geographic splits with overlapping tiles kept apart.

    ``by: blocks`` allocates ground blocks per CRS across scenes (two acquisitions of the same
    ground put each block in one split); ``by: region`` holds out whole SAR scenes. Windows cut
    with ``stride < size`` overlap across a block edge: a test tile's overlapping neighbours in
    val or train, and a val tile's in train, become ``unassigned`` (the held-out tiles stay).

    Returns:
        The records with ``split`` set, and how many became ``unassigned``.
    """
    if settings.by == "blocks":
        grouped = [{**r, "region": r["crs"]} for r in records]
        assigned = split_by_blocks(
            grouped, block_size=float(settings.block_size), val_fraction=settings.val_fraction,
            test_fraction=settings.test_fraction, seed=settings.seed,
        )
        out = [{**r, "split": a["split"]} for r, a in zip(records, assigned)]
    else:
        out = split_by_region(
            records, test_regions=settings.test_regions, val_regions=settings.val_regions,
            val_fraction=settings.val_fraction, test_fraction=settings.test_fraction, seed=settings.seed,
        )
    dropped: set[str] = set()
    # Test against everything else first, then val against train.
    for held, others in (("test", ("train", "val")), ("val", ("train",))):
        view = [
            {**r, "split": "train" if r["split"] in others else r["split"] if r["split"] == held else "unassigned"}
            for r in out
            if r["tile_id"] not in dropped
        ]
        dropped |= {train_id for train_id, _ in find_leaks(view, held_out=(held,))}
    out = [{**r, "split": "unassigned"} if r["tile_id"] in dropped else r for r in out]
    check_no_leakage(out)
    return out, len(dropped)


# ----------------------------------------------------------------------------- the reader


def _relative(path: Path, root: Path) -> str:
    return os.path.relpath(path, root)


def _unique_stems(paths: list[Path], base: Path) -> dict[Path, str]:
    """A short unique name per scene: its stem, or its path below ``base`` when stems repeat."""
    stems = [p.stem for p in paths]

    def name(path: Path) -> str:
        if stems.count(path.stem) == 1:
            return path.stem
        return _relative(path.with_suffix(""), base).replace("../", "up_").replace("/", "_")

    return {p: name(p) for p in paths}


def default_block_tiles(records: list[dict[str, Any]], size: int, stride: int) -> int:
    """Side of the default split block in tiles: about :data:`MIN_BLOCKS` blocks over the largest
    scene's tiles (counted as ground, so overlapping windows count once), within 1..MAX_BLOCK_TILES."""
    per_scene: dict[str, int] = {}
    for record in records:
        per_scene[record["region"]] = per_scene.get(record["region"], 0) + 1
    ground_tiles = max(per_scene.values()) * (stride / size) ** 2
    return int(min(MAX_BLOCK_TILES, max(1, math.floor(math.sqrt(ground_tiles / MIN_BLOCKS)))))


def _refuse_overlap_across_crs(grids: dict[Path, RasterGrid], source: str) -> None:
    """Refuse SAR scenes tiled in different CRSs that cover the same ground.

    Splits and the leakage check compare tile footprints within one CRS; the same ground tiled in
    two CRSs could put one place in train and in test unnoticed.

    Raises:
        DataError: Naming both scenes and their CRSs.
    """
    items = list(grids.items())
    for position, (path_a, grid_a) in enumerate(items):
        for path_b, grid_b in items[position + 1 :]:
            if grid_a.crs != grid_b.crs and _boxes_intersect(grid_a.bounds, footprint_in(grid_b, grid_a.crs)):
                raise DataError(
                    f"{source}: SAR scenes {path_a} ({grid_a.crs}) and {path_b} ({grid_b.crs}) cover the same ground in "
                    "different CRSs, where the leakage check cannot compare their tiles; state target.crs (and "
                    "target.resolution) so both are tiled on one CRS"
                )


def _same_bands(bandsets: dict[Path, BandSet], modality: str) -> BandSet:
    """The one band set every scene of a modality shares; refuses a mismatch naming both files."""
    items = list(bandsets.items())
    first_path, first = items[0]
    for path, bands in items[1:]:
        if bands != first:
            describe = lambda b: ", ".join(f"{band.name} [{band.unit}]" for band in b.bands)  # noqa: E731
            raise DataError(
                f"{modality} scenes {first_path} ({describe(first)}) and {path} ({describe(bands)}) have different "
                f"bands or units; every {modality} scene must have the same bands in the same order and units"
            )
    return first


@register_reader
class ScenesReader(Reader):
    """A user's own SAR and optical scenes plus label files, paired where their footprints meet.

    Layout: a YAML listing (``scenes.yaml`` or any ``.yaml`` path, relative paths relative to its
    folder), a folder holding ``scenes.yaml``, or a folder with ``sar/``, ``optical/`` and an
    optional ``labels/`` (``labels/<layer>.<ext>`` or ``labels/<layer>/<files>``)::

        name: my-city                                    # optional (default: the folder's name)
        sar:     {files: [s1_20240601.tif], bands: [VV, VH], unit: dB}
        optical: {files: ["s2/*.tif"], bands: [B02, B03, B04, B08], unit: reflectance_x1e4}
        labels:
          buildings: {files: [buildings.gpkg]}                              # vector: 1 inside, 0 outside
          landcover: {files: [worldcover.tif], classes: [tree, grass, ...]}  # raster: values = classes
        target: {crs: EPSG:32633, resolution: 10}        # optional; default: each SAR scene's own grid
        tiles: {size: 256, stride: 256, min_valid: 0.5}
        split: {by: blocks, block_size: 20480, val_fraction: 0.15, test_fraction: 0.2, seed: 0}
        sar_look: null                                   # east | west | north | south when known

    Keys:
        * ``sar`` / ``optical`` (required): ``files`` (a path, a glob or a list), ``bands`` and
          ``unit`` (one name or one per band; SAR: linear, dB, amplitude, ...; optical:
          reflectance, reflectance_x1e4, dn). Without them a file's band descriptions and per-band
          ``unit`` tags are used; when neither says, the file is refused by name. Every scene of a
          modality must have the same bands and units (else both files are named).
        * ``labels.<layer>``: ``files`` (rasters or vectors, not mixed: GeoTIFF/COG/VRT,
          GeoPackage, GeoJSON, Shapefile), ``classes`` (required for rasters unless the file has
          a ``classes`` tag; vectors default to ``[background, <layer>]``), ``field`` (burn this
          integer attribute instead of 1; needs ``classes``), ``coverage`` (vectors: ``bounds``,
          the default, labels the box around the file's features and leaves pixels outside it
          unknown; ``all`` says that no feature means background everywhere).
        * ``target``: ``crs`` and/or ``resolution`` of the grid tiles are cut on; by default each
          SAR scene's own grid (then SAR tiles are exact windowed reads).
        * ``tiles``: ``size`` (256), ``stride`` (``size``; smaller strides overlap), ``min_valid``
          (0.5: the share of a tile where SAR and optical both hold data).
        * ``split``: :class:`~xmodal.data.splits.SplitSettings` keys; default ``by: blocks`` with
          blocks of ``b`` tiles of ground on a side, ``b`` = sqrt(tiles of the largest scene /
          10) rounded down, within 1..8 (a small scene still spans several blocks).

    Reader options (``xmodal data index PATH --option tile_size=128 stride=64``, or
    ``data.reader_options``) take the same keys (``tiles.size=128``, ``split.seed=1``) plus the
    shortcuts ``tile_size``, ``stride``, ``min_valid``, ``crs``, ``resolution``, ``block_size``;
    an option overrides the YAML's value, key by key.

    Conventions:
        * Pairs: every SAR scene x optical scene whose footprints intersect on the target grid.
          Tiles are ``size`` windows on the ``stride`` lattice of the target grid, kept when at
          least ``min_valid`` of the tile holds data in both (tested on reads decimated to about
          8 cells per tile side; never a whole-scene read). Index reads headers and those
          decimated reads only.
        * Load reads only the windows a tile covers: SAR resampled in linear power (then back to
          the file's unit), optical bilinear (the area average where the source is much finer),
          raster labels nearest, vector labels burnt per tile from features read once per
          process and indexed (see :func:`~xmodal.data.scenes.rasterise_vector`). No-data and NaN become NaN with ``*_valid`` False; labels are 255
          (unknown) where the SAR has no data, outside every label file and where a raster
          label is no-data.
        * ``region`` is the SAR scene's stem. Splits are geographic: with ``by: blocks``, ground
          blocks are allocated across all scenes of one CRS (a time series of one place puts each
          block in one split); tiles overlapping a held-out tile are left ``unassigned``. SAR
          scenes covering the same ground in different CRSs are refused (the leakage check compares
          tiles within one CRS): state ``target.crs``. ``xmodal data split`` re-splits without that
          repair, so overlapping tiles (``stride < size``) are then caught by the leakage check.
    """

    name = "scenes"
    description = "a user's own SAR + optical scenes and label rasters/vectors, any CRS and resolution"
    layout = "<root>/scenes.yaml, a .yaml listing, or <root>/{sar,optical}/*.tif + <root>/labels/<layer>.<tif|gpkg|geojson|shp>"
    file_suffixes = YAML_SUFFIXES

    @classmethod
    def detect(cls, root: Path) -> bool:
        root = Path(root)
        if root.is_file():
            return root.suffix.lower() in YAML_SUFFIXES
        if _yaml_in(root) is not None:
            return True
        return bool(_scene_files(root / SAR_FOLDER)) and bool(_scene_files(root / OPTICAL_FOLDER))

    @classmethod
    def index(cls, root: Path, **options: Any) -> IndexResult:
        """Pair intersecting scenes, cut tiles, find their labels and assign geographic splits.

        Args:
            root: A YAML listing, a folder holding ``scenes.yaml``, or a scenes folder.
            **options: Listing keys overriding the YAML's (see the class docstring).

        Raises:
            ConfigError: A bad listing key or value, naming it.
            DataError: An unreadable file, unknown bands/units, scenes whose bands differ (naming
                both files), or no tile anywhere.
        """
        spec = read_listing(Path(root), options)
        data_root = spec.base
        sar_bands = _same_bands({p: scene_bands(p, "sar", spec.sar.bands, spec.sar.unit) for p in spec.sar.files}, "sar")
        optical_bands = _same_bands(
            {p: scene_bands(p, "optical", spec.optical.bands, spec.optical.unit) for p in spec.optical.files}, "optical"
        )
        sar_names = _unique_stems(spec.sar.files, data_root)
        optical_names = _unique_stems(spec.optical.files, data_root)
        optical_grids = {p: scene_grid(p) for p in spec.optical.files}
        label_extents: dict[str, dict[Path, Any]] = {name: {} for name in spec.labels}

        size, stride = spec.tile_size, spec.stride
        factor = max(1, size // VALIDITY_CELLS_PER_TILE)
        coverage = _Coverage()
        records: list[dict[str, Any]] = []
        skipped: list[Skipped] = []
        pixel_sizes: dict[Path, float] = {}
        tiling_grids: dict[Path, RasterGrid] = {}
        for sar_path in spec.sar.files:
            sar_grid = scene_grid(sar_path)
            grid = target_grid(sar_grid, spec.target_crs, spec.target_resolution)
            pixel_sizes[sar_path] = grid.pixel_size
            tiling_grids[sar_path] = grid
            windows = tile_windows(grid.height, grid.width, size, stride)
            if not windows:
                skipped.append(Skipped(str(sar_path), f"its grid ({grid.height}x{grid.width} px) is smaller than one {size} px tile"))
                continue
            partners = [p for p in spec.optical.files if _boxes_intersect(grid.bounds, footprint_in(optical_grids[p], grid.crs))]
            if not partners:
                skipped.append(Skipped(str(sar_path), "no optical scene intersects its footprint"))
                continue
            coarse = coarse_grid(grid, factor)
            sar_valid = coverage.on(sar_path, coarse)
            for label in spec.labels.values():
                for path in label.files:
                    if path not in label_extents[label.name] or label_extents[label.name][path][0] != grid.crs:
                        label_extents[label.name][path] = (grid.crs, _label_extent(path, grid.crs))
            for optical_path in partners:
                both = sar_valid & coverage.on(optical_path, coarse)
                fractions = window_fractions(both, windows, size, factor)
                kept = [(w, f) for w, f in zip(windows, fractions) if f >= spec.min_valid and f > 0]
                if not kept:
                    skipped.append(Skipped(
                        f"{sar_path.name} x {optical_path.name}",
                        f"footprints intersect but no {size} px tile has {spec.min_valid:.0%} of its pixels valid in both",
                    ))
                    continue
                for (row, col), fraction in kept:
                    window = window_grid(grid, row, col, size, size)
                    records.append(cls._record(
                        spec, data_root, window, sar_path, optical_path, sar_names[sar_path],
                        optical_names[optical_path], row, col, fraction, label_extents,
                    ))
        if not records:
            first = skipped[0].reason if skipped else "?"
            raise DataError(f"{spec.source}: no tile could be cut from these scenes; first problem: {first}")
        _refuse_overlap_across_crs(tiling_grids, spec.source)
        sizes = sorted(set(round(v, 6) for v in pixel_sizes.values()))
        if len(sizes) > 1:
            raise DataError(
                f"{spec.source}: SAR scenes have pixel sizes {sizes} on their tiling grids; state target.resolution "
                "so every tile has one ground sampling distance"
            )
        split_raw = {"by": "blocks", **spec.split}
        if split_raw["by"] == "blocks" and split_raw.get("block_size") is None:
            split_raw["block_size"] = default_block_tiles(records, size, stride) * size * sizes[0]
        try:
            settings = SplitSettings.from_dict(split_raw)
        except ConfigError as exc:
            raise ConfigError(f"{spec.source}: {exc}") from None
        records, unassigned = assign_splits(records, settings)

        info = DatasetInfo(
            name=spec.name,
            reader=cls.name,
            sar_bands=sar_bands,
            optical_bands=optical_bands,
            layers={
                name: LabelLayer(
                    classes=list(label.classes),
                    description=cls._layer_description(label),
                )
                for name, label in spec.labels.items()
            },
            tile_size=size,
            pixel_size=float(sizes[0]),
            data_root=str(data_root),
            sar_look=spec.sar_look,
            extra={
                "source": spec.source,
                "source_sha256": _file_digest(Path(spec.source)) if Path(spec.source).is_file() else None,
                "target": {"crs": spec.target_crs, "resolution": spec.target_resolution},
                "tiles": {"size": size, "stride": stride, "min_valid": spec.min_valid},
                "sar_files": [_relative(p, data_root) for p in spec.sar.files],
                "optical_files": [_relative(p, data_root) for p in spec.optical.files],
                "labels": {
                    name: {"files": [_relative(p, data_root) for p in label.files], "field": label.field, "coverage": label.coverage}
                    for name, label in spec.labels.items()
                },
                "split": {**split_raw, "unassigned_overlapping": unassigned},
            },
        )
        return IndexResult(manifest=Manifest(info=info, records=records), skipped=skipped)

    @staticmethod
    def _layer_description(label: LabelSpec) -> str:
        if _is_vector(label.files[0]):
            burnt = f"the integer attribute {label.field!r}" if label.field else "1"
            outside = "everywhere" if label.coverage == "all" else "inside the box around the file's features (255 outside it)"
            return f"vector labels reprojected onto the tile grid, burnt as {burnt} over 0 {outside}"
        return "raster labels resampled (nearest) onto the tile grid; 255 where no-data or outside the files"

    @classmethod
    def _record(
        cls,
        spec: ScenesSpec,
        data_root: Path,
        window: RasterGrid,
        sar_path: Path,
        optical_path: Path,
        sar_name: str,
        optical_name: str,
        row: int,
        col: int,
        fraction: float,
        label_extents: dict[str, dict[Path, Any]],
    ) -> dict[str, Any]:
        layers: dict[str, list[str]] = {}
        extents: dict[str, list[Any]] = {}
        for name, label in spec.labels.items():
            for path in label.files:
                extent = label_extents[name][path][1]
                covers = label.coverage == "all" and _is_vector(path) or (extent is not None and _boxes_intersect(window.bounds, extent))
                if covers:
                    layers.setdefault(name, []).append(_relative(path, data_root))
                    extents.setdefault(name, []).append(None if label.coverage == "all" or extent is None else list(extent))
        return make_record(
            tile_id=f"{sar_name}__{optical_name}_r{row}_c{col}",
            region=sar_name,
            crs=window.crs,
            bounds=window.bounds,
            sar_path=_relative(sar_path, data_root),
            optical_path=_relative(optical_path, data_root),
            layers={name: files[0] for name, files in layers.items()},
            extra={
                "grid": grid_to_dict(window),
                "row": row,
                "col": col,
                "valid_fraction": round(float(fraction), 4),
                "label_files": layers,
                "label_extents": extents,
            },
        )

    @classmethod
    def load(cls, record: dict[str, Any], info: DatasetInfo, data_root: Path, options: LoadOptions) -> PairedSample:
        """Read one tile's windows onto its grid: SAR, optical, and the asked-for label layers.

        Raises:
            DataError: A file missing or unreadable, a band count that differs from the index, a
                label value outside the layer's classes, or an unknown layer (all named).
        """
        data_root = Path(data_root)
        extra = record_extra(record)
        grid = grid_from_dict(extra["grid"])
        sar_path, optical_path = data_root / record["sar_path"], data_root / record["optical_path"]
        sar = read_on_grid(sar_path, grid, "sar", units=info.sar_bands.units)
        optical = read_on_grid(optical_path, grid, "optical")
        for path, array, bands in ((sar_path, sar, info.sar_bands), (optical_path, optical, info.optical_bands)):
            if array.shape[0] != len(bands):
                raise DataError(f"{path}: has {array.shape[0]} band(s), the dataset was indexed with {len(bands)} ({bands.names})")
        sar_valid = np.isfinite(sar).all(axis=0)
        optical_valid = np.isfinite(optical).all(axis=0)
        arrays: dict[str, np.ndarray | None] = {"mask": None, "noisy_mask": None}
        for key, layer in (("mask", options.mask_layer), ("noisy_mask", options.noisy_layer)):
            if layer is None:
                continue
            if layer not in info.layers:
                raise DataError(f"tile {record['tile_id']!r}: no label layer {layer!r}; the dataset has {sorted(info.layers)}")
            mask = cls._read_layer(layer, extra, info, data_root, grid)
            mask[~sar_valid] = info.ignore_index
            arrays[key] = mask
        return PairedSample(
            sar=sar,
            optical=optical,
            meta=record_meta(record),
            mask=arrays["mask"],
            noisy_mask=arrays["noisy_mask"],
            label=int(record["scene_label"]),
            sar_valid=sar_valid,
            optical_valid=optical_valid,
            extra={
                "sar_nodata_fraction": float(1.0 - sar_valid.mean()),
                "optical_nodata_fraction": float(1.0 - optical_valid.mean()),
            },
        )

    @staticmethod
    def _read_layer(layer: str, extra: dict[str, Any], info: DatasetInfo, data_root: Path, grid: RasterGrid) -> np.ndarray:
        """One label layer on the tile grid, from every file covering the tile.

        A raster's known value fills pixels still unknown (the first file listed wins); a vector's
        features (non-zero) win over another file's background, so buildings split over several
        files are all burnt.
        """
        ignore = info.ignore_index
        mask = np.full((grid.height, grid.width), ignore, dtype=np.int64)
        settings = info.extra.get("labels", {}).get(layer, {})
        files = extra.get("label_files", {}).get(layer, [])
        extents = extra.get("label_extents", {}).get(layer, [None] * len(files))
        classes = len(info.layers[layer].classes)
        for relative, extent in zip(files, extents):
            path = data_root / relative
            if _is_vector(path):
                values = rasterise_vector(path, grid, field=settings.get("field"), ignore_index=ignore)
                if extent is not None:
                    values[~_inside_box(grid, extent)] = ignore
            else:
                values = read_on_grid(path, grid, "classes", ignore_index=ignore)
            bad = (values != ignore) & ((values < 0) | (values >= classes))
            if bad.any():
                raise DataError(
                    f"{path}: label value {int(values[bad][0])} outside layer {layer!r}'s {classes} classes "
                    f"{info.layers[layer].classes} (0..{classes - 1}, {ignore} = unknown)"
                )
            takes = mask == ignore
            if _is_vector(path):
                takes |= values != 0
            fill = takes & (values != ignore)
            mask[fill] = values[fill]
        return mask


def _inside_box(grid: RasterGrid, box: list[float]) -> np.ndarray:
    """Pixels of ``grid`` whose centres lie inside ``box`` (left, bottom, right, top in grid CRS)."""
    transform = Affine(*grid.transform[:6])
    cols = np.arange(grid.width) + 0.5
    rows = np.arange(grid.height) + 0.5
    xs = transform.c + transform.a * cols
    ys = transform.f + transform.e * rows
    inside_x = (xs >= box[0]) & (xs <= box[2])
    inside_y = (ys >= box[1]) & (ys <= box[3])
    return inside_y[:, None] & inside_x[None, :]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
