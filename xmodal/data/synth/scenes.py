"""A user's own scenes, in the formats real ones come in, generated from the synthetic world.

:func:`synth_scenes` writes what the scenes reader and ``xmodal predict`` read: whole SAR and
optical scenes in two different UTM zones and resolutions, building footprints as GeoJSON in
lon/lat, a ``scenes.yaml`` listing them, and a held-out SAR scene of other ground with its own
footprints::

    OUT/sar/scene_00.tif          VV, VH in dB (float32, NaN no-data), EPSG:32632, 2 m (pixel_size)
    OUT/optical/scene_00.tif      B02, B03, B04, B08 as reflectance x 1e4 (uint16, 0 no-data), EPSG:32633, 4 m
    OUT/labels/buildings.geojson  building polygons, WGS 84 lon/lat (RFC 7946)
    OUT/scenes.yaml               the three lists above
    OUT/new/scene_new.tif         a held-out SAR scene of other ground
    OUT/new/buildings.geojson     its building polygons (to score a prediction)

Nothing here simulates anything itself: the ground, the SAR and the optical image come from the
world's own :func:`~xmodal.data.synth.scene.build_scene`, :func:`~xmodal.data.synth.sar.render_sar`
and :func:`~xmodal.data.synth.optical.render_optical` with the world's default physics, on one
grid in the SAR's CRS at the SAR's pixel size. Region 0 of the seed's world gives the style (urban
form, vegetation, water) of every scene. The world's objects keep their sizes in metres whatever
the pixel: the default 2 m is the world's own scale (a Capella-like strip with a 4 m optical
image); at ``pixel_size=10`` (Sentinel-1 GRD spacing) most buildings are one or two pixels, as
they are to Sentinel-1, and the footprint file grows to ~100,000 specks per 10 km scene. Geometry:

* Each scene lies near 12 deg E, 48 deg N, on the border of UTM zones 32 and 33, so both CRSs are
  valid there; training scenes follow one another southwards, ``1.5`` scene widths apart (their
  grounds never touch), and the held-out scene lies the same distance north of the first.
* The optical footprint is the SAR footprint moved 20 % east and 10 % south, then laid on a grid
  of the other zone (rotated about 4.5 degrees from the SAR grid there): the pair overlaps only
  partly, as real pairs do. The optical image is the world's image over the union of both
  footprints, reprojected onto that grid with bilinear resampling.
* A band of NaN a few pixels wide, slanted like a swath edge, runs along the SAR scene's far-range
  (east, the radar looks east) edge.
* The ground of a scene is built in square blocks of at most :data:`BLOCK_PX` pixels (each with a
  margin so layover and shadows cross block edges), so a large ``size`` needs memory for a block
  at a time plus the output arrays. Like the world's neighbouring tiles, neighbouring blocks are
  independent grounds: streets and fields do not continue across a block edge. The default size
  fits in one block.

Every scene is a pure function of ``(seed, size, pixel_size, index)``: the same arguments give identical
files, and training scene ``k`` is the same whatever the number of scenes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rasterio import features
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import reproject, transform, transform_bounds

from xmodal.data.geotiff import write_raster
from xmodal.data.synth.classes import BUILDING_CLASSES
from xmodal.data.synth.config import WorldConfig
from xmodal.data.synth.optical import OPTICAL_BAND_NAMES, render_optical
from xmodal.data.synth.sar import render_sar
from xmodal.data.synth.scene import build_scene
from xmodal.data.synth.style import RegionStyle, region_style
from xmodal.errors import ConfigError
from xmodal.progress import track

SAR_CRS = "EPSG:32632"  # UTM zone 32N (6-12 deg E)
OPTICAL_CRS = "EPSG:32633"  # UTM zone 33N (12-18 deg E)
LABELS_CRS = "EPSG:4326"  # RFC 7946: GeoJSON is WGS 84 lon/lat, without a crs member
DEFAULT_PIXEL_M = 2.0  # SAR pixel (a Capella-like strip; the world's buildings are drawn for it); the optical pixel is OPTICAL_PIXEL_FACTOR times coarser
OPTICAL_PIXEL_FACTOR = 2
PIXEL_RANGE_M = (0.5, 30.0)
# Centre of the first SAR scene: just west of 12 deg E, the border of zones 32 and 33.
FIRST_CENTRE_LONLAT = (11.93, 48.0)
# Optical footprint = SAR footprint moved by these shares of the scene width (east, south).
OPTICAL_SHIFT = (0.2, 0.1)
# Distance between the top edges of consecutive scenes, in scene widths (> 1: grounds never touch).
SCENE_STRIDE = 1.5
BLOCK_PX = 2048
# Simulated beyond each block so layover (a 90 m roof lies over 129 m at 35 deg) and optical
# shadows (90 m at 45 deg sun elevation) reach across its edges.
BLOCK_MARGIN_M = 160.0
# Ground simulated beyond the union of the footprints, so bilinear resampling has neighbours.
GROUND_PAD_PX = 2
# Swath-edge no-data band: width at the top and bottom rows, drawn in this share of the width.
SWATH_EDGE_SHARE = (0.002, 0.02)
REGION_INDEX = 0
DEFAULT_SIZE = 1024
DEFAULT_SCENES = 1
MIN_SIZE, MAX_SIZE = 128, 8192
MAX_SCENES = 20
HELD_OUT = "new"
OPTICAL_NODATA = 0
COORDINATE_DECIMALS = 7  # 1e-7 deg is about 1 cm: vertices stay on the pixel edges
_SCENES_TAG = 0x5CE2E5
_HELD_OUT_INDEX = 1_000_000  # stream key of the held-out scene, never a training index
_STREAMS = ("layout", "optical", "sar")
_SWATH_EDGE_KEY = 0xED6E  # the swath edge's stream: four keys where a block's have five, never the same


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: CRS, top-left corner, pixel size and shape."""

    crs: str
    left: float
    top: float
    pixel_size: float
    height: int
    width: int

    @property
    def transform(self) -> Affine:
        return Affine(self.pixel_size, 0.0, self.left, 0.0, -self.pixel_size, self.top)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs``."""
        return (
            self.left,
            self.top - self.height * self.pixel_size,
            self.left + self.width * self.pixel_size,
            self.top,
        )


@dataclass(frozen=True)
class SceneLayout:
    """Where one scene lies: its SAR grid, its optical grid (none for the held-out scene) and the
    simulated ground, a grid in the SAR's CRS and pixel size covering both footprints.

    Attributes:
        sar: The SAR scene's grid.
        optical: The optical scene's grid, or ``None``.
        ground: The simulated ground's grid.
        sar_offset: (row, column) of the SAR grid's top-left pixel on the ground grid.
    """

    sar: Grid
    optical: Grid | None
    ground: Grid
    sar_offset: tuple[int, int]

    def sar_window(self) -> tuple[slice, slice]:
        """The SAR scene's rows and columns on the ground grid."""
        row, col = self.sar_offset
        return slice(row, row + self.sar.height), slice(col, col + self.sar.width)


@dataclass
class SceneProducts:
    """One scene simulated on its grids, nothing written.

    Attributes:
        layout: Where the scene lies.
        style: The region style of its ground.
        sar_db: P x H x W float32 dB on the SAR grid (``layout.sar``), NaN in the swath-edge band.
        optical: B x h x w float32 reflectance on the optical grid, NaN where the ground does not
            reach; ``None`` for the held-out scene.
        buildings: H x W bool building footprints on the SAR grid (the truth the labels encode).
        ground_buildings: Building footprints on the whole ground grid (what is vectorised).
        polarisations: SAR band names in file order.
        optical_bands: Optical band names in file order.
    """

    layout: SceneLayout
    style: RegionStyle
    sar_db: np.ndarray
    optical: np.ndarray | None
    buildings: np.ndarray
    ground_buildings: np.ndarray
    polarisations: tuple[str, ...]
    optical_bands: tuple[str, ...]


@dataclass(frozen=True)
class SyntheticScenes:
    """What :func:`synth_scenes` wrote (paths relative to ``out``).

    Attributes:
        out: The output folder.
        sar: SAR scene files.
        optical: Optical scene files.
        labels: Building GeoJSON of the training scenes.
        config: ``scenes.yaml``.
        new_sar: Held-out SAR scene.
        new_labels: Its building GeoJSON.
        buildings: Building polygons in ``labels``.
        new_buildings: Building polygons in ``new_labels``.
        style: Name of the region style of every scene.
        size: Side of each SAR scene in pixels.
        pixel_size: SAR pixel size in metres (the optical one is OPTICAL_PIXEL_FACTOR times that).
        seconds: Wall time of the whole generation.
    """

    out: Path
    sar: list[str]
    optical: list[str]
    labels: str
    config: str
    new_sar: str
    new_labels: str
    buildings: int
    new_buildings: int
    style: str
    size: int
    pixel_size: float
    seconds: float

    def summary(self) -> str:
        """One paragraph for the console: what was written where."""
        pairs = "pair" if len(self.sar) == 1 else "pairs"
        return (
            f"wrote {len(self.sar)} SAR/optical scene {pairs} ({self.size} px, {SAR_CRS} at {self.pixel_size:g} m; "
            f"{OPTICAL_CRS} at {self.pixel_size * OPTICAL_PIXEL_FACTOR:g} m), {self.buildings} building polygons "
            "and a held-out scene "
            f"({self.new_sar}, {self.new_buildings} polygons) of style {self.style} to {self.out} "
            f"in {self.seconds:.1f} s; the list is {self.out / self.config}"
        )


# ------------------------------------------------------------------------------------------ layout
def world_config(seed: int, pixel_size: float = DEFAULT_PIXEL_M) -> WorldConfig:
    """The world settings of every generated scene: the world's defaults on the SAR grid's pixel and CRS."""
    return WorldConfig(seed=seed, pixel_size=float(pixel_size), crs=SAR_CRS)


def scene_layout(size: int, index: int | str, pixel_size: float = DEFAULT_PIXEL_M) -> SceneLayout:
    """Grids of training scene ``index`` (0, 1, ...) or of the held-out scene (``"new"``).

    Args:
        size: Side of the SAR scene in pixels.
        index: Training scene number, or :data:`HELD_OUT`.
        pixel_size: SAR pixel size in metres.
    """
    sar_pixel, optical_pixel = float(pixel_size), float(pixel_size) * OPTICAL_PIXEL_FACTOR
    extent = size * sar_pixel
    held_out = index == HELD_OUT
    (first_x,), (first_y,) = transform(LABELS_CRS, SAR_CRS, [FIRST_CENTRE_LONLAT[0]], [FIRST_CENTRE_LONLAT[1]])
    # Training scenes go south one stride each; the held-out scene lies one stride north.
    centre_y = first_y + SCENE_STRIDE * extent * (1 if held_out else -int(index))
    sar = Grid(
        SAR_CRS, _snap(first_x - extent / 2, sar_pixel), _snap(centre_y + extent / 2, sar_pixel), sar_pixel, size, size
    )
    if held_out:
        ground = _pad(sar, GROUND_PAD_PX)
        return SceneLayout(sar=sar, optical=None, ground=ground, sar_offset=(GROUND_PAD_PX, GROUND_PAD_PX))

    # Optical: the SAR footprint moved east and south, on the other zone's grid at its own pixel size.
    (opt_x,), (opt_y,) = transform(
        SAR_CRS, OPTICAL_CRS, [first_x + OPTICAL_SHIFT[0] * extent], [centre_y - OPTICAL_SHIFT[1] * extent]
    )
    optical_px = math.ceil(extent / optical_pixel)
    half = optical_px * optical_pixel / 2
    optical = Grid(
        OPTICAL_CRS, _snap(opt_x - half, optical_pixel), _snap(opt_y + half, optical_pixel), optical_pixel,
        optical_px, optical_px,
    )
    # Ground: the union of the SAR footprint and the optical one as seen in the SAR's CRS.
    o_left, o_bottom, o_right, o_top = transform_bounds(OPTICAL_CRS, SAR_CRS, *optical.bounds, densify_pts=21)
    s_left, s_bottom, s_right, s_top = sar.bounds
    pad = GROUND_PAD_PX * sar_pixel
    cols_west = math.ceil(max(0.0, s_left - o_left + pad) / sar_pixel)
    rows_north = math.ceil(max(0.0, o_top - s_top + pad) / sar_pixel)
    cols_east = math.ceil(max(0.0, o_right - s_right + pad) / sar_pixel)
    rows_south = math.ceil(max(0.0, s_bottom - o_bottom + pad) / sar_pixel)
    ground = Grid(
        SAR_CRS,
        sar.left - cols_west * sar_pixel,
        sar.top + rows_north * sar_pixel,
        sar_pixel,
        size + rows_north + rows_south,
        size + cols_west + cols_east,
    )
    return SceneLayout(sar=sar, optical=optical, ground=ground, sar_offset=(rows_north, cols_west))


def _snap(value: float, step: float) -> float:
    return round(value / step) * step


def _pad(grid: Grid, pixels: int) -> Grid:
    step = pixels * grid.pixel_size
    return Grid(grid.crs, grid.left - step, grid.top + step, grid.pixel_size, grid.height + 2 * pixels, grid.width + 2 * pixels)


# -------------------------------------------------------------------------------------- simulation
def simulate_scene(seed: int, size: int, index: int | str, pixel_size: float = DEFAULT_PIXEL_M) -> SceneProducts:
    """Simulate one scene on its grids without writing anything.

    Args:
        seed: World seed (region 0 of this world gives the style).
        size: Side of the SAR scene in pixels.
        index: Training scene number (0, 1, ...) or :data:`HELD_OUT`.
        pixel_size: SAR pixel size in metres.

    Raises:
        ConfigError: ``seed``, ``size``, ``index`` or ``pixel_size`` is out of range.
    """
    _check_int("seed", seed, 0, None)
    _check_size(size)
    _check_pixel_size(pixel_size)
    if index != HELD_OUT:
        _check_int("scene index", index, 0, MAX_SCENES - 1)
    config = world_config(seed, pixel_size)
    style = region_style(config, REGION_INDEX)
    layout = scene_layout(size, index, pixel_size)
    key = _HELD_OUT_INDEX if index == HELD_OUT else int(index)
    sar_ground, optical_ground, buildings_ground = _simulate_ground(
        config, style, key, layout.ground, with_optical=layout.optical is not None
    )

    rows, cols = layout.sar_window()
    sar_db = sar_ground[:, rows, cols].copy()
    edge_rng = np.random.default_rng(np.random.SeedSequence([seed, _SCENES_TAG, key, _SWATH_EDGE_KEY]))
    sar_db[:, ~_swath_valid(size, edge_rng)] = np.nan

    optical = None
    if layout.optical is not None and optical_ground is not None:
        optical = np.full((len(optical_ground), layout.optical.height, layout.optical.width), np.nan, dtype=np.float32)
        reproject(
            source=optical_ground,
            destination=optical,
            src_transform=layout.ground.transform,
            src_crs=layout.ground.crs,
            dst_transform=layout.optical.transform,
            dst_crs=layout.optical.crs,
            dst_nodata=np.nan,
            resampling=Resampling.bilinear,
        )
    return SceneProducts(
        layout=layout,
        style=style,
        sar_db=sar_db.astype(np.float32),
        optical=optical,
        buildings=buildings_ground[rows, cols].copy(),
        ground_buildings=buildings_ground,
        polarisations=tuple(config.sar_polarisations),
        optical_bands=tuple(OPTICAL_BAND_NAMES[config.optical_bands]),
    )


def _simulate_ground(
    config: WorldConfig, style: RegionStyle, key: int, ground: Grid, *, with_optical: bool
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """SAR (dB), optical (reflectance) and building mask of the ground grid, built block by block."""
    block_rows = math.ceil(ground.height / BLOCK_PX)
    block_cols = math.ceil(ground.width / BLOCK_PX)
    # Equal square blocks: one build_scene call each, cropped to the part of the ground it covers.
    side = max(math.ceil(ground.height / block_rows), math.ceil(ground.width / block_cols))
    margin = math.ceil(BLOCK_MARGIN_M / ground.pixel_size)
    pols = len(config.sar_polarisations)
    bands = len(OPTICAL_BAND_NAMES[config.optical_bands])
    sar = np.empty((pols, ground.height, ground.width), dtype=np.float32)
    optical = np.empty((bands, ground.height, ground.width), dtype=np.float32) if with_optical else None
    buildings = np.empty((ground.height, ground.width), dtype=bool)
    for block_row in range(block_rows):
        for block_col in range(block_cols):
            root = np.random.SeedSequence([config.seed, _SCENES_TAG, key, block_row, block_col])
            streams = {name: np.random.default_rng(child) for name, child in zip(_STREAMS, root.spawn(len(_STREAMS)))}
            scene = build_scene(config, style, streams["layout"], side + 2 * margin)
            row0, col0 = block_row * side, block_col * side
            height, width = min(side, ground.height - row0), min(side, ground.width - col0)
            target = (slice(row0, row0 + height), slice(col0, col0 + width))
            crop = (slice(margin, margin + height), slice(margin, margin + width))
            sar[(slice(None), *target)] = render_sar(scene, config, streams["sar"]).db[(slice(None), *crop)]
            buildings[target] = scene.building_mask[crop]
            if optical is not None:
                optical[(slice(None), *target)] = render_optical(scene, config, streams["optical"])[(slice(None), *crop)]
    return sar, optical, buildings


def _swath_valid(size: int, rng: np.random.Generator) -> np.ndarray:
    """Valid SAR pixels: all but a slanted band a few pixels wide along the far-range (east) edge."""
    low, high = SWATH_EDGE_SHARE
    top_width, bottom_width = np.maximum(1.0, rng.uniform(low, high, 2) * size)
    rows = np.arange(size)[:, None]
    width = top_width + (bottom_width - top_width) * rows / max(size - 1, 1)
    return np.arange(size)[None, :] < size - np.round(width)


# ------------------------------------------------------------------------------------------ writing
def synth_scenes(
    out: str | Path,
    *,
    seed: int | None = None,
    size: int | None = None,
    scenes: int | None = None,
    pixel_size: float | None = None,
) -> SyntheticScenes:
    """Write SAR and optical scenes, building labels, ``scenes.yaml`` and a held-out scene.

    Args:
        out: Folder to write (created; files of the same names are replaced).
        seed: World seed (default 0).
        size: Side of each SAR scene in pixels (default 1024: 2 km at 2 m); a multiple of 16 in
            [128, 8192]. The optical scenes cover the same width with half as many pixels.
        scenes: Number of SAR/optical training pairs (default 1), up to 20.
        pixel_size: SAR pixel size in metres (default 2, the world's own scale; at 10 m,
            Sentinel-1 GRD's spacing, most of the world's buildings are one or two pixels); the
            optical pixel is twice as coarse.

    Returns:
        What was written, with paths relative to ``out``.

    Raises:
        ConfigError: ``seed``, ``size``, ``scenes`` or ``pixel_size`` is out of range.
    """
    started = time.perf_counter()
    seed = 0 if seed is None else seed
    size = DEFAULT_SIZE if size is None else size
    scenes = DEFAULT_SCENES if scenes is None else scenes
    pixel_size = DEFAULT_PIXEL_M if pixel_size is None else pixel_size
    _check_int("seed", seed, 0, None)
    _check_size(size)
    _check_int("scenes", scenes, 1, MAX_SCENES)
    _check_pixel_size(pixel_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    sar_files: list[str] = []
    optical_files: list[str] = []
    training_polygons: list[dict[str, Any]] = []
    style_name = ""
    indices: list[int | str] = [*range(scenes), HELD_OUT]
    for index in track(indices, "synthetic scenes", unit="scene"):
        products = simulate_scene(seed, size, index, pixel_size)
        style_name = products.style.name
        if index == HELD_OUT:
            new_sar = f"{HELD_OUT}/scene_new.tif"
            _write_sar(out / new_sar, products, seed, "held-out")
            new_polygons = _building_polygons(products)
            new_labels = f"{HELD_OUT}/buildings.geojson"
            _write_geojson(out / new_labels, new_polygons)
            continue
        name = f"scene_{int(index):02d}"
        sar_files.append(f"sar/{name}.tif")
        optical_files.append(f"optical/{name}.tif")
        _write_sar(out / sar_files[-1], products, seed, name)
        _write_optical(out / optical_files[-1], products, seed, name)
        training_polygons.extend(_building_polygons(products))
    labels = "labels/buildings.geojson"
    _write_geojson(out / labels, training_polygons)
    config_file = "scenes.yaml"
    _write_config(
        out / config_file, sar_files, optical_files, labels,
        command=_command(seed, size, scenes, pixel_size), style=style_name,
    )
    return SyntheticScenes(
        out=out,
        sar=sar_files,
        optical=optical_files,
        labels=labels,
        config=config_file,
        new_sar=new_sar,
        new_labels=new_labels,
        buildings=len(training_polygons),
        new_buildings=len(new_polygons),
        style=style_name,
        size=size,
        pixel_size=float(pixel_size),
        seconds=time.perf_counter() - started,
    )


def _file_tags(seed: int, name: str, products: SceneProducts) -> dict[str, str]:
    return {
        "generator": "xmodal.data.synth.scenes",
        "seed": str(seed),
        "scene": name,
        "region_style": products.style.name,
    }


def _write_sar(path: Path, products: SceneProducts, seed: int, name: str) -> None:
    config = world_config(seed, products.layout.sar.pixel_size)
    tags = _file_tags(seed, name, products)
    tags.update(
        look_direction=config.sar_look, incidence_deg=f"{config.incidence_deg:g}", looks=str(config.looks)
    )
    write_raster(
        path,
        products.sar_db,
        crs=products.layout.sar.crs,
        transform=products.layout.sar.transform,
        nodata=np.nan,
        descriptions=list(products.polarisations),
        band_tags=[{"unit": "dB", "polarisation": p} for p in products.polarisations],
        tags=tags,
    )


def _write_optical(path: Path, products: SceneProducts, seed: int, name: str) -> None:
    assert products.optical is not None and products.layout.optical is not None
    # Sentinel-2 convention: reflectance x 1e4 in uint16, 0 only where there is no data, so a
    # measured reflectance that rounds to 0 is stored as 1.
    scaled = np.clip(np.round(products.optical * 1e4), 1, np.iinfo(np.uint16).max)
    digital = np.where(np.isfinite(products.optical), scaled, OPTICAL_NODATA).astype(np.uint16)
    write_raster(
        path,
        digital,
        crs=products.layout.optical.crs,
        transform=products.layout.optical.transform,
        nodata=OPTICAL_NODATA,
        descriptions=list(products.optical_bands),
        band_tags=[{"unit": "reflectance_x1e4"} for _ in products.optical_bands],
        tags=_file_tags(seed, name, products),
        compress="deflate",
    )


def _building_polygons(products: SceneProducts) -> list[dict[str, Any]]:
    """The ground's building mask as GeoJSON polygons in lon/lat, exterior rings counter-clockwise.

    Every vertex is transformed in one call (a scene holds ~10^5 polygons; one call per polygon
    would take most of the generation time).
    """
    mask = products.ground_buildings
    rings_of_polygon: list[int] = []
    rings: list[np.ndarray] = []
    for geometry, _ in features.shapes(
        mask.astype(np.uint8), mask=mask, connectivity=4, transform=products.layout.ground.transform
    ):
        rings_of_polygon.append(len(geometry["coordinates"]))
        rings.extend(np.asarray(ring, dtype=np.float64) for ring in geometry["coordinates"])
    if not rings:
        return []
    points = np.concatenate(rings)
    lon, lat = transform(products.layout.ground.crs, LABELS_CRS, points[:, 0], points[:, 1])
    lonlat = np.round(np.column_stack([lon, lat]), COORDINATE_DECIMALS)
    starts = np.cumsum([0] + [len(ring) for ring in rings[:-1]])
    # Twice the signed area of each ring (shoelace; east and north both grow, so > 0 is counter-clockwise).
    following = np.roll(np.arange(len(points)), -1)
    following[np.cumsum([len(ring) for ring in rings]) - 1] = starts
    cross = lonlat[:, 0] * lonlat[following, 1] - lonlat[following, 0] * lonlat[:, 1]
    counter_clockwise = np.add.reduceat(cross, starts) > 0
    vertices = lonlat.tolist()
    polygons: list[dict[str, Any]] = []
    ring_index = 0
    for count in rings_of_polygon:
        coordinates = []
        for position in range(count):
            start = int(starts[ring_index])
            ring = vertices[start : start + len(rings[ring_index])]
            # RFC 7946 right-hand rule: the exterior ring (first) counter-clockwise, holes clockwise.
            if counter_clockwise[ring_index] != (position == 0):
                ring.reverse()
            coordinates.append(ring)
            ring_index += 1
        polygons.append({"type": "Polygon", "coordinates": coordinates})
    return polygons


def _write_geojson(path: Path, polygons: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    collection = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {"class": BUILDING_CLASSES[1]}, "geometry": polygon} for polygon in polygons
        ],
    }
    path.write_text(json.dumps(collection, separators=(",", ":")))


def _write_config(
    path: Path,
    sar_files: list[str],
    optical_files: list[str],
    labels: str,
    *,
    command: str,
    style: str,
) -> None:
    config = {
        "sar": {"files": sar_files},
        "optical": {"files": optical_files},
        "labels": {"buildings": {"files": [labels], "classes": list(BUILDING_CLASSES)}},
    }
    header = (
        f"# Written by `{command}` "
        f"(xmodal.data.synth.scenes): synthetic scenes of world style {style}.\n"
        "# Paths are relative to this file; band names and units are in each file's tags.\n"
        f"# Held-out scene for `xmodal predict`: {HELD_OUT}/scene_new.tif (labels {HELD_OUT}/buildings.geojson).\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


def _command(seed: int, size: int, scenes: int, pixel_size: float) -> str:
    """The command line that writes these scenes again (OUT left out: the YAML sits in it)."""
    return f"xmodal data synth-scenes OUT --seed {seed} --size {size} --scenes {scenes} --pixel-size {float(pixel_size):g}"


# --------------------------------------------------------------------------------------- validation
def _check_int(name: str, value: Any, minimum: int, maximum: int | None) -> None:
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"synth-scenes: {name}={value!r}; expected {expected}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"synth-scenes: {name}={value}; expected {expected}")


def _check_size(size: Any) -> None:
    _check_int("size", size, MIN_SIZE, MAX_SIZE)
    if size % 16:
        raise ConfigError(f"synth-scenes: size={size}; expected a multiple of 16 (SAR pixels per side)")


def _check_pixel_size(pixel_size: Any) -> None:
    low, high = PIXEL_RANGE_M
    number = isinstance(pixel_size, (int, float, np.integer, np.floating)) and not isinstance(pixel_size, bool)
    if not number or not math.isfinite(pixel_size) or not low <= pixel_size <= high:
        raise ConfigError(f"synth-scenes: pixel_size={pixel_size!r}; expected a number of metres in [{low:g}, {high:g}]")
