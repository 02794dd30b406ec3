"""Scene primitives (xmodal.data.scenes): reading any raster or vector onto a target grid by window."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import Affine, from_origin
from rasterio.warp import transform as transform_points

from xmodal.data import scenes
from xmodal.data.geotiff import write_raster
from xmodal.errors import DataError

# A ground point near 12 E, 48 N: on the border of UTM zones 32 and 33, valid in both.
_X, _Y = transform_points("EPSG:4326", "EPSG:32632", [12.0], [48.0])
X0, Y0 = round(_X[0], -1), round(_Y[0], -1)


def _sar(path: Path, data: np.ndarray, pixel: float = 10.0, **tags) -> Path:
    write_raster(
        path, data.astype(np.float32), crs="EPSG:32632", transform=from_origin(X0, Y0, pixel, pixel), nodata=np.nan,
        descriptions=["VV", "VH"][: data.shape[0]], band_tags=[{"unit": "dB", **tags}] * data.shape[0],
    )
    return path


def _rows_cols(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
    return rows[0], rows[-1], cols[0], cols[-1]


def test_a_feature_lands_on_the_same_pixels_from_another_utm_zone_and_resolution(tmp_path):
    sar = np.full((2, 200, 200), -15.0)
    sar[:, 80:120, 60:100] = 0.0  # a bright 400 m x 400 m square
    grid = scenes.scene_grid(_sar(tmp_path / "sar.tif", sar))
    # The same ground as a 20 m optical scene in zone 33, made by GDAL independently of the reader.
    optical_grid = scenes.target_grid(grid, "EPSG:32633", 20.0)
    assert optical_grid.crs == "EPSG:32633" and optical_grid.pixel_size == 20.0
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    optical = np.zeros((1, optical_grid.height, optical_grid.width), np.float32)
    reproject(sar[:1].astype(np.float32), optical, src_transform=from_origin(X0, Y0, 10, 10), src_crs="EPSG:32632",
              dst_transform=Affine(*optical_grid.transform), dst_crs="EPSG:32633", resampling=Resampling.average)
    optical = np.where(optical > -7.5, 3000, 100).astype(np.uint16)
    write_raster(tmp_path / "optical.tif", optical, crs="EPSG:32633", transform=Affine(*optical_grid.transform), nodata=0,
                 descriptions=["B04"], band_tags=[{"unit": "reflectance_x1e4"}])

    window = scenes.window_grid(grid, 50, 30, 100, 100)
    on_sar_grid = scenes.read_on_grid(tmp_path / "optical.tif", window, "optical")
    sar_window = scenes.read_on_grid(tmp_path / "sar.tif", window, "sar", units=["dB", "dB"])
    assert on_sar_grid.shape == (1, 100, 100) and on_sar_grid.dtype == np.float32
    expected = np.array(_rows_cols(sar_window[0] > -7.5))
    assert tuple(expected) == (30, 69, 30, 69)
    assert np.abs(np.array(_rows_cols(on_sar_grid[0] > 1550)) - expected).max() <= 1


def test_an_aligned_window_is_an_exact_read_and_outside_the_file_is_nan(tmp_path):
    data = np.random.default_rng(0).normal(-12, 3, (2, 64, 64))
    path = _sar(tmp_path / "sar.tif", data)
    window = scenes.window_grid(scenes.scene_grid(path), 40, 48, 32, 32)
    values = scenes.read_on_grid(path, window, "sar", units=["dB", "dB"])
    np.testing.assert_array_equal(values[:, :24, :16], data[:, 40:, 48:].astype(np.float32))
    assert np.isnan(values[:, 24:, :]).all() and np.isnan(values[:, :, 16:]).all()


def test_sar_db_is_averaged_in_linear_power_not_in_db(tmp_path):
    checker = np.where(np.indices((64, 64)).sum(0) % 2 == 0, 0.0, -10.0)[None]
    path = _sar(tmp_path / "checker.tif", checker)
    coarse = scenes.target_grid(scenes.scene_grid(path), None, 40.0)
    values = scenes.read_on_grid(path, coarse, "sar", units=["dB"])
    # Mean of 1 and 0.1 in power is 0.55 (-2.60 dB); the mean of the dB values would be -5.
    np.testing.assert_allclose(values[0, 2:-2, 2:-2], 10 * np.log10(0.55), atol=1e-4)


def test_classes_stay_classes_and_no_data_becomes_ignore(tmp_path):
    classes = np.random.default_rng(1).integers(0, 4, (1, 50, 50)).astype(np.uint8)
    classes[0, :5] = 9  # the file's no-data value
    write_raster(tmp_path / "lc.tif", classes, crs="EPSG:32632", transform=from_origin(X0, Y0, 10, 10), nodata=9)
    grid = scenes.target_grid(scenes.scene_grid(tmp_path / "lc.tif"), "EPSG:32633", 7.0)
    values = scenes.read_on_grid(tmp_path / "lc.tif", grid, "classes")
    assert values.dtype == np.int64 and set(np.unique(values)) <= {0, 1, 2, 3, 255}
    assert (values == 255).any()


def test_a_small_window_of_a_large_scene_reads_only_that_window(tmp_path):
    path = _sar(tmp_path / "big.tif", np.zeros((2, 2048, 2048)))  # 32 MiB as float32, 64 MiB as float64
    window = scenes.window_grid(scenes.scene_grid(path), 1000, 1000, 64, 64)
    moved = scenes.window_grid(scenes.scene_grid(path), 1000, 1000, 64, 64)
    moved = scenes.target_grid(moved, "EPSG:32633", 10.0)
    tracemalloc.start()
    scenes.read_on_grid(path, window, "sar", units=["dB", "dB"])
    scenes.read_on_grid(path, moved, "sar", units=["dB", "dB"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 2**20, f"peak {peak} bytes for two 64 x 64 windows"


def _polygon_lonlat(left: float, top: float, size: float) -> list[list[float]]:
    xs = [left, left + size, left + size, left, left]
    ys = [top, top, top - size, top - size, top]
    lon, lat = transform_points("EPSG:32632", "EPSG:4326", xs, ys)
    return [list(p) for p in zip(lon, lat)]


def test_vector_labels_burn_onto_the_right_pixels(tmp_path):
    grid = scenes.scene_grid(_sar(tmp_path / "sar.tif", np.zeros((2, 200, 200))))
    feature = {"type": "Feature", "properties": {"cls": 2},
               "geometry": {"type": "Polygon", "coordinates": [_polygon_lonlat(X0 + 600, Y0 - 800, 400)]}}
    (tmp_path / "b.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    burned = scenes.rasterise_vector(tmp_path / "b.geojson", grid)
    assert _rows_cols(burned == 1) == (80, 119, 60, 99) and set(np.unique(burned)) == {0, 1}
    assert set(np.unique(scenes.rasterise_vector(tmp_path / "b.geojson", grid, field="cls"))) == {0, 2}
    # The same polygon in a GeoPackage in another UTM zone.
    import pyogrio
    import shapely
    from rasterio.warp import transform_geom

    moved = shapely.geometry.shape(transform_geom("EPSG:4326", "EPSG:32633", feature["geometry"]))
    pyogrio.raw.write(str(tmp_path / "b.gpkg"), np.array([shapely.to_wkb(moved)], dtype=object), field_data=[np.array([2])],
                      fields=["cls"], geometry_type="Polygon", crs="EPSG:32633", driver="GPKG")
    burned_gpkg = scenes.rasterise_vector(tmp_path / "b.gpkg", grid)
    assert np.abs(np.array(_rows_cols(burned_gpkg == 1)) - [80, 119, 60, 99]).max() <= 1
    # A window that holds none of it.
    assert not scenes.rasterise_vector(tmp_path / "b.geojson", scenes.window_grid(grid, 150, 150, 40, 40)).any()


def test_a_crs_less_geojson_in_metres_is_refused_by_name(tmp_path):
    grid = scenes.scene_grid(_sar(tmp_path / "sar.tif", np.zeros((1, 50, 50))))
    ring = [[X0, Y0], [X0 + 100, Y0], [X0 + 100, Y0 - 100], [X0, Y0]]
    (tmp_path / "m.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    with pytest.raises(DataError, match=r"m\.geojson.*lon/lat"):
        scenes.rasterise_vector(tmp_path / "m.geojson", grid)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_bands_come_from_a_statement_or_the_tags_and_an_unknown_unit_is_refused(tmp_path):
    path = _sar(tmp_path / "sar.tif", np.zeros((2, 16, 16)))
    assert scenes.scene_bands(path, "sar").names == ["VV", "VH"]
    assert scenes.scene_bands(path, "sar", unit="linear").units == ["linear", "linear"]
    write_raster(tmp_path / "bare.tif", np.zeros((2, 16, 16), np.float32), crs="EPSG:32632", transform=from_origin(X0, Y0, 10, 10))
    with pytest.raises(DataError, match=r"bare\.tif: band names unknown"):
        scenes.scene_bands(tmp_path / "bare.tif", "sar")
    with pytest.raises(DataError, match=r"bare\.tif: sar unit unknown"):
        scenes.scene_bands(tmp_path / "bare.tif", "sar", names=["VV", "VH"])
    with pytest.raises(DataError, match=r"bare\.tif: 1 band name\(s\) stated"):
        scenes.scene_bands(tmp_path / "bare.tif", "sar", names=["VV"], unit="dB")
    with pytest.raises(DataError, match=r"bare\.tif: .*unit 'reflectance'"):
        scenes.scene_bands(tmp_path / "bare.tif", "sar", names=["VV", "VH"], unit="reflectance")
    write_raster(tmp_path / "plain.tif", np.zeros((1, 16, 16), np.float32), crs="EPSG:32632", transform=Affine.identity())
    with pytest.raises(DataError, match=r"plain\.tif: has no"):
        scenes.scene_grid(tmp_path / "plain.tif")


def test_a_vector_file_is_read_once_and_a_large_one_by_bounding_box(tmp_path, monkeypatch):
    import pyogrio

    grid = scenes.scene_grid(_sar(tmp_path / "sar.tif", np.zeros((2, 200, 200))))
    features = [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
        _polygon_lonlat(X0 + 100 + 200 * i, Y0 - 100, 100)]}} for i in range(8)]
    (tmp_path / "b.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    reads = []
    real_read = pyogrio.raw.read
    monkeypatch.setattr(pyogrio.raw, "read", lambda *a, **k: reads.append(k.get("bbox")) or real_read(*a, **k))
    tiles = [scenes.window_grid(grid, 0, col, 50, 50) for col in range(0, 200, 50)]
    whole = scenes.rasterise_vector(tmp_path / "b.geojson", grid)
    for tile, col in zip(tiles, range(0, 200, 50)):
        np.testing.assert_array_equal(scenes.rasterise_vector(tmp_path / "b.geojson", tile), whole[:50, col:col + 50])
    assert reads == [None]  # once, whole, for the five grids
    monkeypatch.setattr(scenes, "VECTOR_CACHE_BYTES", 0)
    with pytest.raises(DataError, match=r"b\.geojson: .*without a spatial index; convert it to a GeoPackage"):
        scenes.rasterise_vector(tmp_path / "b.geojson", tiles[0])
    import shapely

    lonlat = shapely.from_geojson(json.dumps({"type": "FeatureCollection", "features": features}))
    parts = np.array([shapely.to_wkb(g) for g in shapely.get_parts(lonlat)], dtype=object)
    pyogrio.raw.write(str(tmp_path / "b.gpkg"), parts, field_data=[], fields=[], geometry_type="Polygon", crs="EPSG:4326", driver="GPKG")
    reads.clear()
    for tile, col in zip(tiles, range(0, 200, 50)):
        np.testing.assert_array_equal(scenes.rasterise_vector(tmp_path / "b.gpkg", tile), whole[:50, col:col + 50])
    assert len(reads) == 4 and all(bbox is not None for bbox in reads)
