"""DFC2020 reader on a generated fixture in the real layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from fixtures.dfc2020 import (
    B08_ZERO_BLOCK,
    B10_ZERO_ROWS,
    COPERNICUS_NO_S1,
    COPERNICUS_SIZE,
    COPERNICUS_SPLITS,
    COPERNICUS_UNLISTED,
    FILL_PIXEL,
    NODATA_PATCH,
    S1_ZERO_DB_PIXEL,
    SIZE,
    ZERO_BAND_PATCH,
    copernicus_path,
    file_path,
    make_dfc2020,
    make_dfc2020_copernicus,
)
from rasterio.transform import Affine

from xmodal.data.manifest import Manifest
from xmodal.data.readers import LoadOptions, detect_reader
from xmodal.data.readers.dfc2020 import DFC_TO_DW, Dfc2020Reader
from xmodal.data.readers.sen12ms import IGBP_TO_DFC, Sen12msReader
from xmodal.data.readers.ssl4eo import DYNAMIC_WORLD_CLASSES, Ssl4eoS12Reader
from xmodal.data.sample import IGNORE_INDEX
from xmodal.data.splits import check_no_leakage
from xmodal.errors import ConfigError, DataError, PairingError

DFC = LoadOptions(mask_layer="dfc", noisy_layer="lc_dfc")
# DFC value 0..10 -> CROMA / GFM-Bench class: Savanna (3) and Snow/Ice (8) -> 255, the rest 0..7.
GFM8 = np.array([IGNORE_INDEX, 0, 1, IGNORE_INDEX, 2, 3, 4, 5, IGNORE_INDEX, 6, 7])
GFM8_NAMES = ["Forest", "Shrubland", "Grassland", "Wetlands", "Croplands", "Urban/Built-up", "Barren", "Water"]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dfc2020(tmp_path_factory.mktemp("dfc2020"))


@pytest.fixture(scope="module")
def indexed(fixture_root: Path):
    return Dfc2020Reader.index(fixture_root, protocol="ssl")


@pytest.fixture
def own_copy(fixture_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fixture_root, tmp_path / "dfc2020"))


def _folder_splits(result) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for record in result.manifest.records:
        out.setdefault("validation" if "_validation_" in record["tile_id"] else "test", set()).add(record["split"])
    return out


def _load(result, tile_id: str, options: LoadOptions = DFC):
    manifest = result.manifest
    record = next(r for r in manifest.records if r["tile_id"] == tile_id)
    return Dfc2020Reader.load(record, manifest.info, manifest.data_root, options)


def test_detect(fixture_root: Path, tmp_path: Path) -> None:
    assert Dfc2020Reader.detect(fixture_root)
    assert not Dfc2020Reader.detect(tmp_path)
    assert not Sen12msReader.detect(fixture_root) and not Ssl4eoS12Reader.detect(fixture_root)
    assert detect_reader(fixture_root) is Dfc2020Reader


def test_default_protocol_is_paper_003(fixture_root: Path) -> None:
    assert Dfc2020Reader.index(fixture_root, val_block_size=640.0).manifest.info.extra["protocol"] == "cromss"


def test_ssl_protocol(indexed, fixture_root: Path) -> None:
    manifest = indexed.manifest
    assert len(manifest.records) == 12 and not indexed.skipped
    assert manifest.info.data_root == str(fixture_root.resolve())
    assert manifest.info.extra["protocol"] == "ssl" and manifest.info.extra["protocol_tile_size"] == 96
    assert _folder_splits(indexed) == {"validation": {"test"}, "test": {"train", "val"}}
    # Val is carved by ground block: each 4-patch cluster of the test folder stays in one split.
    by_cluster: dict[int, set[str]] = {}
    for record in manifest.records:
        if "_test_" in record["tile_id"]:
            by_cluster.setdefault(int(record["tile_id"].rsplit("_p", 1)[1]) // 4, set()).add(record["split"])
    assert all(len(splits) == 1 for splits in by_cluster.values())
    assert manifest.info.extra["train_test_overlaps"] == 0
    check_no_leakage(manifest.records)


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        ("cromss", {"validation": {"train", "val"}, "test": {"test"}}),
        ("original", {"validation": {"val"}, "test": {"test"}}),
    ],
)
def test_other_protocols(fixture_root: Path, protocol: str, expected: dict) -> None:
    # The 4 validation patches lie in one 5 km block: smaller blocks leave groups to carve val from.
    result = Dfc2020Reader.index(fixture_root, protocol=protocol, val_block_size=640.0)
    assert _folder_splits(result) == expected
    check_no_leakage(result.manifest.records)


def test_unknown_protocol(fixture_root: Path) -> None:
    with pytest.raises(ConfigError, match="protocol"):
        Dfc2020Reader.index(fixture_root, protocol="random")


def test_without_geometry_groups_by_patch_numbers(fixture_root: Path) -> None:
    result = Dfc2020Reader.index(fixture_root, protocol="ssl", read_geometry=False, val_block_patches=4, val_fraction=0.3)
    records = result.manifest.records
    assert all(r["crs"] == "" for r in records)
    assert {r["split"] for r in records if "_test_" in r["tile_id"]} == {"train", "val"}
    groups: dict[str, set[str]] = {}
    for record in records:
        groups.setdefault(record["region"], set()).add(record["split"])
    assert all(len(splits) == 1 for splits in groups.values())


def test_load_and_label_layers(indexed, fixture_root: Path) -> None:
    info = indexed.manifest.info
    assert info.sar_bands.units == ["dB", "dB"] and len(info.optical_bands) == 13
    assert info.layers["dfc_dw"].classes == list(DYNAMIC_WORLD_CLASSES)
    sample = _load(indexed, "ROIs0000_test_0_p5")
    assert sample.sar.dtype == np.float32 and sample.sar.shape == (2, SIZE, SIZE)  # float64 on disk
    assert sample.optical.dtype == np.float32 and sample.optical.shape == (13, SIZE, SIZE)
    with rasterio.open(file_path(fixture_root, "test", "dfc", 5)) as src:
        dfc = src.read(1).astype(np.int64)
    with rasterio.open(file_path(fixture_root, "test", "lc", 5)) as src:
        igbp = src.read(1).astype(np.int64)
    assert np.array_equal(sample.mask, np.where(dfc > 0, dfc - 1, IGNORE_INDEX))
    assert np.array_equal(sample.noisy_mask, np.asarray(IGBP_TO_DFC)[igbp] - 1)
    dw = _load(indexed, "ROIs0000_test_0_p5", LoadOptions(mask_layer="dfc_dw")).mask
    assert np.array_equal(dw, DFC_TO_DW[dfc])
    assert (dw[dfc == 3] == IGNORE_INDEX).all() and (dw[dfc == 10] == 0).all()  # savanna unknown, water -> 0


def test_no_savanna(fixture_root: Path) -> None:
    result = Dfc2020Reader.index(fixture_root, no_savanna=True)
    assert len(result.manifest.info.layers["dfc"].classes) == 9
    sample = _load(result, "ROIs0000_test_0_p5")
    with rasterio.open(file_path(fixture_root, "test", "dfc", 5)) as src:
        dfc = src.read(1)
    assert (sample.mask[dfc == 3] == IGNORE_INDEX).all() and (sample.mask[dfc == 4] == 2).all()


def test_nodata_masked(indexed) -> None:
    split, patch = NODATA_PATCH
    sample = _load(indexed, f"ROIs0000_{split}_0_p{patch}")
    assert not sample.optical_valid[-6:, -6:].any() and sample.optical_valid[:-6].all()
    assert np.isnan(sample.optical[:, -6:, -6:]).all()
    assert (sample.mask[-6:, -6:] == IGNORE_INDEX).all() and (sample.noisy_mask[-6:, -6:] == IGNORE_INDEX).all()


def test_zero_in_one_band_is_a_measurement_fill_is_every_band(indexed) -> None:
    """S2 no-data is 0 in all 13 bands; B10 = 0 or B08 = 0 alone is a valid pixel; 0 dB is a valid S1 value."""
    split, patch = ZERO_BAND_PATCH
    sample = _load(indexed, f"ROIs0000_{split}_0_p{patch}")
    expected = np.ones((SIZE, SIZE), dtype=bool)
    expected[FILL_PIXEL] = False
    assert np.array_equal(sample.optical_valid, expected)
    assert np.isnan(sample.optical[(slice(None), *FILL_PIXEL)]).all()
    assert (sample.optical[10, :B10_ZERO_ROWS][expected[:B10_ZERO_ROWS]] == 0).all()
    assert (sample.optical[(7, *B08_ZERO_BLOCK)] == 0).all()
    assert sample.sar_valid.all() and (sample.sar[(slice(None), *S1_ZERO_DB_PIXEL)] == 0).all()
    assert sample.noisy_mask[FILL_PIXEL] == IGNORE_INDEX and (sample.noisy_mask[:B10_ZERO_ROWS] != IGNORE_INDEX).all()


def test_gfm_bench_eight_classes(fixture_root: Path, tmp_path: Path) -> None:
    result = Dfc2020Reader.index(fixture_root, classes=8)
    info = result.manifest.info
    assert info.layers["dfc"].classes == GFM8_NAMES and info.layers["lc_dfc"].classes == GFM8_NAMES
    assert info.layers["dfc_dw"].classes == list(DYNAMIC_WORLD_CLASSES)  # its own classes
    assert info.extra["dfc_classes"] == 8
    # dataset.json carries the names that match the mapping.
    result.manifest.save(tmp_path / "prepared")
    assert Manifest.load(tmp_path / "prepared").info.layers["dfc"].classes == GFM8_NAMES
    sample = _load(result, "ROIs0000_test_0_p5")
    with rasterio.open(file_path(fixture_root, "test", "dfc", 5)) as src:
        dfc = src.read(1).astype(np.int64)
    with rasterio.open(file_path(fixture_root, "test", "lc", 5)) as src:
        igbp = src.read(1).astype(np.int64)
    assert np.array_equal(sample.mask, GFM8[dfc])
    assert np.array_equal(sample.noisy_mask, GFM8[np.asarray(IGBP_TO_DFC)[igbp]])
    assert {3, 8} & set(np.unique(dfc)) and set(np.unique(sample.mask)) <= set(range(8)) | {IGNORE_INDEX}
    # classes=9 is the baseline's no_savanna; contradicting or unknown sets are refused.
    nine = Dfc2020Reader.index(fixture_root, classes=9, read_geometry=False).manifest.info
    baseline = Dfc2020Reader.index(fixture_root, no_savanna=True, read_geometry=False).manifest.info
    assert nine.layers["dfc"].classes == baseline.layers["dfc"].classes and len(nine.layers["dfc"].classes) == 9
    with pytest.raises(ConfigError, match="classes"):
        Dfc2020Reader.index(fixture_root, classes=11)
    with pytest.raises(ConfigError, match="no_savanna"):
        Dfc2020Reader.index(fixture_root, classes=10, no_savanna=True)


@pytest.fixture(scope="module")
def copernicus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dfc2020_copernicus(tmp_path_factory.mktemp("copernicus"))


def test_copernicus_bench_copy_pairs_by_name_and_splits_by_csv(copernicus_root: Path) -> None:
    assert detect_reader(copernicus_root) is Dfc2020Reader
    assert detect_reader(copernicus_root / "dfc2020_s1s2") is Dfc2020Reader
    result = Dfc2020Reader.index(copernicus_root)
    manifest = result.manifest
    splits = {r["tile_id"]: r["split"] for r in manifest.records}
    expected = {
        f"ROIs0000_{folder}_0_p{patch}": split
        for split, keys in COPERNICUS_SPLITS.items()
        for folder, patch in keys
        if (folder, patch) != COPERNICUS_NO_S1
    }
    assert splits == expected
    skipped = {s.item: s.reason for s in result.skipped}
    unlisted, no_s1 = (f"ROIs0000_{folder}_0_p{patch}" for folder, patch in (COPERNICUS_UNLISTED, COPERNICUS_NO_S1))
    assert set(skipped) == {unlisted, no_s1}
    assert "not listed" in skipped[unlisted] and "dfc-train-new.csv" in skipped[unlisted]
    assert "ROIs0000_validation_s1_0_p2.tif" in skipped[no_s1]
    info = manifest.info
    assert info.extra["layout"] == "copernicus_bench" and info.extra["protocol"] == "copernicus_bench"
    assert set(info.layers) == {"dfc", "dfc_dw"} and len(info.layers["dfc"].classes) == 10
    # Pixel coordinates only: no footprint is recorded (a made-up one would fake leaks or their absence).
    assert all(r["crs"] == "" for r in manifest.records) and info.extra["georeferenced_patches"] == 0
    splits_of_region: dict[str, set[str]] = {}
    for record in manifest.records:
        splits_of_region.setdefault(record["region"], set()).add(record["split"])
    assert all(len(splits) == 1 for splits in splits_of_region.values())
    record = next(r for r in manifest.records if r["tile_id"] == "ROIs0000_test_0_p1")
    assert record["sar_path"] == "dfc2020_s1s2/s1/ROIs0000_test_s1_0_p1.tif"
    sample = Dfc2020Reader.load(record, info, manifest.data_root, LoadOptions(mask_layer="dfc"))
    assert sample.sar.dtype == np.float32 and sample.sar.shape == (2, COPERNICUS_SIZE, COPERNICUS_SIZE)
    assert sample.optical.shape == (13, COPERNICUS_SIZE, COPERNICUS_SIZE)
    with rasterio.open(copernicus_path(copernicus_root, "test", "dfc", 1)) as src:
        assert src.dtypes[0] == "int32"
        dfc = src.read(1).astype(np.int64)
    assert np.array_equal(sample.mask, np.where(dfc > 0, dfc - 1, IGNORE_INDEX))  # 0 = Background -> ignored
    eight = Dfc2020Reader.index(copernicus_root, classes=8)
    sample = Dfc2020Reader.load(
        next(r for r in eight.manifest.records if r["tile_id"] == "ROIs0000_test_0_p1"),
        eight.manifest.info,
        eight.manifest.data_root,
        LoadOptions(mask_layer="dfc"),
    )
    assert np.array_equal(sample.mask, GFM8[dfc]) and eight.manifest.info.layers["dfc"].classes == GFM8_NAMES


def test_copernicus_bench_copy_by_folder_protocol(copernicus_root: Path, fixture_root: Path) -> None:
    result = Dfc2020Reader.index(copernicus_root, protocol="ssl")
    assert {r["split"] for r in result.manifest.records if "_validation_" in r["tile_id"]} == {"test"}
    assert {r["split"] for r in result.manifest.records if "_test_" in r["tile_id"]} <= {"train", "val"}
    assert len(result.manifest.records) == 9  # the unlisted patch counts too; the one without S1 does not
    with pytest.raises(ConfigError, match="copernicus_bench"):
        Dfc2020Reader.index(fixture_root, protocol="copernicus_bench")


def test_copernicus_bench_split_files_are_checked(copernicus_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(copernicus_root, tmp_path / "copy")) / "dfc2020_s1s2"
    with (root / "dfc-val-new.csv").open("a") as f:
        f.write("ROIs0000_test_dfc_0_p0.tif\n")  # also in train
    with pytest.raises(DataError, match="dfc-val-new.csv.*dfc-train-new.csv|dfc-train-new.csv.*dfc-val-new.csv"):
        Dfc2020Reader.index(root)
    (root / "dfc-val-new.csv").write_text("filename\n")
    with pytest.raises(DataError, match="dfc-val-new.csv: entry 1 'filename'"):
        Dfc2020Reader.index(root)
    for name in ("dfc-train-new.csv", "dfc-val-new.csv", "dfc-test-new.csv"):
        (root / name).unlink()
    with pytest.raises(DataError, match="dfc-train-new.csv"):
        Dfc2020Reader.index(root)


def test_both_layouts_in_one_folder_are_refused(copernicus_root: Path, fixture_root: Path, tmp_path: Path) -> None:
    both = Path(shutil.copytree(fixture_root, tmp_path / "both"))
    shutil.copytree(copernicus_root / "dfc2020_s1s2", both / "dfc2020_s1s2")
    with pytest.raises(DataError, match="both"):
        Dfc2020Reader.index(both)


def test_missing_file_is_reported(own_copy: Path) -> None:
    missing = file_path(own_copy, "test", "dfc", 2)
    missing.unlink()
    file_path(own_copy, "validation", "lc", 0).unlink()  # lc is optional
    result = Dfc2020Reader.index(own_copy)
    assert "ROIs0000_test_0_p2" not in {r["tile_id"] for r in result.manifest.records}
    assert any(s.item == "ROIs0000_test_0_p2" and missing.name in s.reason for s in result.skipped)
    record = next(r for r in result.manifest.records if r["tile_id"] == "ROIs0000_validation_0_p0")
    assert "lc_dfc" not in record["layers"] and "dfc" in record["layers"]


def test_truncated_file(own_copy: Path) -> None:
    result = Dfc2020Reader.index(own_copy)
    record = next(r for r in result.manifest.records if r["tile_id"] == "ROIs0000_test_0_p0")
    damaged = own_copy / record["sar_path"]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(DataError, match=damaged.name):
        Dfc2020Reader.load(record, result.manifest.info, result.manifest.data_root, DFC)


def test_non_overlapping_pair_is_refused(own_copy: Path) -> None:
    result = Dfc2020Reader.index(own_copy)
    record = next(r for r in result.manifest.records if r["tile_id"] == "ROIs0000_test_0_p6")
    with rasterio.open(own_copy / record["optical_path"], "r+") as dst:
        moved = dst.transform
        dst.transform = Affine(moved.a, moved.b, moved.c, moved.d, moved.e, moved.f + 30_000)
    with pytest.raises(PairingError, match="do not overlap"):
        Dfc2020Reader.load(record, result.manifest.info, result.manifest.data_root, DFC)
    again = Dfc2020Reader.index(own_copy)
    assert any(s.item == record["tile_id"] and "do not overlap" in s.reason for s in again.skipped)
