"""SAR forward model: backscatter of a scene, side-looking geometry, noise, resolution and speckle.

Physics, in the order applied:
    1. **Surface sigma0** per pixel and polarisation from the land cover (water dark/specular,
       vegetation volume scattering, strong in cross-pol), per-roof material and roughness (roofs
       overlap ground classes), and the local incidence angle of slopes and pitched roofs.
    2. **Geometry** (ground-range image of a side-looking radar, terrain-corrected with a bare-earth
       model, so only objects above the ground are displaced):
         * a point at height ``h`` appears ``h / tan(theta) / pixel_size`` pixels *towards the
           sensor* (layover); layover areas add up;
         * tree canopies are volumes: their return comes from heights spread between
           ``VOLUME_BOTTOM`` times the canopy height and its top, so it is smeared along range;
         * cells hidden from the sensor by a nearer, taller object return nothing (radar shadow,
           ``h * tan(theta) / pixel_size`` pixels long behind a height step ``h``);
         * walls facing the sensor are spread over their layover band;
         * the wall-ground dihedral returns a strong double bounce at the foot of the wall (at zero
           height, so it stays at the footprint edge), scaled by wall height and falling off quickly
           with the angle between the wall normal and the look direction.
    3. **Sensor**: thermal noise (NESZ) added to sigma0 *before* speckle; multi-look speckle with
       mean 1 in linear power, either formed by filtering complex Gaussian reflectivity through the
       impulse response (speckle correlated over a resolution cell, the signal blurred by the same
       response) or as white Gamma(L, 1/L) noise times a blurred signal.
    4. Stored as dB.

Every map is processed in the frame where the radar looks towards +x; other look directions
rotate the inputs by multiples of 90 degrees and the result back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from xmodal.data.bands import linear_to_db
from xmodal.data.synth.classes import (
    BARE,
    BUILT,
    CROPS,
    FLOODED,
    GRASS,
    LANDCOVER_CLASSES,
    ROOF_MATERIALS,
    SHRUB,
    SNOW,
    TREES,
    WATER,
)
from xmodal.data.synth.config import WorldConfig
from xmodal.data.synth.scene import Scene

# Number of 90-degree counter-clockwise rotations that turn each look direction into "east".
LOOK_ROTATIONS = {"east": 0, "south": 1, "west": 2, "north": 3}
# Look direction as an angle from the image x axis towards +y (south), degrees.
LOOK_ANGLES_DEG = {"east": 0.0, "south": 90.0, "west": 180.0, "north": 270.0}

# C-band-like sigma0 at ~35 degrees incidence, per land-cover class:
# (VV dB, VH dB, HH minus VV dB, texture amplitude dB).
CLASS_BACKSCATTER_DB: dict[int, tuple[float, float, float, float]] = {
    WATER: (-20.0, -29.0, -4.0, 0.7),  # VV replaced by the scene's wind-dependent value
    TREES: (-7.5, -13.5, 0.5, 1.0),
    GRASS: (-11.0, -19.0, -0.5, 1.5),
    FLOODED: (-7.0, -16.0, 4.0, 1.5),  # trunk-water double bounce, strongest in HH
    CROPS: (-12.5, -22.0, -0.5, 1.0),  # raised with growth stage below
    SHRUB: (-10.0, -17.5, 0.0, 1.5),
    BUILT: (-14.0, -23.0, -0.5, 1.5),  # streets and paved yards
    BARE: (-14.0, -23.5, -1.0, 2.5),
    SNOW: (-12.0, -20.0, 0.0, 1.0),  # dry snow; wet snow is 7 dB darker
}
CROP_GROWTH_GAIN_DB = (4.0, 7.0)  # VV, VH gain from bare to fully grown crops
WET_SNOW_OFFSET_DB = -7.0
# Mean VV roof backscatter per roof material (order of ROOF_MATERIALS): rough tiles and gravel are
# brighter, smooth metal and membranes reflect away from the sensor.
ROOF_VV_DB = dict(zip(ROOF_MATERIALS, (-8.0, -11.0, -13.0, -15.0, -14.0, -10.0, -9.0)))
ROOF_CLUTTER_DB = 1.0  # pixel-scale variation on roofs (vents, parapets)
WALL_VV_DB = -9.0  # facade single bounce per image pixel of its layover band
WALL_XPOL_DB = -8.0
DIHEDRAL_VV_DB = 8.0  # wall-ground double bounce of a 10 m wall facing the sensor squarely
DIHEDRAL_HH_GAIN_DB = 3.0
DIHEDRAL_ASPECT_WIDTH_DEG = 7.0
DIHEDRAL_ASPECT_FLOOR = 0.03
DIHEDRAL_XPOL_SQUARE = 0.015  # cross-pol share of a dihedral facing the sensor squarely
DIHEDRAL_XPOL_ORIENTED = 0.05  # extra cross-pol of an oriented dihedral (polarisation rotation)
DIHEDRAL_XPOL_ASPECT_WIDTH_DEG = 25.0
POINT_XPOL_DB = -8.0
VOLUME_MIN_HEIGHT_M = 2.0  # vegetation taller than this scatters as a volume
VOLUME_BOTTOM = 0.3  # share of the canopy height where its volume return starts


@dataclass
class SarImage:
    """A simulated SAR image and its noise-free parts (all P x H x W, linear unless said).

    Attributes:
        db: Speckled intensity in dB, float32 (what is stored).
        sigma0: Noise-free sigma0 after geometry, before noise and resolution (full resolution).
        expected: Mean of the speckled intensity: sigma0 blurred by the resolution, plus noise.
        shadow: Ground cells hidden from the sensor (H x W bool).
        polarisations: Channel names.
    """

    db: np.ndarray
    sigma0: np.ndarray
    expected: np.ndarray
    shadow: np.ndarray
    polarisations: tuple[str, ...]


def render_sar(scene: Scene, config: WorldConfig, rng: np.random.Generator) -> SarImage:
    """Simulate the SAR channels of ``config.sar_polarisations`` for a scene."""
    pols = config.sar_polarisations
    surface = surface_sigma0(scene, pols, config.incidence_deg, config.sar_look)
    walls, dihedrals = building_returns(scene, pols, config.sar_look)
    sigma0, shadow = side_looking_geometry(
        scene.object_height,
        surface,
        scene.building_id,
        walls,
        dihedrals,
        incidence_deg=config.incidence_deg,
        pixel_size=scene.pixel_size,
        look=config.sar_look,
        volume=(scene.building_id == 0) & (scene.object_height > VOLUME_MIN_HEIGHT_M),
    )
    intensity, expected = sensor_response(
        sigma0,
        pols,
        noise_floor_db=config.noise_floor_db,
        looks=config.looks,
        resolution_m=config.sar_resolution_m,
        pixel_size=scene.pixel_size,
        correlated=config.correlated_speckle,
        rng=rng,
    )
    return SarImage(db=linear_to_db(intensity), sigma0=sigma0, expected=expected, shadow=shadow, polarisations=pols)


# ---------------------------------------------------------------------------------------- radiometry
def _channel_db(vv: np.ndarray, vh: np.ndarray, hh_minus_vv: np.ndarray, pol: str) -> np.ndarray:
    if pol == "VV":
        return vv
    if pol in ("VH", "HV"):  # reciprocity: both cross-pol channels see the same sigma0
        return vh
    return vv + hh_minus_vv


def surface_sigma0(scene: Scene, pols: tuple[str, ...], incidence_deg: float, look: str) -> np.ndarray:
    """Linear sigma0 of the visible top surface of every pixel, P x H x W (before geometry)."""
    lc = scene.landcover
    n_classes = len(LANDCOVER_CLASSES)
    table = np.array([CLASS_BACKSCATTER_DB[c] for c in range(n_classes)])
    vv = table[lc, 0] + table[lc, 3] * scene.texture_medium
    vh = table[lc, 1] + table[lc, 3] * scene.texture_medium
    hh_minus_vv = table[lc, 2]

    vv = np.where(lc == WATER, scene.water_vv_db + table[WATER, 3] * scene.texture_medium, vv)
    vh = np.where(lc == WATER, scene.water_vv_db - 9.0 + table[WATER, 3] * scene.texture_medium, vh)
    growth = scene.phenology
    vv = vv + np.where(lc == CROPS, CROP_GROWTH_GAIN_DB[0] * growth, 0.0)
    vh = vh + np.where(lc == CROPS, CROP_GROWTH_GAIN_DB[1] * growth, 0.0)
    if scene.wet_snow:
        vv = vv + np.where(lc == SNOW, WET_SNOW_OFFSET_DB, 0.0)
        vh = vh + np.where(lc == SNOW, WET_SNOW_OFFSET_DB, 0.0)

    inside = scene.building_id > 0
    if inside.any():
        b = scene.buildings
        roof_vv = np.array([ROOF_VV_DB[m] for m in ROOF_MATERIALS])[b.roof_material] + b.roof_sar_offset_db
        roof_vv_map = np.concatenate([[0.0], roof_vv])[scene.building_id] + ROOF_CLUTTER_DB * scene.texture_fine
        xpol_map = np.concatenate([[0.0], b.xpol_offset_db])[scene.building_id]
        vv = np.where(inside, roof_vv_map, vv)
        vh = np.where(inside, roof_vv_map - xpol_map, vh)
        hh_minus_vv = np.where(inside, 0.0, hh_minus_vv)

    # Rough-surface scattering grows with cos^2 of the local incidence angle (slopes, roof pitch).
    factor = _local_incidence_factor(scene.grad_x, scene.grad_y, incidence_deg, look)
    out = np.empty((len(pols), *lc.shape))
    has_point = np.isfinite(scene.point_db)
    point_vv = np.where(has_point, np.power(10.0, np.nan_to_num(scene.point_db) / 10.0), 0.0)
    for i, pol in enumerate(pols):
        linear = np.power(10.0, _channel_db(vv, vh, hh_minus_vv, pol) / 10.0) * factor
        point = point_vv * (10.0 ** (POINT_XPOL_DB / 10.0) if pol in ("VH", "HV") else 1.0)
        out[i] = linear + point
    return out


def _local_incidence_factor(grad_x: np.ndarray, grad_y: np.ndarray, incidence_deg: float, look: str) -> np.ndarray:
    """(cos local incidence / cos incidence)^2; 0 for surfaces facing away beyond grazing."""
    theta = np.deg2rad(incidence_deg)
    look_angle = np.deg2rad(LOOK_ANGLES_DEG[look])
    slope_along_look = grad_x * np.cos(look_angle) + grad_y * np.sin(look_angle)
    # Normal (-gx, -gy, 1)/|.|, unit vector to the sensor (-sin(theta) * look, cos(theta)).
    cos_local = (np.sin(theta) * slope_along_look + np.cos(theta)) / np.sqrt(1.0 + grad_x**2 + grad_y**2)
    return np.clip(np.maximum(cos_local, 0.0) ** 2 / np.cos(theta) ** 2, 0.0, 4.0)


def building_returns(scene: Scene, pols: tuple[str, ...], look: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-building facade (per layover pixel) and double-bounce sigma0, P x (N + 1), column 0 unused.

    The double bounce needs the wall to face the sensor squarely: its co-pol strength falls off as
    a Gaussian of the aspect angle (angle between the look direction and the nearest wall normal).
    Oriented dihedrals turn part of what is left into cross-pol, so the cross-pol ratio rises with
    the aspect angle while the cross-pol power itself stays below the co-pol one.
    """
    b = scene.buildings
    n = len(b)
    aspect = np.abs(np.mod(b.orientation_deg - LOOK_ANGLES_DEG[look] + 45.0, 90.0) - 45.0)
    aspect_rad = np.deg2rad(aspect)
    facing = np.exp(-((aspect / DIHEDRAL_ASPECT_WIDTH_DEG) ** 2))
    copol_factor = DIHEDRAL_ASPECT_FLOOR + (1 - DIHEDRAL_ASPECT_FLOOR) * facing
    xpol_factor = DIHEDRAL_XPOL_SQUARE * copol_factor + DIHEDRAL_XPOL_ORIENTED * np.sin(2 * aspect_rad) ** 2 * np.exp(
        -((aspect / DIHEDRAL_XPOL_ASPECT_WIDTH_DEG) ** 2)
    )
    height_factor = np.clip(b.height_m / 10.0, 0.3, 3.0)
    dihedral_vv = np.power(10.0, (DIHEDRAL_VV_DB + b.dihedral_offset_db) / 10.0) * height_factor
    wall_vv = np.power(10.0, (WALL_VV_DB + b.wall_offset_db) / 10.0) * np.cos(aspect_rad)
    walls = np.zeros((len(pols), n + 1))
    dihedrals = np.zeros((len(pols), n + 1))
    for i, pol in enumerate(pols):
        if pol in ("VH", "HV"):
            walls[i, 1:] = wall_vv * 10.0 ** (WALL_XPOL_DB / 10.0)
            dihedrals[i, 1:] = dihedral_vv * xpol_factor
        else:
            gain = 10.0 ** (DIHEDRAL_HH_GAIN_DB / 10.0) if pol == "HH" else 1.0
            walls[i, 1:] = wall_vv
            dihedrals[i, 1:] = dihedral_vv * copol_factor * gain
    return walls, dihedrals


# ------------------------------------------------------------------------------------------ geometry
def side_looking_geometry(
    height: np.ndarray,
    surface: np.ndarray,
    building_id: np.ndarray,
    walls: np.ndarray,
    dihedrals: np.ndarray,
    *,
    incidence_deg: float,
    pixel_size: float,
    look: str,
    volume: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Map surface, facade and double-bounce returns into the ground-range SAR image.

    Args:
        height: H x W height of the top surface above the ground, metres.
        surface: P x H x W linear sigma0 of the top surface.
        building_id: H x W building ids (0 = none); only building edges form walls.
        walls: P x (N + 1) facade sigma0 per building (per image pixel of the layover band).
        dihedrals: P x (N + 1) double-bounce sigma0 per building (per pixel of wall foot).
        incidence_deg: Incidence angle from vertical.
        pixel_size: Metres per pixel.
        look: Direction the radar beam points to (``"east"``: towards +x).
        volume: H x W cells (tree canopy) whose return is spread over heights from
            ``VOLUME_BOTTOM * height`` to ``height`` instead of coming from the top only.

    Returns:
        P x H x W sigma0 image and the H x W shadow mask, in the input frame.
    """
    k = LOOK_ROTATIONS[look]
    h = np.rot90(np.asarray(height, dtype=np.float64), k)
    surf = np.rot90(surface, k, axes=(1, 2))
    ids = np.rot90(building_id, k)
    spread = np.zeros(h.shape, dtype=bool) if volume is None else np.rot90(volume, k)
    n_pols, rows, cols = surf.shape

    tan_theta = np.tan(np.deg2rad(incidence_deg))
    layover_px_per_m = 1.0 / (tan_theta * pixel_size)
    descent_m_per_px = pixel_size / tan_theta  # the grazing ray drops this much per pixel in range

    # Shadow line: height of the lowest visible point above each cell centre, cast by the far top
    # corner (x0 + 0.5) of every nearer cell.
    x = np.arange(cols, dtype=np.float64)
    reach = np.maximum.accumulate(h + (x + 0.5) * descent_m_per_px, axis=1)
    shadow_line = np.full_like(h, -np.inf)
    shadow_line[:, 1:] = reach[:, :-1] - x[1:] * descent_m_per_px
    lit = h >= shadow_line - 1e-6

    image = np.zeros((n_pols, rows * cols))
    row_index = np.broadcast_to(np.arange(rows)[:, None], (rows, cols))

    # Top surfaces: every lit cell is displaced towards the sensor by its height (linear splitting
    # between the two nearest pixels keeps the energy and sub-pixel positions).
    position = x[None, :] - h * layover_px_per_m
    surface_top = lit & ~spread
    _deposit_points(image, row_index[surface_top], position[surface_top], surf[:, surface_top], cols)
    canopy = lit & spread
    if canopy.any():
        near = position[canopy]
        far = x[None, :].repeat(rows, 0)[canopy] - VOLUME_BOTTOM * h[canopy] * layover_px_per_m
        _deposit_segments(image, row_index[canopy], near, far, surf[:, canopy] / (far - near), cols)

    # Facades facing the sensor: height steps up along range at a building edge.
    step_up = (ids[:, 1:] > 0) & (h[:, 1:] > h[:, :-1] + 0.5)
    if step_up.any():
        r, c = np.nonzero(step_up)
        c = c + 1  # column of the taller cell; the wall stands at its near edge c - 0.5
        wall_pos = c - 0.5
        wall_top = h[r, c]
        foot = h[r, c - 1]
        lowest_visible = np.maximum(foot, shadow_line[r, c] + 0.5 * descent_m_per_px)
        seen = wall_top > lowest_visible
        bid = ids[r, c]
        start = wall_pos - wall_top * layover_px_per_m
        end = wall_pos - lowest_visible * layover_px_per_m
        _deposit_segments(image, r[seen], start[seen], end[seen], walls[:, bid[seen]], cols)
        # Double bounce at the foot of the wall, on the last pixel in front of it, if the foot is lit.
        foot_lit = lowest_visible <= foot + 1e-6
        foot_position = wall_pos - 0.5 - foot * layover_px_per_m
        _deposit_points(image, r[foot_lit], foot_position[foot_lit], dihedrals[:, bid[foot_lit]], cols)

    image = image.reshape(n_pols, rows, cols)
    return np.ascontiguousarray(np.rot90(image, -k, axes=(1, 2))), np.ascontiguousarray(np.rot90(~lit, -k))


def _deposit_points(image: np.ndarray, rows: np.ndarray, position: np.ndarray, values: np.ndarray, cols: int) -> None:
    """Add ``values`` (P x n) at fractional column ``position`` of ``rows``, split linearly."""
    left = np.floor(position).astype(np.int64)
    weight_right = position - left
    size = image.shape[1]
    for column, weight in ((left, 1.0 - weight_right), (left + 1, weight_right)):
        ok = (column >= 0) & (column < cols) & (weight > 0)
        flat = rows[ok] * cols + column[ok]
        for p in range(image.shape[0]):
            image[p] += np.bincount(flat, weights=values[p, ok] * weight[ok], minlength=size)


def _deposit_segments(
    image: np.ndarray, rows: np.ndarray, start: np.ndarray, end: np.ndarray, density: np.ndarray, cols: int
) -> None:
    """Add ``density`` (P x n) per pixel over the column interval [start, end] of ``rows``.

    Pixel ``j`` spans [j - 0.5, j + 0.5]; partially covered end pixels get their covered share.
    Interior pixels are filled with a difference array and a cumulative sum.
    """
    start = np.clip(start, -0.5, cols - 0.5)
    end = np.clip(end, -0.5, cols - 0.5)
    keep = end > start
    rows, start, end, density = rows[keep], start[keep], end[keep], density[:, keep]
    if rows.size == 0:
        return
    first = np.clip(np.floor(start + 0.5).astype(np.int64), 0, cols - 1)
    last = np.clip(np.floor(end + 0.5).astype(np.int64), 0, cols - 1)
    same = first == last
    share_first = np.where(same, end - start, first + 0.5 - start)
    share_last = np.where(same, 0.0, end - (last - 0.5))
    width = cols + 1
    size = image.shape[1]
    diff_size = image.shape[1] // cols * width
    interior = ~same & (last > first + 1)
    opens = rows[interior] * width + first[interior] + 1
    closes = rows[interior] * width + last[interior]
    for p in range(image.shape[0]):
        diff = np.bincount(opens, weights=density[p, interior], minlength=diff_size)
        diff -= np.bincount(closes, weights=density[p, interior], minlength=diff_size)
        filled = np.cumsum(diff.reshape(-1, width), axis=1)[:, :cols].ravel()
        ends = np.bincount(rows * cols + first, weights=density[p] * share_first, minlength=size)
        ends += np.bincount(rows * cols + last, weights=density[p] * share_last, minlength=size)
        image[p] += filled + ends


# -------------------------------------------------------------------------------------------- sensor
def sensor_response(
    sigma0: np.ndarray,
    pols: tuple[str, ...],
    *,
    noise_floor_db: float,
    looks: int,
    resolution_m: float,
    pixel_size: float,
    correlated: bool,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Thermal noise, resolution and multi-look speckle.

    The noise-equivalent sigma0 is added to the signal before speckle, so dark areas show the
    noise floor with speckle, as in real images. Cross-pol channels HV and VH share one speckle
    realisation (reciprocity); co-pol channels have their own.

    Returns:
        Speckled linear intensity and its expectation (blurred sigma0 plus noise), P x H x W each.
    """
    noise = 10.0 ** (noise_floor_db / 10.0)
    mean_power = sigma0 + noise
    # Intensity impulse response: Gaussian with the resolution as full width at half maximum.
    sigma_intensity_px = resolution_m / (2.0 * np.sqrt(2.0 * np.log(2.0))) / pixel_size
    blur = sigma_intensity_px > 0.05
    expected = np.stack([ndimage.gaussian_filter(m, sigma_intensity_px) if blur else m for m in mean_power])
    group_of = {"HH": "HH", "VV": "VV", "VH": "X", "HV": "X"}
    shape = sigma0.shape[1:]
    draws: dict[str, list[tuple[np.ndarray, np.ndarray]] | np.ndarray] = {}
    out = np.empty_like(mean_power)
    if correlated and blur:
        # The amplitude response is the square root of the intensity response: sigma * sqrt(2).
        sigma_amplitude_px = sigma_intensity_px * np.sqrt(2.0)
        energy = _response_energy(sigma_amplitude_px)
        for i, pol in enumerate(pols):
            group = group_of[pol]
            if group not in draws:
                draws[group] = [(rng.standard_normal(shape), rng.standard_normal(shape)) for _ in range(looks)]
            amplitude = np.sqrt(mean_power[i] / 2.0)
            total = np.zeros(shape)
            for real, imag in draws[group]:
                filtered_real = ndimage.gaussian_filter(amplitude * real, sigma_amplitude_px)
                filtered_imag = ndimage.gaussian_filter(amplitude * imag, sigma_amplitude_px)
                total += filtered_real**2 + filtered_imag**2
            out[i] = total / (looks * energy)
    else:
        for i, pol in enumerate(pols):
            group = group_of[pol]
            if group not in draws:
                draws[group] = rng.gamma(looks, 1.0 / looks, shape)
            out[i] = expected[i] * draws[group]
    return out, expected


def _response_energy(sigma_px: float) -> float:
    """Sum of squares of the discrete Gaussian amplitude response (so speckle keeps the mean)."""
    size = int(np.ceil(8 * sigma_px)) * 2 + 1
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    response = ndimage.gaussian_filter(delta, sigma_px)
    return float(np.sum(response**2))
