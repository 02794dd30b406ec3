"""The paired-sample contract, the manifest and GeoTIFF reading: bad input gets named errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmodal.data.bands import BandSet, db_to_linear, linear_to_db, sar_to_db
from xmodal.data.geotiff import read_raster
from xmodal.data.manifest import Manifest, make_record
from xmodal.data.readers import LoadOptions, get_reader
from xmodal.data.sample import PairedSample, TileMeta
from xmodal.errors import DataError, PairingError

from conftest import native_info, write_native_tile


def test_units_round_trip_and_refuse_non_intensities():
    power = np.array([1e-3, 0.1, 1.0, 10.0], dtype=np.float32)
    np.testing.assert_allclose(db_to_linear(linear_to_db(power)), power, rtol=1e-5)
    np.testing.assert_allclose(sar_to_db(np.sqrt(power), "amplitude"), linear_to_db(power), atol=1e-4)
    with pytest.raises(DataError, match="complex_real"):
        sar_to_db(power, "complex_real")


def test_band_set_refuses_wrong_units():
    with pytest.raises(DataError, match="unit 'reflectance'"):
        BandSet.of("sar", ["VV"], "reflectance")


def test_sample_contract_names_the_field():
    meta = TileMeta("t0", "r0", "EPSG:32631", (0, 0, 1, 1))
    sar = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(DataError, match="optical must be float32"):
        PairedSample(sar=sar, optical=np.zeros((4, 8, 8), np.float64), meta=meta)
    with pytest.raises(DataError, match="sar is 8x8 but optical is 4x4"):
        PairedSample(sar=sar, optical=np.zeros((4, 4, 4), np.float32), meta=meta)
    with pytest.raises(DataError, match="mask must be int64"):
        PairedSample(sar=sar, optical=np.zeros((4, 8, 8), np.float32), meta=meta, mask=np.zeros((8, 8), np.uint8))


def test_native_round_trip(hand_dataset: Manifest):
    reader = get_reader("xmodal")
    sample = reader.load(hand_dataset.records[0], hand_dataset.info, hand_dataset.data_root, LoadOptions("buildings"))
    assert sample.sar.shape == (2, 16, 16) and sample.optical.shape == (4, 16, 16)
    assert sample.mask.dtype == np.int64 and set(np.unique(sample.mask)) <= {0, 1}


def test_corrupt_geotiff_is_named(hand_dataset: Manifest):
    path = hand_dataset.data_root / hand_dataset.records[0]["sar_path"]
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=str(path)):
        get_reader("xmodal").load(hand_dataset.records[0], hand_dataset.info, hand_dataset.data_root, LoadOptions())


def test_missing_file_is_named(hand_dataset: Manifest):
    path = hand_dataset.data_root / hand_dataset.records[1]["optical_path"]
    path.unlink()
    with pytest.raises(DataError, match=f"{path}: file not found"):
        get_reader("xmodal").load(hand_dataset.records[1], hand_dataset.info, hand_dataset.data_root, LoadOptions())


def test_wrong_band_count_is_named(tmp_path: Path):
    record = write_native_tile(tmp_path, "t0", sar_bands=3)
    manifest = Manifest(info=native_info(sar_bands=2), records=[record])
    with pytest.raises(DataError, match="has 3 band\\(s\\), expected 2"):
        get_reader("xmodal").load(record, manifest.info, tmp_path, LoadOptions())


def test_pair_with_other_crs_is_refused(tmp_path: Path):
    record = write_native_tile(tmp_path, "t0", sar_crs="EPSG:32632")
    with pytest.raises(PairingError, match="CRS differ"):
        get_reader("xmodal").load(record, native_info(), tmp_path, LoadOptions())


def test_pair_with_other_bounds_is_refused(tmp_path: Path):
    record = write_native_tile(tmp_path, "t0", optical_origin=(500_010.0, 5_700_000.0))
    with pytest.raises(PairingError, match="bounds differ"):
        get_reader("xmodal").load(record, native_info(), tmp_path, LoadOptions())


def test_nan_nodata_reads_as_nan(tmp_path: Path):
    from rasterio.transform import from_origin

    from xmodal.data.geotiff import write_raster

    data = np.ones((1, 8, 8), np.float32)
    data[0, :2] = -9999
    write_raster(tmp_path / "x.tif", data, crs="EPSG:32631", transform=from_origin(0, 16, 2, 2), nodata=-9999)
    raster = read_raster(tmp_path / "x.tif")
    assert np.isnan(raster.data[0, :2]).all() and np.isfinite(raster.data[0, 2:]).all()


def test_manifest_refuses_duplicates_and_bad_split(tmp_path: Path):
    record = make_record(tile_id="a", region="r", crs="", bounds=(0, 0, 1, 1), sar_path="s", optical_path="o")
    with pytest.raises(DataError, match="appears twice"):
        Manifest(info=native_info(), records=[record, dict(record)])
    with pytest.raises(DataError, match="split 'training'"):
        Manifest(info=native_info(), records=[{**record, "split": "training"}])
    with pytest.raises(DataError, match="dataset.json and manifest.parquet"):
        Manifest.load(tmp_path / "nowhere")
