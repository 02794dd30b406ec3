"""SSL4EO-S12 reader on a generated fixture in the real layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from fixtures.ssl4eo import (
    B8_ZERO_BLOCK,
    B10_ZERO_ROWS,
    LOCATIONS,
    S1_NAN_SEASON,
    S2_NODATA_SEASON,
    SIZE_10M,
    UNLABELLED_SEASON,
    ZERO_BAND_SEASON,
    make_ssl4eo,
)
from xmodal.data.readers import LoadOptions, detect_reader
from xmodal.data.readers.dfc2020 import Dfc2020Reader
from xmodal.data.readers.sen12ms import Sen12msReader
from xmodal.data.readers.ssl4eo import DYNAMIC_WORLD_CLASSES, Ssl4eoS12Reader, band_file
from xmodal.data.sample import IGNORE_INDEX
from xmodal.data.splits import check_no_leakage
from xmodal.errors import DataError, PairingError

DW = LoadOptions(mask_layer="dynamic_world")


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ssl4eo(tmp_path_factory.mktemp("ssl4eo"))


@pytest.fixture(scope="module")
def indexed(fixture_root: Path):
    return Ssl4eoS12Reader.index(fixture_root)


@pytest.fixture
def own_copy(fixture_root: Path, tmp_path: Path) -> Path:
    """A copy that a test may damage."""
    return Path(shutil.copytree(fixture_root, tmp_path / "ssl4eo"))


def _record(indexed, tile_id: str) -> dict:
    return next(r for r in indexed.manifest.records if r["tile_id"] == tile_id)


def _load(indexed, tile_id: str, options: LoadOptions = DW):
    manifest = indexed.manifest
    return Ssl4eoS12Reader.load(_record(indexed, tile_id), manifest.info, manifest.data_root, options)


def test_detect(fixture_root: Path, tmp_path: Path) -> None:
    assert Ssl4eoS12Reader.detect(fixture_root)
    assert not Ssl4eoS12Reader.detect(tmp_path)
    assert not Sen12msReader.detect(fixture_root) and not Dfc2020Reader.detect(fixture_root)
    assert detect_reader(fixture_root) is Ssl4eoS12Reader


def test_index_pairs_seasons_by_date(indexed, fixture_root: Path) -> None:
    manifest = indexed.manifest
    info = manifest.info
    assert info.reader == "ssl4eo_s12" and Path(info.data_root).is_absolute()
    assert info.data_root == str(fixture_root.resolve())
    expected = {f"{loc.location}_s{i}" for loc in LOCATIONS for i in range(min(len(loc.s1_dates), len(loc.s2_dates)))}
    assert {r["tile_id"] for r in manifest.records} == expected
    for record in manifest.records:
        extra = json.loads(record["extra"])
        assert record["region"] == extra["location"]
        # Paired by date (the S1 product date starts at character 17), not by folder name.
        assert extra["days_apart"] < 30
        assert record["sar_path"].startswith(f"s1/{extra['location']}/S1")
        assert record["optical_path"].startswith(f"s2c/{extra['location']}/")
    # Seasons are ranked by S2 date within a location.
    dates = [json.loads(_record(indexed, f"0000000_s{i}")["extra"])["s2_product"][:15] for i in range(4)]
    assert dates == sorted(dates)
    # 0000002 has one S1 product more than S2 seasons: reported, not paired.
    assert len(indexed.skipped) == 1 and "20210301T052108" in indexed.skipped[0].reason
    assert "no S2 season" in indexed.skipped[0].reason


def test_load_shapes_dtypes_units(indexed) -> None:
    info = indexed.manifest.info
    assert info.sar_bands.names == ["VV", "VH"] and set(info.sar_bands.units) == {"dB"}
    assert info.optical_bands.names[:3] == ["B01", "B02", "B03"] and "B10" in info.optical_bands.names
    assert set(info.optical_bands.units) == {"reflectance_x1e4"}
    sample = _load(indexed, "0000000_s0")
    assert sample.sar.shape == (2, SIZE_10M, SIZE_10M) and sample.sar.dtype == np.float32
    assert sample.optical.shape == (13, SIZE_10M, SIZE_10M) and sample.optical.dtype == np.float32
    assert sample.mask.dtype == np.int64 and sample.mask.shape == (SIZE_10M, SIZE_10M)
    valid = sample.valid()
    assert valid.any()
    # Stored units kept: dB around -11 / -18, reflectance x 1e4 (not divided).
    assert -30 < np.nanmean(sample.sar[0]) < -5 and np.nanmean(sample.sar[1]) < np.nanmean(sample.sar[0])
    assert 100 < np.nanmin(sample.optical) and np.nanmax(sample.optical) <= 10_000
    assert np.isfinite(sample.sar[:, sample.sar_valid]).all() and np.isfinite(sample.optical[:, sample.optical_valid]).all()


def test_l2a_product_and_season_selection(fixture_root: Path) -> None:
    result = Ssl4eoS12Reader.index(fixture_root, optical_product="s2a", seasons=[0], max_locations=2)
    manifest = result.manifest
    assert "B10" not in manifest.info.optical_bands.names and len(manifest.info.optical_bands) == 12
    assert {r["tile_id"] for r in manifest.records} == {"0000000_s0", "0000001_s0"}
    assert all(r["optical_path"].startswith("s2a/") for r in manifest.records)
    sample = Ssl4eoS12Reader.load(manifest.records[0], manifest.info, manifest.data_root, DW)
    assert sample.optical.shape == (12, SIZE_10M, SIZE_10M)


def test_s1_reprojected_onto_s2_grid_in_linear_power(own_copy: Path) -> None:
    """A constant S1 field stays constant after the warp; the uncovered western strip is invalid."""
    result = Ssl4eoS12Reader.index(own_copy, seasons=[0], max_locations=1)
    record = result.manifest.records[0]
    for band in ("VV", "VH"):
        path = own_copy / record["sar_path"] / band_file(band)
        with rasterio.open(path, "r+") as dst:
            dst.write(np.full((1, dst.height, dst.width), -13.0, dtype=np.float32))
    sample = Ssl4eoS12Reader.load(record, result.manifest.info, result.manifest.data_root, DW)
    assert np.allclose(sample.sar[:, sample.sar_valid], -13.0, atol=1e-4)
    # S1 lies about 40 m (4 px) east and 15 m south of S2: the first columns have no S1 data.
    assert not sample.sar_valid[:, :3].any() and sample.sar_valid[3:, 6:].all()
    assert np.isnan(sample.sar[:, ~sample.sar_valid]).all()
    assert (sample.mask[~sample.sar_valid] == IGNORE_INDEX).all()


def test_nodata_masked(indexed) -> None:
    location, season = S2_NODATA_SEASON
    sample = _load(indexed, f"{location}_s{season}")
    strip = SIZE_10M // 4
    assert not sample.optical_valid[:, :strip].any() and sample.optical_valid[:, strip + 1 :].all()
    assert np.isnan(sample.optical[:, ~sample.optical_valid]).all()
    assert (sample.mask[~sample.optical_valid] == IGNORE_INDEX).all()
    assert sample.extra["optical_nodata_fraction"] == pytest.approx(1 - sample.optical_valid.mean())

    location, season = S1_NAN_SEASON
    sample = _load(indexed, f"{location}_s{season}")
    assert not sample.sar_valid[0].any()  # NaN rows at the top of the S1 grid
    assert (sample.mask[~sample.sar_valid] == IGNORE_INDEX).all()
    assert not sample.valid()[~sample.sar_valid].any()


def test_zero_in_one_band_is_a_measurement_not_nodata(indexed) -> None:
    """Sentinel-2 fill is 0 in every band; B10 = 0 (clear sky) or B8 = 0 (water) alone is valid."""
    location, season = ZERO_BAND_SEASON
    sample = _load(indexed, f"{location}_s{season}")
    names = indexed.manifest.info.optical_bands.names
    b10, b08 = names.index("B10"), names.index("B08")
    assert sample.optical_valid.all() and sample.extra["optical_nodata_fraction"] == 0.0
    assert (sample.optical[b10, : B10_ZERO_ROWS - 3] == 0).all()  # away from the bilinear seam
    assert (sample.optical[b08][B8_ZERO_BLOCK] == 0).all()
    assert np.isfinite(sample.optical).all()
    assert (sample.mask[sample.sar_valid] != IGNORE_INDEX).any()
    # S1 is invalid only outside its footprint (western columns, northern rows); 0 dB is a value.
    assert sample.sar_valid[3:, 6:].all()


def test_fill_is_nodata_in_every_band_and_kept_out_of_interpolation(indexed) -> None:
    location, season = S2_NODATA_SEASON
    sample = _load(indexed, f"{location}_s{season}")
    strip = SIZE_10M // 4
    assert np.isnan(sample.optical[:, :, :strip]).all()
    # Next to the fill, the 20 m / 60 m bands are interpolated from valid pixels only: no value
    # pulled towards 0 by the fill (the fixture's reflectances are all >= 100).
    assert np.nanmin(sample.optical) >= 100


def test_dynamic_world_labels(indexed) -> None:
    info = indexed.manifest.info
    assert info.layers["dynamic_world"].classes == list(DYNAMIC_WORLD_CLASSES)
    sample = _load(indexed, "0000001_s1")
    known = sample.mask[sample.mask != IGNORE_INDEX]
    assert known.size > 0.5 * sample.mask.size and known.min() >= 0 and known.max() <= 8
    # The label product's own no-data (255, top-right corner) stays unknown after nearest warping.
    assert (sample.mask[:3, -3:] == IGNORE_INDEX).any()
    location, season = UNLABELLED_SEASON
    record = _record(indexed, f"{location}_s{season}")
    assert "dynamic_world" not in record["layers"]
    with pytest.raises(DataError, match="dynamic_world"):
        _load(indexed, f"{location}_s{season}")
    assert _load(indexed, f"{location}_s{season}", LoadOptions()).mask is None


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_label_without_georeferencing_is_stretched_over_the_tile(own_copy: Path) -> None:
    result = Ssl4eoS12Reader.index(own_copy, seasons=[0], max_locations=1)
    record = result.manifest.records[0]
    path = own_copy / json.loads(record["layers"])["dynamic_world"]
    labels = np.kron(np.arange(4, dtype=np.uint8).reshape(2, 2), np.ones((6, 6), dtype=np.uint8))
    path.unlink()
    with rasterio.open(path, "w", driver="GTiff", height=12, width=12, count=1, dtype="uint8") as dst:
        dst.write(labels, 1)
    sample = Ssl4eoS12Reader.load(record, result.manifest.info, result.manifest.data_root, DW)
    expected = np.kron(np.arange(4).reshape(2, 2), np.ones((SIZE_10M // 2, SIZE_10M // 2), dtype=np.int64))
    valid = sample.valid()
    assert np.array_equal(sample.mask[valid], expected[valid])


def test_external_labels_root(own_copy: Path, tmp_path: Path) -> None:
    labels = Path(shutil.move(own_copy / "dw", tmp_path / "elsewhere"))
    assert not Ssl4eoS12Reader.index(own_copy).manifest.info.layers
    result = Ssl4eoS12Reader.index(own_copy, labels_root=labels)
    record = next(r for r in result.manifest.records if r["tile_id"] == "0000000_s0")
    assert str(labels.resolve()) in record["layers"]
    sample = Ssl4eoS12Reader.load(record, result.manifest.info, result.manifest.data_root, DW)
    assert (sample.mask != IGNORE_INDEX).any()
    with pytest.raises(DataError, match="not found"):
        Ssl4eoS12Reader.index(own_copy, labels_root=tmp_path / "missing")


@pytest.mark.parametrize("crs", ["EPSG:4326", "utm"])
def test_splits_by_block_and_leak_free(crs: str, indexed, tmp_path: Path) -> None:
    if crs == "utm":
        indexed = Ssl4eoS12Reader.index(make_ssl4eo(tmp_path, crs="utm"))
        assert indexed.manifest.records[0]["crs"].startswith("EPSG:32")
    records = indexed.manifest.records
    assert {r["split"] for r in records} == {"train", "val", "test"}
    by_location: dict[str, set[str]] = {}
    for record in records:
        by_location.setdefault(record["region"], set()).add(record["split"])
    assert all(len(splits) == 1 for splits in by_location.values())
    # 0000002 and 0000003 overlap on the ground: one block, one split.
    assert by_location["0000002"] == by_location["0000003"]
    check_no_leakage(records)


def test_missing_band_file_is_reported(own_copy: Path) -> None:
    record = Ssl4eoS12Reader.index(own_copy).manifest.records[1]
    missing = own_copy / record["optical_path"] / "B8A.tif"
    missing.unlink()
    result = Ssl4eoS12Reader.index(own_copy)
    assert record["tile_id"] not in {r["tile_id"] for r in result.manifest.records}
    assert any(s.item == record["tile_id"] and str(missing) in s.reason for s in result.skipped)


def test_truncated_file_raises_data_error_naming_it(own_copy: Path) -> None:
    result = Ssl4eoS12Reader.index(own_copy)
    record = result.manifest.records[0]
    damaged = own_copy / record["optical_path"] / "B11.tif"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(DataError, match="B11.tif"):
        Ssl4eoS12Reader.load(record, result.manifest.info, result.manifest.data_root, DW)
    # A file cut inside its header is already caught by the index.
    reference = own_copy / record["optical_path"] / "B2.tif"
    reference.write_bytes(reference.read_bytes()[:40])
    again = Ssl4eoS12Reader.index(own_copy)
    assert any(s.item == record["tile_id"] and "B2.tif" in s.reason for s in again.skipped)


def test_non_overlapping_pair_is_refused(own_copy: Path) -> None:
    result = Ssl4eoS12Reader.index(own_copy)
    record = result.manifest.records[0]
    for band in ("VV", "VH"):
        path = own_copy / record["sar_path"] / band_file(band)
        with rasterio.open(path, "r+") as dst:
            moved = dst.transform
            dst.transform = Affine(moved.a, moved.b, moved.c + 1.0, moved.d, moved.e, moved.f)  # 1 degree east
    with pytest.raises(PairingError, match="do not overlap"):
        Ssl4eoS12Reader.load(record, result.manifest.info, result.manifest.data_root, DW)
    again = Ssl4eoS12Reader.index(own_copy)
    assert record["tile_id"] not in {r["tile_id"] for r in again.manifest.records}
    assert any(s.item == record["tile_id"] and "do not overlap" in s.reason for s in again.skipped)
