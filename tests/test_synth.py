"""Tests of the synthetic paired SAR/optical world: physics, labels, files and determinism."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import rasterio

from xmodal.data.manifest import Manifest, record_extra, record_layers, record_meta
from xmodal.data.readers import LoadOptions, get_reader
from xmodal.data.sample import PairedSample
from xmodal.data.synth import LANDCOVER_CLASSES, WorldConfig, generate_scene, generate_world, region_style
from xmodal.data.synth.classes import BUILT, GRASS, TREES, WATER
from xmodal.data.synth.labels import noisy_landcover
from xmodal.data.synth.sar import render_sar, side_looking_geometry
from xmodal.data.synth.scene import scene_from_boxes
from xmodal.errors import ConfigError

SMALL = dict(tile_size=64, regions=2, scenes_per_region=3)
INCIDENCE = 35.0
PIXEL = 2.0


def _box_scene(height: float, *, size: int = 96, box: tuple[int, int, int, int] = (40, 56, 40, 56), **kwargs):
    row0, row1, col0, col1 = box
    return scene_from_boxes(
        size,
        pixel_size=PIXEL,
        background=GRASS,
        boxes=[(row0, row1, col0, col1, height)],
        roof_sar_offset_db=8.0,
        **kwargs,
    )


def _along_range(image: np.ndarray, look: str, line: int) -> np.ndarray:
    """The profile through ``line`` ordered from near range (sensor side) to far range."""
    if look == "east":
        return image[line]
    if look == "west":
        return image[line, ::-1]
    if look == "south":
        return image[:, line]
    return image[::-1, line]


# ------------------------------------------------------------------------------------ configuration
def test_config_defaults_and_round_trip():
    config = WorldConfig()
    assert (config.regions, config.scenes_per_region, config.tile_size, config.pixel_size) == (6, 40, 128, 2.0)
    assert config.sar_polarisations == ("VV", "VH") and config.sar_look == "east"
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    quad = WorldConfig.from_dict({"sar_polarisations": ["HH", "HV", "VH", "VV"], "optical_bands": "s2"})
    assert quad.sar_polarisations == ("HH", "HV", "VH", "VV")


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"tile_sise": 64}, "tile_sise"),
        ({"looks": 0}, "looks"),
        ({"sar_look": "up"}, "sar_look"),
        ({"sar_polarisations": ["VV", "XX"]}, "sar_polarisations"),
        ({"optical_bands": "rgb"}, "optical_bands"),
        ({"crs": "EPSG:4326"}, "crs"),
        ({"label_confusion_rate": 0.9}, "label_confusion_rate"),
        ({"region_spacing_m": 100.0}, "region_spacing_m"),
        ({"correlated_speckle": "yes"}, "correlated_speckle"),
    ],
)
def test_config_errors_name_the_field(data, named):
    with pytest.raises(ConfigError, match=named):
        WorldConfig.from_dict(data)


# ------------------------------------------------------------------------------------- determinism
def test_scenes_are_deterministic_and_depend_on_the_seed():
    config = WorldConfig(seed=3, **SMALL)
    first, again = generate_scene(config, 1, 2), generate_scene(config, 1, 2)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    other_seed = generate_scene(dataclasses.replace(config, seed=4), 1, 2)
    assert not np.array_equal(first["landcover"], other_seed["landcover"])
    assert not np.allclose(np.nan_to_num(first["sar"]), np.nan_to_num(other_seed["sar"]))
    # A scene does not depend on how many regions or scenes are generated.
    bigger = generate_scene(dataclasses.replace(config, regions=5, scenes_per_region=9), 1, 2)
    np.testing.assert_array_equal(first["sar"], bigger["sar"])


def test_region_styles_differ():
    config = WorldConfig()
    styles = [region_style(config, r) for r in range(config.regions)]
    assert len({s.archetype for s in styles}) == config.regions
    medians = [s.height_median_m for s in styles]
    assert max(medians) > 2 * min(medians)


# ----------------------------------------------------------------------------------- SAR geometry
# Unit vector (row, column) pointing from the scene towards the sensor, per look direction.
TOWARDS_SENSOR = {"east": (0, -1), "west": (0, 1), "north": (1, 0), "south": (-1, 0)}


@pytest.mark.parametrize("look", ["east", "west", "north", "south"])
def test_layover_moves_the_roof_towards_the_sensor(look):
    height = 20.0
    expected_shift = round(height / np.tan(np.deg2rad(INCIDENCE)) / PIXEL)  # 14 px
    scene = _box_scene(height)
    # Only the roof scatters: its image centroid moves by the layover, its energy is kept.
    roof = (scene.building_id > 0).astype(np.float64)[None]
    no_buildings = np.zeros((1, 2))
    image, _ = side_looking_geometry(
        scene.object_height, roof, scene.building_id, no_buildings, no_buildings,
        incidence_deg=INCIDENCE, pixel_size=PIXEL, look=look,
    )
    rows, cols = np.mgrid[0:96, 0:96]
    moved = np.array([np.sum(rows * image[0]), np.sum(cols * image[0])]) / image[0].sum()
    original = np.array([np.sum(rows * roof[0]), np.sum(cols * roof[0])]) / roof[0].sum()
    assert image.sum() == pytest.approx(roof.sum())
    np.testing.assert_allclose(moved - original, np.array(TOWARDS_SENSOR[look]) * expected_shift, atol=0.5)

    # Full model: the brightest return (double bounce) lies just outside the footprint on the
    # sensor side, and the true footprint beyond the displaced roof is dark.
    config = WorldConfig(incidence_deg=INCIDENCE, pixel_size=PIXEL, sar_look=look)
    full = render_sar(scene, config, np.random.default_rng(0))
    profile = _along_range(full.sigma0[0], look, 48)
    footprint = np.flatnonzero(_along_range(scene.building_id, look, 48) > 0)
    assert footprint[0] - 2 <= int(np.argmax(profile)) < footprint[0]
    assert np.all(profile[footprint[2:]] == 0)


def test_layover_with_speckle_displaces_the_bright_band():
    height = 30.0
    shift = round(height / np.tan(np.deg2rad(INCIDENCE)) / PIXEL)  # 21 px
    scene = _box_scene(height, size=128, box=(30, 100, 70, 100))
    image = render_sar(scene, WorldConfig(sar_look="east"), np.random.default_rng(1))
    linear_mean = np.mean(np.power(10.0, image.db[0, 35:95] / 10.0), axis=0)
    layover_band = linear_mean[70 - shift + 2 : 68].mean()
    beyond_roof = linear_mean[100 - shift + 2 : 98].mean()  # inside the true footprint
    background = linear_mean[5:30].mean()
    assert layover_band > 3 * background
    assert beyond_roof < 0.2 * background


@pytest.mark.parametrize("height", [10.0, 25.0])
def test_radar_shadow_behind_the_building(height):
    expected = height * np.tan(np.deg2rad(INCIDENCE)) / PIXEL
    scene = _box_scene(height, size=128, box=(40, 90, 40, 56))
    config = WorldConfig(sar_look="east")
    image = render_sar(scene, config, np.random.default_rng(2))
    profile = image.sigma0[0, 65]
    behind = profile[56:]
    shadow_length = int(np.argmax(behind > 0))
    assert shadow_length == pytest.approx(expected, abs=1)
    assert image.shadow[65, 56 : 56 + shadow_length].all()
    # With speckle, the shadow holds the thermal noise floor only.
    shadow_power = np.power(10.0, image.db[0, 45:85, 57 : 55 + shadow_length] / 10.0).mean()
    assert 10 * np.log10(shadow_power) == pytest.approx(config.noise_floor_db, abs=1.0)


def test_double_bounce_needs_walls_facing_the_sensor():
    square = _box_scene(15.0, orientation_deg=0.0)
    oblique = _box_scene(15.0, orientation_deg=40.0)
    config = WorldConfig(sar_look="east")
    peak_square = render_sar(square, config, np.random.default_rng(0)).sigma0[0].max()
    peak_oblique = render_sar(oblique, config, np.random.default_rng(0)).sigma0[0].max()
    assert peak_square > 10 * peak_oblique


# ------------------------------------------------------------------------------------ SAR sensor
@pytest.mark.parametrize("correlated", [True, False])
def test_speckle_keeps_the_mean_linear_power(correlated):
    config = WorldConfig(looks=4, correlated_speckle=correlated, sar_resolution_m=3.0)
    scene = scene_from_boxes(160, pixel_size=PIXEL, background=TREES, boxes=[])
    image = render_sar(scene, config, np.random.default_rng(5))
    area = (slice(None), slice(10, 150), slice(10, 150))
    truth = image.sigma0[area].mean(axis=(1, 2)) + 10 ** (config.noise_floor_db / 10)
    measured = np.power(10.0, image.db[area] / 10.0).mean(axis=(1, 2))
    np.testing.assert_allclose(measured / truth, 1.0, atol=0.04)
    # It is speckle: the single-pixel spread of an L-look intensity is about 1/sqrt(L) of the mean.
    ratio = np.power(10.0, image.db[0][area[1:]] / 10.0) / truth[0]
    assert ratio.std() == pytest.approx(1 / np.sqrt(config.looks), rel=0.2)


def test_correlated_speckle_is_correlated_over_the_resolution_cell():
    scene = scene_from_boxes(128, pixel_size=PIXEL, background=GRASS, boxes=[])
    lag_correlation = {}
    for correlated in (True, False):
        image = render_sar(scene, WorldConfig(correlated_speckle=correlated), np.random.default_rng(0))
        field = np.power(10.0, image.db[0, 8:120, 8:120] / 10.0)
        field = field - field.mean()
        lag_correlation[correlated] = np.mean(field[:, 1:] * field[:, :-1]) / field.var()
    assert lag_correlation[True] > 0.3
    assert lag_correlation[False] < lag_correlation[True]


# ------------------------------------------------------------------------------ radiometry by class
def test_water_darker_than_built_and_vegetation_red_edge():
    config = WorldConfig(seed=0, tile_size=96, edge_nodata_prob=0.0)
    values: dict[str, list[np.ndarray]] = {"water": [], "built": [], "red": [], "nir": []}
    for region in range(config.regions):
        products = generate_scene(config, region, 0)
        vv, optical, landcover = products["sar"][0], products["optical"], products["landcover"]
        values["water"].append(vv[landcover == WATER])
        values["built"].append(vv[landcover == BUILT])
        vegetation = (landcover == TREES) | (landcover == GRASS)
        values["red"].append(optical[2][vegetation])  # B04
        values["nir"].append(optical[3][vegetation])  # B08
    pooled = {k: np.concatenate(v) for k, v in values.items()}
    assert pooled["water"].size > 500 and pooled["built"].size > 500
    assert pooled["water"].mean() < pooled["built"].mean() - 3.0
    assert pooled["nir"].mean() > 3 * pooled["red"].mean()


# ---------------------------------------------------------------------------------------- labels
def test_noisy_labels_measured_rate_matches_the_configured_rate():
    config = WorldConfig(label_confusion_rate=0.12, label_boundary_shift_px=0.0, label_blob_count=0.0, tile_size=96)
    truth = generate_scene(dataclasses.replace(config, edge_nodata_prob=1.0), 0, 0)["landcover"]
    noisy, rate = noisy_landcover(truth, config, np.random.default_rng(0))
    valid = truth != 255
    assert rate == pytest.approx(0.12, abs=0.01)
    assert rate == pytest.approx(np.mean(noisy[valid] != truth[valid]))
    assert np.all(noisy[~valid] == 255)
    # Every mechanism adds noise on top.
    full = dataclasses.replace(config, label_boundary_shift_px=1.5, label_blob_count=3.0)
    _, full_rate = noisy_landcover(truth, full, np.random.default_rng(0))
    assert full_rate > rate + 0.01
    clean = dataclasses.replace(config, label_confusion_rate=0.0)
    assert noisy_landcover(truth, clean, np.random.default_rng(0))[1] == 0.0


# ----------------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    config = WorldConfig(
        seed=1, edge_nodata_prob=0.5, sar_polarisations=("HH", "HV", "VH", "VV"), optical_bands="s2", **SMALL
    )
    return out, config, generate_world(out, config)


def test_world_files_and_manifest(world):
    out, config, manifest = world
    assert len(manifest) == config.regions * config.scenes_per_region
    loaded = Manifest.load(out)
    assert loaded.records == manifest.records
    info = loaded.info
    assert info.reader == "xmodal" and info.sar_look == "east" and info.tile_size == 64
    assert info.sar_bands.names == ["HH", "HV", "VH", "VV"] and set(info.sar_bands.units) == {"dB"}
    assert len(info.optical_bands) == 13 and info.optical_bands.names[8] == "B8A"
    assert 0 < info.layers["landcover_noisy"].noise_rate < 0.5
    assert info.layers["landcover"].classes == list(LANDCOVER_CLASSES)
    assert json.loads((out / "world.json").read_text())["config"] == config.to_dict()

    for record in loaded.records:
        assert record["split"] == "unassigned"
        layers = list(record_layers(record).values())
        for path in [record["sar_path"], record["optical_path"], *layers, record_extra(record)["dsm"]]:
            with rasterio.open(out / path) as src:
                assert src.crs.to_epsg() == 32631
                assert src.bounds == pytest.approx((record["left"], record["bottom"], record["right"], record["top"]))
                assert src.res == (config.pixel_size, config.pixel_size)
        with rasterio.open(out / record["sar_path"]) as src:
            assert list(src.descriptions) == ["HH", "HV", "VH", "VV"] and src.tags(1)["unit"] == "dB"

    metas = [record_meta(r) for r in loaded.records]
    for i, a in enumerate(metas):
        for b in metas[i + 1 :]:
            assert not a.overlaps(b), (a.tile_id, b.tile_id)


def test_world_tiles_load_as_paired_samples(world):
    out, config, _ = world
    manifest = Manifest.load(out)
    reader = get_reader(manifest.info.reader)
    saw_nodata = False
    for record in manifest.records:
        sample = reader.load(record, manifest.info, manifest.data_root, LoadOptions("buildings", "landcover_noisy"))
        assert isinstance(sample, PairedSample)
        assert sample.sar.shape == (4, 64, 64) and sample.optical.shape == (13, 64, 64)
        valid = sample.valid()
        # SAR is finite everywhere except in the no-data band, which is NaN in both modalities.
        assert np.array_equal(np.isfinite(sample.sar).all(axis=0), valid)
        assert np.isnan(sample.sar[:, ~valid]).all() and np.isnan(sample.optical[:, ~valid]).all()
        assert np.all(sample.mask[~valid] == 255) and np.all(sample.noisy_mask[~valid] == 255)
        assert set(np.unique(sample.mask[valid])) <= {0, 1}
        extra = record_extra(record)
        assert extra["nodata_fraction"] == pytest.approx(1 - valid.mean(), abs=1e-5)
        assert extra["building_fraction"] == pytest.approx(np.mean(sample.mask[valid] == 1), abs=1e-5)
        saw_nodata |= not valid.all()
        assert 0 <= record["scene_label"] < len(manifest.info.scene_classes)
    assert saw_nodata
