"""SEN12MS reader on a generated fixture in the real layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from fixtures.sen12ms import (
    B08_ZERO_BLOCK,
    B10_ZERO_ROWS,
    BAD_PATCH,
    FILL_PIXEL,
    NODATA_PATCH,
    S1_ZERO_DB_PIXEL,
    SCENES,
    SIZE,
    TEST_SCENES,
    UNLISTED_PATCH,
    ZERO_BAND_PATCH,
    file_path,
    make_sen12ms,
)
from rasterio.transform import Affine

from xmodal.data.readers import LoadOptions, detect_reader
from xmodal.data.readers.dfc2020 import Dfc2020Reader
from xmodal.data.readers.sen12ms import IGBP_TO_DFC, Sen12msReader, igbp_to_dfc_index, sen12ms_group
from xmodal.data.readers.ssl4eo import Ssl4eoS12Reader
from xmodal.data.sample import IGNORE_INDEX
from xmodal.data.splits import check_no_leakage, find_leaks
from xmodal.errors import ConfigError, DataError, PairingError

BOTH = LoadOptions(mask_layer="dfc", noisy_layer="igbp")
ALL_PATCHES = {
    f"{season}_{scene}_p{patch}" for season, scenes in SCENES.items() for scene, (*_, patches) in scenes.items() for patch in patches
}


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sen12ms(tmp_path_factory.mktemp("sen12ms"))


@pytest.fixture(scope="module")
def indexed(fixture_root: Path):
    return Sen12msReader.index(fixture_root)


@pytest.fixture
def own_copy(fixture_root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(fixture_root, tmp_path / "sen12ms"))


def _load(indexed, tile_id: str, options: LoadOptions = BOTH):
    manifest = indexed.manifest
    record = next(r for r in manifest.records if r["tile_id"] == tile_id)
    return Sen12msReader.load(record, manifest.info, manifest.data_root, options)


def _tile(key: tuple[str, int, int]) -> str:
    season, scene, patch = key
    return f"{season}_{scene}_p{patch}"


def test_detect(fixture_root: Path, tmp_path: Path) -> None:
    assert Sen12msReader.detect(fixture_root)
    assert not Sen12msReader.detect(tmp_path)
    assert not Dfc2020Reader.detect(fixture_root) and not Ssl4eoS12Reader.detect(fixture_root)
    assert detect_reader(fixture_root) is Sen12msReader


def test_index_pairs_triplets(indexed, fixture_root: Path) -> None:
    manifest = indexed.manifest
    assert {r["tile_id"] for r in manifest.records} == ALL_PATCHES and not indexed.skipped
    assert manifest.info.data_root == str(fixture_root.resolve())
    for record in manifest.records:
        assert "_s1_" in record["sar_path"] and record["sar_path"].replace("s1_", "s2_") == record["optical_path"]
        assert '"igbp"' in record["layers"] and "_lc_" in record["layers"]
        assert record["crs"].startswith("EPSG:327") or record["crs"].startswith("EPSG:326")
    info = manifest.info
    assert info.sar_bands.names == ["VV", "VH"] and set(info.sar_bands.units) == {"dB"}
    assert len(info.optical_bands) == 13 and set(info.optical_bands.units) == {"reflectance_x1e4"}
    assert len(info.layers["igbp"].classes) == 17 and len(info.layers["dfc"].classes) == 10


def test_load_shapes_dtypes_and_label_convention(indexed, fixture_root: Path) -> None:
    sample = _load(indexed, "ROIs1158_spring_1_p1")
    assert sample.sar.shape == (2, SIZE, SIZE) and sample.sar.dtype == np.float32
    assert sample.optical.shape == (13, SIZE, SIZE) and sample.optical.dtype == np.float32
    assert sample.mask.dtype == np.int64 and sample.noisy_mask.dtype == np.int64
    assert -40 < np.nanmean(sample.sar) < 0 and np.nanmin(sample.optical) >= 200  # stored units kept
    with rasterio.open(file_path(fixture_root, "ROIs1158_spring", "lc", 1, 1)) as src:
        igbp = src.read(1).astype(np.int64)
    expected_igbp = np.where((igbp >= 1) & (igbp <= 17), igbp - 1, IGNORE_INDEX)
    expected_dfc = np.where(igbp >= 1, np.asarray(IGBP_TO_DFC)[np.clip(igbp, 0, 17)] - 1, IGNORE_INDEX)
    assert np.array_equal(sample.noisy_mask, expected_igbp)
    assert np.array_equal(sample.mask, expected_dfc)
    assert (sample.mask[0, :3] == IGNORE_INDEX).all()  # IGBP 0 is not a class


def test_no_savanna(fixture_root: Path) -> None:
    result = Sen12msReader.index(fixture_root, no_savanna=True)
    assert "Savanna" not in result.manifest.info.layers["dfc"].classes and len(result.manifest.info.layers["dfc"].classes) == 9
    sample = _load(result, "ROIs1158_spring_1_p1")
    with rasterio.open(file_path(fixture_root, "ROIs1158_spring", "lc", 1, 1)) as src:
        igbp = src.read(1)
    assert (sample.mask[(igbp == 8) | (igbp == 9)] == IGNORE_INDEX).all()  # savannas
    assert (sample.mask[igbp == 10] == 2).all()  # grassland: DFC 4 -> index 2 once savanna is gone
    assert (sample.mask[igbp == 17] == 8).all()  # water


def test_nodata_and_known_nan_sample(indexed) -> None:
    sample = _load(indexed, _tile(NODATA_PATCH))
    assert not sample.optical_valid[:8, :8].any() and sample.optical_valid[8:, 8:].all()
    assert np.isnan(sample.optical[:, :8, :8]).all()
    assert (sample.mask[:8, :8] == IGNORE_INDEX).all() and (sample.noisy_mask[:8, :8] == IGNORE_INDEX).all()
    bad = _load(indexed, _tile(BAD_PATCH))
    assert not bad.sar_valid[5:8].any() and bad.sar_valid[8:].all()  # NaN rows 5-7 in S1
    assert (bad.mask[5:8] == IGNORE_INDEX).all()
    assert np.isfinite(bad.sar[:, bad.valid()]).all() and bad.extra["sar_nodata_fraction"] == pytest.approx(3 / SIZE)


def test_zero_in_one_band_is_a_measurement_fill_is_every_band(indexed) -> None:
    """S2 no-data is 0 in all 13 bands (the product's fill); B10 = 0 or B08 = 0 alone is valid; 0 dB is valid."""
    sample = _load(indexed, _tile(ZERO_BAND_PATCH))
    expected = np.ones((SIZE, SIZE), dtype=bool)
    expected[FILL_PIXEL] = False
    assert np.array_equal(sample.optical_valid, expected)
    assert np.isnan(sample.optical[(slice(None), *FILL_PIXEL)]).all()
    assert (sample.optical[10, :B10_ZERO_ROWS][expected[:B10_ZERO_ROWS]] == 0).all()
    assert (sample.optical[(7, *B08_ZERO_BLOCK)] == 0).all()
    assert sample.sar_valid.all() and (sample.sar[(slice(None), *S1_ZERO_DB_PIXEL)] == 0).all()
    assert (sample.mask[:B10_ZERO_ROWS] != IGNORE_INDEX).any() and sample.mask[FILL_PIXEL] == IGNORE_INDEX
    assert sample.extra["optical_nodata_fraction"] == pytest.approx(1 / SIZE**2)


def test_declared_nodata_is_honoured_per_band(own_copy: Path) -> None:
    """A file's declared nodata marks that band's pixels no-data (read_raster -> NaN), in S1 and S2."""
    result = Sen12msReader.index(own_copy)
    record = next(r for r in result.manifest.records if r["tile_id"] == "ROIs1158_spring_1_p1")
    with rasterio.open(own_copy / record["sar_path"], "r+") as dst:
        sar = dst.read()
        sar[1, 4, 4] = -9999.0
        dst.write(sar)
        dst.nodata = -9999.0
    with rasterio.open(own_copy / record["optical_path"], "r+") as dst:
        optical = dst.read()
        optical[3, 6, 6] = 65535
        dst.write(optical)
        dst.nodata = 65535
    sample = Sen12msReader.load(record, result.manifest.info, result.manifest.data_root, BOTH)
    assert not sample.sar_valid[4, 4] and sample.sar_valid.sum() == SIZE**2 - 1
    assert not sample.optical_valid[6, 6] and sample.optical_valid.sum() == SIZE**2 - 1


def test_gfm_bench_eight_classes(fixture_root: Path) -> None:
    result = Sen12msReader.index(fixture_root, classes=8)
    classes = result.manifest.info.layers["dfc"].classes
    assert len(classes) == 8 and "Savanna" not in classes and "Snow/Ice" not in classes
    sample = _load(result, "ROIs1158_spring_1_p1")
    with rasterio.open(file_path(fixture_root, "ROIs1158_spring", "lc", 1, 1)) as src:
        igbp = src.read(1)
    # DFC value -> GFM-Bench class: Savanna (3) and Snow/Ice (8) -> 255, the others renumbered 0..7.
    gfm8 = np.array([IGNORE_INDEX, 0, 1, IGNORE_INDEX, 2, 3, 4, 5, IGNORE_INDEX, 6, 7])
    expected = np.where((igbp >= 1) & (igbp <= 17), gfm8[np.asarray(IGBP_TO_DFC)[np.clip(igbp, 0, 17)]], IGNORE_INDEX)
    assert np.array_equal(sample.mask, expected)
    assert np.array_equal(igbp_to_dfc_index(np.arange(18), classes=8), gfm8[np.asarray(IGBP_TO_DFC)])
    with pytest.raises(ConfigError, match="classes"):
        Sen12msReader.index(fixture_root, classes=7)


def test_skip_known_bad(fixture_root: Path) -> None:
    result = Sen12msReader.index(fixture_root, skip_known_bad=True)
    assert _tile(BAD_PATCH) not in {r["tile_id"] for r in result.manifest.records}
    assert [s.item for s in result.skipped] == [_tile(BAD_PATCH)] and "NaN" in result.skipped[0].reason


def test_split_from_lists_by_scene_and_leak_free(indexed) -> None:
    records = indexed.manifest.records
    assert indexed.manifest.info.extra["split_source"] == "train_list.txt+test_list.txt"
    by_group: dict[str, set[str]] = {}
    for record in records:
        by_group.setdefault(record["region"], set()).add(record["split"])
    assert all(len(splits) == 1 for splits in by_group.values())
    for season, scene in TEST_SCENES:
        assert by_group[sen12ms_group(season, scene)] == {"test"}
    # The unlisted patch follows its scene; val is carved from training scenes.
    season, scene, _ = UNLISTED_PATCH
    unlisted = next(r for r in records if r["tile_id"] == _tile(UNLISTED_PATCH))
    assert {unlisted["split"]} == by_group[sen12ms_group(season, scene)]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    check_no_leakage(records)
    # Patches of a scene overlap: a split that cuts a scene would leak.
    cut = [{**r, "split": "test" if r["tile_id"].endswith("_p2") else "train"} for r in records]
    assert find_leaks(cut)


def test_split_from_holdout_scenes_or_seeded_draw(own_copy: Path) -> None:
    (own_copy / "train_list.txt").unlink()
    (own_copy / "test_list.txt").unlink()
    result = Sen12msReader.index(own_copy)
    assert result.manifest.info.extra["split_source"] == "SEN12MS_holdOutScenes.txt"
    test_groups = {r["region"] for r in result.manifest.records if r["split"] == "test"}
    assert test_groups == {sen12ms_group(season, scene) for season, scene in TEST_SCENES}
    check_no_leakage(result.manifest.records)

    drawn = Sen12msReader.index(own_copy, use_split_files=False, seed=3)
    assert drawn.manifest.info.extra["split_source"] == "seeded scene draw"
    splits_per_group: dict[str, set[str]] = {}
    for record in drawn.manifest.records:
        splits_per_group.setdefault(record["region"], set()).add(record["split"])
    assert all(len(s) == 1 for s in splits_per_group.values()) and "test" in {r["split"] for r in drawn.manifest.records}
    check_no_leakage(drawn.manifest.records)


def test_missing_file_is_reported(own_copy: Path) -> None:
    missing = file_path(own_copy, "ROIs1158_spring", "lc", 2, 2)
    missing.unlink()
    result = Sen12msReader.index(own_copy)
    assert "ROIs1158_spring_2_p2" not in {r["tile_id"] for r in result.manifest.records}
    assert any(s.item == "ROIs1158_spring_2_p2" and str(missing) in s.reason for s in result.skipped)


def test_truncated_file(own_copy: Path) -> None:
    result = Sen12msReader.index(own_copy)
    record = next(r for r in result.manifest.records if r["tile_id"] == "ROIs1158_spring_1_p1")
    damaged = own_copy / record["optical_path"]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(DataError, match=damaged.name):
        Sen12msReader.load(record, result.manifest.info, result.manifest.data_root, BOTH)
    damaged.write_bytes(damaged.read_bytes()[:40])
    again = Sen12msReader.index(own_copy)
    assert any(s.item == record["tile_id"] and damaged.name in s.reason for s in again.skipped)


def test_non_overlapping_pair_is_refused(own_copy: Path) -> None:
    result = Sen12msReader.index(own_copy)
    record = next(r for r in result.manifest.records if r["tile_id"] == "ROIs1868_summer_3_p1")
    with rasterio.open(own_copy / record["sar_path"], "r+") as dst:
        moved = dst.transform
        dst.transform = Affine(moved.a, moved.b, moved.c + 50_000, moved.d, moved.e, moved.f)
    with pytest.raises(PairingError, match="do not overlap"):
        Sen12msReader.load(record, result.manifest.info, result.manifest.data_root, BOTH)
    again = Sen12msReader.index(own_copy)
    assert any(s.item == record["tile_id"] and "do not overlap" in s.reason for s in again.skipped)
