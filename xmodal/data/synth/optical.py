"""Optical forward model: surface reflectance, sun illumination and cast shadows, sensor blur/noise.

Reflectance spectra are typical values at the Sentinel-2 band centres (B01..B12 with B8A):
vegetation has the red edge (low red, high NIR), water is dark in the NIR and SWIR, roofs come in
several materials. The image is an orthophoto: roofs lie exactly over their footprints (no relief
displacement), as in a near-nadir, orthorectified product.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from xmodal.data.bands import SENTINEL2_BANDS
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

OPTICAL_BAND_NAMES = {"s2": SENTINEL2_BANDS, "rgbn": ("B02", "B03", "B04", "B08")}

#                    B01    B02    B03    B04    B05    B06    B07    B08    B8A    B09    B10    B11    B12
_SPECTRA = {
    WATER:   (0.070, 0.060, 0.050, 0.030, 0.022, 0.015, 0.012, 0.010, 0.009, 0.005, 0.002, 0.005, 0.003),
    TREES:   (0.025, 0.030, 0.050, 0.030, 0.080, 0.220, 0.280, 0.300, 0.310, 0.110, 0.004, 0.160, 0.080),
    GRASS:   (0.040, 0.045, 0.085, 0.050, 0.120, 0.280, 0.340, 0.360, 0.370, 0.130, 0.005, 0.250, 0.140),
    FLOODED: (0.040, 0.040, 0.060, 0.040, 0.080, 0.160, 0.200, 0.210, 0.210, 0.070, 0.004, 0.100, 0.050),
    CROPS:   (0.035, 0.040, 0.090, 0.045, 0.140, 0.320, 0.400, 0.430, 0.440, 0.150, 0.005, 0.240, 0.120),
    SHRUB:   (0.050, 0.060, 0.090, 0.100, 0.140, 0.200, 0.230, 0.250, 0.260, 0.090, 0.005, 0.300, 0.220),
    BUILT:   (0.090, 0.100, 0.115, 0.125, 0.135, 0.145, 0.155, 0.165, 0.170, 0.060, 0.004, 0.190, 0.170),
    BARE:    (0.100, 0.120, 0.170, 0.220, 0.250, 0.270, 0.290, 0.300, 0.310, 0.110, 0.006, 0.360, 0.300),
    SNOW:    (0.850, 0.850, 0.840, 0.820, 0.800, 0.780, 0.760, 0.720, 0.700, 0.250, 0.020, 0.080, 0.050),
}
_TURBID_WATER = (0.090, 0.090, 0.110, 0.090, 0.070, 0.040, 0.030, 0.025, 0.022, 0.010, 0.002, 0.006, 0.004)
_MOIST_SOIL = (0.070, 0.080, 0.110, 0.140, 0.160, 0.180, 0.190, 0.200, 0.210, 0.080, 0.005, 0.260, 0.210)
_ROOF_SPECTRA = {
    "clay_tile":      (0.060, 0.070, 0.100, 0.250, 0.300, 0.320, 0.330, 0.350, 0.350, 0.120, 0.005, 0.400, 0.320),
    "concrete":       (0.180, 0.200, 0.220, 0.230, 0.240, 0.250, 0.255, 0.260, 0.265, 0.090, 0.005, 0.280, 0.250),
    "bitumen":        (0.050, 0.055, 0.060, 0.065, 0.068, 0.070, 0.072, 0.075, 0.076, 0.030, 0.002, 0.085, 0.080),
    "metal":          (0.300, 0.310, 0.320, 0.320, 0.320, 0.320, 0.320, 0.320, 0.320, 0.110, 0.006, 0.300, 0.280),
    "white_membrane": (0.600, 0.640, 0.660, 0.660, 0.650, 0.640, 0.630, 0.620, 0.610, 0.210, 0.010, 0.500, 0.420),
    "green_roof":     (0.040, 0.045, 0.080, 0.050, 0.110, 0.250, 0.300, 0.320, 0.330, 0.110, 0.005, 0.220, 0.120),
    "gravel":         (0.130, 0.150, 0.180, 0.200, 0.210, 0.220, 0.230, 0.240, 0.245, 0.085, 0.005, 0.280, 0.250),
}
BAND_CENTRES_UM = (0.443, 0.490, 0.560, 0.665, 0.705, 0.740, 0.783, 0.842, 0.865, 0.945, 1.375, 1.610, 2.190)
# Share of skylight in the irradiance per band (larger in the blue): what is left in cast shadows.
_DIFFUSE_SHARE = (0.45, 0.38, 0.30, 0.25, 0.22, 0.20, 0.18, 0.16, 0.16, 0.15, 0.10, 0.10, 0.08)
# Texture amplitudes (relative): (medium-scale patches, fine-scale crowns/grain) per class.
_TEXTURE = {
    WATER: (0.05, 0.0), TREES: (0.10, 0.25), GRASS: (0.08, 0.04), FLOODED: (0.10, 0.06), CROPS: (0.05, 0.03),
    SHRUB: (0.10, 0.15), BUILT: (0.10, 0.06), BARE: (0.12, 0.05), SNOW: (0.03, 0.01),
}
ROOF_TEXTURE = 0.05
SENSOR_NOISE = 0.004  # reflectance units


def band_indices(band_set: str) -> list[int]:
    """Positions of a band set's bands within the 13 Sentinel-2 bands."""
    return [SENTINEL2_BANDS.index(name) for name in OPTICAL_BAND_NAMES[band_set]]


def surface_reflectance(scene: Scene, bands: list[int]) -> np.ndarray:
    """Reflectance of the top surface, B x H x W (before illumination and sensor)."""
    lc = scene.landcover
    table = np.array([_SPECTRA[c] for c in range(len(LANDCOVER_CLASSES))])[:, bands]
    reflectance = table[lc]  # H x W x B
    growth = scene.phenology[..., None]
    crop = growth * table[CROPS] + (1.0 - growth) * np.asarray(_MOIST_SOIL)[bands]
    reflectance = np.where((lc == CROPS)[..., None], crop, reflectance)
    water = (1 - scene.turbidity) * table[WATER] + scene.turbidity * np.asarray(_TURBID_WATER)[bands]
    reflectance = np.where((lc == WATER)[..., None], water, reflectance)
    texture = np.array([_TEXTURE[c] for c in range(len(LANDCOVER_CLASSES))])
    modulation = 1.0 + texture[lc, 0] * scene.texture_medium + texture[lc, 1] * scene.texture_fine

    inside = scene.building_id > 0
    if inside.any():
        b = scene.buildings
        roofs = np.array([_ROOF_SPECTRA[m] for m in ROOF_MATERIALS])[:, bands]
        per_building = roofs[b.roof_material] * b.roof_brightness[:, None]
        roof = np.concatenate([np.zeros((1, len(bands))), per_building])[scene.building_id]
        reflectance = np.where(inside[..., None], roof, reflectance)
        modulation = np.where(inside, 1.0 + ROOF_TEXTURE * scene.texture_fine, modulation)

    reflectance = reflectance * np.clip(modulation, 0.3, 2.0)[..., None]
    return np.moveaxis(reflectance, -1, 0)


def cast_shadows(dsm: np.ndarray, pixel_size: float, sun_azimuth_deg: float, sun_elevation_deg: float) -> np.ndarray:
    """Pixels in the shadow of the surface model (H x W bool), by marching towards the sun."""
    azimuth = np.deg2rad(sun_azimuth_deg)
    step_x, step_y = np.sin(azimuth), -np.cos(azimuth)  # towards the sun, image axes (y = south)
    scale = 1.0 / max(abs(step_x), abs(step_y))
    step_x, step_y = step_x * scale, step_y * scale  # one pixel along the dominant axis
    rise_per_step = scale * pixel_size * np.tan(np.deg2rad(sun_elevation_deg))
    steps = int(np.ceil((float(dsm.max()) - float(dsm.min())) / rise_per_step))
    rows, cols = dsm.shape
    shadow = np.zeros(dsm.shape, dtype=bool)
    for t in range(1, steps + 1):
        dx, dy = int(round(t * step_x)), int(round(t * step_y))
        if abs(dx) >= cols or abs(dy) >= rows:
            break
        # occluder[r, c] = dsm[r + dy, c + dx]; outside the grid nothing occludes.
        occluder = np.full(dsm.shape, -np.inf)
        occluder[max(0, -dy) : rows - max(0, dy), max(0, -dx) : cols - max(0, dx)] = dsm[
            max(0, dy) : rows - max(0, -dy), max(0, dx) : cols - max(0, -dx)
        ]
        shadow |= occluder > dsm + t * rise_per_step
    return shadow


def render_optical(scene: Scene, config: WorldConfig, rng: np.random.Generator) -> np.ndarray:
    """Reflectance image (B x H x W float32) of the configured band set."""
    bands = band_indices(config.optical_bands)
    reflectance = surface_reflectance(scene, bands)

    # Cars and street furniture: small objects of random colour on paved ground.
    points = np.isfinite(scene.point_db)
    if points.any():
        colour = rng.uniform(0.03, 0.5, (len(bands), int(points.sum())))
        reflectance[:, points] = colour

    azimuth = np.deg2rad(config.sun_azimuth_deg)
    elevation = np.deg2rad(config.sun_elevation_deg)
    sun = np.array([np.sin(azimuth) * np.cos(elevation), -np.cos(azimuth) * np.cos(elevation), np.sin(elevation)])
    gx, gy = scene.grad_x, scene.grad_y
    cos_incident = (-gx * sun[0] - gy * sun[1] + sun[2]) / np.sqrt(1.0 + gx**2 + gy**2)
    direct = np.clip(cos_incident / np.sin(elevation), 0.0, 2.0)
    lit = ~cast_shadows(scene.dsm, scene.pixel_size, config.sun_azimuth_deg, config.sun_elevation_deg)
    diffuse = np.asarray(_DIFFUSE_SHARE)[bands][:, None, None]
    irradiance = diffuse + (1.0 - diffuse) * (direct * lit)[None]
    image = reflectance * irradiance

    sigma_px = config.optical_resolution_m / (2.0 * np.sqrt(2.0 * np.log(2.0))) / scene.pixel_size
    if sigma_px > 0.05:
        image = np.stack([ndimage.gaussian_filter(band, sigma_px) for band in image])
    # Residual haze (path radiance, strongest in the blue) varies from scene to scene.
    haze = rng.uniform(0.0, 0.02) * (0.443 / np.asarray(BAND_CENTRES_UM)[bands]) ** 2
    image = image + haze[:, None, None] + SENSOR_NOISE * rng.standard_normal(image.shape)
    return np.clip(image, 0.0, 1.5).astype(np.float32)
