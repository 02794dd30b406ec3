"""SEN12MS reader, plus the Sentinel-1/-2 helpers shared with the DFC2020 and SSL4EO-S12 readers.

Layout (Schmitt et al. 2019; archives ``ROIs{season}_{lc|s1|s2}.tar.gz`` unpacked side by side)::

    <root>/ROIs{1158_spring,1868_summer,1970_fall,2017_winter}/
        s1_<scene>/ROIs<season>_s1_<scene>_p<patch>.tif   # VV, VH: sigma0 in dB, float32
        s2_<scene>/ROIs<season>_s2_<scene>_p<patch>.tif   # 13 bands B01..B12 with B8A and B10, uint16 L1C x 1e4
        lc_<scene>/ROIs<season>_lc_<scene>_p<patch>.tif   # 4 bands uint16: IGBP, LCCS-LC, LCCS-LU, LCCS-SH
    <root>/[splits/]train_list.txt, test_list.txt, [val_list.txt]        # optional: s2 file names
    <root>/[splits/]SEN12MS_holdOutScenes.txt, [ValidationScenes.txt]   # optional: "ROIs1158_spring/s1_63"

A triplet is found by swapping the source token (``s1`` / ``s2`` / ``lc``) in folder and file name.
The three files of a triplet share one pixel grid (256 x 256 px at 10 m, UTM).

Label convention (both layers come from band 1 of the ``lc`` file, MODIS IGBP 1-17 resampled to 10 m):

* ``igbp``: IGBP 1..17 stored as 0..16; any other value is 255 (unknown).
* ``dfc``: IGBP mapped to the simplified DFC2020 scheme with the look-up table
  :data:`IGBP_TO_DFC` (values 1..10), stored as 0..9; the unused DFC value 0 is 255. The option
  ``classes`` picks the class set (:data:`DFC_CLASS_SETS`): ``9`` (or ``no_savanna``, as in the
  DFC2020 baseline) makes Savanna 255 and moves the classes above it down by one; ``8`` (CROMA /
  GFM-Bench) also makes Snow/Ice 255.

In both layers a pixel whose S1 or S2 data are no-data is 255 as well.

No-data (:func:`~xmodal.data.bands.mask_s2`, :func:`~xmodal.data.bands.mask_s1`, shared with the
DFC2020 and SSL4EO-S12 readers): an S2 pixel is no-data when all 13 bands are 0 (the product's
fill) or a band is NaN / the file's declared nodata; one band at 0 (B10 over clear sky, water in
NIR) is a measurement. S1 is no-data where a band is NaN or the declared nodata; 0 dB is valid.

Splits never cut a scene (patches of one scene overlap by about half a patch): the official
``train_list.txt`` / ``test_list.txt`` when present, else ``SEN12MS_holdOutScenes.txt``, else a
seeded draw of whole (season, scene) groups. A validation split is carved from training scenes.

The patch ``ROIs1868_summer_*_146_p202`` carries NaNs in S1. It loads with those pixels marked
invalid (``sar_valid`` False, labels 255); the index option ``skip_known_bad`` leaves it out and
lists it in ``IndexResult.skipped``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError
from rasterio.warp import transform_bounds

from xmodal.data.bands import SENTINEL2_BANDS, BandSet, mask_s1, mask_s2
from xmodal.data.geotiff import RasterGrid, check_same_grid, crs_string, read_raster
from xmodal.data.manifest import (
    DatasetInfo,
    LabelLayer,
    Manifest,
    make_record,
    record_extra,
    record_layers,
    record_meta,
)
from xmodal.data.readers.base import IndexResult, LoadOptions, Reader, Skipped, register_reader
from xmodal.data.sample import IGNORE_INDEX, PairedSample
from xmodal.data.splits import find_leaks
from xmodal.errors import ConfigError, DataError, PairingError
from xmodal.progress import track

# --------------------------------------------------------------------------------------------
# Sentinel-1 / Sentinel-2 encoding shared by SEN12MS, DFC2020 and SSL4EO-S12
# --------------------------------------------------------------------------------------------

S1_BAND_NAMES = ("VV", "VH")
S1_UNIT = "dB"
S2_L1C_BAND_NAMES = SENTINEL2_BANDS
S2_L2A_BAND_NAMES = tuple(name for name in SENTINEL2_BANDS if name != "B10")
S2_UNIT = "reflectance_x1e4"

IGBP_CLASSES = [
    "Evergreen Needleleaf Forests",
    "Evergreen Broadleaf Forests",
    "Deciduous Needleleaf Forests",
    "Deciduous Broadleaf Forests",
    "Mixed Forests",
    "Closed Shrublands",
    "Open Shrublands",
    "Woody Savannas",
    "Savannas",
    "Grasslands",
    "Permanent Wetlands",
    "Croplands",
    "Urban and Built-up Lands",
    "Cropland/Natural Vegetation Mosaics",
    "Permanent Snow and Ice",
    "Barren",
    "Water Bodies",
]
DFC_CLASSES = [
    "Forest",
    "Shrubland",
    "Savanna",
    "Grassland",
    "Wetlands",
    "Croplands",
    "Urban/Built-up",
    "Snow/Ice",
    "Barren",
    "Water",
]
# IGBP value (index) -> simplified DFC2020 value; 0 is unused in both schemes.
IGBP_TO_DFC = (0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 6, 8, 9, 10)
DFC_SAVANNA = 3
DFC_SNOW_ICE = 8
# Class sets of the zero-based DFC layers: number of classes -> DFC values left out (-> 255).
# 10: all; 9: the DFC2020 baseline's ``no_savanna``; 8: CROMA / GFM-Bench (no Savanna, no Snow/Ice,
# both nearly absent from the DFC2020 labels), so mIoU is comparable with their tables.
DFC_CLASS_SETS: dict[int, tuple[int, ...]] = {10: (), 9: (DFC_SAVANNA,), 8: (DFC_SAVANNA, DFC_SNOW_ICE)}

SEN12MS_SEASONS = ("ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter")
# (season, scene, patch) of the one SEN12MS patch with NaNs in S1 (known from the DFC2020 baseline).
SEN12MS_KNOWN_BAD = (("ROIs1868_summer", 146, 202),)


def s1_band_set() -> BandSet:
    """VV and VH backscatter in dB, as GEE / ESA GRD products ship them."""
    return BandSet.of("sar", list(S1_BAND_NAMES), S1_UNIT)


def s2_band_set(level: str = "L1C") -> BandSet:
    """Sentinel-2 bands of an L1C (13 bands) or L2A (12 bands, no B10) product, reflectance x 1e4."""
    if level not in ("L1C", "L2A"):
        raise ConfigError(f"Sentinel-2 processing level {level!r}: expected 'L1C' or 'L2A'")
    names = S2_L1C_BAND_NAMES if level == "L1C" else S2_L2A_BAND_NAMES
    return BandSet.of("optical", list(names), S2_UNIT)


def mask_labels(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Labels as int64 with :data:`IGNORE_INDEX` wherever the imagery is no-data."""
    labels = labels.astype(np.int64, copy=False)
    labels[~valid] = IGNORE_INDEX
    return labels


def lookup_classes(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Map integer ``values`` through ``table``; values outside the table become unknown."""
    values = np.asarray(values, dtype=np.int64)
    inside = (values >= 0) & (values < len(table))
    out = np.full(values.shape, IGNORE_INDEX, dtype=np.int64)
    out[inside] = table[values[inside]]
    return out


def dfc_class_count(reader: str, classes: int | None, no_savanna: bool) -> int:
    """The DFC class set asked for by the reader options ``classes`` and ``no_savanna``.

    ``no_savanna=True`` is the DFC2020 baseline's name for ``classes=9``.

    Raises:
        ConfigError: ``classes`` is not one of :data:`DFC_CLASS_SETS`, or contradicts ``no_savanna``.
    """
    if classes is None:
        return 9 if no_savanna else 10
    if isinstance(classes, bool) or classes not in DFC_CLASS_SETS:
        raise ConfigError(
            f"reader {reader!r}: classes={classes!r}; expected one of {sorted(DFC_CLASS_SETS, reverse=True)} "
            "(10 DFC classes, 9 without Savanna, 8 without Savanna and Snow/Ice as CROMA / GFM-Bench)"
        )
    if no_savanna and DFC_SAVANNA not in DFC_CLASS_SETS[classes]:
        raise ConfigError(f"reader {reader!r}: no_savanna=True contradicts classes={classes}; give one of them")
    return int(classes)


def _kept_dfc_values(classes: int) -> list[int]:
    """Simplified DFC values 1..10 that stay classes in the ``classes`` set, in order."""
    if classes not in DFC_CLASS_SETS:
        raise DataError(f"DFC class set {classes!r}: expected one of {sorted(DFC_CLASS_SETS, reverse=True)}")
    return [value for value in range(1, len(DFC_CLASSES) + 1) if value not in DFC_CLASS_SETS[classes]]


def dfc_class_names(classes: int = 10) -> list[str]:
    """Class names of the zero-based DFC layers (10, 9 without Savanna, 8 also without Snow/Ice)."""
    return [DFC_CLASSES[value - 1] for value in _kept_dfc_values(classes)]


def dfc_classes_note(classes: int) -> str:
    """What a layer description says about the left-out DFC classes ("" for all 10)."""
    dropped = [DFC_CLASSES[value - 1] for value in DFC_CLASS_SETS[classes]]
    return f"; {' and '.join(dropped)} -> 255, classes above them shift down" if dropped else ""


def _dfc_value_table(classes: int) -> np.ndarray:
    """Simplified DFC value 0..10 -> zero-based class index of the ``classes`` set (255 = unknown or left out)."""
    table = np.full(len(DFC_CLASSES) + 1, IGNORE_INDEX, dtype=np.int64)
    kept = _kept_dfc_values(classes)
    table[kept] = np.arange(len(kept))
    return table


def dfc_to_index(dfc: np.ndarray, classes: int = 10) -> np.ndarray:
    """Simplified DFC2020 values 1..10 -> 0..classes-1 (left-out classes, 0 and others -> 255)."""
    return lookup_classes(dfc, _dfc_value_table(classes))


def igbp_to_index(igbp: np.ndarray, classes: int = 10) -> np.ndarray:
    """IGBP values 1..17 -> 0..16; anything else -> 255 (the DFC class set does not apply)."""
    table = np.full(len(IGBP_CLASSES) + 1, IGNORE_INDEX, dtype=np.int64)
    table[1:] = np.arange(len(IGBP_CLASSES))
    return lookup_classes(igbp, table)


def igbp_to_dfc_index(igbp: np.ndarray, classes: int = 10) -> np.ndarray:
    """IGBP values -> zero-based simplified DFC classes of the ``classes`` set through :data:`IGBP_TO_DFC`."""
    table = _dfc_value_table(classes)[np.asarray(IGBP_TO_DFC)]
    return lookup_classes(igbp, table)


# --------------------------------------------------------------------------------------------
# Raster headers and footprints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RasterHeader:
    """What a GeoTIFF header says, read without touching the pixels."""

    path: str
    grid: RasterGrid
    count: int
    dtype: str
    nodata: float | None


def read_header(path: str | Path) -> RasterHeader:
    """Open a GeoTIFF and read its georeferencing only.

    Raises:
        DataError: The file is missing or its header cannot be decoded (truncated, not a TIFF).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        with rasterio.open(path) as src:
            grid = RasterGrid(crs=crs_string(src.crs), transform=tuple(src.transform)[:6], height=src.height, width=src.width)
            return RasterHeader(path=path, grid=grid, count=src.count, dtype=src.dtypes[0], nodata=src.nodata)
    except RasterioError as exc:
        raise DataError(f"{path}: cannot be read as a GeoTIFF, truncated or corrupt? ({exc})") from exc


def read_headers(paths: Iterable[str], workers: int = 8) -> dict[str, RasterHeader | DataError]:
    """Read many headers, in threads (opening files is I/O bound); errors are returned, not raised."""

    def one(path: str) -> RasterHeader | DataError:
        try:
            return read_header(path)
        except DataError as exc:
            return exc

    paths = list(dict.fromkeys(paths))
    if workers <= 1 or len(paths) < 16:
        return {path: one(path) for path in track(paths, "reading headers", unit="file")}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, track(pool.map(one, paths), "reading headers", total=len(paths), unit="file")))


def to_crs(crs: str) -> CRS:
    """A rasterio CRS from the text stored in grids and records."""
    try:
        return CRS.from_user_input(crs)
    except CRSError as exc:
        raise DataError(f"cannot interpret CRS {crs[:80]!r} ({exc})") from exc


def bounds_in(grid: RasterGrid, crs: str) -> tuple[float, float, float, float]:
    """Footprint of ``grid`` in ``crs`` (the bounding box of the reprojected footprint)."""
    if grid.crs == crs:
        return grid.bounds
    return tuple(transform_bounds(to_crs(grid.crs), to_crs(crs), *grid.bounds, densify_pts=21))  # type: ignore[return-value]


def footprint_overlap(grid: RasterGrid, reference: RasterGrid) -> float:
    """Share (0..1) of the ``reference`` footprint that ``grid`` covers, across CRSs."""
    if not grid.crs or not reference.crs:
        return 1.0 if (grid.height, grid.width) == (reference.height, reference.width) else 0.0
    left, bottom, right, top = bounds_in(grid, reference.crs)
    r_left, r_bottom, r_right, r_top = reference.bounds
    width = min(right, r_right) - max(left, r_left)
    height = min(top, r_top) - max(bottom, r_bottom)
    area = (r_right - r_left) * (r_top - r_bottom)
    if width <= 0 or height <= 0 or area <= 0:
        return 0.0
    return float(width * height / area)


def check_overlap(grid: RasterGrid, reference: RasterGrid, path: str, reference_path: str, minimum: float) -> float:
    """Refuse a pair whose footprints share less than ``minimum`` of the reference footprint.

    Raises:
        PairingError: Naming both files and the measured overlap.
    """
    share = footprint_overlap(grid, reference)
    if share <= 0 or share < minimum:
        what = "do not overlap" if share <= 0 else f"overlap on only {share:.0%} of the reference footprint"
        raise PairingError(
            f"{path} and {reference_path}: footprints {what} (need > {minimum:.0%}); "
            f"{grid.bounds} in {grid.crs[:40]} vs {reference.bounds} in {reference.crs[:40]}"
        )
    return share


# --------------------------------------------------------------------------------------------
# Grouped, seeded, leak-free split helpers
# --------------------------------------------------------------------------------------------


def seeded_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) fixed by ``key`` and ``seed`` (independent of Python's hash seed)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def carve_groups(keys: Iterable[str], fraction: float, seed: int) -> set[str]:
    """About ``fraction`` of the groups ``keys``, chosen by a seeded draw; at least one when
    ``fraction`` > 0 and two or more groups exist, and never all of them."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"split fraction {fraction}: must be in [0, 1)")
    ranked = sorted(set(keys), key=lambda key: (seeded_fraction(key, seed), key))
    if fraction == 0 or len(ranked) < 2:
        return set()
    chosen = {key for key in ranked if seeded_fraction(key, seed) < fraction}
    if not chosen:
        chosen = {ranked[0]}
    if len(chosen) == len(ranked):
        chosen.discard(ranked[-1])
    return chosen


def ensure_nonempty_splits(assignment: dict[str, str], seed: int) -> dict[str, str]:
    """With three or more groups, move one training group into each empty held-out split."""
    assignment = dict(assignment)
    if len(assignment) < 3:
        return assignment
    ranked = sorted(assignment, key=lambda key: (seeded_fraction(key, seed + 1), key))
    for split in ("test", "val"):
        if split in assignment.values():
            continue
        donors = [key for key in ranked if assignment[key] == "train"]
        if len(donors) > 1:
            assignment[donors[0]] = split
    return assignment


def move_leaking_groups(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move every held-out group (``region``) that touches a training tile on the ground into train.

    Spatial blocks are assigned by tile centre, so a tile near a block edge can overlap a tile of
    the neighbouring block; moving the held-out side keeps test and val clean at a small cost in size.
    """
    records = [dict(r) for r in records]
    region_of = {r["tile_id"]: r["region"] for r in records}
    for _ in range(len(records) + 1):
        leaks = find_leaks(records)
        if not leaks:
            return records
        moving = {region_of[held] for _, held in leaks}
        for record in records:
            if record["region"] in moving:
                record["split"] = "train"
    raise DataError("could not remove train/held-out overlaps by moving groups; check the footprints in the manifest")


def find_split_file(root: Path, name: str) -> Path | None:
    """``root/name`` or ``root/splits/name`` when it exists."""
    for candidate in (root / name, root / "splits" / name):
        if candidate.is_file():
            return candidate
    return None


def read_name_list(path: Path) -> list[str]:
    """Non-empty, stripped lines of a split list."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as a text list ({exc})") from exc
    return [line.strip() for line in lines if line.strip()]


def relative_to_root(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, absolute otherwise (record paths join onto root)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path.resolve())


def first_entries(folder: Path, limit: int = 64) -> list[os.DirEntry]:
    """Up to ``limit`` entries of a folder (detect must stay cheap on folders of 100k entries)."""
    entries = []
    try:
        with os.scandir(folder) as iterator:
            for entry in iterator:
                entries.append(entry)
                if len(entries) >= limit:
                    break
    except OSError:
        return []
    return entries


def refuse_unknown_options(reader: str, unknown: dict[str, Any]) -> None:
    if unknown:
        raise ConfigError(f"reader {reader!r}: unknown option(s) {sorted(unknown)}")


# --------------------------------------------------------------------------------------------
# Loading a SEN12MS-style co-registered pair (SEN12MS and DFC2020)
# --------------------------------------------------------------------------------------------

# Layer name -> (band of the label file, decoder(values, DFC class count) -> zero-based int64 classes).
LabelDecoder = tuple[int, Callable[[np.ndarray, int], np.ndarray]]


def load_coregistered_pair(
    record: dict[str, Any],
    info: DatasetInfo,
    data_root: Path,
    options: LoadOptions,
    decoders: dict[str, LabelDecoder],
) -> PairedSample:
    """Read one S1 file and one S2 file on one grid plus the requested label layers.

    Raises:
        DataError: A file is missing, truncated, has the wrong band count, or a layer is unknown.
        PairingError: The S1 and S2 footprints do not overlap or their grids differ.
    """
    sar = read_raster(data_root / record["sar_path"], expected_bands=len(info.sar_bands))
    optical = read_raster(data_root / record["optical_path"], expected_bands=len(info.optical_bands))
    check_overlap(sar.grid, optical.grid, sar.path, optical.path, minimum=0.0)
    check_same_grid(sar.grid, optical.grid, sar.path, optical.path)
    sar_valid = mask_s1(sar.data)
    optical_valid = mask_s2(optical.data)
    both_valid = sar_valid & optical_valid
    layers = record_layers(record)
    # Datasets indexed before the ``classes`` option only recorded ``no_savanna``.
    classes = int(info.extra.get("dfc_classes") or (9 if info.extra.get("no_savanna") else 10))
    masks: dict[str, np.ndarray | None] = {"mask": None, "noisy_mask": None}
    for key, layer in (("mask", options.mask_layer), ("noisy_mask", options.noisy_layer)):
        if layer is None:
            continue
        if layer not in layers or layer not in decoders:
            raise DataError(f"tile {record['tile_id']!r}: no label layer {layer!r}; it has {sorted(layers)}")
        band, decode = decoders[layer]
        label_raster = read_raster(data_root / layers[layer], dtype=np.int64)
        if label_raster.data.shape[0] < band:
            raise DataError(f"{label_raster.path}: has {label_raster.data.shape[0]} band(s); layer {layer!r} needs band {band}")
        check_same_grid(optical.grid, label_raster.grid, optical.path, label_raster.path)
        masks[key] = mask_labels(decode(label_raster.data[band - 1], classes), both_valid)
    pixels = float(both_valid.size)
    return PairedSample(
        sar=sar.data,
        optical=optical.data,
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


def geometry_of_pair(
    headers: dict[str, RasterHeader | DataError], sar_path: str, optical_path: str
) -> tuple[RasterHeader | None, str | None]:
    """The S2 header of a pair plus why the pair must be skipped (``None`` when it is fine)."""
    optical, sar = headers[optical_path], headers[sar_path]
    if isinstance(optical, DataError):
        return None, str(optical)
    if isinstance(sar, DataError):
        return optical, str(sar)
    try:
        check_overlap(sar.grid, optical.grid, sar.path, optical.path, minimum=0.0)
    except PairingError as exc:
        return optical, str(exc)
    return optical, None


PairGrid = tuple[str, tuple[float, float, float, float], int]


def pair_grids(pairs: list[tuple[Path, Path]], read_geometry: bool, workers: int = 8) -> list[PairGrid | str]:
    """The grid of each (S1, S2) pair as ``(crs, bounds, side in px)`` of its S2 file, or why the pair is refused.

    Without ``read_geometry`` (fast indexing: no file is opened) each pair gets an empty CRS,
    zero bounds and the 256 px patch side of SEN12MS and DFC2020.
    """
    if not read_geometry:
        return [("", (0.0, 0.0, 0.0, 0.0), 256) for _ in pairs]
    headers = read_headers([str(path) for pair in pairs for path in pair], workers)
    grids: list[PairGrid | str] = []
    for s1, s2 in pairs:
        optical, problem = geometry_of_pair(headers, str(s1), str(s2))
        grids.append(problem if problem or optical is None else (optical.grid.crs, optical.grid.bounds, optical.grid.height))
    return grids


# --------------------------------------------------------------------------------------------
# SEN12MS
# --------------------------------------------------------------------------------------------

_SEN12MS_FILE = re.compile(r"^(ROIs\d{4}_(?:spring|summer|fall|winter))_(s1|s2|lc)_(\d+)_p(\d+)\.tif$")
_SEN12MS_SCENE_DIR = re.compile(r"^(s1|s2|lc)_(\d+)$")
_SCENE_LINE = re.compile(r"^(ROIs\d{4}_(?:spring|summer|fall|winter))/(?:s1|s2|lc)_(\d+)$")


def sen12ms_group(season: str, scene: int) -> str:
    """Region / split group of a SEN12MS scene."""
    return f"{season}_scene{scene}"


def _scene_groups_from_file(path: Path) -> set[str]:
    """Groups named in ``SEN12MS_holdOutScenes.txt``-style files (``ROIs1158_spring/s1_63``)."""
    groups = set()
    for line in read_name_list(path):
        match = _SCENE_LINE.match(line.rstrip("/"))
        if not match:
            raise DataError(f"{path}: line {line!r} is not of the form 'ROIs1158_spring/s1_63'")
        groups.add(sen12ms_group(match.group(1), int(match.group(2))))
    return groups


def _s2_name_to_group(name: str, source: Path) -> tuple[str, str]:
    """(group, tile id) of an ``ROIs..._s2_<scene>_p<patch>.tif`` entry in a split list."""
    match = _SEN12MS_FILE.match(Path(name).name)
    if not match:
        raise DataError(f"{source}: entry {name!r} is not a SEN12MS file name")
    season, _, scene, patch = match.groups()
    return sen12ms_group(season, int(scene)), f"{season}_{scene}_p{patch}"


@register_reader
class Sen12msReader(Reader):
    """SEN12MS triplets (S1 dB, S2 L1C, MODIS land cover), split by scene."""

    name = "sen12ms"
    version = 2  # class sets, S2 no-data only where every band is 0
    description = "SEN12MS: S1 GRD (dB) / S2 L1C / MODIS IGBP triplets, 256 px at 10 m, 4 seasons"
    layout = (
        "<root>/ROIs{1158_spring,1868_summer,1970_fall,2017_winter}/{s1,s2,lc}_<scene>/"
        "ROIs<season>_{s1,s2,lc}_<scene>_p<n>.tif"
    )

    @classmethod
    def detect(cls, root: Path) -> bool:
        for season in SEN12MS_SEASONS:
            folder = root / season
            if folder.is_dir() and any(_SEN12MS_SCENE_DIR.match(entry.name) for entry in first_entries(folder)):
                return True
        return False

    @classmethod
    def index(
        cls,
        root: Path,
        *,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        use_split_files: bool = True,
        skip_known_bad: bool = False,
        no_savanna: bool = False,
        classes: int | None = None,
        read_geometry: bool = True,
        workers: int = 8,
        **unknown: Any,
    ) -> IndexResult:
        """Pair the triplets of ``root`` and split them by scene.

        Args:
            root: Folder holding the ``ROIs<season>`` folders.
            val_fraction: Share of training scenes carved out for validation (seeded, by scene),
                unless ``val_list.txt`` / ``ValidationScenes.txt`` name them.
            test_fraction: Share of scenes held out for test when no split file exists.
            seed: Seed of the scene draws.
            use_split_files: Honour ``train_list.txt`` / ``test_list.txt`` / ``SEN12MS_holdOutScenes.txt``.
            skip_known_bad: Leave out the patch with NaNs in S1 (reported in ``skipped``).
            no_savanna: Drop Savanna from the ``dfc`` layer (9 classes), as the DFC2020 baseline can;
                the same as ``classes=9``.
            classes: DFC class set of the ``dfc`` layer: 10, 9 (no Savanna) or 8 (no Savanna, no
                Snow/Ice: CROMA / GFM-Bench); left-out classes load as 255.
            read_geometry: Read S1/S2 headers for CRS and bounds (needed for the leakage check and
                the footprint test); off leaves CRS empty and is faster on huge slow disks.
            workers: Threads reading headers.
        """
        refuse_unknown_options(cls.name, unknown)
        dfc_classes = dfc_class_count(cls.name, classes, no_savanna)
        root = Path(root)
        if not cls.detect(root):
            raise DataError(f"{root}: no ROIs<season>/(s1|s2|lc)_<scene> folders; not a SEN12MS layout")
        files: dict[tuple[str, int, int], dict[str, Path]] = defaultdict(dict)
        skipped: list[Skipped] = []
        for season in SEN12MS_SEASONS:
            season_dir = root / season
            if not season_dir.is_dir():
                continue
            for scene_entry in sorted(os.scandir(season_dir), key=lambda e: e.name):
                if not (scene_entry.is_dir() and _SEN12MS_SCENE_DIR.match(scene_entry.name)):
                    continue
                for file_entry in os.scandir(scene_entry.path):
                    match = _SEN12MS_FILE.match(file_entry.name)
                    if not match:
                        continue
                    file_season, source, scene, patch = match.groups()
                    files[(file_season, int(scene), int(patch))][source] = Path(file_entry.path)
        candidates: list[tuple[tuple[str, int, int], dict[str, Path]]] = []
        for key in sorted(files):
            season, scene, patch = key
            found = files[key]
            missing = [source for source in ("s1", "s2", "lc") if source not in found]
            if missing:
                expected = [root / season / f"{s}_{scene}" / f"{season}_{s}_{scene}_p{patch}.tif" for s in missing]
                skipped.append(Skipped(f"{season}_{scene}_p{patch}", f"missing file(s): {', '.join(map(str, expected))}"))
                continue
            if skip_known_bad and key in SEN12MS_KNOWN_BAD:
                reason = f"{found['s1']}: known NaN values in S1 (skip_known_bad=True)"
                skipped.append(Skipped(f"{season}_{scene}_p{patch}", reason))
                continue
            candidates.append((key, found))

        records: list[dict[str, Any]] = []
        tile_size = 256
        grids = pair_grids([(found["s1"], found["s2"]) for _, found in candidates], read_geometry, workers)
        for ((season, scene, patch), found), grid in zip(candidates, grids):
            tile_id = f"{season}_{scene}_p{patch}"
            if isinstance(grid, str):
                skipped.append(Skipped(tile_id, grid))
                continue
            crs, bounds, tile_size = grid
            lc_path = found["lc"].relative_to(root).as_posix()
            records.append(
                make_record(
                    tile_id=tile_id,
                    region=sen12ms_group(season, scene),
                    crs=crs,
                    bounds=bounds,
                    sar_path=found["s1"].relative_to(root).as_posix(),
                    optical_path=found["s2"].relative_to(root).as_posix(),
                    layers={"igbp": lc_path, "dfc": lc_path},
                    extra={"season": season, "scene": scene, "patch": patch},
                )
            )
        records, split_source, more_skipped = _sen12ms_splits(
            root, records, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, use_split_files=use_split_files
        )
        skipped.extend(more_skipped)
        info = DatasetInfo(
            name="sen12ms",
            reader=cls.name,
            sar_bands=s1_band_set(),
            optical_bands=s2_band_set("L1C"),
            layers={
                "igbp": LabelLayer(
                    classes=list(IGBP_CLASSES),
                    description="MODIS MCD12Q1 IGBP (500 m, resampled to 10 m) from lc band 1; values 1-17 stored as 0-16",
                ),
                "dfc": LabelLayer(
                    classes=dfc_class_names(dfc_classes),
                    description="IGBP mapped to simplified DFC2020 classes (LUT 0,1,1,1,1,1,2,2,3,3,4,5,6,7,6,8,9,10); "
                    f"values 1-10 stored as 0-{dfc_classes - 1}, 0 unused -> 255" + dfc_classes_note(dfc_classes),
                ),
            },
            tile_size=tile_size,
            pixel_size=10.0,
            data_root=str(root.resolve()),
            extra={
                "no_savanna": DFC_SAVANNA in DFC_CLASS_SETS[dfc_classes],
                "dfc_classes": dfc_classes,
                "split_source": split_source,
                "seed": seed,
                "leaking_pairs": len(find_leaks(records)) if read_geometry else None,
            },
        )
        return IndexResult(manifest=Manifest(info=info, records=records), skipped=skipped)

    @classmethod
    def load(cls, record: dict[str, Any], info: DatasetInfo, data_root: Path, options: LoadOptions) -> PairedSample:
        return load_coregistered_pair(
            record, info, data_root, options, {"igbp": (1, igbp_to_index), "dfc": (1, igbp_to_dfc_index)}
        )


def _sen12ms_splits(
    root: Path,
    records: list[dict[str, Any]],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    use_split_files: bool,
) -> tuple[list[dict[str, Any]], str, list[Skipped]]:
    """Assign whole scenes to train / val / test; return records, where the split came from, skips."""
    groups = sorted({r["region"] for r in records})
    skipped: list[Skipped] = []
    train_list = find_split_file(root, "train_list.txt") if use_split_files else None
    test_list = find_split_file(root, "test_list.txt") if use_split_files else None
    val_list = find_split_file(root, "val_list.txt") if use_split_files else None
    holdout = find_split_file(root, "SEN12MS_holdOutScenes.txt") if use_split_files else None
    validation_scenes = find_split_file(root, "ValidationScenes.txt") if use_split_files else None

    if train_list or test_list:
        # Patch lists: a patch goes where it is listed; an unlisted patch follows its scene.
        by_tile: dict[str, str] = {}
        for split, path in (("train", train_list), ("test", test_list), ("val", val_list)):
            if path is None:
                continue
            for name in read_name_list(path):
                _, tile_id = _s2_name_to_group(name, path)
                by_tile[tile_id] = split
        votes: dict[str, Counter] = defaultdict(Counter)
        for record in records:
            if record["tile_id"] in by_tile:
                votes[record["region"]][by_tile[record["tile_id"]]] += 1
        scene_split = {group: count.most_common(1)[0][0] for group, count in votes.items()}
        listed = [name for name in ("train_list.txt", "test_list.txt", "val_list.txt") if find_split_file(root, name)]
        kept = []
        for record in records:
            split = by_tile.get(record["tile_id"], scene_split.get(record["region"]))
            if split is None:
                skipped.append(Skipped(record["tile_id"], f"neither the patch nor its scene is listed in {', '.join(listed)}"))
                continue
            kept.append({**record, "split": split})
        records, source = kept, "+".join(listed)
        if val_list is None:
            records = _carve_val_scenes(records, val_fraction, seed)
        return records, source, skipped

    if holdout:
        test_groups = _scene_groups_from_file(holdout)
        val_groups = _scene_groups_from_file(validation_scenes) if validation_scenes else set()
        assignment = {g: "test" if g in test_groups else "val" if g in val_groups else "train" for g in groups}
        records = [{**r, "split": assignment[r["region"]]} for r in records]
        if not validation_scenes:
            records = _carve_val_scenes(records, val_fraction, seed)
        source = holdout.name + (f"+{validation_scenes.name}" if validation_scenes else "")
        return records, source, skipped

    test_groups = carve_groups(groups, test_fraction, seed)
    remaining = [g for g in groups if g not in test_groups]
    val_groups = carve_groups(remaining, val_fraction / max(1e-9, 1 - test_fraction), seed + 1) if val_fraction else set()
    assignment = {g: "test" if g in test_groups else "val" if g in val_groups else "train" for g in groups}
    return [{**r, "split": assignment[r["region"]]} for r in records], "seeded scene draw", skipped


def _carve_val_scenes(records: list[dict[str, Any]], val_fraction: float, seed: int) -> list[dict[str, Any]]:
    """Move a seeded share of the training scenes to val."""
    train_groups = sorted({r["region"] for r in records if r["split"] == "train"})
    val_groups = carve_groups(train_groups, val_fraction, seed + 1) if val_fraction else set()
    return [{**r, "split": "val"} if r["region"] in val_groups else r for r in records]
