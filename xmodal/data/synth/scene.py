"""The ground truth of one scene: land cover, building footprints with heights, a surface model.

A scene is laid out on a square grid slightly larger than the tile (``WorldConfig.scene_margin_px``
on each side) so that layover and shadows of objects just outside a tile still reach into it.

Layout, in order:
    1. gentle terrain (for the DSM and for slope-dependent radiometry);
    2. natural cover from competing smooth random fields, agricultural areas cut into parcels;
    3. water: sea coast, a meandering river, lakes;
    4. a developed zone (smooth field), a street grid of lots at the region's grid angle, and one
       building per occupied lot (rectangle or L-shape, rotated by a small jitter inside its lot,
       so buildings never overlap); buildings touching water are dropped;
    5. streets and paved yards become ``built``; flooded vegetation fringes some shores;
    6. object heights (buildings, tree canopy, low vegetation) above the terrain.

Everything is vectorised over pixels; per-lot parameters are arrays indexed by a lot-id image.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

from xmodal.data.synth.classes import BARE, BUILT, CROPS, FLOODED, GRASS, SHRUB, SNOW, TREES, WATER
from xmodal.data.synth.config import WorldConfig
from xmodal.data.synth.fields import smooth_field, top_share, uniform_field
from xmodal.data.synth.style import RegionStyle

# Natural cover candidates: key in RegionStyle.natural_weights -> (class, correlation length in m).
# "agri" is resolved into crop / grass / bare parcels.
_AGRI = -1
_NATURAL = {
    "trees": (TREES, 30.0),
    "grass": (GRASS, 40.0),
    "shrub": (SHRUB, 20.0),
    "bare": (BARE, 30.0),
    "snow": (SNOW, 60.0),
    "agri": (_AGRI, 80.0),
}


@dataclass
class Buildings:
    """One entry per building; building id ``k`` (in ``Scene.building_id``) is row ``k - 1``.

    Attributes:
        height_m: Roof (eave) height above ground.
        orientation_deg: Direction of the building's first axis, degrees from the image x axis
            towards +y (south); walls face ``orientation + k * 90``.
        roof_material: Index into ``ROOF_MATERIALS``.
        roof_brightness: Optical albedo multiplier of this roof (weathering, colour).
        pitch_deg: Roof pitch, 0 for flat roofs.
        roof_sar_offset_db: This roof's backscatter offset from its material's mean (roughness,
            fixtures, slope details).
        xpol_offset_db: Co-pol minus cross-pol ratio of the roof.
        wall_offset_db: Offset of the facade backscatter (windows, balconies, material).
        dihedral_offset_db: Offset of the wall-ground double bounce (wall smoothness, ground).
    """

    height_m: np.ndarray
    orientation_deg: np.ndarray
    roof_material: np.ndarray
    roof_brightness: np.ndarray
    pitch_deg: np.ndarray
    roof_sar_offset_db: np.ndarray
    xpol_offset_db: np.ndarray
    wall_offset_db: np.ndarray
    dihedral_offset_db: np.ndarray

    def __len__(self) -> int:
        return len(self.height_m)

    def take(self, index: np.ndarray) -> Buildings:
        """The buildings at ``index`` (an integer or boolean array), in that order."""
        return Buildings(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def uniform(
        cls,
        heights: list[float] | np.ndarray,
        *,
        orientation_deg: float = 0.0,
        roof_material: int = 1,
        roof_sar_offset_db: float = 0.0,
    ) -> Buildings:
        """Buildings that differ only by height (flat roofs, no random offsets); used by tests."""
        heights = np.asarray(heights, dtype=np.float64)
        n = len(heights)
        return cls(
            height_m=heights,
            orientation_deg=np.full(n, orientation_deg),
            roof_material=np.full(n, roof_material, dtype=np.int64),
            roof_brightness=np.ones(n),
            pitch_deg=np.zeros(n),
            roof_sar_offset_db=np.full(n, roof_sar_offset_db),
            xpol_offset_db=np.full(n, 8.0),
            wall_offset_db=np.zeros(n),
            dihedral_offset_db=np.zeros(n),
        )


@dataclass
class Scene:
    """Ground truth of one scene on a square pixel grid (row = south, column = east).

    Attributes:
        pixel_size: Metres per pixel.
        landcover: uint8 class map (``LANDCOVER_CLASSES``).
        building_id: int32 map, 0 outside buildings, ``k`` inside building ``k``.
        buildings: Per-building attributes.
        object_height: Height of the top surface above the terrain (buildings, canopy), metres.
        terrain: Ground elevation, metres.
        grad_x: Slope of the visible surface along +x (dz/dx), for radiometry (terrain, roof pitch).
        grad_y: Slope along +y (south).
        phenology: Crop greenness in [0, 1] on crop pixels, 0 elsewhere.
        texture_fine: Unit-variance texture correlated over ~1 px (canopy crowns, roof clutter).
        texture_medium: Unit-variance texture correlated over ~8 m (moisture, wear, patches).
        point_db: VV sigma0 (dB) of point-like clutter (cars, poles, fences), NaN where none.
        water_vv_db: Open-water VV sigma0 of this scene (wind roughening).
        turbidity: Optical turbidity of the water in [0, 1].
        wet_snow: Snow is wet (dark in SAR).
    """

    pixel_size: float
    landcover: np.ndarray
    building_id: np.ndarray
    buildings: Buildings
    object_height: np.ndarray
    terrain: np.ndarray
    grad_x: np.ndarray
    grad_y: np.ndarray
    phenology: np.ndarray
    texture_fine: np.ndarray
    texture_medium: np.ndarray
    point_db: np.ndarray
    water_vv_db: float = -20.0
    turbidity: float = 0.3
    wet_snow: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.landcover.shape

    @property
    def dsm(self) -> np.ndarray:
        """Digital surface model: terrain plus object heights, metres."""
        return (self.terrain + self.object_height).astype(np.float32)

    @property
    def building_mask(self) -> np.ndarray:
        return self.building_id > 0


def scene_from_boxes(
    size: int,
    *,
    pixel_size: float,
    background: int,
    boxes: list[tuple[int, int, int, int, float]],
    roof_sar_offset_db: float = 0.0,
    orientation_deg: float = 0.0,
) -> Scene:
    """A hand-made flat scene: one land-cover class with axis-aligned box buildings.

    Args:
        size: Side of the square grid in pixels.
        pixel_size: Metres per pixel.
        background: Land-cover class everywhere outside the boxes.
        boxes: ``(row0, row1, col0, col1, height_m)`` per building, half-open pixel ranges.
        roof_sar_offset_db: Roof backscatter offset shared by every building.
        orientation_deg: Wall orientation of every building (0: walls face the image axes).
    """
    shape = (size, size)
    landcover = np.full(shape, background, dtype=np.uint8)
    building_id = np.zeros(shape, dtype=np.int32)
    height = np.zeros(shape, dtype=np.float32)
    for number, (row0, row1, col0, col1, box_height) in enumerate(boxes, start=1):
        building_id[row0:row1, col0:col1] = number
        landcover[row0:row1, col0:col1] = BUILT
        height[row0:row1, col0:col1] = box_height
    zeros = np.zeros(shape, dtype=np.float32)
    return Scene(
        pixel_size=pixel_size,
        landcover=landcover,
        building_id=building_id,
        buildings=Buildings.uniform(
            [b[4] for b in boxes], orientation_deg=orientation_deg, roof_sar_offset_db=roof_sar_offset_db
        ),
        object_height=height,
        terrain=zeros.copy(),
        grad_x=zeros.copy(),
        grad_y=zeros.copy(),
        phenology=zeros.copy(),
        texture_fine=zeros.copy(),
        texture_medium=zeros.copy(),
        point_db=np.full(shape, np.nan, dtype=np.float32),
    )


def build_scene(config: WorldConfig, style: RegionStyle, rng: np.random.Generator, size: int) -> Scene:
    """Lay out one random scene of ``size`` x ``size`` pixels in the given region style."""
    ps = config.pixel_size
    shape = (size, size)
    rows, cols = np.mgrid[0:size, 0:size]
    x = (cols + 0.5) * ps  # metres east
    y = (rows + 0.5) * ps  # metres south

    terrain = style.base_elevation_m + style.terrain_relief_m * smooth_field(rng, shape, 60.0 / ps)
    grad_y, grad_x = np.gradient(terrain, ps)

    landcover, phenology = _natural_cover(rng, shape, style, x, y, ps)
    water = _water(rng, shape, style, x, y, ps)
    urban_field = smooth_field(rng, shape, 120.0 / ps)
    urban_share = float(np.clip(style.urban_share + 0.2 * rng.standard_normal(), 0.0, 1.0))
    urban = top_share(urban_field, urban_share, where=~water)

    lots = _lay_out_lots(rng, style, x, y, urban, urban_field, water)
    inside, building_id, buildings = lots.inside, lots.building_id, lots.buildings

    # Developed land: streets and paved yards are "built"; gardens keep natural cover but no fields.
    urban_lot = lots.urban_lot
    built_ground = urban_lot & (lots.street | lots.paved) & ~water
    garden = urban_lot & ~built_ground & ~inside
    landcover[garden & np.isin(landcover, (CROPS, BARE, SNOW))] = GRASS
    landcover[built_ground] = BUILT
    landcover[water] = WATER
    if water.any() and rng.random() < style.wetland_prob:
        distance = ndimage.distance_transform_edt(~water) * ps
        reach = rng.uniform(6.0, 24.0) * (1.0 + 0.5 * smooth_field(rng, shape, 15.0 / ps))
        fringe = (distance > 0) & (distance < reach) & ~urban_lot & (uniform_field(rng, shape, 20.0 / ps) > 0.3)
        landcover[fringe & (landcover != BUILT)] = FLOODED
    landcover[inside] = BUILT
    phenology = np.where(landcover == CROPS, phenology, 0.0)

    texture_fine = smooth_field(rng, shape, 1.0)
    texture_medium = smooth_field(rng, shape, 8.0 / ps)
    object_height = _object_heights(landcover, phenology, building_id, buildings, style, texture_fine, texture_medium)

    # Pitched roofs: slope down from a ridge along the longer axis (for optical shading and SAR).
    roof_gx, roof_gy = lots.roof_gradient
    grad_x = np.where(inside, roof_gx, np.where(water, 0.0, grad_x))
    grad_y = np.where(inside, roof_gy, np.where(water, 0.0, grad_y))

    # Cars, poles and fences on paved ground: bright point clutter that is not a building.
    clutter = (landcover == BUILT) & ~inside & (rng.random(shape) < style.car_density)
    point_db = np.where(clutter, rng.uniform(-4.0, 10.0, shape), np.nan)

    return Scene(
        pixel_size=ps,
        landcover=landcover.astype(np.uint8),
        building_id=building_id.astype(np.int32),
        buildings=buildings,
        object_height=object_height.astype(np.float32),
        terrain=terrain.astype(np.float32),
        grad_x=grad_x.astype(np.float32),
        grad_y=grad_y.astype(np.float32),
        phenology=phenology.astype(np.float32),
        texture_fine=texture_fine.astype(np.float32),
        texture_medium=texture_medium.astype(np.float32),
        point_db=point_db.astype(np.float32),
        water_vv_db=float(rng.uniform(*style.water_vv_db)),
        turbidity=float(rng.uniform(0.0, 1.0)),
        wet_snow=style.wet_snow,
    )


def _natural_cover(
    rng: np.random.Generator, shape: tuple[int, int], style: RegionStyle, x: np.ndarray, y: np.ndarray, ps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Natural land cover (argmax of competing smooth fields) and crop phenology per pixel."""
    keys = [k for k in _NATURAL if style.natural_weights.get(k, 0.0) > 0]
    scores = np.empty((len(keys), *shape))
    for i, key in enumerate(keys):
        _, scale_m = _NATURAL[key]
        # Scene-level re-weighting: tiles of one region differ in their mix.
        weight = style.natural_weights[key] * rng.lognormal(0.0, 0.5)
        scores[i] = smooth_field(rng, shape, scale_m / ps) + 1.2 * np.log(weight)
    winner = np.argmax(scores, axis=0)
    classes = np.array([_NATURAL[k][0] for k in keys])
    landcover = classes[winner]

    # Agricultural parcels on a rotated grid: each parcel is a crop (with its growth stage),
    # a meadow or a ploughed field.
    angle = rng.uniform(0.0, np.pi)
    parcel_u, parcel_v = rng.uniform(30.0, 90.0, size=2)
    u = x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0.0, parcel_u)
    v = -x * np.sin(angle) + y * np.cos(angle) + rng.uniform(0.0, parcel_v)
    iu = np.floor(u / parcel_u).astype(np.int64)
    iv = np.floor(v / parcel_v).astype(np.int64)
    iu -= iu.min()
    iv -= iv.min()
    parcel = iu * (iv.max() + 1) + iv
    n_parcels = int(parcel.max()) + 1
    parcel_draw = rng.random(n_parcels)
    parcel_class = np.where(parcel_draw < 0.7, CROPS, np.where(parcel_draw < 0.85, GRASS, BARE))
    parcel_phenology = rng.uniform(0.0, 1.0, n_parcels)
    agri = landcover == _AGRI
    landcover = np.where(agri, parcel_class[parcel], landcover)
    phenology = np.where(agri, parcel_phenology[parcel], 0.0)
    return landcover.astype(np.uint8), phenology


def _water(
    rng: np.random.Generator, shape: tuple[int, int], style: RegionStyle, x: np.ndarray, y: np.ndarray, ps: float
) -> np.ndarray:
    """Sea, river and lake pixels."""
    extent = shape[0] * ps
    water = np.zeros(shape, dtype=bool)
    if style.coast:
        direction = rng.uniform(0.0, 2 * np.pi)
        along = (x * np.cos(direction) + y * np.sin(direction)) / extent
        coast_field = 3.0 * along + 0.6 * smooth_field(rng, shape, 40.0 / ps)
        share = max(0.0, rng.uniform(-0.15, 0.55))
        water |= top_share(coast_field, share)
    if rng.random() < style.river_prob:
        direction = rng.uniform(0.0, np.pi)
        u = x * np.cos(direction) + y * np.sin(direction)
        v = -x * np.sin(direction) + y * np.cos(direction)
        amplitude = rng.uniform(10.0, 60.0)
        wavelength = rng.uniform(150.0, 500.0)
        centre = v.mean() + rng.uniform(-0.3, 0.3) * extent
        centre_line = centre + amplitude * np.sin(2 * np.pi * u / wavelength + rng.uniform(0, 2 * np.pi))
        width = rng.uniform(8.0, 40.0) * (1.0 + 0.2 * smooth_field(rng, shape, 30.0 / ps))
        water |= np.abs(v - centre_line) < width / 2
    if style.lake_share > 0:
        share = style.lake_share * rng.uniform(0.0, 2.0)
        water |= top_share(smooth_field(rng, shape, 25.0 / ps), share)
    return water


@dataclass
class _Lots:
    """Per-pixel result of the street/lot layout."""

    inside: np.ndarray  # pixel lies in a building
    building_id: np.ndarray  # 0 or the building's id
    buildings: Buildings
    urban_lot: np.ndarray  # pixel's lot is in the developed zone
    street: np.ndarray  # pixel lies on a street between blocks
    paved: np.ndarray  # pixel's lot has a paved yard
    roof_gradient: tuple[np.ndarray, np.ndarray]  # (d height / dx, d height / dy) of pitched roofs


def _lay_out_lots(
    rng: np.random.Generator,
    style: RegionStyle,
    x: np.ndarray,
    y: np.ndarray,
    urban: np.ndarray,
    urban_field: np.ndarray,
    water: np.ndarray,
) -> _Lots:
    """Street grid of blocks of lots and one (possibly absent) building per lot, rasterised at once."""
    alpha = np.deg2rad(style.grid_angle_deg + rng.normal(0.0, 3.0))
    lot_u, lot_v = rng.uniform(*style.lot_size_m, size=2)
    street = style.street_width_m
    u = x * np.cos(alpha) + y * np.sin(alpha)
    v = -x * np.sin(alpha) + y * np.cos(alpha)
    iu, a, street_u = _grid_axis(u, lot_u, style.lots_per_block[0], street, rng.uniform(0.0, 1000.0))
    iv, b, street_v = _grid_axis(v, lot_v, style.lots_per_block[1], street, rng.uniform(0.0, 1000.0))
    iu -= iu.min()
    iv -= iv.min()
    lot = iu * (iv.max() + 1) + iv
    n = int(lot.max()) + 1

    pixels = np.bincount(lot.ravel(), minlength=n).astype(np.float64)
    pixels = np.maximum(pixels, 1.0)
    urban_lot_of = np.bincount(lot.ravel(), weights=urban.ravel(), minlength=n) / pixels > 0.5
    intensity = np.bincount(lot.ravel(), weights=urban_field.ravel(), minlength=n) / pixels

    half_u = np.full(n, lot_u / 2 - style.setback_m)
    half_v = np.full(n, lot_v / 2 - style.setback_m)
    draw = rng.random(n)
    occupied = np.where(urban_lot_of, draw < style.occupancy, draw < style.rural_building_rate)
    wu = half_u * rng.uniform(*style.building_fill, n)
    wv = half_v * rng.uniform(*style.building_fill, n)
    delta = np.deg2rad(rng.normal(0.0, style.orientation_jitter_deg, n))
    cos_d, sin_d = np.cos(delta), np.sin(delta)
    # Shrink rotated buildings until they fit their lot, then shift them within the slack.
    ext_u = wu * np.abs(cos_d) + wv * np.abs(sin_d)
    ext_v = wu * np.abs(sin_d) + wv * np.abs(cos_d)
    shrink = np.minimum(1.0, np.minimum(half_u / np.maximum(ext_u, 1e-6), half_v / np.maximum(ext_v, 1e-6)))
    wu, wv, ext_u, ext_v = wu * shrink, wv * shrink, ext_u * shrink, ext_v * shrink
    off_u = rng.uniform(-1.0, 1.0, n) * np.maximum(half_u - ext_u, 0.0)
    off_v = rng.uniform(-1.0, 1.0, n) * np.maximum(half_v - ext_v, 0.0)
    occupied &= (wu >= 2.0) & (wv >= 2.0)  # at least 4 m wide

    low, high = style.height_range_m
    # Log-normal heights, taller towards the core of the developed zone.
    log_height = style.height_spread * rng.standard_normal(n) + 0.25 * np.clip(intensity, -2, 2)
    height = style.height_median_m * np.exp(log_height)
    height = np.clip(height, low, high)
    l_shape = rng.random(n) < style.l_shape_prob
    corner_u = rng.choice([-1.0, 1.0], n)
    corner_v = rng.choice([-1.0, 1.0], n)
    cut_u = rng.uniform(0.3, 0.6, n)
    cut_v = rng.uniform(0.3, 0.6, n)
    pitch = np.where(rng.random(n) < style.pitched_roof_prob, rng.uniform(20.0, 40.0, n), 0.0)
    material = rng.choice(len(style.roof_materials), size=n, p=np.asarray(style.roof_materials))
    paved_flag = rng.random(n) < style.paved_lot_prob
    per_building = dict(
        roof_brightness=rng.uniform(0.75, 1.25, n),
        roof_sar_offset_db=rng.normal(0.0, 2.5, n),
        xpol_offset_db=rng.uniform(6.0, 10.0, n),
        wall_offset_db=rng.normal(0.0, 2.0, n),
        dihedral_offset_db=rng.normal(0.0, 2.0, n),
    )

    # Rasterise: local coordinates in each building's own rotated frame.
    du, dv = a - off_u[lot], b - off_v[lot]
    cd, sd = cos_d[lot], sin_d[lot]
    along = du * cd + dv * sd
    across = -du * sd + dv * cd
    half_along, half_across = wu[lot], wv[lot]
    inside = occupied[lot] & (np.abs(along) < half_along) & (np.abs(across) < half_across)
    notch = (
        l_shape[lot]
        & (corner_u[lot] * along > half_along * (1 - 2 * cut_u[lot]))
        & (corner_v[lot] * across > half_across * (1 - 2 * cut_v[lot]))
    )
    inside &= ~notch

    # Drop buildings that touch water, then number the rest 1..N.
    wet = np.bincount(lot[inside], weights=water[inside], minlength=n) > 0
    has_pixels = np.bincount(lot[inside], minlength=n) > 0
    kept = np.flatnonzero(has_pixels & ~wet)
    inside &= np.isin(lot, kept)
    id_of_lot = np.zeros(n, dtype=np.int32)
    id_of_lot[kept] = np.arange(1, len(kept) + 1, dtype=np.int32)
    building_id = np.where(inside, id_of_lot[lot], 0)

    theta = alpha + delta  # direction of each building's first axis
    buildings = Buildings(
        height_m=height[kept],
        orientation_deg=np.rad2deg(theta[kept]),
        roof_material=material[kept],
        pitch_deg=pitch[kept],
        **{k: v[kept] for k, v in per_building.items()},
    )

    # Roof slope (gradient points up towards the ridge along the longer axis).
    slope = np.tan(np.deg2rad(pitch))[lot]
    ridge_along = (wu >= wv)[lot]
    t = theta[lot]
    axis1 = (np.cos(t), np.sin(t))
    axis2 = (-np.sin(t), np.cos(t))
    toward_ridge = np.where(ridge_along, -np.sign(across), -np.sign(along))
    gx = slope * toward_ridge * np.where(ridge_along, axis2[0], axis1[0])
    gy = slope * toward_ridge * np.where(ridge_along, axis2[1], axis1[1])
    gx = np.where(inside, gx, 0.0)
    gy = np.where(inside, gy, 0.0)

    in_street = street_u | street_v
    occupied_now = np.zeros(n, dtype=bool)
    occupied_now[kept] = True
    return _Lots(
        inside=inside,
        building_id=building_id,
        buildings=buildings,
        urban_lot=urban_lot_of[lot],
        street=in_street,
        paved=(occupied_now & paved_flag)[lot],
        roof_gradient=(gx, gy),
    )


def _grid_axis(
    coord: np.ndarray, lot: float, lots_per_block: int, street: float, offset: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Along one grid axis: lot index, position from the lot centre, and the street mask.

    Blocks of ``lots_per_block`` lots alternate with streets of width ``street``.
    """
    pitch = lots_per_block * lot + street
    shifted = coord + offset
    block = np.floor(shifted / pitch)
    within = shifted - block * pitch
    in_street = within >= lots_per_block * lot
    k = np.clip(np.floor(within / lot), 0, lots_per_block - 1)
    local = within - (k + 0.5) * lot
    return (block * lots_per_block + k).astype(np.int64), local, in_street


def _object_heights(
    landcover: np.ndarray,
    phenology: np.ndarray,
    building_id: np.ndarray,
    buildings: Buildings,
    style: RegionStyle,
    texture_fine: np.ndarray,
    texture_medium: np.ndarray,
) -> np.ndarray:
    """Height of the top surface above the terrain: buildings, canopy and low vegetation."""
    height = np.zeros(landcover.shape)
    # Crowns are a few metres wide: vary canopy height at crown scale, not pixel by pixel (pixel-scale
    # height noise would shadow half the canopy from a side-looking radar).
    crowns = ndimage.gaussian_filter(texture_fine, 1.0)
    crowns /= crowns.std() + 1e-9
    canopy = style.tree_height_m * (1.0 + 0.15 * texture_medium) * (1.0 + 0.08 * np.tanh(crowns))
    height = np.where(landcover == TREES, np.maximum(canopy, 2.0), height)
    height = np.where(landcover == GRASS, 0.3, height)
    height = np.where(landcover == CROPS, 0.2 + 1.8 * phenology, height)
    height = np.where(landcover == SHRUB, np.clip(1.5 + 0.5 * texture_medium, 0.5, 3.0), height)
    height = np.where(landcover == FLOODED, 1.0, height)
    roof = np.concatenate([[0.0], buildings.height_m])[building_id]
    return np.where(building_id > 0, roof, height)
