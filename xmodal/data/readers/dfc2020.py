"""DFC2020 reader (IEEE GRSS Data Fusion Contest 2020, DOI 10.21227/rha7-m332).

Layout (S1 and S2 encoded as in SEN12MS: VV/VH dB, 13-band L1C uint16; S1 may be float64)::

    <root>/ROIs0000_validation/{s1,s2,dfc,lc}_validation/ROIs0000_validation_{s1,s2,dfc,lc}_0_p<N>.tif   # 986 patches
    <root>/ROIs0000_test/{s1,s2,dfc,lc}_0/ROIs0000_test_{s1,s2,dfc,lc}_0_p<N>.tif                        # 5,128 patches

Folder names inside the two split folders are not relied on (re-packaged copies name them
``s1_test`` etc.); files are matched by name. ``validation/`` and ``test/`` are accepted as split
folder names too. ``s1``, ``s2`` and ``dfc`` are required per patch, ``lc`` is optional.

Label layers (zero-based, 255 = unknown, also where S1 or S2 are no-data):

* ``dfc``: the semi-manual high-resolution labels, simplified IGBP 1..10 -> 0..9, 0 -> 255. With
  ``no_savanna`` Savanna -> 255 and the classes above it move down (9 classes), as in the baseline.
* ``dfc_dw``: the same labels in Dynamic World class indices, the mapping CromSS (paper 003) uses
  to fine-tune DW-pretrained models: Forest->trees, Shrubland->shrub_and_scrub, Grassland->grass,
  Wetlands->flooded_vegetation, Croplands->crops, Urban->built, Barren->bare, Water->water,
  Snow/Ice->snow_and_ice; Savanna has no DW class -> 255.
* ``lc_dfc``: MODIS IGBP (``lc`` band 1) through the SEN12MS IGBP->DFC table: low-resolution, noisy.

Protocols (option ``protocol``; membership of the two folders is fixed by the protocol):

* ``"ssl"`` (CROMA / GFM-Bench): train and val on the 5,128 ``test`` patches, test on
  the 986 ``validation`` patches; those works crop 256 px patches into 96 px tiles with overlap
  (``info.extra["protocol_tile_size"]``; the cropping is a pipeline setting).
* ``"cromss"`` (default, since xmodal reproduces paper 003): paper 003 as written: fine-tune on the 986 ``validation`` patches, test on the
  5,128 ``test`` patches (full 256 px patches for ResNet-50).
* ``"original"``: the contest: ``validation`` -> val, ``test`` -> test, no training patches
  (the contest trained on SEN12MS).

Validation is carved from the training folder by a seeded draw over groups. Patches carry no scene
id, so groups are ground blocks of ``val_block_size`` metres when the files are georeferenced
(held-out blocks touching training patches then move to train), and runs of
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
    carve_groups,
    dfc_class_names,
    dfc_to_index,
    first_entries,
    igbp_to_dfc_index,
    load_coregistered_pair,
    lookup_classes,
    move_leaking_groups,
    pair_grids,
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
}
PROTOCOL_NOTES = {
    "ssl": "CROMA / GFM-Bench: train+val on the 5,128 'test' patches, test on the 986 'validation' patches, 96 px crops",
    "cromss": "paper 003 (CromSS) as written: fine-tune on the 986 'validation' patches, test on the 5,128 'test' patches",
    "original": "DFC2020 contest: 'validation' folder = val, 'test' folder = test, no training patches",
}
# Simplified DFC value 0..10 -> Dynamic World class index (CromSS fine-tuning convention).
DFC_TO_DW = np.array([IGNORE_INDEX, 1, 5, IGNORE_INDEX, 2, 3, 4, 6, 8, 7, 0], dtype=np.int64)

_FILE = re.compile(r"^ROIs0000_(validation|test)_(s1|s2|dfc|lc)_0_p(\d+)\.tif$")
_SOURCE_DIR = re.compile(r"^(s1|s2|dfc|lc)_(0|test|validation)$")


def dfc_to_dw_index(dfc: np.ndarray, no_savanna: bool = False) -> np.ndarray:
    """Simplified DFC values -> Dynamic World class indices (Savanna and 0 -> 255)."""
    return lookup_classes(dfc, DFC_TO_DW)


@register_reader
class Dfc2020Reader(Reader):
    """DFC2020 validation / test patches (S1 dB, S2 L1C, semi-manual DFC labels)."""

    name = "dfc2020"
    description = "DFC2020: 986 validation + 5,128 test patches, S1 (dB) / S2 L1C, 256 px at 10 m, DFC labels 1-10"
    layout = (
        "<root>/ROIs0000_{validation,test}/{s1,s2,dfc,lc}_{validation,0}/"
        "ROIs0000_{validation,test}_{s1,s2,dfc,lc}_0_p<N>.tif"
    )

    @classmethod
    def detect(cls, root: Path) -> bool:
        for names in SPLIT_FOLDERS.values():
            for name in names:
                folder = root / name
                if folder.is_dir() and any(_SOURCE_DIR.match(e.name) and e.is_dir() for e in first_entries(folder)):
                    return True
        return False

    @classmethod
    def index(
        cls,
        root: Path,
        *,
        protocol: str = "cromss",
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
            root: Folder holding ``ROIs0000_validation`` and/or ``ROIs0000_test``.
            protocol: ``"cromss"`` (default), ``"ssl"`` or ``"original"`` (see module docstring).
            no_savanna: Drop Savanna from the ``dfc`` / ``lc_dfc`` layers (9 classes).
            val_fraction: Share of training-folder groups carved out for val (not for ``original``).
            seed: Seed of that draw.
            val_block_size: Side of the ground blocks grouping georeferenced patches, in CRS units.
            val_block_patches: Consecutive patch numbers per group when patches lack georeferencing.
            read_geometry: Read S1/S2 headers for CRS, bounds and the footprint test.
            workers: Threads reading headers.
        """
        refuse_unknown_options(cls.name, unknown)
        if protocol not in PROTOCOLS:
            raise ConfigError(f"dfc2020: protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}")
        root = Path(root)
        files: dict[tuple[str, int], dict[str, Path]] = defaultdict(dict)
        found_folders = []
        for folder_split, names in SPLIT_FOLDERS.items():
            for name in names:
                folder = root / name
                if not folder.is_dir():
                    continue
                found_folders.append(name)
                for source_dir in sorted(os.scandir(folder), key=lambda e: e.name):
                    if not source_dir.is_dir():
                        continue
                    for entry in os.scandir(source_dir.path):
                        match = _FILE.match(entry.name)
                        if match and match.group(1) == folder_split:
                            files[(folder_split, int(match.group(3)))][match.group(2)] = Path(entry.path)
        if not found_folders:
            raise DataError(f"{root}: neither ROIs0000_validation/ nor ROIs0000_test/ found; not a DFC2020 layout")

        skipped: list[Skipped] = []
        candidates = []
        for (folder_split, patch), found in sorted(files.items()):
            tile_id = f"ROIs0000_{folder_split}_0_p{patch}"
            missing = [source for source in ("s1", "s2", "dfc") if source not in found]
            if missing:
                folder = next(iter(found.values())).parent.parent
                expected = [f"ROIs0000_{folder_split}_{source}_0_p{patch}.tif" for source in missing]
                skipped.append(Skipped(tile_id, f"missing file(s) {', '.join(expected)} under {folder}"))
                continue
            candidates.append((folder_split, patch, tile_id, found))

        records = []
        tile_size = 256
        grids = pair_grids([(found["s1"], found["s2"]) for *_, found in candidates], read_geometry, workers)
        for (folder_split, patch, tile_id, found), grid in zip(candidates, grids):
            if isinstance(grid, str):
                skipped.append(Skipped(tile_id, grid))
                continue
            crs, bounds, tile_size = grid
            dfc_path = found["dfc"].relative_to(root).as_posix()
            layers = {"dfc": dfc_path, "dfc_dw": dfc_path}
            if "lc" in found:
                layers["lc_dfc"] = found["lc"].relative_to(root).as_posix()
            records.append(
                make_record(
                    tile_id=tile_id,
                    region=f"{folder_split}",
                    crs=crs,
                    bounds=bounds,
                    sar_path=found["s1"].relative_to(root).as_posix(),
                    optical_path=found["s2"].relative_to(root).as_posix(),
                    layers=layers,
                    extra={"folder": folder_split, "patch": patch},
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
        dw_classes = list(DYNAMIC_WORLD_CLASSES)
        info = DatasetInfo(
            name="dfc2020",
            reader=cls.name,
            sar_bands=s1_band_set(),
            optical_bands=s2_band_set("L1C"),
            layers={
                "dfc": LabelLayer(
                    classes=dfc_class_names(no_savanna),
                    description="DFC2020 semi-manual labels, simplified IGBP 1-10 stored as 0-9, 0 -> 255"
                    + ("; Savanna -> 255, classes above shift down" if no_savanna else ""),
                ),
                "dfc_dw": LabelLayer(
                    classes=dw_classes,
                    description="DFC2020 labels in Dynamic World class indices (CromSS convention); Savanna and 0 -> 255",
                ),
                "lc_dfc": LabelLayer(
                    classes=dfc_class_names(no_savanna),
                    description="MODIS IGBP (lc band 1, 500 m) mapped to DFC classes: low-resolution weak labels",
                ),
            },
            tile_size=tile_size,
            pixel_size=10.0,
            data_root=str(root.resolve()),
            extra={
                "protocol": protocol,
                "protocol_note": PROTOCOL_NOTES[protocol],
                "protocol_tile_size": PROTOCOLS[protocol][2],
                "no_savanna": no_savanna,
                "val_fraction": val_fraction,
                "seed": seed,
                "val_grouping": f"ground blocks of {val_block_size} CRS units"
                if read_geometry
                else f"runs of {val_block_patches} patch numbers",
                "train_test_overlaps": len(find_leaks(records, held_out=("test",))) if read_geometry else None,
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
    """Splits by protocol, with val carved from the training folder by seeded groups."""
    if val_block_size <= 0 or val_block_patches <= 0:
        raise ConfigError("dfc2020: val_block_size and val_block_patches must be positive")
    validation_role, test_role, _ = PROTOCOLS[protocol]
    role = {"validation": validation_role, "test": test_role}
    out = []
    for record in records:
        folder = record["region"]
        if record["crs"]:
            centre_x = (record["left"] + record["right"]) / 2
            centre_y = (record["bottom"] + record["top"]) / 2
            crs_key = record["crs"] if len(record["crs"]) <= 20 else f"crs{seeded_fraction(record['crs'], 0):.8f}"
            group = f"{folder}:{crs_key}:{int(centre_x // val_block_size)}:{int(centre_y // val_block_size)}"
        else:
            patch = int(record["tile_id"].rsplit("_p", 1)[1])
            group = f"{folder}:patches{patch // val_block_patches}"
        out.append({**record, "region": group, "split": role[folder]})
    train_groups = sorted({r["region"] for r in out if r["split"] == "train"})
    val_groups = carve_groups(train_groups, val_fraction, seed) if val_fraction else set()
    out = [{**r, "split": "val"} if r["region"] in val_groups else r for r in out]
    # Only val/train are ours to fix; the test folder is fixed by the protocol.
    train_and_val = [r for r in out if r["split"] in ("train", "val")]
    fixed = {r["tile_id"]: r["split"] for r in move_leaking_groups(train_and_val)} if train_and_val else {}
    return [{**r, "split": fixed.get(r["tile_id"], r["split"])} for r in out]
