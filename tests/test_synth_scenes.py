"""Tests of a user's own scenes generated from the synthetic world (``xmodal data synth-scenes``):
formats, grids, footprints, labels against the world's truth, determinism and the command."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import yaml
from rasterio import features
from rasterio.crs import CRS
from rasterio.warp import transform_geom

from xmodal.cli.main import main
from xmodal.data.synth import scenes as synth_scenes_module
from xmodal.data.synth import simulate_scene, synth_scenes
from xmodal.errors import ConfigError

SEED = 3
SIZE = 128  # the smallest scene: a few seconds for the whole file
SCENES = 2


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> synth_scenes_module.SyntheticScenes:
    return synth_scenes(tmp_path_factory.mktemp("scenes"), seed=SEED, size=SIZE, scenes=SCENES)


def _all_files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _footprint(path: Path, crs: str) -> shapely.Polygon:
    """A raster's footprint as a polygon in ``crs`` (edges densified, so a rotated grid stays exact)."""
    with rasterio.open(path) as src:
        left, bottom, right, top = src.bounds
        ring = shapely.segmentize(shapely.box(left, bottom, right, top), (right - left) / 20)
        return shapely.geometry.shape(transform_geom(src.crs, crs, shapely.geometry.mapping(ring)))


def _rasterise_labels(path: Path, sar_path: Path) -> np.ndarray:
    """The GeoJSON's polygons burnt onto the SAR scene's grid, as a user's reader would."""
    collection = json.loads(path.read_text())
    with rasterio.open(sar_path) as src:
        geometries = transform_geom("EPSG:4326", src.crs, [f["geometry"] for f in collection["features"]])
        return features.rasterize(
            [(g, 1) for g in geometries], out_shape=(src.height, src.width), transform=src.transform, fill=0
        ).astype(bool)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


# ------------------------------------------------------------------------------------------ formats
def test_sar_scenes_are_float32_db_in_utm_32_at_2_m_with_a_swath_edge(written):
    for relative in (*written.sar, written.new_sar):
        with rasterio.open(written.out / relative) as src:
            assert src.crs == CRS.from_epsg(32632)
            assert src.res == (2.0, 2.0) and (src.height, src.width) == (SIZE, SIZE)
            assert src.dtypes == ("float32", "float32")
            assert src.descriptions == ("VV", "VH")
            assert [src.tags(band)["unit"] for band in (1, 2)] == ["dB", "dB"]
            assert src.nodata is not None and math.isnan(src.nodata)
            data = src.read()
        missing = np.isnan(data).any(axis=0)
        # A band a few pixels wide along the east (far-range) edge, and nothing else.
        assert 0 < missing.mean() < 0.05, relative
        assert missing[:, -1].all() and not missing[:, : SIZE * 3 // 4].any(), relative
        assert (np.diff(missing.astype(int), axis=1) >= 0).all(), "no-data must run to the edge"
        assert np.isfinite(data[:, ~missing]).all()
        assert -30.0 < float(np.median(data[:, ~missing])) < 0.0


def test_optical_scenes_are_uint16_reflectance_in_utm_33_at_4_m(written):
    for relative in written.optical:
        with rasterio.open(written.out / relative) as src:
            assert src.crs == CRS.from_epsg(32633)
            assert src.res == (4.0, 4.0) and (src.height, src.width) == (SIZE // 2, SIZE // 2)
            assert set(src.dtypes) == {"uint16"}
            assert src.descriptions == ("B02", "B03", "B04", "B08")
            assert {src.tags(band)["unit"] for band in range(1, src.count + 1)} == {"reflectance_x1e4"}
            assert src.nodata == 0
            data = src.read()
        measured = (data > 0).all(axis=0)
        assert measured.mean() > 0.95  # the world covers the whole footprint
        assert not ((data == 0).any(axis=0) & measured).any()
        assert 100 < float(np.median(data[:, measured])) < 5000  # reflectance 0.01 .. 0.5


def test_scenes_yaml_lists_the_files_and_says_what_wrote_it(written):
    text = (written.out / "scenes.yaml").read_text()
    assert text.startswith("# Written by `xmodal data synth-scenes OUT --seed 3 --size 128 --scenes 2")
    listed = yaml.safe_load(text)
    assert listed == {
        "sar": {"files": ["sar/scene_00.tif", "sar/scene_01.tif"]},
        "optical": {"files": ["optical/scene_00.tif", "optical/scene_01.tif"]},
        "labels": {"buildings": {"files": ["labels/buildings.geojson"], "classes": ["background", "building"]}},
    }
    for relative in (*listed["sar"]["files"], *listed["optical"]["files"], *listed["labels"]["buildings"]["files"]):
        assert (written.out / relative).is_file()


# ----------------------------------------------------------------------------------------- geometry
def test_each_optical_scene_overlaps_its_sar_scene_partly_and_no_other(written):
    sar = [_footprint(written.out / f, "EPSG:32632") for f in written.sar]
    optical = [_footprint(written.out / f, "EPSG:32632") for f in written.optical]
    for k, optical_footprint in enumerate(optical):
        for j, sar_footprint in enumerate(sar):
            share = optical_footprint.intersection(sar_footprint).area / sar_footprint.area
            if j == k:
                assert 0.5 < share < 0.95, share  # partly: moved 20 % east and 10 % south, rotated
            else:
                assert share == 0.0
    held_out = _footprint(written.out / written.new_sar, "EPSG:32632")
    assert not any(held_out.intersects(footprint) for footprint in (*sar, *optical))


def test_scenes_lie_near_12_deg_east_48_deg_north(written):
    for relative in (*written.sar, *written.optical, written.new_sar):
        lon_lat = _footprint(written.out / relative, "EPSG:4326")
        left, bottom, right, top = lon_lat.bounds
        assert 11.5 < left < right < 12.5 and 47.5 < bottom < top < 48.5, (relative, lon_lat.bounds)


# ------------------------------------------------------------------------------------------- labels
def test_geojson_is_rfc_7946_lon_lat(written):
    for relative in (written.labels, written.new_labels):
        collection = json.loads((written.out / relative).read_text())
        assert collection["type"] == "FeatureCollection" and "crs" not in collection
        polygons = [shapely.geometry.shape(f["geometry"]) for f in collection["features"]]
        assert polygons and all(p.geom_type == "Polygon" and p.is_valid for p in polygons)
        # Right-hand rule: exterior rings counter-clockwise, holes clockwise.
        assert all(p.exterior.is_ccw and not any(h.is_ccw for h in p.interiors) for p in polygons)
        left, bottom, right, top = shapely.total_bounds(polygons)
        assert 11.5 < left < right < 12.5 and 47.5 < bottom < top < 48.5


def test_labels_rasterised_onto_the_sar_grid_match_the_world_buildings(written):
    pairs = [(k, written.labels, written.sar[k]) for k in range(SCENES)] + [("new", written.new_labels, written.new_sar)]
    for index, labels, sar in pairs:
        truth = simulate_scene(SEED, SIZE, index).buildings
        burnt = _rasterise_labels(written.out / labels, written.out / sar)
        assert truth.mean() > 0.01, "a scene without buildings tests nothing"
        assert _iou(burnt, truth) > 0.99, index


def test_optical_file_is_the_world_image_reprojected(written):
    products = simulate_scene(SEED, SIZE, 0)
    with rasterio.open(written.out / written.optical[0]) as src:
        stored = src.read().astype(np.float64) / 1e4
    assert np.allclose(stored, products.optical, atol=1e-4)


# ------------------------------------------------------------------------------------- determinism
def test_the_same_seed_writes_identical_files_and_a_scene_does_not_depend_on_the_count(written, tmp_path):
    again = synth_scenes(tmp_path / "again", seed=SEED, size=SIZE, scenes=SCENES)
    assert _all_files(again.out) == _all_files(written.out)
    fewer = _all_files(synth_scenes(tmp_path / "fewer", seed=SEED, size=SIZE, scenes=1).out)
    first = _all_files(written.out)
    for relative in ("sar/scene_00.tif", "optical/scene_00.tif", "new/scene_new.tif", "new/buildings.geojson"):
        assert fewer[relative] == first[relative], relative
    other = _all_files(synth_scenes(tmp_path / "other", seed=SEED + 1, size=SIZE, scenes=1).out)
    assert other["sar/scene_00.tif"] != first["sar/scene_00.tif"]


def test_a_ground_larger_than_a_block_is_built_in_blocks(monkeypatch):
    whole = simulate_scene(SEED, SIZE, 0)
    monkeypatch.setattr(synth_scenes_module, "BLOCK_PX", 64)
    blocks = simulate_scene(SEED, SIZE, 0)
    assert blocks.sar_db.shape == whole.sar_db.shape and blocks.optical.shape == whole.optical.shape
    assert np.array_equal(np.isnan(blocks.sar_db), np.isnan(whole.sar_db))  # the swath edge is the scene's
    assert 0.01 < blocks.buildings.mean() < 0.6
    assert not np.array_equal(blocks.buildings, whole.buildings)  # other grounds, same style


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 200}, "size=200; expected a multiple of 16"),
        ({"size": 64}, "size=64; expected an integer in [128, 8192]"),
        ({"scenes": 0}, "scenes=0; expected an integer in [1, 20]"),
        ({"seed": -1}, "seed=-1; expected an integer >= 0"),
        ({"pixel_size": 0.0}, "pixel_size=0.0; expected a number of metres in [0.5, 30]"),
    ],
)
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        synth_scenes(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ command
def test_command_writes_the_scenes(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "synth-scenes", str(out), "--seed", "1", "--size", "128", "--scenes", "1"]) == 0
    assert "wrote 1 SAR/optical scene pair (128 px, EPSG:32632 at 2 m; EPSG:32633 at 4 m)" in capsys.readouterr().out
    for relative in ("sar/scene_00.tif", "optical/scene_00.tif", "labels/buildings.geojson", "scenes.yaml",
                     "new/scene_new.tif", "new/buildings.geojson"):
        assert (out / relative).is_file(), relative
    assert main(["data", "synth-scenes", str(tmp_path / "bad"), "--size", "200"]) == 2
    assert "xmodal: error: synth-scenes: size=200; expected a multiple of 16" in capsys.readouterr().err
