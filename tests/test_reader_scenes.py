"""The scenes reader on scenes generated here in the real formats: GeoTIFFs with band descriptions
and unit tags in two UTM zones and resolutions, building polygons as lon/lat GeoJSON and as a
GeoPackage in a third CRS, a scene larger than a load's memory, and a YAML listing."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import from_origin
from rasterio.warp import transform as transform_points

from xmodal.data.geotiff import write_raster
from xmodal.data.manifest import record_extra, record_layers
from xmodal.data.readers import LoadOptions, detect_reader, get_reader
from xmodal.data.readers.scenes import ScenesReader, grid_from_dict, read_listing
from xmodal.data.splits import find_leaks
from xmodal.errors import ConfigError, DataError

# Ground near the border of UTM zones 32 and 33 (12 degrees east), where the two grids are rotated
# by about 2 degrees against each other.
LON, LAT = 12.0, 48.0
SAR_CRS, OPTICAL_CRS, GPKG_CRS = "EPSG:32632", "EPSG:32633", "EPSG:3035"
SAR_PIXEL, OPTICAL_PIXEL = 10.0, 20.0
SAR_SIZE = 128
FEATURE_HALF = 30.0  # metres: a 60 m bright square on the ground


def utm(lon: float, lat: float, crs: str) -> tuple[float, float]:
    xs, ys = transform_points("EPSG:4326", crs, [lon], [lat])
    return xs[0], ys[0]


def sar_origin() -> tuple[float, float]:
    """Top-left of the SAR grid: the scene centred on (LON, LAT), snapped to 10 m."""
    x, y = utm(LON, LAT, SAR_CRS)
    half = SAR_SIZE * SAR_PIXEL / 2
    return round((x - half) / SAR_PIXEL) * SAR_PIXEL, round((y + half) / SAR_PIXEL) * SAR_PIXEL


def pixel_centres(origin: tuple[float, float], pixel: float, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    xs = origin[0] + (np.arange(width) + 0.5) * pixel
    ys = origin[1] - (np.arange(height) + 0.5) * pixel
    return np.meshgrid(xs, ys)


def optical_origin(size: int = 96) -> tuple[float, float]:
    x, y = utm(LON, LAT, OPTICAL_CRS)
    return round(x - size * OPTICAL_PIXEL / 2), round(y + size * OPTICAL_PIXEL / 2)


def feature_lonlat() -> tuple[float, float]:
    """A ground point about 300 m east and 200 m south of the scene centre, inside one 32 px tile.

    It is an optical pixel's centre, so the 60 m square drawn on the 20 m optical grid is centred
    on it exactly (on the 10 m SAR grid it is off by at most half a pixel)."""
    x, y = utm(LON, LAT, SAR_CRS)
    xs, ys = transform_points(SAR_CRS, OPTICAL_CRS, [x + 300.0], [y - 200.0])
    left, top = optical_origin()
    col, row = round((xs[0] - left) / OPTICAL_PIXEL - 0.5), round((top - ys[0]) / OPTICAL_PIXEL - 0.5)
    lon, lat = transform_points(OPTICAL_CRS, "EPSG:4326", [left + (col + 0.5) * OPTICAL_PIXEL], [top - (row + 0.5) * OPTICAL_PIXEL])
    return lon[0], lat[0]


def write_sar(path: Path, *, crs: str = SAR_CRS, bands=("VV", "VH"), unit: str | None = "dB", origin=None,
              size: int = SAR_SIZE, feature: bool = True, nan_box: tuple[int, int, int, int] | None = None) -> Path:
    """A SAR scene in dB (-15 background, 0 dB on the feature), band names and unit tags."""
    origin = origin or sar_origin()
    data = np.full((len(bands), size, size), -15.0, dtype=np.float32)
    data += np.random.default_rng(0).normal(0, 0.5, data.shape).astype(np.float32)
    if feature:
        fx, fy = utm(*feature_lonlat(), crs)
        xs, ys = pixel_centres(origin, SAR_PIXEL, size, size)
        data[:, (np.abs(xs - fx) < FEATURE_HALF) & (np.abs(ys - fy) < FEATURE_HALF)] = 0.0
    if nan_box is not None:
        r0, r1, c0, c1 = nan_box
        data[:, r0:r1, c0:c1] = np.nan
    write_raster(path, data, crs=crs, transform=from_origin(*origin, SAR_PIXEL, SAR_PIXEL), nodata=float("nan"),
                 descriptions=list(bands), band_tags=[{"unit": unit}] * len(bands) if unit else None)
    return path


def write_optical(path: Path, *, nodata_cols: int = 0) -> Path:
    """An optical scene in the next UTM zone at 20 m over more ground than the SAR (uint16, 0 = no-data)."""
    size = 96  # 1.92 km, the SAR scene is 1.28 km
    origin = optical_origin(size)
    data = np.random.default_rng(1).integers(450, 550, (4, size, size)).astype(np.uint16)
    fx, fy = utm(*feature_lonlat(), OPTICAL_CRS)
    xs, ys = pixel_centres(origin, OPTICAL_PIXEL, size, size)
    data[:, (np.abs(xs - fx) < FEATURE_HALF) & (np.abs(ys - fy) < FEATURE_HALF)] = 3000
    if nodata_cols:
        data[:, :, :nodata_cols] = 0
    write_raster(path, data, crs=OPTICAL_CRS, transform=from_origin(*origin, OPTICAL_PIXEL, OPTICAL_PIXEL), nodata=0,
                 descriptions=["B02", "B03", "B04", "B08"], band_tags=[{"unit": "reflectance_x1e4"}] * 4)
    return path


def building_squares() -> list[tuple[float, float, float, float]]:
    """Building boxes on the SAR grid's pixel edges (so the expected pixels are unambiguous)."""
    left, top = sar_origin()
    boxes = []
    for row, col, rows, cols in ((10, 12, 5, 4), (40, 70, 3, 6), (90, 20, 6, 6)):
        boxes.append((left + col * SAR_PIXEL, top - (row + rows) * SAR_PIXEL, left + (col + cols) * SAR_PIXEL, top - row * SAR_PIXEL))
    return boxes


def expected_buildings(boxes) -> np.ndarray:
    xs, ys = pixel_centres(sar_origin(), SAR_PIXEL, SAR_SIZE, SAR_SIZE)
    mask = np.zeros((SAR_SIZE, SAR_SIZE), dtype=np.int64)
    for value, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        mask[(xs > x0) & (xs < x1) & (ys > y0) & (ys < y1)] = value
    return mask


def ring(box, crs: str, points: int = 4) -> list[list[float]]:
    """A box's outline with ``points`` vertices per edge, reprojected from the SAR CRS to ``crs``."""
    x0, y0, x1, y1 = box
    t = np.linspace(0, 1, points, endpoint=False)
    xs = np.concatenate([x0 + (x1 - x0) * t, np.full_like(t, x1), x1 - (x1 - x0) * t, np.full_like(t, x0)])
    ys = np.concatenate([np.full_like(t, y1), y1 - (y1 - y0) * t, np.full_like(t, y0), y0 + (y1 - y0) * t])
    out_x, out_y = transform_points(SAR_CRS, crs, xs.tolist(), ys.tolist())
    coords = [[float(a), float(b)] for a, b in zip(out_x, out_y)]
    return coords + [coords[0]]


def write_geojson(path: Path, boxes) -> Path:
    """RFC 7946 GeoJSON: lon/lat, no ``crs`` member."""
    features = [
        {"type": "Feature", "properties": {"id": i}, "geometry": {"type": "Polygon", "coordinates": [ring(b, "EPSG:4326")]}}
        for i, b in enumerate(boxes)
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def write_gpkg(path: Path, boxes, crs: str = GPKG_CRS, kinds: list[int] | None = None, driver: str = "GPKG") -> Path:
    """A GeoPackage (or Shapefile) in ``crs`` written through pyogrio's raw API (no geopandas), with a ``kind`` field."""
    import pyogrio.raw
    import shapely

    geometries = shapely.to_wkb([shapely.Polygon(ring(b, crs)) for b in boxes])
    kinds = kinds or list(range(1, len(boxes) + 1))
    pyogrio.raw.write(str(path), geometries, [np.asarray(kinds, dtype=np.int32)], ["kind"], geometry_type="Polygon",
                      crs=crs, driver=driver)
    return path


def write_listing(folder: Path, body: dict) -> Path:
    path = folder / "scenes.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def basic_scenes(folder: Path, **tiles) -> Path:
    """SAR (zone 32, 10 m), optical (zone 33, 20 m), buildings (GeoJSON) and parcels (GPKG, EPSG:3035)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_sar(folder / "s1_20240601.tif")
    write_optical(folder / "s2_20240603.tif")
    boxes = building_squares()
    write_geojson(folder / "buildings.geojson", boxes)
    write_gpkg(folder / "parcels.gpkg", boxes, kinds=[1, 2, 1])
    return write_listing(folder, {
        "sar": {"files": ["s1_20240601.tif"]},
        "optical": {"files": ["s2_20240603.tif"]},
        "labels": {
            "buildings": {"files": ["buildings.geojson"], "coverage": "all"},
            "parcels": {"files": ["parcels.gpkg"], "classes": ["none", "house", "shed"], "field": "kind", "coverage": "all"},
        },
        "tiles": {"size": 32, "stride": 32, "min_valid": 0.5, **tiles},
        "split": {"block_size": 640},
    })


def load(manifest, record, mask_layer=None, noisy_layer=None):
    return ScenesReader.load(record, manifest.info, manifest.data_root, LoadOptions(mask_layer, noisy_layer))


def mosaic(manifest, records, field: str, mask_layer=None) -> np.ndarray:
    """Loaded tiles put back at their rows/cols on the SAR grid."""
    out = None
    for record in records:
        sample = load(manifest, record, mask_layer=mask_layer)
        array = getattr(sample, field)
        if out is None:
            out = np.full((*array.shape[:-2], SAR_SIZE, SAR_SIZE), -1, dtype=array.dtype)
        extra = record_extra(record)
        row, col = extra["row"], extra["col"]
        out[..., row:row + array.shape[-2], col:col + array.shape[-1]] = array
    return out


def centroid(image: np.ndarray) -> np.ndarray:
    weights = np.nan_to_num(image - np.nanmin(image))
    weights[weights < 0.5 * weights.max()] = 0
    rows, cols = np.indices(image.shape)
    return np.array([(rows * weights).sum(), (cols * weights).sum()]) / weights.sum()


# ----------------------------------------------------------------------------- tests


def test_scenes_in_two_utm_zones_pair_and_align_within_a_pixel(tmp_path: Path):
    listing = basic_scenes(tmp_path / "scenes")
    result = ScenesReader.index(listing)
    manifest = result.manifest
    manifest.folder = tmp_path  # data_root is absolute; a folder is only needed for relative roots
    info = manifest.info
    assert info.sar_bands.names == ["VV", "VH"] and info.sar_bands.units == ["dB", "dB"]
    assert info.optical_bands.names == ["B02", "B03", "B04", "B08"] and set(info.optical_bands.units) == {"reflectance_x1e4"}
    assert info.tile_size == 32 and info.pixel_size == SAR_PIXEL and len(manifest) == 16
    assert all(r["crs"] == SAR_CRS and r["region"] == "s1_20240601" for r in manifest.records)

    # The feature's expected position on the SAR grid, from its lon/lat.
    fx, fy = utm(*feature_lonlat(), SAR_CRS)
    left, top = sar_origin()
    expected = np.array([(top - fy) / SAR_PIXEL, (fx - left) / SAR_PIXEL]) - 0.5
    sar = mosaic(manifest, manifest.records, "sar")[0]
    optical = mosaic(manifest, manifest.records, "optical")[2]
    assert np.abs(centroid(sar) - expected).max() <= 1.0
    assert np.abs(centroid(optical) - expected).max() <= 1.0
    assert np.abs(centroid(optical) - centroid(sar)).max() <= 1.0
    # SAR on its own grid is an exact window read; optical covers every tile, bilinear in range.
    sample = load(manifest, manifest.records[0])
    assert sample.sar.dtype == np.float32 and sample.sar_valid.all() and sample.optical_valid.all()
    assert 450 <= np.nanmin(sample.optical) and np.nanmax(optical) <= 3000


def test_a_stated_target_grid_reprojects_the_sar_too(tmp_path: Path):
    listing = basic_scenes(tmp_path / "scenes")
    manifest = ScenesReader.index(listing, crs=OPTICAL_CRS, resolution=20.0, tile_size=16).manifest
    assert manifest.info.pixel_size == 20.0 and {r["crs"] for r in manifest.records} == {OPTICAL_CRS}
    record = manifest.records[0]
    grid = grid_from_dict(record_extra(record)["grid"])
    assert grid.crs == OPTICAL_CRS and grid.pixel_size == 20.0 and (grid.height, grid.width) == (16, 16)
    sample = load(manifest, record)
    assert sample.sar.shape == (2, 16, 16) and np.nanmax(sample.sar) < 5  # still dB, resampled in linear power


def test_vector_labels_rasterise_onto_the_expected_pixels(tmp_path: Path):
    listing = basic_scenes(tmp_path / "scenes")
    manifest = ScenesReader.index(listing).manifest
    assert manifest.info.layers["buildings"].classes == ["background", "buildings"]
    assert manifest.info.layers["parcels"].classes == ["none", "house", "shed"]
    expected = expected_buildings(building_squares())
    buildings = mosaic(manifest, manifest.records, "mask", mask_layer="buildings")
    np.testing.assert_array_equal(buildings, (expected > 0).astype(np.int64))  # lon/lat GeoJSON
    parcels = mosaic(manifest, manifest.records, "mask", mask_layer="parcels")
    np.testing.assert_array_equal(parcels, np.array([0, 1, 2, 1])[expected])  # GPKG in EPSG:3035, field burnt
    assert all(record_layers(r) == {"buildings": "buildings.geojson", "parcels": "parcels.gpkg"} for r in manifest.records)

    # One layer from several files: every file's features are burnt, whichever file comes first.
    folder = listing.parent
    write_geojson(folder / "north.geojson", building_squares()[:1])
    write_geojson(folder / "south.geojson", building_squares()[1:])
    body = yaml.safe_load(listing.read_text())
    body["labels"] = {"buildings": {"files": ["north.geojson", "south.geojson"], "coverage": "all"}}
    manifest = ScenesReader.index(write_listing(folder, body)).manifest
    np.testing.assert_array_equal(mosaic(manifest, manifest.records, "mask", mask_layer="buildings"), buildings)


def test_vector_labels_cover_only_the_box_of_their_features_by_default(tmp_path: Path):
    folder = tmp_path / "scenes"
    basic_scenes(folder)
    boxes = building_squares()[:2]  # features in the top rows only
    write_geojson(folder / "few.geojson", boxes)
    listing = write_listing(folder, {"sar": {"files": ["s1_20240601.tif"]}, "optical": {"files": ["s2_20240603.tif"]},
                                     "labels": {"buildings": {"files": ["few.geojson"]}}, "tiles": {"size": 32}})
    manifest = ScenesReader.index(listing).manifest
    labelled = [r for r in manifest.records if "buildings" in record_layers(r)]
    assert 0 < len(labelled) < len(manifest)
    mask = mosaic(manifest, labelled, "mask", mask_layer="buildings")
    left = int((boxes[0][0] - sar_origin()[0]) / SAR_PIXEL)
    assert (mask[:, :left] == 255).any() and (mask == 1).sum() == (expected_buildings(boxes) > 0).sum()


def write_landcover(path: Path, *, value_east: int = 2, classes_tag: str | None = None) -> Path:
    """Land cover on the optical's 20 m grid in zone 33: class 1 west of the feature's easting,
    ``value_east`` east of it, no-data (255) in the northern 25 rows (500 m: the SAR scene's northern 180 m)."""
    size = 96
    origin = optical_origin(size)
    fx, _ = utm(*feature_lonlat(), OPTICAL_CRS)
    xs, _ = pixel_centres(origin, OPTICAL_PIXEL, size, size)
    data = np.where(xs < fx, 1, value_east).astype(np.uint8)
    data[:25] = 255
    write_raster(path, data, crs=OPTICAL_CRS, transform=from_origin(*origin, OPTICAL_PIXEL, OPTICAL_PIXEL), nodata=255,
                 tags={"classes": classes_tag} if classes_tag else None)
    return path


def test_raster_labels_land_by_nearest_with_no_data_unknown(tmp_path: Path):
    folder = tmp_path / "scenes"
    basic_scenes(folder)
    write_landcover(folder / "landcover.tif", classes_tag="water, field, forest")
    body = {"sar": {"files": ["s1_20240601.tif"]}, "optical": {"files": ["s2_20240603.tif"]},
            "labels": {"landcover": {"files": ["landcover.tif"]}}, "tiles": {"size": 32}}
    manifest = ScenesReader.index(write_listing(folder, body)).manifest
    assert manifest.info.layers["landcover"].classes == ["water", "field", "forest"]  # from the file's tag
    # No split stated: 16 tiles of ground get 1-tile blocks, so even this small scene holds out val and test.
    assert manifest.info.extra["split"]["block_size"] == 32 * SAR_PIXEL
    assert {r["split"] for r in manifest.records} == {"train", "val", "test"}
    mask = mosaic(manifest, manifest.records, "mask", mask_layer="landcover")
    # Truth at each SAR pixel centre: which side of the feature's easting (in zone 33) it lies on.
    xs, ys = pixel_centres(sar_origin(), SAR_PIXEL, SAR_SIZE, SAR_SIZE)
    east, north = transform_points(SAR_CRS, OPTICAL_CRS, xs.ravel().tolist(), ys.ravel().tolist())
    east, north = np.asarray(east).reshape(xs.shape), np.asarray(north).reshape(xs.shape)
    fx, _ = utm(*feature_lonlat(), OPTICAL_CRS)
    nodata_south_edge = optical_origin()[1] - 25 * OPTICAL_PIXEL
    known = mask != 255
    assert set(np.unique(mask)) == {1, 2, 255}  # nearest: never an interpolated class
    clear = (np.abs(east - fx) > OPTICAL_PIXEL) & (np.abs(north - nodata_south_edge) > OPTICAL_PIXEL)
    np.testing.assert_array_equal(mask[clear & known], np.where(east < fx, 1, 2)[clear & known])
    assert (mask[clear & (north > nodata_south_edge)] == 255).all() and known[clear & (north < nodata_south_edge)].all()

    write_landcover(folder / "landcover.tif", value_east=7)
    with pytest.raises(DataError, match=r"landcover\.tif: label value 7 outside layer 'landcover'"):
        mosaic(manifest, manifest.records, "mask", mask_layer="landcover")


def test_overlapping_windows_with_a_smaller_stride(tmp_path: Path):
    listing = basic_scenes(tmp_path / "scenes", stride=16)
    manifest = ScenesReader.index(listing, **{"split": {"by": "region"}}).manifest
    positions = sorted((record_extra(r)["row"], record_extra(r)["col"]) for r in manifest.records)
    assert positions == [(r, c) for r in range(0, 97, 16) for c in range(0, 97, 16)]
    by_position = {(record_extra(r)["row"], record_extra(r)["col"]): r for r in manifest.records}
    a, b = load(manifest, by_position[0, 0]), load(manifest, by_position[0, 16])
    np.testing.assert_array_equal(a.sar[:, :, 16:], b.sar[:, :, :16])
    np.testing.assert_allclose(a.optical[:, :, 16:], b.optical[:, :, :16], rtol=1e-5)  # GDAL warps each window on its own


def test_nodata_and_nan_are_masked_and_empty_tiles_dropped(tmp_path: Path):
    folder = tmp_path / "scenes"
    listing = basic_scenes(folder)
    write_sar(folder / "s1_20240601.tif", nan_box=(0, 64, 0, 40))  # NaN over the top-left
    write_optical(folder / "s2_20240603.tif", nodata_cols=0)
    manifest = ScenesReader.index(listing).manifest
    positions = {(record_extra(r)["row"], record_extra(r)["col"]): r for r in manifest.records}
    assert (0, 0) not in positions and (32, 0) not in positions  # all NaN: not a tile
    assert (0, 32) in positions  # 8 of 32 columns NaN: 75 % valid
    sample = load(manifest, positions[0, 32], mask_layer="buildings")
    assert not sample.sar_valid[:, :8].any() and sample.sar_valid[:, 8:].all()
    assert np.isnan(sample.sar[:, :, :8]).all() and (sample.mask[:, :8] == 255).all() and (sample.mask[:, 8:] != 255).all()

    # Optical no-data (0) over the file's western 800 m (the SAR's western 480 m) becomes NaN / invalid.
    write_sar(folder / "s1_20240601.tif")
    write_optical(folder / "s2_20240603.tif", nodata_cols=40)
    manifest = ScenesReader.index(listing, min_valid=0.0).manifest
    columns = {record_extra(r)["col"] for r in manifest.records}
    assert 0 not in columns and 32 in columns  # no valid optical pixel under the western tiles: none kept
    samples = [load(manifest, r) for r in manifest.records if record_extra(r)["col"] == 32]
    assert all(not s.optical_valid[:, :8].any() and s.optical_valid[:, 24:].all() for s in samples)
    for s in samples:
        assert np.isnan(s.optical[:, ~s.optical_valid]).all() and np.isfinite(s.optical[:, s.optical_valid]).all()


def test_a_missing_unit_is_refused_naming_the_file(tmp_path: Path):
    folder = tmp_path / "scenes"
    listing = basic_scenes(folder)
    write_sar(folder / "s1_20240601.tif", unit=None)
    with pytest.raises(DataError, match=r"s1_20240601\.tif.*unit"):
        ScenesReader.index(listing)
    manifest = ScenesReader.index(listing, **{"sar": {"unit": "dB"}}).manifest  # a statement fixes it
    assert manifest.info.sar_bands.units == ["dB", "dB"]


def test_scenes_with_different_bands_or_units_are_refused_naming_both(tmp_path: Path):
    folder = tmp_path / "scenes"
    basic_scenes(folder)
    write_sar(folder / "s1_b.tif", unit="linear")
    write_sar(folder / "s1_c.tif", bands=("VV",))
    for other, what in (("s1_b.tif", r"VV \[linear\]"), ("s1_c.tif", r"\(VV \[dB\]\)")):
        listing = write_listing(folder, {"sar": {"files": ["s1_20240601.tif", other]}, "optical": {"files": ["s2_20240603.tif"]}})
        with pytest.raises(DataError, match=rf"s1_20240601\.tif.*{other.replace('.', '[.]')}.*{what}|s1_20240601\.tif.*{what}"):
            ScenesReader.index(listing)


def test_block_split_keeps_overlapping_tiles_apart_across_scenes(tmp_path: Path):
    folder = tmp_path / "scenes"
    basic_scenes(folder)
    write_sar(folder / "s1_20240613.tif")  # a second acquisition of the same ground
    listing = write_listing(folder, {
        "sar": {"files": ["s1_*.tif"]}, "optical": {"files": ["s2_20240603.tif"]},
        "tiles": {"size": 16, "stride": 8}, "split": {"by": "blocks", "block_size": 320, "test_fraction": 0.3, "seed": 1},
    })
    manifest = ScenesReader.index(listing).manifest
    records = manifest.records
    splits = {r["split"] for r in records}
    assert {"train", "val", "test", "unassigned"} <= splits
    assert find_leaks(records) == [] and find_leaks([{**r, "split": "train" if r["split"] == "val" else r["split"]} for r in records], ("test",)) == []
    # The same ground in both acquisitions is in the same split (or left out).
    by_bounds: dict[tuple, set[str]] = {}
    for r in records:
        by_bounds.setdefault((r["left"], r["top"]), set()).add(r["split"])
    assert all(len(s - {"unassigned"}) <= 1 for s in by_bounds.values())
    assert manifest.info.extra["split"]["unassigned_overlapping"] > 0

    # The same ground tiled in two CRSs would escape the leakage check: refused until one CRS is stated.
    write_sar(folder / "s1_20240613.tif", crs=OPTICAL_CRS, origin=optical_origin(SAR_SIZE // 2))  # same ground, zone 33
    with pytest.raises(DataError, match=r"s1_20240601\.tif \(EPSG:32632\) and .*s1_20240613\.tif \(EPSG:32633\) cover the same ground"):
        ScenesReader.index(listing)
    manifest = ScenesReader.index(listing, crs=SAR_CRS, resolution=SAR_PIXEL).manifest
    assert {r["crs"] for r in manifest.records} == {SAR_CRS} and find_leaks(manifest.records) == []


def test_a_scene_larger_than_a_load_is_read_by_window(tmp_path: Path, monkeypatch):
    folder = tmp_path / "big"
    folder.mkdir()
    size, pixel = 4096, 10.0
    origin = sar_origin()
    profile = {"driver": "GTiff", "height": size, "width": size, "count": 2, "dtype": "float32", "crs": SAR_CRS,
               "transform": from_origin(*origin, pixel, pixel), "nodata": float("nan"), "tiled": True, "blockxsize": 256, "blockysize": 256}
    with rasterio.open(folder / "sar.tif", "w", **profile) as dst:  # 128 MiB, written in strips
        strip = np.full((2, 256, size), -12.0, dtype=np.float32)
        for row in range(0, size, 256):
            dst.write(strip, window=rasterio.windows.Window(0, row, size, 256))
        dst.descriptions = ("VV", "VH")
        for band in (1, 2):
            dst.update_tags(band, unit="dB")
    optical = np.full((4, 512, 512), 800, dtype=np.uint16)
    write_raster(folder / "optical.tif", optical, crs=SAR_CRS, transform=from_origin(*origin, 80.0, 80.0), nodata=0,
                 descriptions=["B02", "B03", "B04", "B08"], band_tags=[{"unit": "reflectance_x1e4"}] * 4)
    listing = write_listing(folder, {"sar": {"files": ["sar.tif"]}, "optical": {"files": ["optical.tif"]}, "tiles": {"size": 256}})
    scene_bytes = 2 * size * size * 4

    # Every pixel read from a file, as (file, pixels read, pixels returned): windows and decimated reads.
    reads: list[tuple[str, int, int]] = []
    original = rasterio.io.DatasetReader.read

    def counting_read(self, indexes=None, out=None, window=None, out_shape=None, **kwargs):
        data = original(self, indexes, out=out, window=window, out_shape=out_shape, **kwargs)
        read_px = (int(window.height) * int(window.width)) if window is not None else self.height * self.width
        reads.append((Path(self.name).name, read_px, data.shape[-2] * data.shape[-1]))
        return data

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", counting_read)
    tracemalloc.start()
    try:
        manifest = ScenesReader.index(listing).manifest
        _, index_peak = tracemalloc.get_traced_memory()
        index_reads = list(reads)
        reads.clear()
        tracemalloc.reset_peak()
        sample = load(manifest, manifest.records[len(manifest) // 2])
        _, load_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(manifest) == 256 and sample.sar.shape == (2, 256, 256) and np.isfinite(sample.optical).all()
    # Index: the SAR is read once, decimated (GDAL walks its blocks; Python never holds more than the small result).
    assert [(name, out) for name, _, out in index_reads if name == "sar.tif"] == [("sar.tif", 128 * 128)]
    # Load: the SAR is read as exactly its 256 x 256 window.
    assert [(name, px) for name, px, _ in reads if name == "sar.tif"] == [("sar.tif", 256 * 256)]
    assert index_peak < scene_bytes / 16, f"index peaked at {index_peak / 2**20:.1f} MiB"
    assert load_peak < scene_bytes / 16, f"load peaked at {load_peak / 2**20:.1f} MiB"


def test_listing_keys_are_validated_by_name(tmp_path: Path):
    folder = tmp_path / "scenes"
    basic_scenes(folder)
    base = {"sar": {"files": ["s1_20240601.tif"]}, "optical": {"files": ["s2_20240603.tif"]}}
    cases = [
        ({**base, "tile": {"size": 3}}, r"unknown key\(s\) \['tile'\]"),
        ({**base, "tiles": {"size": -3}}, r"tiles\.size: expected a positive integer"),
        ({**base, "tiles": {"min_valid": 2}}, r"tiles\.min_valid"),
        ({**base, "sar": {"files": ["missing.tif"]}}, r"sar\.files: .*missing\.tif not found"),
        ({**base, "sar": {"files": ["s1_*.tiff"]}}, r"sar\.files: pattern"),
        ({**base, "optical": {"file": ["s2_20240603.tif"]}}, r"optical: unknown key\(s\) \['file'\]"),
        ({**base, "labels": {"lc": {"files": ["s1_20240601.tif"]}}}, r"labels\.lc\.classes: required"),
        ({**base, "labels": {"b": {"files": ["buildings.geojson"], "coverage": "some"}}}, r"labels\.b\.coverage"),
        ({**base, "target": {"crs": "EPSG:99999999"}}, r"target\.crs"),
        ({**base, "split": {"by": "random"}}, r"split\.by"),
        ({**base, "sar_look": "up"}, r"sar_look"),
    ]
    for body, message in cases:
        listing = write_listing(folder, body)
        with pytest.raises(ConfigError, match=message):
            ScenesReader.index(listing)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['tile_sise'\]"):
        ScenesReader.index(write_listing(folder, base), tile_sise=3)


def test_options_override_the_listing(tmp_path: Path):
    listing = basic_scenes(tmp_path / "scenes")
    spec = read_listing(listing, {"tile_size": 16, "tiles": {"stride": 8}, "split": {"seed": 4}})
    assert (spec.tile_size, spec.stride, spec.min_valid, spec.split) == (16, 8, 0.5, {"block_size": 640, "seed": 4})


def test_detection_of_a_listing_a_folder_and_a_scenes_folder(tmp_path: Path):
    listing = basic_scenes(tmp_path / "listed")
    assert detect_reader(listing) is ScenesReader and detect_reader(listing.parent) is ScenesReader
    folder = tmp_path / "plain"
    write_sar(folder / "sar" / "s1.tif")
    write_optical(folder / "optical" / "s2.tif")
    (folder / "labels").mkdir()
    write_geojson(folder / "labels" / "buildings.geojson", building_squares())
    write_gpkg(folder / "labels" / "footprints.shp", building_squares(), crs=OPTICAL_CRS, driver="ESRI Shapefile")
    assert detect_reader(folder) is ScenesReader
    manifest = ScenesReader.index(folder, tile_size=32).manifest
    assert set(manifest.info.layers) == {"buildings", "footprints"} and len(manifest) == 16
    assert manifest.records[0]["sar_path"] == "sar/s1.tif"
    shapefile = mosaic(manifest, manifest.records, "mask", mask_layer="footprints")  # the next zone's Shapefile
    np.testing.assert_array_equal(shapefile[shapefile != 255], (expected_buildings(building_squares()) > 0)[shapefile != 255])
    assert (shapefile == 1).sum() == (expected_buildings(building_squares()) > 0).sum()
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(DataError, match=r"notes\.txt: neither a folder nor a file"):
        detect_reader(other)


def test_cli_indexes_a_listing(tmp_path: Path, capsys):
    from xmodal.cli.main import main

    listing = basic_scenes(tmp_path / "scenes")
    code = main(["data", "index", str(listing), "--out", str(tmp_path / "prepared"), "--option", "tile_size=32", "stride=32", "--no-stats"])
    out = capsys.readouterr().out
    assert code == 0 and "scenes: 16 pairs" in out, out
    assert get_reader(json.loads((tmp_path / "prepared" / "dataset.json").read_text())["reader"]) is ScenesReader


def test_a_user_listing_trains_an_epoch_through_xmodal_run(tmp_path: Path):
    from xmodal.data.prepared import DataSettings, index_folder
    from xmodal.engine.config import build_config
    from xmodal.engine.plain import run_plain

    listing = basic_scenes(tmp_path / "scenes")
    config = build_config({
        "name": "own-scenes",
        "method": "supervised",
        "method_settings": {"input": "sar", "task": "segmentation"},
        "data": {"root": str(listing), "mask_layer": "buildings", "tile_size": 32, "batch_size": 4},
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]},
        "train": {"epochs": 1},
        "run": {"storage": str(tmp_path / "runs"), "panels": 1},
    })
    (run,) = run_plain(config, log=lambda line: None)
    metric = "test/accuracy" if "test/accuracy" in run.metrics else "val/accuracy"
    assert 0.0 <= run.metrics[metric] <= 1.0
    prepared = index_folder(DataSettings(root=str(listing)))
    assert prepared.parent == listing.parent / ".xmodal" and prepared.name.startswith("scenes-")
    assert (prepared / "dataset.json").is_file() and (prepared / "stats.json").is_file()
