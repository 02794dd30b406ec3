"""DFC2020 reader (IEEE GRSS Data Fusion Contest 2020, DOI 10.21227/rha7-m332).

Original layout (S1 and S2 encoded as in SEN12MS: VV/VH dB, 13-band L1C uint16; S1 may be float64)::

    <root>/ROIs0000_validation/{s1,s2,dfc,lc}_validation/ROIs0000_validation_{s1,s2,dfc,lc}_0_p<N>.tif   # 986 patches
    <root>/ROIs0000_test/{s1,s2,dfc,lc}_0/ROIs0000_test_{s1,s2,dfc,lc}_0_p<N>.tif                        # 5,128 patches

Folder names inside the two split folders are not relied on (re-packaged copies name them
``s1_test`` etc.); files are matched by name. ``validation/`` and ``test/`` are accepted as split
folder names too. ``s1``, ``s2`` and ``dfc`` are required per patch, ``lc`` is optional.

Copernicus-Bench copy (Wang et al. 2025; what TorchGeo's ``CopernicusBenchDFC2020S1`` / ``...S2``
read, ``l2_dfc2020_s1s2/dfc2020.zip`` unpacked)::

    <root>/dfc2020_s1s2/{s1,s2,dfc}/ROIs0000_{test,validation}_{s1,s2,dfc}_0_p<N>.tif
    <root>/dfc2020_s1s2/dfc-{train,val,test}-new.csv     # no header; one dfc file name per line

``<root>`` may also be the ``dfc2020_s1s2`` folder itself. S1 is float64 dB, S2 13-band uint16, the
``dfc`` labels int32 with 0 = Background (unlabelled) and 1-10 the DFC classes, as in the original;
there is no ``lc``. The three files of a patch are paired by file name (TorchGeo serves S1 and S2 as
two unpaired datasets). The files carry pixel coordinates only (TorchGeo drops their "location"),
so such patches are recorded without CRS and bounds: the leakage check cannot run on them.

Label layers (zero-based, 255 = unknown, also where S1 or S2 are no-data):

* ``dfc``: the semi-manual high-resolution labels, simplified IGBP 1..10 -> 0..9, 0 -> 255. The
  option ``classes`` picks the class set: ``9`` (or ``no_savanna``, as in the baseline) makes
  Savanna 255 and moves the classes above it down; ``8`` (CROMA / GFM-Bench) also makes Snow/Ice
  255, leaving Forest, Shrubland, Grassland, Wetlands, Croplands, Urban/Built-up, Barren, Water as
  0..7, so mIoU is comparable with their tables.
* ``dfc_dw``: the same labels in Dynamic World class indices, the mapping CromSS (paper 003) uses
  to fine-tune DW-pretrained models: Forest->trees, Shrubland->shrub_and_scrub, Grassland->grass,
  Wetlands->flooded_vegetation, Croplands->crops, Urban->built, Barren->bare, Water->water,
  Snow/Ice->snow_and_ice; Savanna has no DW class -> 255 (``classes`` does not apply).
* ``lc_dfc`` (original layout): MODIS IGBP (``lc`` band 1) through the SEN12MS IGBP->DFC table,
  in the same class set as ``dfc``: low-resolution, noisy.

No-data follows the products (:func:`~xmodal.data.bands.mask_s2`, :func:`~xmodal.data.bands.mask_s1`,
shared with the SEN12MS and SSL4EO-S12 readers): an S2 pixel is no-data when all 13 bands are 0
or a band is NaN / the declared nodata; one band at 0 is a measurement. S1: NaN or declared nodata;
0 dB is valid.

Protocols (option ``protocol``; membership of the two folders is fixed by the protocol):

* ``"ssl"`` (CROMA / GFM-Bench): train and val on the 5,128 ``test`` patches, test on
  the 986 ``validation`` patches; those works crop 256 px patches into 96 px tiles with overlap
  (``info.extra["protocol_tile_size"]``; the cropping is a pipeline setting).
* ``"cromss"`` (default of the original layout, since xmodal reproduces paper 003): paper 003 as
  written: fine-tune on the 986 ``validation`` patches, test on the 5,128 ``test`` patches (full
  256 px patches for ResNet-50).
* ``"original"``: the contest: ``validation`` -> val, ``test`` -> test, no training patches
  (the contest trained on SEN12MS).
* ``"copernicus_bench"`` (default of the Copernicus-Bench copy, and only there): each patch goes
  to the split whose ``dfc-<split>-new.csv`` lists it; unlisted patches are skipped.

The first three apply to both layouts (the folder is the ``validation`` / ``test`` token of the
file name). Validation is carved from the training folder by a seeded draw over groups. Patches
carry no scene id, so groups are ground blocks of ``val_block_size`` metres when the files are
georeferenced (held-out blocks touching training patches then move to train), and runs of
``val_block_patches`` consecutive patch numbers otherwise. Leakage caveat: patch numbers are only
a proxy for location, and the protocol itself fixes the two folders; ``info.extra`` reports
``train_test_overlaps``, the number of training/test footprint overlaps found between the
folders, which the reader cannot remove without breaking the protocol.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.manifest import DatasetInfo, LabelLayer, Manifest, make_record
from xmodal.data.readers.base import IndexResult, LoadOptions, Reader, Skipped, register_reader
from xmodal.data.readers.sen12ms import (
    DFC_CLASS_SETS,
    DFC_SAVANNA,
    carve_groups,
    dfc_class_count,
    dfc_class_names,
    dfc_classes_note,
    dfc_to_index,
    first_entries,
    igbp_to_dfc_index,
    load_coregistered_pair,
    lookup_classes,
    move_leaking_groups,
    pair_grids,
    read_name_list,
    refuse_unknown_options,
    s1_band_set,
    s2_band_set,
    seeded_fraction,
)
from xmodal.data.classes import DYNAMIC_WORLD_CLASSES
from xmodal.data.sample import IGNORE_INDEX, PairedSample
from xmodal.data.splits import find_leaks
from xmodal.errors import ConfigError, DataError

SPLIT_FOLDERS = {
    "validation": ("ROIs0000_validation", "validation"),
    "test": ("ROIs0000_test", "test"),
}
PROTOCOLS = {
    # protocol: (role of the 'validation' folder, role of the 'test' folder, tile size used by the protocol)
    "ssl": ("test", "train", 96),
    "cromss": ("train", "test", 256),
    "original": ("val", "test", 256),
    # Roles come from the split CSVs of the Copernicus-Bench copy, not from the folders.
    "copernicus_bench": (None, None, 256),
}
PROTOCOL_NOTES = {
    "ssl": "CROMA / GFM-Bench: train+val on the 5,128 'test' patches, test on the 986 'validation' patches, 96 px crops",
    "cromss": "paper 003 (CromSS) as written: fine-tune on the 986 'validation' patches, test on the 5,128 'test' patches",
    "original": "DFC2020 contest: 'validation' folder = val, 'test' folder = test, no training patches",
    "copernicus_bench": "Copernicus-Bench / TorchGeo: splits as listed in dfc-{train,val,test}-new.csv",
}
# Simplified DFC value 0..10 -> Dynamic World class index (CromSS fine-tuning convention).
DFC_TO_DW = np.array([IGNORE_INDEX, 1, 5, IGNORE_INDEX, 2, 3, 4, 6, 8, 7, 0], dtype=np.int64)

# The Copernicus-Bench copy (TorchGeo ``CopernicusBenchDFC2020S1`` / ``S2``).
TORCHGEO_DIR = "dfc2020_s1s2"
TORCHGEO_SOURCES = ("s1", "s2", "dfc")
TORCHGEO_SPLIT_FILES = {"train": "dfc-train-new.csv", "val": "dfc-val-new.csv", "test": "dfc-test-new.csv"}
LAYOUT_ORIGINAL = "original"
LAYOUT_TORCHGEO = "copernicus_bench"

_FILE = re.compile(r"^ROIs0000_(validation|test)_(s1|s2|dfc|lc)_0_p(\d+)\.tif$")
_SOURCE_DIR = re.compile(r"^(s1|s2|dfc|lc)_(0|test|validation)$")

PatchKey = tuple[str, int]  # (folder: 'validation' or 'test', patch number)


def dfc_to_dw_index(dfc: np.ndarray, classes: int = 10) -> np.ndarray:
    """Simplified DFC values -> Dynamic World class indices (Savanna and 0 -> 255; ``classes`` does not apply)."""
    return lookup_classes(dfc, DFC_TO_DW)


def _has_original_layout(root: Path) -> bool:
    for names in SPLIT_FOLDERS.values():
        for name in names:
            folder = root / name
            if folder.is_dir() and any(_SOURCE_DIR.match(e.name) and e.is_dir() for e in first_entries(folder)):
                return True
    return False


def torchgeo_folder(root: Path) -> Path | None:
    """The ``dfc2020_s1s2`` folder of a Copernicus-Bench copy at ``root`` (or ``root`` itself), else ``None``."""
    for candidate in (root / TORCHGEO_DIR, root):
        if all((candidate / source).is_dir() for source in TORCHGEO_SOURCES) and any(
            _FILE.match(entry.name) for entry in first_entries(candidate / "dfc")
        ):
            return candidate
    return None


def _scan_original(root: Path) -> dict[PatchKey, dict[str, Path]]:
    files: dict[PatchKey, dict[str, Path]] = defaultdict(dict)
    for folder_split, names in SPLIT_FOLDERS.items():
        for name in names:
            folder = root / name
            if not folder.is_dir():
                continue
            for source_dir in sorted(os.scandir(folder), key=lambda e: e.name):
                if not source_dir.is_dir():
                    continue
                for entry in os.scandir(source_dir.path):
                    match = _FILE.match(entry.name)
                    if match and match.group(1) == folder_split:
                        files[(folder_split, int(match.group(3)))][match.group(2)] = Path(entry.path)
    return files


def _scan_torchgeo(folder: Path) -> dict[PatchKey, dict[str, Path]]:
    """Files of ``<folder>/{s1,s2,dfc}``, by patch; a file in the wrong source folder is ignored."""
    files: dict[PatchKey, dict[str, Path]] = defaultdict(dict)
    for source in TORCHGEO_SOURCES:
        for entry in os.scandir(folder / source):
            match = _FILE.match(entry.name)
            if match and match.group(2) == source and entry.is_file():
                files[(match.group(1), int(match.group(3)))][source] = Path(entry.path)
    return files


def read_torchgeo_splits(folder: Path) -> dict[PatchKey, tuple[str, str]]:
    """Patch -> (split, CSV file name) from the ``dfc-{train,val,test}-new.csv`` lists of ``folder``.

    Each line names one patch by its ``dfc`` file name (TorchGeo derives the S1 / S2 names from it);
    a file name of another source or a path ending in one is accepted too.

    Raises:
        DataError: No split file exists, a line is not a DFC2020 file name, or a patch is listed in
            two split files.
    """
    out: dict[PatchKey, tuple[str, str]] = {}
    present = {split: folder / name for split, name in TORCHGEO_SPLIT_FILES.items() if (folder / name).is_file()}
    if not present:
        raise DataError(
            f"{folder}: no split file {', '.join(TORCHGEO_SPLIT_FILES.values())}; the Copernicus-Bench copy has them "
            "(or index with protocol=ssl / cromss / original to split by folder)"
        )
    for split, path in present.items():
        for number, line in enumerate(read_name_list(path), start=1):
            name = Path(line.split(",")[0].strip().strip('"')).name
            match = _FILE.match(name)
            if not match:
                raise DataError(
                    f"{path}: entry {number} {line!r} is not a DFC2020 file name; expected e.g. 'ROIs0000_test_dfc_0_p609.tif'"
                )
            key = (match.group(1), int(match.group(3)))
            if key in out and out[key][0] != split:
                raise DataError(
                    f"{path}: entry {number} {name!r} is also listed in {out[key][1]}; a patch belongs to one split"
                )
            out[key] = (split, path.name)
    return out


def _pixel_coordinates(crs: str, bounds: tuple[float, float, float, float], side: int) -> bool:
    """True for a grid without a location: no CRS, or the identity transform (pixel coordinates)."""
    return not crs or tuple(bounds) == (0.0, 0.0, float(side), float(side))


@register_reader
class Dfc2020Reader(Reader):
    """DFC2020 validation / test patches (S1 dB, S2 L1C, semi-manual DFC labels), original or Copernicus-Bench copy."""

    name = "dfc2020"
    version = 2  # Copernicus-Bench copy, class sets, S2 no-data only where every band is 0
    description = (
        "DFC2020: 986 validation + 5,128 test patches, S1 (dB) / S2 L1C, 256 px at 10 m, DFC labels 1-10; "
        "also the Copernicus-Bench (TorchGeo) copy"
    )
    layout = (
        "<root>/ROIs0000_{validation,test}/{s1,s2,dfc,lc}_{validation,0}/"
        "ROIs0000_{validation,test}_{s1,s2,dfc,lc}_0_p<N>.tif "
        "or <root>/dfc2020_s1s2/{s1,s2,dfc}/ROIs0000_..._p<N>.tif + dfc-{train,val,test}-new.csv"
    )

    @classmethod
    def detect(cls, root: Path) -> bool:
        return _has_original_layout(root) or torchgeo_folder(root) is not None

    @classmethod
    def index(
        cls,
        root: Path,
        *,
        protocol: str | None = None,
        classes: int | None = None,
        no_savanna: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
        val_block_size: float = 5120.0,
        val_block_patches: int = 32,
        read_geometry: bool = True,
        workers: int = 8,
        **unknown: Any,
    ) -> IndexResult:
        """Pair S1/S2/labels per patch and assign splits by ``protocol``.

        Args:
            root: Folder holding ``ROIs0000_validation`` and/or ``ROIs0000_test``, or the
                Copernicus-Bench copy (``dfc2020_s1s2`` or the folder holding it).
            protocol: ``"cromss"``, ``"ssl"``, ``"original"`` or ``"copernicus_bench"`` (see module
                docstring); ``None``: ``"cromss"`` for the original layout, ``"copernicus_bench"``
                for the Copernicus-Bench copy.
            classes: DFC class set of the ``dfc`` / ``lc_dfc`` layers: 10, 9 (no Savanna) or 8 (no
                Savanna, no Snow/Ice: CROMA / GFM-Bench); left-out classes load as 255.
            no_savanna: The DFC2020 baseline's name for ``classes=9``.
            val_fraction: Share of training-folder groups carved out for val (not for ``original``
                and ``copernicus_bench``).
            seed: Seed of that draw.
            val_block_size: Side of the ground blocks grouping georeferenced patches, in CRS units.
            val_block_patches: Consecutive patch numbers per group when patches lack georeferencing.
            read_geometry: Read S1/S2 headers for CRS, bounds and the footprint test.
            workers: Threads reading headers.
        """
        refuse_unknown_options(cls.name, unknown)
        if protocol is not None and protocol not in PROTOCOLS:
            raise ConfigError(f"dfc2020: protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
        dfc_classes = dfc_class_count(cls.name, classes, no_savanna)
        root = Path(root)
        copernicus = torchgeo_folder(root)
        original = _has_original_layout(root)
        if copernicus is not None and original:
            raise DataError(
                f"{root}: holds both the original DFC2020 folders (ROIs0000_*) and the Copernicus-Bench copy "
                f"({copernicus}); index one of them"
            )
        if copernicus is not None:
            layout = LAYOUT_TORCHGEO
            protocol = protocol or "copernicus_bench"
            files = _scan_torchgeo(copernicus)
        else:
            layout = LAYOUT_ORIGINAL
            protocol = protocol or "cromss"
            if protocol == "copernicus_bench":
                raise ConfigError(
                    f"dfc2020: protocol 'copernicus_bench' needs the Copernicus-Bench copy "
                    f"({TORCHGEO_DIR}/ with {', '.join(TORCHGEO_SPLIT_FILES.values())}); {root} holds the original layout"
                )
            files = _scan_original(root)
            if not files and not original:
                raise DataError(
                    f"{root}: neither ROIs0000_validation/ nor ROIs0000_test/ nor {TORCHGEO_DIR}/{{s1,s2,dfc}}/ found; "
                    "not a DFC2020 layout"
                )

        skipped: list[Skipped] = []
        listed: dict[PatchKey, tuple[str, str]] = {}
        if protocol == "copernicus_bench" and copernicus is not None:
            listed = read_torchgeo_splits(copernicus)
            for folder_split, patch in sorted(set(listed) - set(files)):
                _, csv_name = listed[(folder_split, patch)]
                skipped.append(
                    Skipped(f"ROIs0000_{folder_split}_0_p{patch}", f"listed in {csv_name} but no file of it under {copernicus}")
                )
        candidates = []
        for (folder_split, patch), found in sorted(files.items()):
            tile_id = f"ROIs0000_{folder_split}_0_p{patch}"
            if protocol == "copernicus_bench" and (folder_split, patch) not in listed:
                names = ", ".join(TORCHGEO_SPLIT_FILES.values())
                label_name = f"ROIs0000_{folder_split}_dfc_0_p{patch}.tif"
                skipped.append(Skipped(tile_id, f"{label_name} is not listed in any of {names} under {copernicus}"))
                continue
            missing = [source for source in ("s1", "s2", "dfc") if source not in found]
            if missing:
                folder = next(iter(found.values())).parent.parent
                expected = [f"ROIs0000_{folder_split}_{source}_0_p{patch}.tif" for source in missing]
                skipped.append(Skipped(tile_id, f"missing file(s) {', '.join(expected)} under {folder}"))
                continue
            candidates.append((folder_split, patch, tile_id, found))

        records = []
        tile_size = 256
        located = 0
        grids = pair_grids([(found["s1"], found["s2"]) for *_, found in candidates], read_geometry, workers)
        for (folder_split, patch, tile_id, found), grid in zip(candidates, grids):
            if isinstance(grid, str):
                skipped.append(Skipped(tile_id, grid))
                continue
            crs, bounds, tile_size = grid
            if _pixel_coordinates(crs, bounds, tile_size):
                crs, bounds = "", (0.0, 0.0, 0.0, 0.0)
            else:
                located += 1
            dfc_path = found["dfc"].relative_to(root).as_posix()
            layers = {"dfc": dfc_path, "dfc_dw": dfc_path}
            if "lc" in found:
                layers["lc_dfc"] = found["lc"].relative_to(root).as_posix()
            extra: dict[str, Any] = {"folder": folder_split, "patch": patch}
            if listed:
                extra["split_file"] = listed[(folder_split, patch)][1]
            records.append(
                make_record(
                    tile_id=tile_id,
                    region=f"{folder_split}",
                    crs=crs,
                    bounds=bounds,
                    sar_path=found["s1"].relative_to(root).as_posix(),
                    optical_path=found["s2"].relative_to(root).as_posix(),
                    layers=layers,
                    extra=extra,
                    split=listed[(folder_split, patch)][0] if listed else "unassigned",
                )
            )
        records = _assign_protocol(
            records,
            protocol=protocol,
            val_fraction=val_fraction,
            seed=seed,
            val_block_size=val_block_size,
            val_block_patches=val_block_patches,
        )
        class_names = dfc_class_names(dfc_classes)
        layers_info = {
            "dfc": LabelLayer(
                classes=class_names,
                description=f"DFC2020 semi-manual labels, simplified IGBP 1-10 stored as 0-{dfc_classes - 1}, "
                "0 (Background / unlabelled) -> 255" + dfc_classes_note(dfc_classes),
            ),
            "dfc_dw": LabelLayer(
                classes=list(DYNAMIC_WORLD_CLASSES),
                description="DFC2020 labels in Dynamic World class indices (CromSS convention); Savanna and 0 -> 255",
            ),
        }
        if layout == LAYOUT_ORIGINAL:
            layers_info["lc_dfc"] = LabelLayer(
                classes=class_names,
                description="MODIS IGBP (lc band 1, 500 m) mapped to DFC classes: low-resolution weak labels"
                + dfc_classes_note(dfc_classes),
            )
        georeferenced = read_geometry and located > 0
        info = DatasetInfo(
            name="dfc2020",
            reader=cls.name,
            sar_bands=s1_band_set(),
            optical_bands=s2_band_set("L1C"),
            layers=layers_info,
            tile_size=tile_size,
            pixel_size=10.0,
            data_root=str(root.resolve()),
            extra={
                "layout": layout,
                "protocol": protocol,
                "protocol_note": PROTOCOL_NOTES[protocol],
                "protocol_tile_size": PROTOCOLS[protocol][2],
                "dfc_classes": dfc_classes,
                "no_savanna": DFC_SAVANNA in DFC_CLASS_SETS[dfc_classes],
                "val_fraction": val_fraction,
                "seed": seed,
                "val_grouping": f"ground blocks of {val_block_size} CRS units"
                if georeferenced
                else f"runs of {val_block_patches} patch numbers",
                "georeferenced_patches": located if read_geometry else None,
                "train_test_overlaps": len(find_leaks(records, held_out=("test",))) if georeferenced else None,
            },
        )
        return IndexResult(manifest=Manifest(info=info, records=records), skipped=skipped)

    @classmethod
    def load(cls, record: dict[str, Any], info: DatasetInfo, data_root: Path, options: LoadOptions) -> PairedSample:
        return load_coregistered_pair(
            record,
            info,
            data_root,
            options,
            {"dfc": (1, dfc_to_index), "dfc_dw": (1, dfc_to_dw_index), "lc_dfc": (1, igbp_to_dfc_index)},
        )


def _assign_protocol(
    records: list[dict[str, Any]],
    *,
    protocol: str,
    val_fraction: float,
    seed: int,
    val_block_size: float,
    val_block_patches: int,
) -> list[dict[str, Any]]:
    """Splits by protocol, with val carved from the training folder by seeded groups.

    ``copernicus_bench`` keeps the split each record got from its CSV (nothing is carved or moved);
    its groups are (folder, split), so no group spans two splits.
    """
    if val_block_size <= 0 or val_block_patches <= 0:
        raise ConfigError("dfc2020: val_block_size and val_block_patches must be positive")
    validation_role, test_role, _ = PROTOCOLS[protocol]
    role = {"validation": validation_role, "test": test_role}
    out = []
    for record in records:
        folder = record["region"]
        if protocol == "copernicus_bench":
            out.append({**record, "region": f"{folder}:{record['split']}"})
            continue
        if record["crs"]:
            centre_x = (record["left"] + record["right"]) / 2
            centre_y = (record["bottom"] + record["top"]) / 2
            crs_key = record["crs"] if len(record["crs"]) <= 20 else f"crs{seeded_fraction(record['crs'], 0):.8f}"
            group = f"{folder}:{crs_key}:{int(centre_x // val_block_size)}:{int(centre_y // val_block_size)}"
        else:
            patch = int(record["tile_id"].rsplit("_p", 1)[1])
            group = f"{folder}:patches{patch // val_block_patches}"
        out.append({**record, "region": group, "split": role[folder]})
    if protocol == "copernicus_bench":
        return out
    train_groups = sorted({r["region"] for r in out if r["split"] == "train"})
    val_groups = carve_groups(train_groups, val_fraction, seed) if val_fraction else set()
    out = [{**r, "split": "val"} if r["region"] in val_groups else r for r in out]
    # Only val/train are ours to fix; the test folder is fixed by the protocol.
    train_and_val = [r for r in out if r["split"] in ("train", "val")]
    fixed = {r["tile_id"]: r["split"] for r in move_leaking_groups(train_and_val)} if train_and_val else {}
    return [{**r, "split": fixed.get(r["tile_id"], r["split"])} for r in out]
