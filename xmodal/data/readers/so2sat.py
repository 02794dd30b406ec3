"""So2Sat LCZ42: 32 x 32 Sentinel-1 / Sentinel-2 patch pairs with one Local Climate Zone label each.

Layouts (HDF5, one file per split)::

    v2:  <root>/{training,validation,testing}.h5
    v3:  <root>/{random,block,culture_10}/{training,testing}.h5     (or <root> = one variant folder)
    v4:  the v2 files plus <root>/{training,validation,testing}_geo.h5 (coord, tfw, epsg per patch)

Each split file holds ``sen1`` (N x 32 x 32 x 8), ``sen2`` (N x 32 x 32 x 10) and ``label``
(N x 17, one-hot), channels-last float64. A record points at one row: ``sar_path`` and
``optical_path`` are the file, ``extra["row"]`` the row; :meth:`So2SatReader.load` reads that row
only, through one cached read-only handle per file and per process (handles are reopened after a
fork, never shared with the parent).

Conventions this reader applies:

* Sentinel-1 channels (linear, not dB): Re/Im of unfiltered VH and VV (``complex_real`` /
  ``complex_imag``), Lee-filtered VH and VV intensity (``linear``), Re/Im of the Lee-filtered
  covariance off-diagonal C12. Sentinel-2: B02, B03, B04, B05, B06, B07, B08, B8A, B11, B12 as
  reflectance (the files are already divided by 10,000).
* The class is ``argmax`` of the one-hot row; rows that are not one-hot are skipped and reported.
  ``classes="urban"`` keeps LCZ 1-10, ``"low-rise"`` keeps the four classes named low-rise (LCZ 3
  compact, 6 open, 7 lightweight, 8 large), ``"all"`` keeps the 17; labels are remapped to
  0..k-1 and the 17-class index is kept in ``extra["lcz_index"]``.
* Splits follow the files: training -> train, validation -> val, testing -> test. The v2 files are
  themselves geographic: train is 42 cities, val the western halves and test the eastern halves of
  10 other cities. v3 has no validation file; ``val_fraction`` carves a seeded share of training
  rows into val (a random carve: neighbouring patches then sit on both sides).
* There is no per-pixel label layer. Without v4 geolocation, patches have no CRS (``crs=""``) and
  placeholder bounds (0, 0, 32, 32), which the leakage check ignores; with ``*_geo.h5`` beside a
  split file, each patch gets its UTM CRS and footprint: from ``coord`` (the patch centre) where the
  file has it, else from ``tfw``, whose order differs between releases (GDAL geotransform order in
  the Nov-2025 files, world-file order in the re-release without ``coord``) and is told from the
  values (:func:`tfw_corners`). ``DatasetInfo.extra["geolocation"]`` names the source per file.
* Non-finite values become NaN and are flagged invalid in ``sar_valid`` / ``optical_valid``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from xmodal.data.bands import BandSet
from xmodal.data.manifest import DatasetInfo, Manifest, make_record, record_extra, record_meta
from xmodal.data.readers.base import IndexResult, LoadOptions, Reader, Skipped, register_reader
from xmodal.data.sample import PairedSample
from xmodal.errors import ConfigError, DataError

PATCH_SIZE = 32
PIXEL_SIZE = 10.0
# Footprint of a patch without geolocation (crs ""): pixel units, ignored by the leakage check.
PLACEHOLDER_BOUNDS = (0.0, 0.0, float(PATCH_SIZE), float(PATCH_SIZE))
SEN1_KEY, SEN2_KEY, LABEL_KEY = "sen1", "sen2", "label"
SAR_BAND_NAMES = ("VH_re", "VH_im", "VV_re", "VV_im", "VH_lee", "VV_lee", "C12_re", "C12_im")
SAR_BAND_UNITS = (
    "complex_real",
    "complex_imag",
    "complex_real",
    "complex_imag",
    "linear",
    "linear",
    "complex_real",
    "complex_imag",
)
OPTICAL_BAND_NAMES = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")

# The 17 Local Climate Zones in label order: codes 1-10 are built types, A-G land cover.
LCZ_CODES = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "A", "B", "C", "D", "E", "F", "G")
LCZ_NAMES = (
    "compact high-rise",
    "compact mid-rise",
    "compact low-rise",
    "open high-rise",
    "open mid-rise",
    "open low-rise",
    "lightweight low-rise",
    "large low-rise",
    "sparsely built",
    "heavy industry",
    "dense trees",
    "scattered trees",
    "bush, scrub",
    "low plants",
    "bare rock or paved",
    "bare soil or sand",
    "water",
)
# Class subsets of the swd paper (low-rise: 4, urban: 10, all: 17), as 0-based label indices.
# The paper names only "four classes ... that contain low-rise buildings": the four LCZ whose
# names say low-rise (3, 6, 7, 8).
CLASS_SUBSETS: dict[str, tuple[int, ...]] = {
    "all": tuple(range(17)),
    "urban": tuple(range(10)),
    "low-rise": (2, 5, 6, 7),
}

V2_FILES = {"training": "train", "validation": "val", "testing": "test"}
V3_FILES = {"training": "train", "testing": "test"}
V3_VARIANTS = ("random", "block", "culture_10")
_INDEX_OPTIONS = {"version", "variant", "classes", "val_fraction", "seed"}


def class_names(indices: tuple[int, ...]) -> list[str]:
    """Display names (``"LCZ 3: compact low-rise"``) of 17-class label indices."""
    return [f"LCZ {LCZ_CODES[i]}: {LCZ_NAMES[i]}" for i in indices]


# ---------------------------------------------------------------------------------------------
# HDF5 access
# ---------------------------------------------------------------------------------------------

_handles: dict[str, h5py.File] = {}
_handles_pid: int | None = None


def _open_h5(path: Path) -> h5py.File:
    """Open an HDF5 file read-only, with errors naming the file.

    File locking keeps HDF5's default: a process that opens one file with two different locking
    settings is refused, so any other h5py user in the process must be able to open it too. Where
    locking fails (some network file systems), set ``HDF5_USE_FILE_LOCKING=FALSE``.
    """
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read as HDF5 ({exc})") from exc


def cached_handle(path: Path) -> h5py.File:
    """A read-only handle on ``path`` kept open for this process.

    Handles inherited through ``fork`` belong to the parent's HDF5 state: a child drops them
    (without using them) and opens its own.
    """
    global _handles_pid
    pid = os.getpid()
    if _handles_pid != pid:
        _handles.clear()
        _handles_pid = pid
    key = str(path)
    handle = _handles.get(key)
    if handle is None or not handle.id.valid:
        handle = _handles[key] = _open_h5(path)
    return handle


def close_handles() -> None:
    """Close this process's cached handles (before rewriting a file, or at shutdown)."""
    if _handles_pid == os.getpid():
        for handle in _handles.values():
            if handle.id.valid:
                handle.close()
    _handles.clear()


def _dataset(handle: h5py.File, key: str, path: Path) -> h5py.Dataset:
    if key not in handle:
        raise DataError(f"{path}: missing dataset {key!r}; a So2Sat file holds 'sen1', 'sen2' and 'label'")
    return handle[key]


def check_split_file(handle: h5py.File, path: Path) -> int:
    """Check dataset names and shapes of one split file and return its row count.

    Raises:
        DataError: A missing dataset, a wrong shape, or row counts that differ (naming file and key).
    """
    expected = {SEN1_KEY: (PATCH_SIZE, PATCH_SIZE, 8), SEN2_KEY: (PATCH_SIZE, PATCH_SIZE, 10), LABEL_KEY: (17,)}
    counts = {}
    for key, tail in expected.items():
        shape = _dataset(handle, key, path).shape
        if len(shape) != len(tail) + 1 or tuple(shape[1:]) != tail:
            raise DataError(f"{path}: dataset {key!r} has shape {shape}, expected N x {' x '.join(map(str, tail))}")
        counts[key] = shape[0]
    if len(set(counts.values())) != 1:
        raise DataError(f"{path}: datasets disagree on the number of patches: {counts}")
    return counts[SEN1_KEY]


# Tolerances of the tfw order check: pixel sizes within 1 % of 10 m, rotation terms below 1e-6.
_PIXEL_RTOL, _ROTATION_ATOL = 0.01, 1e-6


def tfw_corners(tfw: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Upper-left corner and pixel sizes of every patch from its six ``tfw`` values, in either order.

    Two orders occur in the v4 files, told apart per row by the values:

    * GDAL geotransform order (the Nov-2025 ``*_geo.h5``): ``(x0, 10, 0, y0, 0, 10)``, ``(x0, y0)``
      the patch's upper-left corner and the y size positive; the official notebook reads it as
      ``from_origin(tfw[0], tfw[3], tfw[1], tfw[5])``. Recognised by ``|row[1]| == 10``.
    * World-file order (the later re-release): ``(A, D, B, E, C, F)``: x size, row rotation D (about
      0), column rotation B, y size, then C/F. In a real world file C/F is the centre of the
      upper-left pixel (what this reader assumed before); the re-release writes the upper-left
      *corner* there (its ``save_geotiff.py`` puts C/F into the affine's corner terms), and that is
      how it is read here.

    Pixel sizes are taken by magnitude: the corner is the north-west one in both orders.

    Returns:
        ``left``, ``top``, x size, y size (N each) and the order of each row (``"gdal"`` / ``"world"``).

    Raises:
        DataError: A row that fits neither order (naming the file, the row and its values).
    """
    def is_pixel(values: np.ndarray) -> np.ndarray:
        return np.isclose(np.abs(values), PIXEL_SIZE, rtol=_PIXEL_RTOL, atol=0.0)

    def is_zero(values: np.ndarray) -> np.ndarray:
        return np.abs(values) <= _ROTATION_ATOL

    gdal = is_pixel(tfw[:, 1]) & is_pixel(tfw[:, 5]) & is_zero(tfw[:, 2]) & is_zero(tfw[:, 4])
    world = is_pixel(tfw[:, 0]) & is_pixel(tfw[:, 3]) & is_zero(tfw[:, 1]) & is_zero(tfw[:, 2])
    bad = np.flatnonzero(~(gdal | world) | ~np.isfinite(tfw).all(axis=1))
    if bad.size:
        row = int(bad[0])
        raise DataError(
            f"{path}: 'tfw' row {row} {tfw[row].tolist()} fits neither GDAL geotransform order "
            f"(x0, {PIXEL_SIZE:g}, 0, y0, 0, {PIXEL_SIZE:g}) nor world-file order "
            f"({PIXEL_SIZE:g}, 0, 0, -{PIXEL_SIZE:g}, x0, y0) ({bad.size} such row(s))"
        )
    left = np.where(gdal, tfw[:, 0], tfw[:, 4])
    top = np.where(gdal, tfw[:, 3], tfw[:, 5])
    x_size = np.abs(np.where(gdal, tfw[:, 1], tfw[:, 0]))
    y_size = np.abs(np.where(gdal, tfw[:, 5], tfw[:, 3]))
    return left, top, x_size, y_size, ["gdal" if g else "world" for g in gdal]


def _read_geo(path: Path, rows: int) -> tuple[list[str], np.ndarray, str]:
    """CRS and (left, bottom, right, top) of every patch from a v4 ``*_geo.h5`` file.

    ``coord`` (patch centres, x and y in its first two columns) is used where present; ``tfw``
    otherwise (see :func:`tfw_corners`). The third value says which: ``"coord"``,
    ``"tfw (GDAL order)"``, ``"tfw (world-file order)"`` or ``"tfw (mixed orders)"``.
    """
    with _open_h5(path) as handle:
        if "epsg" not in handle or ("tfw" not in handle and "coord" not in handle):
            raise DataError(
                f"{path}: a So2Sat geolocation file needs 'epsg' and 'tfw' (or 'coord'); it has {sorted(handle)}"
            )
        epsg = np.asarray(handle["epsg"][()]).reshape(-1)
        if epsg.size == 1:
            epsg = np.repeat(epsg, rows)
        if epsg.size != rows:
            raise DataError(f"{path}: dataset 'epsg' has {epsg.size} entries for {rows} patches")
        codes = [int(float(c.decode() if isinstance(c, bytes) else c)) for c in epsg]
        extent = PATCH_SIZE * PIXEL_SIZE
        if "coord" in handle:  # patch centres: x and y in the first two columns
            if handle["coord"].shape[0] != rows or handle["coord"].size < 2 * rows:
                raise DataError(
                    f"{path}: dataset 'coord' has shape {handle['coord'].shape}, expected {rows} x (2 or more)"
                )
            coord = np.asarray(handle["coord"][()], dtype=np.float64).reshape(rows, -1)
            left, bottom = coord[:, 0] - extent / 2, coord[:, 1] - extent / 2
            right, top = left + extent, bottom + extent
            source = "coord"
        else:
            if handle["tfw"].size != rows * 6:
                raise DataError(f"{path}: dataset 'tfw' has shape {handle['tfw'].shape}, expected {rows} x 6")
            tfw = np.asarray(handle["tfw"][()], dtype=np.float64).reshape(rows, 6)
            left, top, x_size, y_size, orders = tfw_corners(tfw, path)
            right, bottom = left + PATCH_SIZE * x_size, top - PATCH_SIZE * y_size
            names = {"gdal": "GDAL order", "world": "world-file order"}
            source = f"tfw ({names[orders[0]]})" if len(set(orders)) == 1 else "tfw (mixed orders)"
    bounds = np.stack([left, bottom, right, top], axis=1)
    return [f"EPSG:{code}" for code in codes], bounds, source


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def _variant_folders(root: Path) -> list[str]:
    return [v for v in V3_VARIANTS if (root / v / "training.h5").is_file() or (root / v / "testing.h5").is_file()]


def resolve_layout(
    root: Path, version: str = "auto", variant: str | None = None
) -> tuple[str, str | None, dict[str, str]]:
    """Version, variant and ``{relative file: split}`` of the So2Sat folder ``root``.

    Raises:
        ConfigError: An unknown version or variant, or several v3 variants and none chosen.
        DataError: No So2Sat file where the version says.
    """
    version = str(version)
    if version not in ("auto", "2", "3", "4"):
        raise ConfigError(f"so2sat: version {version!r} must be 'auto', '2', '3' or '4'")
    if variant is not None and variant not in V3_VARIANTS:
        raise ConfigError(f"so2sat: variant {variant!r} must be one of {V3_VARIANTS}")
    variants = _variant_folders(root)
    has_v2 = any((root / f"{stem}.h5").is_file() for stem in V2_FILES) and root.name not in V3_VARIANTS
    # TorchGeo-style copies hold the v2 files and the v3 folders side by side: v2 unless told.
    if version == "auto" and (variant is not None or root.name in V3_VARIANTS or (variants and not has_v2)):
        version = "3"
    if version == "3":
        if root.name in V3_VARIANTS and not variants:
            chosen, prefix = root.name, ""
        else:
            if variant is None and len(variants) > 1:
                raise ConfigError(f"{root}: holds So2Sat v3 variants {variants}; choose one with variant=...")
            chosen = variant or (variants[0] if variants else None)
            if chosen is None:
                raise DataError(f"{root}: no So2Sat v3 folder ({', '.join(V3_VARIANTS)}) with training.h5/testing.h5")
            prefix = f"{chosen}/"
        files = {f"{prefix}{stem}.h5": split for stem, split in V3_FILES.items()}
        return "3", chosen, files
    files = {f"{stem}.h5": split for stem, split in V2_FILES.items()}
    has_geo = any((root / f"{stem}_geo.h5").is_file() for stem in V2_FILES)
    if version == "4" and not has_geo:
        raise DataError(f"{root}: version 4 needs *_geo.h5 files beside the split files; none found")
    if version == "auto":
        version = "4" if has_geo else "2"
    return version, None, files


@register_reader
class So2SatReader(Reader):
    """So2Sat LCZ42 (v2, v3, v4 geolocation): Sentinel-1/2 patch pairs with LCZ scene labels."""

    name = "so2sat"
    version = 2  # v4 tfw read in either order (footprints)
    description = "So2Sat LCZ42: 32x32 Sentinel-1 (8 ch, linear/complex) + Sentinel-2 (10 bands) patches, 17 LCZ"
    layout = (
        "<root>/{training,validation,testing}.h5 (v2; v4 adds *_geo.h5) or "
        "<root>/{random,block,culture_10}/{training,testing}.h5 (v3)"
    )

    @classmethod
    def detect(cls, root: Path) -> bool:
        root = Path(root)
        candidates = [root / f"{stem}.h5" for stem in V2_FILES]
        candidates += [root / variant / f"{stem}.h5" for variant in _variant_folders(root) for stem in V3_FILES]
        first = next((path for path in candidates if path.is_file()), None)
        if first is None:
            return False
        try:  # dataset names only, no pixels
            with h5py.File(first, "r") as handle:
                return SEN1_KEY in handle and SEN2_KEY in handle
        except OSError:
            return False

    @classmethod
    def index(cls, root: Path, **options: Any) -> IndexResult:
        """One record per patch row of every split file present.

        Args:
            root: Dataset folder (see the module docstring).
            **options:
                version: ``"auto"`` (default: from the layout), ``"2"``, ``"3"`` or ``"4"``.
                variant: v3 split protocol ``"random"``, ``"block"`` or ``"culture_10"`` (needed only
                    when ``root`` holds several).
                classes: ``"all"`` (default), ``"urban"`` or ``"low-rise"``.
                val_fraction: v3 only: share of training rows moved to val (default 0).
                seed: Seed of that draw (default 0).

        Raises:
            ConfigError: An unknown option or value.
            DataError: A missing dataset, a wrong shape or inconsistent row counts (naming the file).
        """
        unknown = set(options) - _INDEX_OPTIONS
        if unknown:
            raise ConfigError(f"so2sat: unknown index option(s) {sorted(unknown)}; known: {sorted(_INDEX_OPTIONS)}")
        root = Path(root)
        version, variant, files = resolve_layout(root, options.get("version", "auto"), options.get("variant"))
        subset_name = options.get("classes", "all")
        if subset_name not in CLASS_SUBSETS:
            raise ConfigError(f"so2sat: classes {subset_name!r} must be one of {sorted(CLASS_SUBSETS)}")
        subset = CLASS_SUBSETS[subset_name]
        remap = np.full(17, -1, dtype=np.int64)
        remap[list(subset)] = np.arange(len(subset))
        val_fraction = float(options.get("val_fraction", 0.0))
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"so2sat: val_fraction {val_fraction} must be in [0, 1)")
        if val_fraction and version != "3":
            raise ConfigError("so2sat: val_fraction applies to v3 only; v2/v4 ship validation.h5")
        rng = np.random.default_rng(int(options.get("seed", 0)))

        records: list[dict[str, Any]] = []
        skipped: list[Skipped] = []
        geolocated: dict[str, str] = {}
        for relative, split in files.items():
            path = root / relative
            if not path.is_file():
                skipped.append(Skipped(item=relative, reason=f"{path}: file not found; no {split} patches"))
                continue
            with _open_h5(path) as handle:
                rows = check_split_file(handle, path)
                labels = np.asarray(handle[LABEL_KEY][()], dtype=np.float64)
            classes = labels.argmax(axis=1)
            one_hot = (np.count_nonzero(labels, axis=1) == 1) & (labels.max(axis=1) == 1.0)
            geo_path = path.with_name(f"{path.stem}_geo.h5")
            crs_list, bounds = (None, None)
            if version == "4" and geo_path.is_file():
                crs_list, bounds, geolocated[geo_path.name] = _read_geo(geo_path, rows)
            carve = rng.random(rows) < val_fraction if split == "train" and val_fraction else np.zeros(rows, dtype=bool)
            stem = Path(relative).stem
            id_prefix = f"{variant}_" if variant else ""
            for row in range(rows):
                if not one_hot[row]:
                    skipped.append(Skipped(item=f"{relative}[{row}]", reason=f"{path}: label row {row} is not one-hot"))
                    continue
                lcz = int(classes[row])
                if remap[lcz] < 0:
                    continue
                crs = crs_list[row] if crs_list else ""
                records.append(
                    make_record(
                        tile_id=f"{id_prefix}{stem}_{row:06d}",
                        region=f"{stem}:{crs}" if crs else stem,
                        crs=crs,
                        bounds=tuple(bounds[row]) if bounds is not None else PLACEHOLDER_BOUNDS,
                        sar_path=relative,
                        optical_path=relative,
                        scene_label=int(remap[lcz]),
                        extra={"row": row, "lcz_index": lcz, "lcz": LCZ_CODES[lcz]},
                        split="val" if carve[row] else split,
                    )
                )
        if not records:
            found = [s.reason for s in skipped[:3]]
            raise DataError(f"{root}: no So2Sat patches indexed (version {version}, classes {subset_name!r}); {found}")

        if version in ("2", "4"):
            split_note = "per file; the v2 files are geographic (train: 42 cities; val / test: west / east halves of 10 others)"
        else:
            split_note = f"per file (v3 {variant})" + ("; val carved at random from training" if val_fraction else "")
        info = DatasetInfo(
            name="so2sat",
            reader=cls.name,
            sar_bands=BandSet.of("sar", list(SAR_BAND_NAMES), list(SAR_BAND_UNITS)),
            optical_bands=BandSet.of("optical", list(OPTICAL_BAND_NAMES), "reflectance"),
            layers={},
            scene_classes=class_names(subset),
            tile_size=PATCH_SIZE,
            pixel_size=PIXEL_SIZE,
            data_root=str(root.resolve()),
            sar_look=None,
            extra={
                "version": version,
                "variant": variant,
                "classes": subset_name,
                "lcz_indices": list(subset),
                "val_fraction": val_fraction,
                "geolocation": geolocated,
                "split": split_note,
            },
        )
        return IndexResult(manifest=Manifest(info=info, records=records), skipped=skipped)

    @classmethod
    def load(cls, record: dict[str, Any], info: DatasetInfo, data_root: Path, options: LoadOptions) -> PairedSample:
        """Read one patch row: C x 32 x 32 float32 SAR and optical, non-finite values as NaN.

        Raises:
            DataError: Missing file or dataset, a row beyond the file, or a label layer asked for.
        """
        if options.mask_layer is not None or options.noisy_layer is not None:
            raise DataError(f"tile {record['tile_id']!r}: So2Sat has scene labels only, no per-pixel label layer")
        extra = record_extra(record)
        row = int(extra["row"])
        arrays = []
        for key, relative in ((SEN1_KEY, record["sar_path"]), (SEN2_KEY, record["optical_path"])):
            path = Path(data_root) / relative
            dataset = _dataset(cached_handle(path), key, path)
            if not 0 <= row < dataset.shape[0]:
                raise DataError(f"{path}: row {row} is beyond dataset {key!r} of {dataset.shape[0]} patches; re-index")
            try:
                patch = dataset[row]
            except OSError as exc:
                raise DataError(f"{path}: cannot read row {row} of {key!r} ({exc})") from exc
            array = np.ascontiguousarray(np.moveaxis(patch, -1, 0), dtype=np.float32)
            array[~np.isfinite(array)] = np.nan
            arrays.append(array)
        sar, optical = arrays
        return PairedSample(
            sar=sar,
            optical=optical,
            meta=record_meta(record),
            label=int(record["scene_label"]),
            sar_valid=np.isfinite(sar).all(axis=0),
            optical_valid=np.isfinite(optical).all(axis=0),
            extra={"lcz_index": extra.get("lcz_index")},
        )
