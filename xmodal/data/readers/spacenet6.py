"""SpaceNet 6 / MSAW (Rotterdam, AOI 11): Capella quad-pol SAR tiles paired with WorldView-2 optical.

Layout as distributed (the train archive also holds ``PAN`` and a ``SummaryData`` folder)::

    <root>/SN6_buildings/train/train/AOI_11_Rotterdam/
        SAR-Intensity/SN6_Train_AOI_11_Rotterdam_SAR-Intensity_<strip>_tile_<N>.tif
        PS-RGBNIR/SN6_Train_AOI_11_Rotterdam_PS-RGBNIR_<strip>_tile_<N>.tif       (also PS-RGB, RGBNIR, PAN)
        geojson_buildings/SN6_Train_AOI_11_Rotterdam_Buildings_<strip>_tile_<N>.geojson
        SummaryData/SAR_orientations.txt
    <root>/SN6_buildings/test/test_public/AOI_11_Rotterdam/
        SAR-Intensity/SN6_Test_Public_AOI_11_Rotterdam_SAR-Intensity_<strip>_tile_<N>.tif

``<root>`` may also be the ``SN6_buildings`` folder or an ``AOI_11_Rotterdam`` folder itself. ``<strip>``
is the SAR strip id, two timestamps ``YYYYMMDDhhmmss_YYYYMMDDhhmmss``; every product of one tile
carries the same strip id and tile number, and pairs are made on that key.

Conventions this reader applies:

* SAR-Intensity is 4 bands HH, HV, VH, VV of log-scaled intensity (non-negative, up to about 71),
  not calibrated sigma0 dB: its unit is ``log_intensity``. Optical products are digital numbers.
* No-data is 0 in every product (edge tiles) and NaN in some SAR tiles: a pixel whose bands are all
  0, or any of them NaN, becomes NaN in every band and False in ``sar_valid`` / ``optical_valid``.
* Buildings are GeoJSON polygons (EPSG:4326 unless the file's ``crs`` member says otherwise; a file
  without one must hold lon/lat, |x| <= 180 and |y| <= 90, as RFC 7946 says, or it is refused),
  reprojected to the SAR CRS and burnt onto the SAR grid at pixel centres: layer ``buildings``,
  0 = background, 1 = building, 255 where the SAR is no-data. Empty files (no features, or zero
  bytes) are all background. Pixels where only the optical is no-data keep their label: the labels
  describe the SAR task.
* ``SAR_orientations.txt`` marks each strip 0 (imaged from the north) or 1 (imaged from the south).
  As in the official baseline, tiles of orientation-1 strips are rotated by 180 degrees on load
  (SAR, optical, masks and validity) so that layover always falls the same way; predictions made
  on such tiles go back to the ground's orientation with :func:`restore_orientation`.
* Splits are geographic, never random: the official baseline's easting bands (UTM x 591,550 to
  596,250 in 5 bands of 940 m) assigned by each tile's left easting; by default band 4 (east) is
  test and band 3 is val. A tile whose footprint reaches into a band of another split would overlap
  that split's tiles on the ground, so it is left ``unassigned``. The public test tiles
  (``test_public``: SAR only, no labels, no optical) are ``unassigned`` too, never ``test``: nothing
  can be scored on them. ``extra["unassigned_reason"]`` of a record tells the two apart
  (``"straddling"`` / ``"test_public"``), and ``DatasetInfo.extra["split"]["unassigned"]`` counts each.
* The optical product is the one asked for (``optical_product``); without that option, the first
  product of :data:`OPTICAL_PREFERENCE` whose folder holds tiles (a download may hold PS-RGB
  alone), named in ``DatasetInfo.extra["optical_product"]`` and in a note.
* ``RGBNIR`` (2 m, 450 px) is resampled onto the 0.5 m SAR grid on load (bilinear by default,
  no-data excluded from the kernel); the other products share the SAR grid exactly.
"""

from __future__ import annotations

import bisect
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject

from xmodal.data.bands import BandSet
from xmodal.data.geotiff import RasterGrid, check_same_grid, read_raster
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
from xmodal.data.scenes import rasterise_vector, scene_grid
from xmodal.data.splits import SPLIT_LOCKED
from xmodal.errors import ConfigError, DataError, PairingError

AOI = "AOI_11_Rotterdam"
SAR_PRODUCT = "SAR-Intensity"
LABEL_FOLDER = "geojson_buildings"
ORIENTATIONS_FILE = "SAR_orientations.txt"
SAR_BAND_NAMES = ("HH", "HV", "VH", "VV")
BUILDINGS_LAYER = "buildings"
BUILDING_CLASSES = ["background", "building"]
# Folders below <root> holding the train and public-test AOI folders, most specific root first.
TRAIN_SUBPATHS = ("SN6_buildings/train/train", "train/train", "train")
TEST_SUBPATHS = ("SN6_buildings/test/test_public", "test/test_public", "test_public")


@dataclass(frozen=True)
class OpticalProduct:
    """One optical product of SpaceNet 6 (all WorldView-2, digital numbers)."""

    bands: tuple[str, ...]
    pixel_size: float
    dtype: str


# Band order follows the product names (verify against a real tile's band descriptions).
OPTICAL_PRODUCTS: dict[str, OpticalProduct] = {
    "PS-RGBNIR": OpticalProduct(("R", "G", "B", "NIR"), 0.5, "uint16"),
    "PS-RGB": OpticalProduct(("R", "G", "B"), 0.5, "uint8"),
    "RGBNIR": OpticalProduct(("R", "G", "B", "NIR"), 2.0, "uint16"),
}
DEFAULT_OPTICAL_PRODUCT = "PS-RGBNIR"
# Products tried in turn when none is asked for: PS-RGBNIR (4 bands on the SAR grid), PS-RGB (the
# same grid, 3 bands), RGBNIR (4 bands, but 2 m: resampled onto the SAR grid on load).
OPTICAL_PREFERENCE = ("PS-RGBNIR", "PS-RGB", "RGBNIR")
# Why a tile is ``unassigned`` (record ``extra["unassigned_reason"]``).
STRADDLING, TEST_PUBLIC = "straddling", "test_public"

# The official baseline's validation groups: 5 bands between UTM eastings 592,000 - 450 and
# 596,700 - 450 (EPSG:32631), a tile belonging to the band holding its left edge.
DEFAULT_EASTING_EDGES = (591550.0, 592490.0, 593430.0, 594370.0, 595310.0, 596250.0)
DEFAULT_VAL_BANDS = (3,)
DEFAULT_TEST_BANDS = (4,)

_FILE_PATTERN = re.compile(
    r"^SN6_(?P<subset>Train|Test_Public)_AOI_11_Rotterdam_(?P<product>[A-Za-z-]+)_"
    r"(?P<strip>\d{14}_\d{14})_tile_(?P<tile>\d+)\.(?P<ext>tif|geojson)$"
)
_STRIP_PATTERN = re.compile(r"^\d{14}_\d{14}$")
_INDEX_OPTIONS = {
    "optical_product",
    "orientations_file",
    "rotate",
    "easting_edges",
    "val_bands",
    "test_bands",
    "exclude_straddling",
    "include_test_public",
    "optical_resampling",
}


@dataclass(frozen=True)
class TileKey:
    """What names one tile across products: SAR strip id and tile number."""

    strip: str
    tile: int


def parse_tile_name(name: str) -> tuple[str, str, TileKey] | None:
    """``(subset, product, key)`` of an SN6 file name, or ``None`` when it is not one."""
    match = _FILE_PATTERN.match(name)
    if match is None:
        return None
    return match["subset"], match["product"], TileKey(match["strip"], int(match["tile"]))


def _scan(folder: Path, product: str, suffix: str) -> dict[TileKey, Path]:
    """Files of one product in ``folder`` by tile key (empty when the folder is absent)."""
    found: dict[TileKey, Path] = {}
    if not folder.is_dir():
        return found
    for entry in os.scandir(folder):
        parsed = parse_tile_name(entry.name)
        if parsed is not None and parsed[1] == product and entry.name.endswith(suffix):
            found[parsed[2]] = Path(entry.path)
    return found


def choose_optical_product(train_aoi: Path, requested: str | None) -> tuple[str, dict[TileKey, Path], str | None]:
    """The optical product to pair with, its tiles by key, and a note when it stands in for another.

    Args:
        train_aoi: The train ``AOI_11_Rotterdam`` folder.
        requested: The product asked for, or ``None``: then the first of :data:`OPTICAL_PREFERENCE`
            (PS-RGBNIR, PS-RGB, RGBNIR) whose folder holds tiles.

    Raises:
        DataError: No tiles in the folder(s) looked for (naming them and the products present).
    """
    candidates = [requested] if requested else list(OPTICAL_PREFERENCE)
    for name in candidates:
        tiles = _scan(train_aoi / name, name, ".tif")
        if tiles:
            if name == candidates[0]:
                return name, tiles, None
            absent = ", ".join(candidates[: candidates.index(name)])
            note = f"optical product {name}: no {absent} tiles in {train_aoi}; first present of {', '.join(candidates)}"
            return name, tiles, note
    looked = ", ".join(str(train_aoi / name) for name in candidates)
    present = [name for name in OPTICAL_PRODUCTS if name not in candidates and _scan(train_aoi / name, name, ".tif")]
    also = f"; present: {', '.join(present)} (optical_product=...)" if present else ""
    raise DataError(f"{train_aoi}: no SpaceNet 6 optical tiles in {looked}{also}")


def _has_sar_tiles(aoi: Path) -> bool:
    folder = aoi / SAR_PRODUCT
    if not folder.is_dir():
        return False
    return any(parse_tile_name(entry.name) is not None for entry in os.scandir(folder))


def locate_aoi_folders(root: Path) -> tuple[Path | None, Path | None]:
    """The train and public-test ``AOI_11_Rotterdam`` folders under ``root`` (either may be None)."""
    if root.name == AOI:
        is_test = root.parent.name == "test_public"
        return (None, root) if is_test else (root, None)
    train = next((root / sub / AOI for sub in TRAIN_SUBPATHS if _has_sar_tiles(root / sub / AOI)), None)
    test = next((root / sub / AOI for sub in TEST_SUBPATHS if _has_sar_tiles(root / sub / AOI)), None)
    return train, test


def read_orientations(path: Path) -> dict[str, int]:
    """Parse ``SAR_orientations.txt``: one ``<strip id> <0|1>`` per line.

    Raises:
        DataError: A line that is not a strip id followed by 0 or 1 (naming file and line).
    """
    orientations: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from exc
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) != 2 or not _STRIP_PATTERN.match(fields[0]) or fields[1] not in ("0", "1"):
            raise DataError(
                f"{path}, line {number}: expected '<YYYYMMDDhhmmss_YYYYMMDDhhmmss> <0|1>', got {line.strip()!r}"
            )
        orientations[fields[0]] = int(fields[1])
    return orientations


def _find_orientations_file(root: Path, train: Path | None, test: Path | None) -> Path | None:
    candidates = [root / ORIENTATIONS_FILE]
    for aoi in (train, test):
        if aoi is not None:
            candidates += [aoi / "SummaryData" / ORIENTATIONS_FILE, aoi / ORIENTATIONS_FILE]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    # Some copies move SummaryData around; a recursive search over names is still cheap.
    found = sorted(root.rglob(ORIENTATIONS_FILE))
    return found[0] if found else None


def check_same_footprint(sar: RasterGrid, optical: RasterGrid, sar_path: str, optical_path: str) -> None:
    """Refuse a pair whose CRS or bounds differ, allowing different pixel sizes (RGBNIR is 2 m).

    Raises:
        PairingError: Naming both files and what differs.
    """
    if (sar.height, sar.width) == (optical.height, optical.width):
        check_same_grid(sar, optical, sar_path, optical_path)
        return
    if sar.crs != optical.crs:
        raise PairingError(f"{sar_path} and {optical_path}: CRS differ ({sar.crs} vs {optical.crs})")
    tolerance = 0.5 * max(sar.pixel_size, optical.pixel_size)
    if any(abs(a - b) > tolerance for a, b in zip(sar.bounds, optical.bounds)):
        raise PairingError(
            f"{sar_path} and {optical_path}: bounds differ ({sar.bounds} vs {optical.bounds}) by more than half a pixel"
        )


def mask_nodata(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Turn SN6 no-data (all bands 0, or any band non-finite) into NaN in every band.

    Returns:
        The array (modified in place) and the H x W validity mask.
    """
    invalid = (data == 0).all(axis=0) | ~np.isfinite(data).all(axis=0)
    data[:, invalid] = np.nan
    return data, ~invalid


def rasterize_buildings(path: Path, grid: RasterGrid) -> np.ndarray:
    """Burn the building polygons of one GeoJSON onto a raster grid (int64, 0/1).

    Raises:
        DataError: The file is missing, not JSON, or holds a geometry that cannot be reprojected.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if not path.read_text().strip():  # SN6 ships empty files for tiles without buildings
        return np.zeros((grid.height, grid.width), dtype=np.int64)
    return rasterise_vector(path, grid)


def _rotate_180(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array[..., ::-1, ::-1])


def _is_rotated(record: Any) -> bool:
    if isinstance(record, PairedSample):
        return bool(record.extra.get("rotated", False))
    if isinstance(record, Mapping):
        extra = record.get("extra")
        if isinstance(extra, str):
            return bool(record_extra(record).get("rotated", False))
        if isinstance(extra, Mapping):
            return bool(extra.get("rotated", False))
        return bool(record.get("rotated", False))
    raise DataError(f"restore_orientation: expected a manifest record or a PairedSample, got {type(record).__name__}")


def restore_orientation(prediction: Any, record: Any) -> Any:
    """Undo the 180 degree rotation :meth:`SpaceNet6Reader.load` applied to an orientation-1 tile.

    Args:
        prediction: ``... x H x W`` numpy array or torch tensor predicted on the loaded tile.
        record: The tile's manifest record (or its loaded :class:`PairedSample`).

    Returns:
        The prediction in the tile's ground orientation (north up), unchanged for unrotated tiles.
    """
    if not _is_rotated(record):
        return prediction
    if isinstance(prediction, np.ndarray):
        return _rotate_180(prediction)
    return prediction.flip(dims=(-2, -1))  # torch.Tensor


def easting_band(easting: float, edges: Sequence[float]) -> int:
    """Index of the band holding ``easting``; values beyond the ends fall into the end bands."""
    position = bisect.bisect_right(list(edges), easting) - 1
    return min(max(position, 0), len(edges) - 2)


def _band_splits(edges: Sequence[float], val_bands: Sequence[int], test_bands: Sequence[int]) -> list[str]:
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"spacenet6 easting_edges must be at least 2 increasing values, got {list(edges)}")
    count = len(edges) - 1
    named = list(val_bands) + list(test_bands)
    if any(not isinstance(b, int) or not 0 <= b < count for b in named):
        raise ConfigError(f"spacenet6 val_bands/test_bands {named} must be band indices in 0..{count - 1}")
    if set(val_bands) & set(test_bands):
        raise ConfigError(f"spacenet6 bands {sorted(set(val_bands) & set(test_bands))} are both val and test")
    splits = ["test" if b in test_bands else "val" if b in val_bands else "train" for b in range(count)]
    if "train" not in splits:
        raise ConfigError("spacenet6: every easting band is held out; leave at least one for train")
    return splits


def assign_split(
    bounds: tuple[float, float, float, float],
    edges: Sequence[float],
    band_splits: Sequence[str],
    exclude_straddling: bool,
) -> tuple[str, int]:
    """Split and band of a tile: the band of its left edge, ``unassigned`` if it reaches another split."""
    left, _, right, _ = bounds
    band = easting_band(left, edges)
    last = easting_band(np.nextafter(right, -np.inf), edges)
    touched = {band_splits[b] for b in range(band, last + 1)}
    if exclude_straddling and len(touched) > 1:
        return "unassigned", band
    return band_splits[band], band


@register_reader
class SpaceNet6Reader(Reader):
    """SpaceNet 6 (MSAW, Rotterdam): SAR-Intensity paired with one optical product, building masks."""

    name = "spacenet6"
    version = 2  # public test tiles unassigned, partial optical downloads
    description = "SpaceNet 6 / MSAW Rotterdam: Capella quad-pol SAR + WorldView-2 optical, building footprints"
    layout = (
        "<root>/SN6_buildings/train/train/AOI_11_Rotterdam/{SAR-Intensity,PS-RGBNIR,PS-RGB,RGBNIR,"
        "geojson_buildings,SummaryData}/ and <root>/SN6_buildings/test/test_public/AOI_11_Rotterdam/SAR-Intensity/"
    )

    @classmethod
    def detect(cls, root: Path) -> bool:
        train, test = locate_aoi_folders(Path(root))
        return train is not None or test is not None

    @classmethod
    def index(cls, root: Path, **options: Any) -> IndexResult:
        """Pair SAR and optical tiles by strip and tile number and assign geographic splits.

        Args:
            root: Dataset folder (see the module docstring).
            **options:
                optical_product: ``"PS-RGBNIR"``, ``"PS-RGB"`` or ``"RGBNIR"``; default: the first
                    of :data:`OPTICAL_PREFERENCE` present (PS-RGBNIR, then PS-RGB, then RGBNIR).
                orientations_file: Path of ``SAR_orientations.txt``; default: searched under ``root``.
                rotate: Rotate orientation-1 tiles by 180 degrees on load (default True).
                easting_edges: Band edges in UTM metres (default :data:`DEFAULT_EASTING_EDGES`).
                val_bands / test_bands: Band indices held out (default ``(3,)`` / ``(4,)``).
                exclude_straddling: Leave tiles reaching into another split's band ``unassigned``
                    (default True; False reproduces the baseline's slightly overlapping groups).
                include_test_public: Index the SAR-only public test tiles, as ``unassigned``
                    (default True).
                optical_resampling: Resampling of RGBNIR onto the SAR grid (default ``"bilinear"``).

        Raises:
            ConfigError: An unknown option or an invalid value.
            DataError: No SAR tiles under ``root``, no tiles of the optical product asked for (or
                of any, when none is), or an unreadable orientations file.
        """
        unknown = set(options) - _INDEX_OPTIONS
        if unknown:
            raise ConfigError(f"spacenet6: unknown index option(s) {sorted(unknown)}; known: {sorted(_INDEX_OPTIONS)}")
        root = Path(root)
        requested = options.get("optical_product")
        if requested is not None and requested not in OPTICAL_PRODUCTS:
            raise ConfigError(f"spacenet6: optical_product {requested!r} is not one of {sorted(OPTICAL_PRODUCTS)}")
        resampling = options.get("optical_resampling", "bilinear")
        if resampling not in Resampling.__members__:
            raise ConfigError(f"spacenet6: optical_resampling {resampling!r} is not a rasterio Resampling name")
        rotate = bool(options.get("rotate", True))
        exclude_straddling = bool(options.get("exclude_straddling", True))
        edges = [float(e) for e in options.get("easting_edges", DEFAULT_EASTING_EDGES)]
        val_bands = tuple(options.get("val_bands", DEFAULT_VAL_BANDS))
        test_bands = tuple(options.get("test_bands", DEFAULT_TEST_BANDS))
        band_splits = _band_splits(edges, val_bands, test_bands)

        train_aoi, test_aoi = locate_aoi_folders(root)
        if not options.get("include_test_public", True):
            test_aoi = None
        if train_aoi is None and test_aoi is None:
            raise DataError(f"{root}: no SpaceNet 6 SAR-Intensity tiles found; expected layout {cls.layout}")
        if train_aoi is not None:
            product_name, optical_tiles, product_note = choose_optical_product(train_aoi, requested)
        else:  # public test tiles only: no optical is read
            product_name, optical_tiles, product_note = requested or DEFAULT_OPTICAL_PRODUCT, {}, None
        product = OPTICAL_PRODUCTS[product_name]

        orientations_path = options.get("orientations_file")
        if orientations_path is not None:
            orientations_path = Path(orientations_path)
            if not orientations_path.is_file():
                raise DataError(f"{orientations_path}: orientations file not found")
        else:
            orientations_path = _find_orientations_file(root, train_aoi, test_aoi)
        orientations = read_orientations(orientations_path) if orientations_path else {}

        data_root = root.resolve()
        records: list[dict[str, Any]] = []
        skipped: list[Skipped] = []
        unlisted_strips: set[str] = set()

        def add_record(
            key: TileKey, sar_path: Path, optical_path: Path | None, label_path: Path | None, subset: str
        ) -> None:
            try:
                grid = scene_grid(sar_path)
                if optical_path is not None:
                    check_same_footprint(grid, scene_grid(optical_path), str(sar_path), str(optical_path))
            except DataError as exc:  # PairingError included
                skipped.append(Skipped(item=sar_path.name, reason=str(exc)))
                return
            orientation = orientations.get(key.strip)
            if orientation is None:
                unlisted_strips.add(key.strip)
            if subset == "test_public":
                split, band = "unassigned", easting_band(grid.bounds[0], edges)
            else:
                split, band = assign_split(grid.bounds, edges, band_splits, exclude_straddling)
            reason = (TEST_PUBLIC if subset == "test_public" else STRADDLING) if split == "unassigned" else None
            prefix = "test_public_" if subset == "test_public" else ""
            records.append(
                make_record(
                    tile_id=f"{prefix}{key.strip}_tile_{key.tile}",
                    region=key.strip,
                    crs=grid.crs,
                    bounds=grid.bounds,
                    sar_path=os.path.relpath(sar_path, data_root),
                    optical_path=os.path.relpath(optical_path, data_root) if optical_path else "",
                    layers={BUILDINGS_LAYER: os.path.relpath(label_path, data_root)} if label_path else {},
                    extra={
                        "strip": key.strip,
                        "tile": key.tile,
                        "subset": subset,
                        "orientation": orientation,
                        "rotated": bool(rotate and orientation == 1),
                        "easting_band": band,
                        "unassigned_reason": reason,
                        # Nothing can be scored on them: `xmodal data split` must not move them.
                        SPLIT_LOCKED: TEST_PUBLIC if subset == "test_public" else None,
                        "height": grid.height,
                        "width": grid.width,
                        "pixel_size": grid.pixel_size,
                    },
                    split=split,
                )
            )

        if train_aoi is not None:
            sar_tiles = _scan(train_aoi / SAR_PRODUCT, SAR_PRODUCT, ".tif")
            label_files = _scan(train_aoi / LABEL_FOLDER, "Buildings", ".geojson")
            for key in sorted(sar_tiles, key=lambda k: (k.strip, k.tile)):
                optical = optical_tiles.get(key)
                if optical is None:
                    expected = train_aoi / product_name / sar_tiles[key].name.replace(SAR_PRODUCT, product_name)
                    skipped.append(Skipped(item=sar_tiles[key].name, reason=f"no {product_name} tile: {expected} not found"))
                    continue
                add_record(key, sar_tiles[key], optical, label_files.get(key), "train")
            for key in sorted(set(optical_tiles) - set(sar_tiles), key=lambda k: (k.strip, k.tile)):
                reason = f"no {SAR_PRODUCT} tile with strip {key.strip} and tile {key.tile}"
                skipped.append(Skipped(item=optical_tiles[key].name, reason=reason))
        if test_aoi is not None:
            test_tiles = _scan(test_aoi / SAR_PRODUCT, SAR_PRODUCT, ".tif")
            for key in sorted(test_tiles, key=lambda k: (k.strip, k.tile)):
                add_record(key, test_tiles[key], None, None, "test_public")
        if not records:
            first_problem = skipped[0].reason if skipped else "?"
            raise DataError(f"{root}: SpaceNet 6 tiles found but no pair could be made; first problem: {first_problem}")

        first = record_extra(records[0])
        reasons = Counter(record_extra(r)["unassigned_reason"] for r in records)
        # Orientation 0 strips were imaged from the north (the radar looks south in north-up
        # pixels); rotated orientation-1 tiles look south too. A mix, or an unknown strip, has no look.
        effective = {0 if extra["rotated"] else extra["orientation"] for extra in map(record_extra, records)}
        sar_look = {0: "south", 1: "north"}.get(effective.pop()) if len(effective) == 1 else None
        info = DatasetInfo(
            name="spacenet6",
            reader=cls.name,
            sar_bands=BandSet.of("sar", list(SAR_BAND_NAMES), "log_intensity"),
            optical_bands=BandSet.of("optical", list(product.bands), "dn"),
            layers={
                BUILDINGS_LAYER: LabelLayer(
                    classes=list(BUILDING_CLASSES),
                    description=(
                        "SpaceNet 6 building footprints (GeoJSON) reprojected to the SAR CRS and burnt onto "
                        "the SAR grid at pixel centres; 255 where the SAR is no-data or the tile has no labels"
                    ),
                )
            },
            scene_classes=[],
            tile_size=int(first["height"]),
            pixel_size=float(first["pixel_size"]),
            data_root=str(data_root),
            sar_look=sar_look,
            extra={
                "optical_product": product_name,
                "notes": [product_note] if product_note else [],
                "optical_resampling": resampling if product.pixel_size != 0.5 else None,
                "optical_pixel_size": product.pixel_size,
                "orientations_file": str(orientations_path) if orientations_path else None,
                "strips_without_orientation": sorted(unlisted_strips),
                "rotate": rotate,
                "tiles_without_labels": sum(
                    1 for r in records if r["layers"] == "{}" and r["optical_path"]  # train tiles only
                ),
                "split": {
                    "method": "easting bands (left tile edge), as in the SpaceNet 6 baseline",
                    "easting_edges": edges,
                    "band_splits": band_splits,
                    "exclude_straddling": exclude_straddling,
                    "unassigned": {reason: reasons[reason] for reason in (STRADDLING, TEST_PUBLIC)},
                },
            },
        )
        return IndexResult(manifest=Manifest(info=info, records=records), skipped=skipped)

    @classmethod
    def load(cls, record: dict[str, Any], info: DatasetInfo, data_root: Path, options: LoadOptions) -> PairedSample:
        """Read one tile: SAR, optical on the SAR grid, building mask; rotated if its strip needs it.

        A public-test tile has no optical: its ``optical`` is zeros with ``optical_valid`` all False
        (SAR-only models never read it) and its building mask, if asked for, is all 255.

        Raises:
            DataError: A missing or unreadable file (named), or an unknown label layer.
            PairingError: SAR and optical grids differ.
        """
        data_root = Path(data_root)
        extra = record_extra(record)
        sar = read_raster(data_root / record["sar_path"], expected_bands=len(info.sar_bands))
        sar_data, sar_valid = mask_nodata(sar.data)
        height, width = sar.grid.height, sar.grid.width

        if record["optical_path"]:
            optical_path = data_root / record["optical_path"]
            optical_data, optical_valid = cls._read_optical(optical_path, sar.grid, sar.path, info)
        else:
            optical_data = np.zeros((len(info.optical_bands), height, width), dtype=np.float32)
            optical_valid = np.zeros((height, width), dtype=bool)

        mask = None
        if options.noisy_layer is not None:
            raise DataError(f"tile {record['tile_id']!r}: SpaceNet 6 has no noisy label layer {options.noisy_layer!r}")
        if options.mask_layer is not None:
            if options.mask_layer != BUILDINGS_LAYER:
                raise DataError(
                    f"tile {record['tile_id']!r}: no label layer {options.mask_layer!r}; SpaceNet 6 has {BUILDINGS_LAYER!r}"
                )
            layers = record_layers(record)
            if BUILDINGS_LAYER in layers:
                mask = rasterize_buildings(data_root / layers[BUILDINGS_LAYER], sar.grid)
            else:
                mask = np.full((height, width), IGNORE_INDEX, dtype=np.int64)
            mask[~sar_valid] = IGNORE_INDEX

        rotated = bool(extra.get("rotated", False))
        if rotated:
            sar_data, optical_data = _rotate_180(sar_data), _rotate_180(optical_data)
            sar_valid, optical_valid = _rotate_180(sar_valid), _rotate_180(optical_valid)
            mask = _rotate_180(mask) if mask is not None else None
        return PairedSample(
            sar=sar_data,
            optical=optical_data,
            meta=record_meta(record),
            mask=mask,
            label=int(record["scene_label"]),
            sar_valid=sar_valid,
            optical_valid=optical_valid,
            extra={
                "strip": extra.get("strip"),
                "orientation": extra.get("orientation"),
                "rotated": rotated,
                "sar_nodata_fraction": float(1.0 - sar_valid.mean()),
                "optical_nodata_fraction": float(1.0 - optical_valid.mean()),
            },
        )

    @staticmethod
    def _read_optical(
        path: Path, sar_grid: RasterGrid, sar_path: str, info: DatasetInfo
    ) -> tuple[np.ndarray, np.ndarray]:
        """Optical bands on the SAR grid, with no-data as NaN, plus their validity mask."""
        optical = read_raster(path, expected_bands=len(info.optical_bands))
        check_same_footprint(sar_grid, optical.grid, sar_path, optical.path)
        data, valid = mask_nodata(optical.data)
        if (optical.grid.height, optical.grid.width) == (sar_grid.height, sar_grid.width):
            return data, valid
        # Coarser product (RGBNIR): resample onto the SAR grid; NaN no-data stays out of the kernel.
        resampling = Resampling[info.extra.get("optical_resampling") or "bilinear"]
        resampled = np.full((data.shape[0], sar_grid.height, sar_grid.width), np.nan, dtype=np.float32)
        reproject(
            source=data,
            destination=resampled,
            src_transform=Affine(*optical.grid.transform),
            src_crs=CRS.from_user_input(optical.grid.crs),
            dst_transform=Affine(*sar_grid.transform),
            dst_crs=CRS.from_user_input(sar_grid.crs),
            src_nodata=np.nan,
            dst_nodata=np.nan,
            resampling=resampling,
        )
        return mask_nodata(resampled)
