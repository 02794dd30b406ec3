"""Scenes and the whole world: generation, tiling on the ground, files and manifest.

Each scene is a pure function of ``(config, region_index, scene_index)``: its random streams come
from ``SeedSequence([seed, region, scene])`` and it is laid out on its own, so scene ``i`` is the
same whatever the number of regions or scenes generated. Separate child streams drive the layout,
the optical image, the SAR image, the labels and the no-data band, so changing e.g. the number of
looks leaves the land cover and the optical image untouched.

Tiles of a region sit side by side on a grid (``region_grid_columns`` wide, no overlap); regions
are ``region_spacing_m`` apart in northing. Neighbouring tiles are independent scenes, so content
does not continue across tile edges.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import Affine

from xmodal.data.bands import BandSet
from xmodal.data.geotiff import write_raster
from xmodal.data.manifest import DatasetInfo, LabelLayer, Manifest, make_record
from xmodal.data.synth.classes import BUILDING_CLASSES, LABEL_NODATA, LANDCOVER_CLASSES, SCENE_CLASSES
from xmodal.data.synth.config import WorldConfig
from xmodal.data.synth.labels import noisy_landcover, scene_class
from xmodal.data.synth.optical import OPTICAL_BAND_NAMES, render_optical
from xmodal.data.synth.sar import render_sar
from xmodal.data.synth.scene import build_scene
from xmodal.data.synth.style import RegionStyle, region_style
from xmodal.progress import track


_SCENE_TAG = 0x5CE1E
WORLD_FILE = "world.json"
WORLD_VERSION = 1


def scene_streams(config: WorldConfig, region_index: int, scene_index: int) -> dict[str, np.random.Generator]:
    """Independent random streams of one scene, keyed by purpose."""
    root = np.random.SeedSequence([config.seed, _SCENE_TAG, region_index, scene_index])
    names = ("layout", "optical", "sar", "labels", "nodata")
    return {name: np.random.default_rng(child) for name, child in zip(names, root.spawn(len(names)))}


def generate_scene(config: WorldConfig, region_index: int, scene_index: int) -> dict[str, np.ndarray]:
    """Simulate one tile without writing anything.

    Returns:
        ``sar`` (P x H x W dB float32, NaN where no data), ``optical`` (B x H x W reflectance
        float32, NaN where no data), ``buildings`` (H x W uint8 0/1), ``landcover`` and
        ``landcover_noisy`` (H x W uint8), all labels 255 where no data; ``dsm`` (2 x H x W float32:
        surface elevation and height above ground, metres); ``valid`` (H x W bool); and 0-d arrays
        ``scene_label``, ``noise_rate``, ``building_fraction`` and ``nodata_fraction``.
    """
    style = region_style(config, region_index)
    streams = scene_streams(config, region_index, scene_index)
    margin = config.scene_margin_px
    scene = build_scene(config, style, streams["layout"], config.tile_size + 2 * margin)
    optical = render_optical(scene, config, streams["optical"])
    sar = render_sar(scene, config, streams["sar"])

    crop = (slice(margin, margin + config.tile_size), slice(margin, margin + config.tile_size))
    valid = _valid_area(config, streams["nodata"])
    sar_db = np.where(valid, sar.db[(slice(None), *crop)], np.nan).astype(np.float32)
    optical = np.where(valid, optical[(slice(None), *crop)], np.nan).astype(np.float32)
    building_id = scene.building_id[crop]
    landcover = np.where(valid, scene.landcover[crop], LABEL_NODATA).astype(np.uint8)
    buildings = np.where(valid, building_id > 0, LABEL_NODATA).astype(np.uint8)
    dsm = np.stack([scene.dsm[crop], scene.object_height[crop]])
    dsm = np.where(valid, dsm, np.nan).astype(np.float32)
    noisy, noise_rate = noisy_landcover(landcover, config, streams["labels"])
    label = scene_class(landcover, np.where(valid, building_id, 0), scene.object_height[crop], config.pixel_size)
    n_valid = max(int(valid.sum()), 1)
    return {
        "sar": sar_db,
        "optical": optical,
        "buildings": buildings,
        "landcover": landcover,
        "landcover_noisy": noisy,
        "dsm": dsm,
        "valid": valid,
        "scene_label": np.asarray(label, dtype=np.int64),
        "noise_rate": np.asarray(noise_rate),
        "building_fraction": np.asarray(float(np.sum(buildings == 1)) / n_valid),
        "nodata_fraction": np.asarray(1.0 - valid.mean()),
    }


def _valid_area(config: WorldConfig, rng: np.random.Generator) -> np.ndarray:
    """Valid pixels of a tile: all, or all but a band along one edge (swath or strip edge)."""
    size = config.tile_size
    valid = np.ones((size, size), dtype=bool)
    if rng.random() < config.edge_nodata_prob:
        width = int(rng.integers(size // 10, size // 2 + 1))
        edge = int(rng.integers(4))
        if edge == 0:
            valid[:width] = False
        elif edge == 1:
            valid[-width:] = False
        elif edge == 2:
            valid[:, :width] = False
        else:
            valid[:, -width:] = False
    return valid


def tile_bounds(config: WorldConfig, region_index: int, scene_index: int) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a tile in ``config.crs``."""
    extent = config.tile_extent_m
    column, row = scene_index % config.region_grid_columns, scene_index // config.region_grid_columns
    left = config.origin[0] + column * extent
    top = config.origin[1] + region_index * config.region_spacing_m - row * extent
    return left, top - extent, left + extent, top


def dataset_info(config: WorldConfig, noise_rate: float | None) -> DatasetInfo:
    """The :class:`DatasetInfo` of a world generated with ``config``."""
    return DatasetInfo(
        name="synthetic",
        reader="xmodal",
        sar_bands=BandSet.of("sar", list(config.sar_polarisations), "dB"),
        optical_bands=BandSet.of("optical", list(OPTICAL_BAND_NAMES[config.optical_bands]), "reflectance"),
        layers={
            "buildings": LabelLayer(list(BUILDING_CLASSES), description="true building footprints (not their layover)"),
            "landcover": LabelLayer(list(LANDCOVER_CLASSES), description="true land cover (Dynamic World classes)"),
            "landcover_noisy": LabelLayer(
                list(LANDCOVER_CLASSES),
                noise_rate=noise_rate,
                description=(
                    f"land cover with boundary shifts (~{config.label_boundary_shift_px} px), class confusions "
                    f"({config.label_confusion_rate:.0%} of pixels) and ~{config.label_blob_count} blob error(s) "
                    "per tile; "
                    "noise_rate is measured"
                ),
            ),
        },
        scene_classes=list(SCENE_CLASSES),
        tile_size=config.tile_size,
        pixel_size=config.pixel_size,
        data_root=".",
        sar_look=config.sar_look,
        extra={
            "generator": "xmodal.data.synth",
            "incidence_deg": config.incidence_deg,
            "looks": config.looks,
            "sar_resolution_m": config.sar_resolution_m,
            "noise_floor_db": config.noise_floor_db,
            "world_file": WORLD_FILE,
        },
    )


def generate_world(out_dir: str | Path, config: WorldConfig) -> Manifest:
    """Generate every tile of the world into ``out_dir`` and save its manifest.

    Writes ``<out>/<region>/<tile_id>/{sar,optical,buildings,landcover,landcover_noisy,dsm}.tif``,
    ``dataset.json``, ``manifest.parquet`` and ``world.json`` (config and region styles).

    Returns:
        The saved manifest (``split`` left ``"unassigned"``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    styles = [region_style(config, r) for r in range(config.regions)]
    records: list[dict[str, Any]] = []
    differing = 0.0
    valid_total = 0
    started = time.perf_counter()
    scenes = [(r, style, i) for r, style in enumerate(styles) for i in range(config.scenes_per_region)]
    for region_index, style, scene_index in track(scenes, "synthetic world", unit="tile"):
        products = generate_scene(config, region_index, scene_index)
        records.append(_write_tile(out, config, style, region_index, scene_index, products))
        n_valid = int(products["valid"].sum())
        differing += float(products["noise_rate"]) * n_valid
        valid_total += n_valid
    elapsed = time.perf_counter() - started
    noise_rate = differing / valid_total if valid_total else 0.0

    manifest = Manifest(info=dataset_info(config, noise_rate), records=records)
    manifest.save(out)
    world = {
        "version": WORLD_VERSION,
        "config": config.to_dict(),
        "regions": [s.to_dict() for s in styles],
        "landcover_classes": list(LANDCOVER_CLASSES),
        "scene_classes": list(SCENE_CLASSES),
        "conventions": {
            "image_axes": "north-up; column x grows east, row y grows south",
            "sar_look": (
                f"radar beam points {config.sar_look}; the sensor sits on the opposite side; layover moves objects "
                "towards the sensor by h/tan(incidence)/pixel_size px; radar shadow falls away from it, "
                "h*tan(incidence)/pixel_size px long"
            ),
            "dsm_bands": ["dsm (terrain + objects, m)", "height above ground (m)"],
        },
        "noise_rate": noise_rate,
        "generation_seconds": elapsed,
        "seconds_per_scene": elapsed / max(len(records), 1),
    }
    (out / WORLD_FILE).write_text(json.dumps(world, indent=2))
    return manifest


def _write_tile(
    out: Path,
    config: WorldConfig,
    style: RegionStyle,
    region_index: int,
    scene_index: int,
    products: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Write one tile's files and return its manifest record."""
    tile_id = f"r{region_index:02d}_t{scene_index:04d}"
    folder = Path(style.name) / tile_id
    bounds = tile_bounds(config, region_index, scene_index)
    transform = Affine(config.pixel_size, 0.0, bounds[0], 0.0, -config.pixel_size, bounds[3])
    common = {"crs": config.crs, "transform": transform}
    sar_names = list(config.sar_polarisations)
    optical_names = list(OPTICAL_BAND_NAMES[config.optical_bands])
    files = {
        "sar": (products["sar"], np.nan, sar_names, [{"unit": "dB", "polarisation": p} for p in sar_names]),
        "optical": (products["optical"], np.nan, optical_names, [{"unit": "reflectance"} for _ in optical_names]),
        "dsm": (products["dsm"], np.nan, ["dsm", "height_above_ground"], [{"unit": "m"}, {"unit": "m"}]),
        "buildings": (products["buildings"], LABEL_NODATA, ["buildings"], [{"classes": ",".join(BUILDING_CLASSES)}]),
        "landcover": (products["landcover"], LABEL_NODATA, ["landcover"], [{"classes": ",".join(LANDCOVER_CLASSES)}]),
        "landcover_noisy": (
            products["landcover_noisy"],
            LABEL_NODATA,
            ["landcover_noisy"],
            [{"classes": ",".join(LANDCOVER_CLASSES), "noise_rate": f"{float(products['noise_rate']):.4f}"}],
        ),
    }
    paths: dict[str, str] = {}
    for name, (data, nodata, descriptions, band_tags) in files.items():
        relative = folder / f"{name}.tif"
        write_raster(
            out / relative,
            data,
            nodata=nodata,
            descriptions=descriptions,
            band_tags=band_tags,
            tags={"xmodal_layer": name, "tile_id": tile_id, "region": style.name},
            compress="deflate" if data.dtype == np.uint8 else None,
            **common,
        )
        paths[name] = relative.as_posix()
    return make_record(
        tile_id=tile_id,
        region=style.name,
        crs=config.crs,
        bounds=bounds,
        sar_path=paths["sar"],
        optical_path=paths["optical"],
        scene_label=int(products["scene_label"]),
        layers={k: paths[k] for k in ("buildings", "landcover", "landcover_noisy")},
        extra={
            "dsm": paths["dsm"],
            "noise_rate": round(float(products["noise_rate"]), 6),
            "building_fraction": round(float(products["building_fraction"]), 6),
            "nodata_fraction": round(float(products["nodata_fraction"]), 6),
            "scene_index": scene_index,
        },
    )
