"""SSL4EO-S12 (v1) reader, with optional Dynamic World noisy labels (paper 003, CromSS).

Layout (Wang et al. 2023; mediaTUM / Hugging Face ``wangyi111/SSL4EO-S12`` archives unpacked)::

    <root>/s1/<location>/<S1 product id>/{VV,VH}.tif            # float32 sigma0 in dB
    <root>/s2c/<location>/<S2 id>/{B1,...,B8,B8A,B9,B10,B11,B12}.tif   # L1C, uint16 x 1e4
    <root>/s2a/<location>/<S2 id>/{B1,...,B12 without B10}.tif  # L2A, uint16 x 1e4
    <root>/dw/<location>/<S2 id>/label.tif                      # optional Dynamic World labels

``<location>`` is a 7-digit id (0000000-0251078, with gaps); each location has 4 seasonal folders
per modality. S1 folder names are GRD product ids ``S1A_IW_GRDH_1SDV_<YYYYMMDDTHHMMSS>_...``;
S2 folder names are GEE ids ``<YYYYMMDDTHHMMSS>_<YYYYMMDDTHHMMSS>_T<tile>``. Each band is its own
GeoTIFF at native resolution (264 px for 10 m bands, 132 px for 20 m, 44 px for 60 m) written by
the official downloader in geographic coordinates (``+proj=latlong``); the reader accepts any CRS.

Pairing: S1 and S2 share the location id but not the timestamps or folder names. Within a
location, folders are sorted by acquisition time and paired by rank (by nearest date when the
counts differ); a pair further apart than ``max_days_apart`` is skipped. One record per
(location, season), where the season index is the rank of the S2 date; region = location id.

Resampling on load, onto the 10 m grid of S2 band B2:

* S2 20 m / 60 m bands: bilinear. Reflectance is a smooth field; nearest (TorchGeo's choice) leaves
  2x2 / 6x6 blocks that a network can key on. No-data is excluded from the interpolation.
* S1: the S1 grid is offset by about 40 m and 0.7 % in pixel size from S2, so S1 is reprojected
  onto the S2 grid, bilinear **in linear power** (dB -> linear -> bilinear -> dB): averaging
  logarithms underestimates the mean backscatter. Pixels outside the S1 footprint are NaN.
* Dynamic World labels: nearest, from their own grid (a label file without georeferencing is
  stretched over the S2 tile, nearest, as CromSS does).

No-data follows the products (:func:`~xmodal.data.bands.mask_s2` / :func:`~xmodal.data.bands.mask_s1`,
shared with the SEN12MS and DFC2020 readers): an S2 pixel is fill when every band is 0 there
(bands compared on the 10 m grid, nearest); one band at 0 (B10 over clear sky, NIR over water) is
a measurement and is interpolated like any value. A band file's declared nodata is no-data for that
band. S1 is no-data where NaN (or the declared nodata); 0 dB is a valid value. Pixels outside the S1
footprint are no-data too.

Dynamic World labels (optional; option ``labels_root`` or ``<root>/dw``): one single-band GeoTIFF
per location and S2 folder, values 0-8 for the 9 classes (water, trees, grass, flooded_vegetation,
crops, shrub_and_scrub, built, bare, snow_and_ice); anything else is unknown (255). The file is
``<labels_root>/<location>/<S2 folder name>/label.tif``, the layout of the CromSS release
(NoLDO-S12 ``ssl4eo_s12_nol.zip``); ``<labels_root>/<location>/<S2 folder name>.tif`` is accepted
too, and a label folder whose name starts with the same sensing time matches when the names differ
(L1C vs L2A ids). Layer name ``dynamic_world``; these labels are noisy by design (paper 003).

Splits: locations are 2.64 km patches; neighbouring ones can overlap (the sampler only keeps
centres 1.98 km apart). Locations are assigned to splits by square blocks of ``block_size_deg``
degrees over their centres (:func:`~xmodal.data.splits.split_by_blocks`), then every held-out
block that touches a training location on the ground moves to train, so the manifest passes
:func:`~xmodal.data.splits.check_no_leakage`.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from rasterio.warp import reproject

from xmodal.data.bands import DB_FLOOR_LINEAR, mask_s1, mask_s2, s2_fill
from xmodal.data.geotiff import RasterGrid, read_raster
from xmodal.data.manifest import DatasetInfo, LabelLayer, Manifest, make_record, record_extra, record_layers, record_meta
from xmodal.data.readers.base import IndexResult, LoadOptions, Reader, Skipped, register_reader
from xmodal.data.readers.sen12ms import (
    bounds_in,
    check_overlap,
    ensure_nonempty_splits,
    first_entries,
    mask_labels,
    move_leaking_groups,
    read_headers,
    refuse_unknown_options,
    relative_to_root,
    s1_band_set,
    s2_band_set,
    to_crs,
)
from xmodal.data.classes import DYNAMIC_WORLD_CLASSES
from xmodal.data.sample import IGNORE_INDEX, PairedSample
from xmodal.data.splits import find_leaks, split_by_blocks
from xmodal.errors import ConfigError, DataError

DW_LAYER = "dynamic_world"
OPTICAL_PRODUCTS = {"s2c": "L1C", "s2a": "L2A"}
REFERENCE_BAND = "B02"  # its 10 m grid is the grid of every loaded sample
S1_REFERENCE_BAND = "VV"

_LOCATION = re.compile(r"^\d{7}$")
_S1_PRODUCT = re.compile(r"^S1[A-D]_[A-Z0-9]{2}_[A-Z0-9]{4}_[A-Z0-9]{4}_(\d{8}T\d{6})_")
_S2_PRODUCT = re.compile(r"^(\d{8}T\d{6})_")


def band_file(band: str) -> str:
    """File name of a band: ``B01`` -> ``B1.tif``, ``B8A`` -> ``B8A.tif``, ``VV`` -> ``VV.tif``."""
    match = re.fullmatch(r"B0?(\d{1,2}A?)", band)
    return f"B{match.group(1)}.tif" if match else f"{band}.tif"


def acquisition_time(folder: str, sensor: str) -> datetime | None:
    """Sensing start time encoded in an S1 product id or an S2 GEE id, ``None`` if unparsable."""
    match = (_S1_PRODUCT if sensor == "s1" else _S2_PRODUCT).match(folder)
    if not match:
        return None
    try:
        return datetime.strptime(match.group(1), "%Y%m%dT%H%M%S")
    except ValueError:
        return None


@dataclass(frozen=True)
class _Season:
    name: str
    time: datetime
    files: frozenset[str]


def _list_seasons(folder: Path, sensor: str, skipped: list[Skipped]) -> list[_Season]:
    """Seasonal sub-folders of one location, sorted by time; unparsable names go to ``skipped``."""
    seasons = []
    if not folder.is_dir():
        return seasons
    for entry in os.scandir(folder):
        if not entry.is_dir():
            continue
        time = acquisition_time(entry.name, sensor)
        if time is None:
            kind = "an S1 product id" if sensor == "s1" else "an S2 id"
            skipped.append(Skipped(entry.path, f"folder name is not {kind} with a date"))
            continue
        files = frozenset(e.name for e in os.scandir(entry.path) if e.is_file())
        seasons.append(_Season(entry.name, time, files))
    return sorted(seasons, key=lambda s: (s.time, s.name))


def _pair_by_date(
    s1: list[_Season], s2: list[_Season]
) -> tuple[list[tuple[int, _Season, _Season]], list[_Season], list[_Season]]:
    """(season index, S2, S1) pairs, plus unmatched S1 and S2 folders.

    Equal counts pair by rank (the dataset's 4 seasons); otherwise each S2 date takes the nearest
    unused S1 date. The season index is the rank of the S2 date.
    """
    if len(s1) == len(s2):
        return [(i, b, a) for i, (a, b) in enumerate(zip(s1, s2))], [], []
    unused = list(s1)
    pairs, lonely_s2 = [], []
    for season, optical in enumerate(s2):
        if not unused:
            lonely_s2.append(optical)
            continue
        nearest = min(unused, key=lambda s: (abs((s.time - optical.time).total_seconds()), s.name))
        unused.remove(nearest)
        pairs.append((season, optical, nearest))
    return pairs, unused, lonely_s2


def _find_label(labels_dir: Path, entries: list[str], s2_name: str) -> Path | None:
    """The Dynamic World file of one S2 folder (see module docstring for the accepted names)."""
    if s2_name in entries and (labels_dir / s2_name / "label.tif").is_file():
        return labels_dir / s2_name / "label.tif"
    if f"{s2_name}.tif" in entries:
        return labels_dir / f"{s2_name}.tif"
    stamp = s2_name[:15]
    for entry in sorted(entries):
        if entry.startswith(stamp):
            candidate = labels_dir / entry
            if candidate.is_dir() and (candidate / "label.tif").is_file():
                return candidate / "label.tif"
            if candidate.is_file() and entry.endswith(".tif"):
                return candidate
    return None


@register_reader
class Ssl4eoS12Reader(Reader):
    """SSL4EO-S12 v1: S1 GRD / S2 L1C or L2A, 4 seasons per location, optional Dynamic World labels."""

    name = "ssl4eo_s12"
    version = 2  # S2 no-data only where every band is 0
    description = "SSL4EO-S12 v1: per-band GeoTIFFs of S1 GRD (dB) and S2 L1C/L2A, 4 seasons x 251k locations; DW noisy labels"
    layout = "<root>/{s1,s2c,s2a}/<7-digit location>/<product id>/<BAND>.tif [+ <root>/dw/<location>/<S2 id>/label.tif]"

    @classmethod
    def detect(cls, root: Path) -> bool:
        if not (root / "s1").is_dir() or not any((root / product).is_dir() for product in OPTICAL_PRODUCTS):
            return False
        return any(_LOCATION.match(entry.name) and entry.is_dir() for entry in first_entries(root / "s1"))

    @classmethod
    def index(
        cls,
        root: Path,
        *,
        optical_product: str = "s2c",
        labels_root: str | Path | None = None,
        seasons: list[int] | tuple[int, ...] | None = None,
        block_size_deg: float = 1.0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        max_days_apart: float = 45.0,
        min_overlap: float = 0.5,
        max_locations: int | None = None,
        workers: int = 8,
        **unknown: Any,
    ) -> IndexResult:
        """Pair S1 and S2 seasons per location, attach Dynamic World labels, split by blocks.

        Args:
            root: Folder holding ``s1`` and ``s2c`` / ``s2a``.
            optical_product: ``"s2c"`` (L1C, 13 bands) or ``"s2a"`` (L2A, 12 bands, no B10).
            labels_root: Dynamic World folder; ``None`` uses ``<root>/dw`` when it exists.
            seasons: Season indices (0-3, by S2 date rank) to keep; ``None`` keeps all.
            block_size_deg: Side of the square split blocks, in degrees of longitude/latitude.
            val_fraction: Expected share of blocks in val.
            test_fraction: Expected share of blocks in test.
            seed: Seed of the block draw.
            max_days_apart: Skip an S1/S2 pair whose dates differ by more days than this.
            min_overlap: Skip a pair whose S1 footprint covers less than this share of the S2 one.
            max_locations: Index only the first N locations (sorted ids): quick looks at a big copy.
            workers: Threads reading GeoTIFF headers.
        """
        refuse_unknown_options(cls.name, unknown)
        root = Path(root)
        if optical_product not in OPTICAL_PRODUCTS:
            raise ConfigError(f"ssl4eo_s12: optical_product {optical_product!r}; expected one of {sorted(OPTICAL_PRODUCTS)}")
        if not 0 <= min_overlap <= 1:
            raise ConfigError(f"ssl4eo_s12: min_overlap {min_overlap} must be in [0, 1]")
        s1_root, s2_root = root / "s1", root / optical_product
        for folder in (s1_root, s2_root):
            if not folder.is_dir():
                raise DataError(f"{folder}: not found; an SSL4EO-S12 root holds s1/ and {optical_product}/")
        labels_dir = Path(labels_root) if labels_root is not None else root / "dw"
        if labels_root is not None and not labels_dir.is_dir():
            raise DataError(f"{labels_dir}: Dynamic World labels folder not found")
        have_labels = labels_dir.is_dir()
        optical_bands = s2_band_set(OPTICAL_PRODUCTS[optical_product])
        sar_bands = s1_band_set()
        optical_files = [band_file(b) for b in optical_bands.names]
        sar_files = [band_file(b) for b in sar_bands.names]

        skipped: list[Skipped] = []
        locations = sorted(
            {e.name for folder in (s1_root, s2_root) for e in os.scandir(folder) if e.is_dir() and _LOCATION.match(e.name)}
        )
        if max_locations is not None:
            locations = locations[:max_locations]
        candidates: list[dict[str, Any]] = []
        for location in locations:
            s1_seasons = _list_seasons(s1_root / location, "s1", skipped)
            s2_seasons = _list_seasons(s2_root / location, "s2", skipped)
            if not s1_seasons or not s2_seasons:
                missing = s1_root / location if not s1_seasons else s2_root / location
                skipped.append(Skipped(location, f"{missing}: no seasonal folders; location has only one modality"))
                continue
            pairs, lonely_s1, lonely_s2 = _pair_by_date(s1_seasons, s2_seasons)
            for folder, other, lonely in ((s1_root, "S2", lonely_s1), (s2_root, "S1", lonely_s2)):
                for season in lonely:
                    path = folder / location / season.name
                    skipped.append(Skipped(f"{location}/{season.name}", f"{path}: no {other} season left to pair with"))
            label_entries = sorted(os.listdir(labels_dir / location)) if have_labels and (labels_dir / location).is_dir() else []
            for season_index, optical, sar in pairs:
                if seasons is not None and season_index not in seasons:
                    continue
                tile_id = f"{location}_s{season_index}"
                days = abs((optical.time - sar.time).total_seconds()) / 86400
                if days > max_days_apart:
                    reason = f"S1 {sar.name} and S2 {optical.name} are {days:.0f} days apart (max_days_apart={max_days_apart})"
                    skipped.append(Skipped(tile_id, reason))
                    continue
                missing_files = [str(s2_root / location / optical.name / f) for f in optical_files if f not in optical.files]
                missing_files += [str(s1_root / location / sar.name / f) for f in sar_files if f not in sar.files]
                if missing_files:
                    skipped.append(Skipped(tile_id, f"missing file(s): {', '.join(missing_files)}"))
                    continue
                label = _find_label(labels_dir / location, label_entries, optical.name) if label_entries else None
                candidates.append(
                    {
                        "tile_id": tile_id,
                        "location": location,
                        "season": season_index,
                        "optical": optical,
                        "sar": sar,
                        "days": days,
                        "label": label,
                    }
                )

        optical_dir = {c["tile_id"]: s2_root / c["location"] / c["optical"].name for c in candidates}
        sar_dir = {c["tile_id"]: s1_root / c["location"] / c["sar"].name for c in candidates}
        headers = read_headers(
            [str(optical_dir[t] / band_file(REFERENCE_BAND)) for t in optical_dir]
            + [str(sar_dir[t] / band_file(S1_REFERENCE_BAND)) for t in sar_dir],
            workers,
        )
        records: list[dict[str, Any]] = []
        tile_size = 264
        for candidate in candidates:
            tile_id = candidate["tile_id"]
            optical = headers[str(optical_dir[tile_id] / band_file(REFERENCE_BAND))]
            sar = headers[str(sar_dir[tile_id] / band_file(S1_REFERENCE_BAND))]
            problem = next((str(h) for h in (optical, sar) if isinstance(h, DataError)), None)
            if problem is None:
                try:
                    share = check_overlap(sar.grid, optical.grid, sar.path, optical.path, min_overlap)
                except DataError as exc:
                    problem = str(exc)
            if problem is not None:
                skipped.append(Skipped(tile_id, problem))
                continue
            tile_size = optical.grid.height
            layers = {DW_LAYER: relative_to_root(candidate["label"], root)} if candidate["label"] is not None else {}
            records.append(
                make_record(
                    tile_id=tile_id,
                    region=candidate["location"],
                    crs=optical.grid.crs,
                    bounds=optical.grid.bounds,
                    sar_path=sar_dir[tile_id].relative_to(root).as_posix(),
                    optical_path=optical_dir[tile_id].relative_to(root).as_posix(),
                    layers=layers,
                    extra={
                        "location": candidate["location"],
                        "season": candidate["season"],
                        "s1_product": candidate["sar"].name,
                        "s2_product": candidate["optical"].name,
                        "days_apart": round(candidate["days"], 2),
                        "s1_overlap": round(share, 4),
                    },
                )
            )
        records = _split_locations(
            records, block_size_deg=block_size_deg, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
        layers_info = {}
        if have_labels:
            layers_info[DW_LAYER] = LabelLayer(
                classes=list(DYNAMIC_WORLD_CLASSES),
                description="Google Dynamic World V1 'label' band matched to the S2 season (CromSS / NoLDO-S12 "
                "SSL4EO-S12@NoL); automatic, noisy by design; values 0-8, others -> 255; nearest onto the S2 10 m grid",
            )
        info = DatasetInfo(
            name="ssl4eo_s12",
            reader=cls.name,
            sar_bands=sar_bands,
            optical_bands=optical_bands,
            layers=layers_info,
            tile_size=tile_size,
            pixel_size=10.0,
            data_root=str(root.resolve()),
            extra={
                "optical_product": optical_product,
                "labels_root": relative_to_root(labels_dir, root) if have_labels else None,
                "seasons": list(seasons) if seasons is not None else None,
                "block_size_deg": block_size_deg,
                "seed": seed,
                "min_overlap": min_overlap,
                "max_days_apart": max_days_apart,
                "grid": f"S2 {REFERENCE_BAND} 10 m grid",
                "s2_resampling": "bilinear (20 m / 60 m bands; no-data excluded)",
                "s1_resampling": "bilinear in linear power onto the S2 grid",
                "label_resampling": "nearest",
                "leaking_pairs": len(find_leaks(records)),
            },
        )
        return IndexResult(manifest=Manifest(info=info, records=records), skipped=skipped)

    @classmethod
    def load(cls, record: dict[str, Any], info: DatasetInfo, data_root: Path, options: LoadOptions) -> PairedSample:
        optical_dir = data_root / record["optical_path"]
        sar_dir = data_root / record["sar_path"]
        reference = read_raster(optical_dir / band_file(REFERENCE_BAND), expected_bands=1)
        grid = reference.grid
        height, width = grid.height, grid.width

        rasters = [
            reference if band == REFERENCE_BAND else read_raster(optical_dir / band_file(band), expected_bands=1)
            for band in info.optical_bands.names
        ]
        # The product's fill is 0 in every band: compare the bands on the 10 m grid (nearest), then keep
        # the fill (and only the fill) out of the interpolation of each band on its native grid.
        if (reference.data[0] == 0).any():
            nearest = np.stack([_onto_grid(r.data[0], r.grid, grid, Resampling.nearest, np.nan) for r in rasters])
            fill = s2_fill(nearest)
        else:  # fill is 0 in every band, B02 (on the target grid) included
            fill = np.zeros((height, width), dtype=bool)
        optical = np.empty((len(rasters), height, width), dtype=np.float32)
        for position, raster in enumerate(rasters):
            values = raster.data[0]
            if fill.any():
                native_fill = _onto_grid(fill.astype(np.uint8), grid, raster.grid, Resampling.max, 0) > 0
                values[native_fill & (values == 0)] = np.nan
            optical[position] = _onto_grid(values, raster.grid, grid, Resampling.bilinear, np.nan)
        optical[:, fill] = np.nan
        optical_valid = mask_s2(optical)

        sar = np.empty((len(info.sar_bands), height, width), dtype=np.float32)
        minimum = float(info.extra.get("min_overlap", 0.0))
        for position, band in enumerate(info.sar_bands.names):
            raster = read_raster(sar_dir / band_file(band), expected_bands=1)
            check_overlap(raster.grid, grid, raster.path, reference.path, minimum)
            db = raster.data[0]
            db[~np.isfinite(db)] = np.nan
            linear = np.power(np.float32(10.0), db / np.float32(10.0), dtype=np.float32)
            linear = _onto_grid(linear, raster.grid, grid, Resampling.bilinear, np.nan)
            with np.errstate(invalid="ignore"):
                sar[position] = 10.0 * np.log10(np.maximum(linear, DB_FLOOR_LINEAR))
        sar_valid = mask_s1(sar)

        both_valid = sar_valid & optical_valid
        layers = record_layers(record)
        masks: dict[str, np.ndarray | None] = {"mask": None, "noisy_mask": None}
        for key, layer in (("mask", options.mask_layer), ("noisy_mask", options.noisy_layer)):
            if layer is None:
                continue
            if layer not in layers:
                raise DataError(f"tile {record['tile_id']!r}: no label layer {layer!r}; it has {sorted(layers)}")
            with warnings.catch_warnings():
                # Label files without georeferencing are handled below (stretched over the tile).
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                label = read_raster(data_root / layers[layer], expected_bands=1, dtype=np.int32)
            values = label.data[0]
            if label.nodata is not None and np.isfinite(label.nodata):
                values[values == int(label.nodata)] = IGNORE_INDEX
            values[(values < 0) | (values >= len(DYNAMIC_WORLD_CLASSES))] = IGNORE_INDEX
            if label.grid.crs:
                on_grid = _onto_grid(values, label.grid, grid, Resampling.nearest, IGNORE_INDEX)
            else:
                on_grid = _stretch_nearest(values, height, width)
            masks[key] = mask_labels(on_grid, both_valid)

        pixels = float(height * width)
        return PairedSample(
            sar=sar,
            optical=optical,
            meta=record_meta(record),
            mask=masks["mask"],
            noisy_mask=masks["noisy_mask"],
            label=int(record["scene_label"]),
            sar_valid=sar_valid,
            optical_valid=optical_valid,
            extra={
                **record_extra(record),
                "sar_nodata_fraction": float((~sar_valid).sum() / pixels),
                "optical_nodata_fraction": float((~optical_valid).sum() / pixels),
            },
        )


def _same_grid(a: RasterGrid, b: RasterGrid) -> bool:
    if a.crs != b.crs or (a.height, a.width) != (b.height, b.width):
        return False
    tolerance = 1e-3 * b.pixel_size
    return all(abs(x - y) <= tolerance for x, y in zip(a.transform, b.transform))


def _onto_grid(values: np.ndarray, source: RasterGrid, target: RasterGrid, resampling: Resampling, nodata: float) -> np.ndarray:
    """``values`` (H x W on ``source``) resampled onto ``target``; ``nodata`` where nothing maps."""
    if _same_grid(source, target):
        return values
    out = np.full((target.height, target.width), nodata, dtype=values.dtype)
    reproject(
        source=values,
        destination=out,
        src_transform=Affine(*source.transform[:6]),
        src_crs=to_crs(source.crs),
        src_nodata=nodata,
        dst_transform=Affine(*target.transform[:6]),
        dst_crs=to_crs(target.crs),
        dst_nodata=nodata,
        resampling=resampling,
    )
    return out


def _stretch_nearest(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label without georeferencing onto the S2 tile (its extent assumed
    to be the tile's, as CromSS assumes when it resizes labels to 264 px)."""
    rows = np.minimum(((np.arange(height) + 0.5) * values.shape[0] / height).astype(int), values.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * values.shape[1] / width).astype(int), values.shape[1] - 1)
    return values[np.ix_(rows, cols)]


def _split_locations(
    records: list[dict[str, Any]], *, block_size_deg: float, val_fraction: float, test_fraction: float, seed: int
) -> list[dict[str, Any]]:
    """Assign locations to splits by lon/lat blocks, then move held-out blocks that touch train."""
    if not records:
        return records
    # One pseudo-record per location: its footprint (all seasons) in lon/lat, so blocks and the
    # overlap test work across the UTM zones / CRSs of a worldwide dataset.
    footprints: dict[str, list[float]] = {}
    for record in records:
        grid_bounds = (record["left"], record["bottom"], record["right"], record["top"])
        left, bottom, right, top = bounds_in(_bounds_grid(record["crs"], grid_bounds), "EPSG:4326")
        box = footprints.setdefault(record["region"], [left, bottom, right, top])
        box[:] = [min(box[0], left), min(box[1], bottom), max(box[2], right), max(box[3], top)]
    pseudo = [
        # One shared "region": the blocks of the whole world are allocated together.
        {"tile_id": loc, "region": "world", "crs": "EPSG:4326", "left": b[0], "bottom": b[1], "right": b[2], "top": b[3]}
        for loc, b in sorted(footprints.items())
    ]
    drawn = split_by_blocks(pseudo, block_size=block_size_deg, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    # Same block key as split_by_blocks; whole blocks move from here on.
    for record in drawn:
        centre_x, centre_y = (record["left"] + record["right"]) / 2, (record["bottom"] + record["top"]) / 2
        record["region"] = f"{int(centre_x // block_size_deg)}:{int(centre_y // block_size_deg)}"
    block_split = ensure_nonempty_splits({r["region"]: r["split"] for r in drawn}, seed)
    drawn = move_leaking_groups([{**r, "split": block_split[r["region"]]} for r in drawn])
    location_split = {r["tile_id"]: r["split"] for r in drawn}
    return [{**r, "split": location_split[r["region"]]} for r in records]


def _bounds_grid(crs: str, bounds: tuple[float, float, float, float]) -> RasterGrid:
    """A one-pixel grid covering ``bounds`` (lets :func:`bounds_in` reproject record bounds)."""
    left, bottom, right, top = bounds
    return RasterGrid(crs=crs, transform=(right - left, 0.0, left, 0.0, bottom - top, top), height=1, width=1)
