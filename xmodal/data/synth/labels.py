"""Label products: the noisy land-cover layer and the scene (local-climate-zone-like) class.

Noise model of ``landcover_noisy`` (what real weak labels such as Dynamic World get wrong):
    1. boundary shifts: a smooth random warp moves class boundaries by a few pixels;
    2. class confusions: smooth patches covering ``label_confusion_rate`` of the tile are relabelled
       to a plausible confusable class (grass <-> crops, trees <-> shrub, water <-> flooded ...);
    3. blob errors: a few compact blobs of a wrong class present in the tile.
The measured share of differing pixels is returned, not assumed.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from xmodal.data.synth.classes import (
    BARE,
    BUILT,
    CROPS,
    FLOODED,
    GRASS,
    LABEL_NODATA,
    LANDCOVER_CLASSES,
    SCENE_CLASSES,
    SHRUB,
    SNOW,
    TREES,
    VEGETATION_CLASSES,
    WATER,
)
from xmodal.data.synth.config import WorldConfig
from xmodal.data.synth.fields import smooth_field, top_share

# Classes each class is plausibly mistaken for.
CONFUSABLE: dict[int, tuple[int, ...]] = {
    WATER: (FLOODED,),
    TREES: (SHRUB, GRASS),
    GRASS: (CROPS, SHRUB),
    FLOODED: (WATER, GRASS),
    CROPS: (GRASS, BARE),
    SHRUB: (GRASS, TREES, BARE),
    BUILT: (BARE,),
    BARE: (BUILT, SHRUB),
    SNOW: (BARE,),
}
_CONFUSION_PATCH_PX = 6.0
_WARP_SCALE_PX = 10.0


def noisy_landcover(
    truth: np.ndarray, config: WorldConfig, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Apply the noise model to a uint8 land-cover tile (``LABEL_NODATA`` pixels stay as they are).

    Returns:
        The noisy layer and its measured noise rate (share of valid pixels that differ).
    """
    shape = truth.shape
    valid = truth != LABEL_NODATA
    noisy = truth.copy()

    shift = config.label_boundary_shift_px
    if shift > 0:
        rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
        dy = np.clip(shift * smooth_field(rng, shape, _WARP_SCALE_PX), -2 * shift, 2 * shift)
        dx = np.clip(shift * smooth_field(rng, shape, _WARP_SCALE_PX), -2 * shift, 2 * shift)
        src_r = np.clip(np.rint(rows + dy).astype(np.int64), 0, shape[0] - 1)
        src_c = np.clip(np.rint(cols + dx).astype(np.int64), 0, shape[1] - 1)
        warped = truth[src_r, src_c]
        noisy = np.where(valid & (warped != LABEL_NODATA), warped, noisy)

    rate = config.label_confusion_rate
    if rate > 0 and valid.any():
        patches = top_share(smooth_field(rng, shape, _CONFUSION_PATCH_PX), rate, where=valid)
        # A second smooth field picks among several partners consistently within a patch.
        choice = ndtr(smooth_field(rng, shape, _CONFUSION_PATCH_PX * 2))
        confused = noisy.copy()
        for cls, partners in CONFUSABLE.items():
            where = patches & (noisy == cls)
            if where.any():
                pick = np.minimum((choice[where] * len(partners)).astype(np.int64), len(partners) - 1)
                confused[where] = np.asarray(partners, dtype=np.uint8)[pick]
        noisy = confused

    n_blobs = rng.poisson(config.label_blob_count)
    present = np.unique(truth[valid])
    if n_blobs and present.size:
        rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
        for _ in range(n_blobs):
            centre_r, centre_c = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
            radius = config.label_blob_radius_px * rng.uniform(0.5, 1.5)
            stretch = rng.uniform(0.6, 1.6)
            angle = rng.uniform(0, np.pi)
            du, dv = cols - centre_c, rows - centre_r
            along = du * np.cos(angle) + dv * np.sin(angle)
            across = -du * np.sin(angle) + dv * np.cos(angle)
            blob = (along / (radius * stretch)) ** 2 + (across * stretch / radius) ** 2 < 1.0
            noisy[blob & valid] = rng.choice(present)

    noisy[~valid] = LABEL_NODATA
    measured = float(np.mean(noisy[valid] != truth[valid])) if valid.any() else 0.0
    return noisy, measured


def scene_class(landcover: np.ndarray, building_id: np.ndarray, building_height: np.ndarray, pixel_size: float) -> int:
    """Local-climate-zone-like class of a tile (index into ``SCENE_CLASSES``).

    Args:
        landcover: Land-cover tile, ``LABEL_NODATA`` where unknown.
        building_id: Building ids of the tile (0 = none).
        building_height: Per-pixel roof height (used on building pixels).
        pixel_size: Metres per pixel.
    """
    valid = landcover != LABEL_NODATA
    total = max(int(valid.sum()), 1)
    on_building = (building_id > 0) & valid
    building_share = on_building.sum() / total
    share = {c: np.sum(landcover[valid] == c) / total for c in range(len(LANDCOVER_CLASSES))}
    vegetation = sum(share[c] for c in VEGETATION_CLASSES)

    if building_share >= 0.08:
        mean_height = float(building_height[on_building].mean())
        ids = np.unique(building_id[on_building])
        mean_footprint_m2 = on_building.sum() * pixel_size**2 / max(len(ids), 1)
        if mean_height < 15.0 and mean_footprint_m2 >= 700.0:
            return SCENE_CLASSES.index("large_lowrise")
        density = "compact" if building_share >= 0.25 else "open"
        rise = "highrise" if mean_height >= 25.0 else "midrise" if mean_height >= 10.0 else "lowrise"
        return SCENE_CLASSES.index(f"{density}_{rise}")
    if building_share >= 0.01:
        return SCENE_CLASSES.index("sparsely_built")
    if share[WATER] >= 0.5:
        return SCENE_CLASSES.index("water")
    if share[TREES] >= 0.4:
        return SCENE_CLASSES.index("dense_trees")
    if vegetation >= share[BARE] + share[SNOW] + share[BUILT]:
        return SCENE_CLASSES.index("low_plants")
    return SCENE_CLASSES.index("bare_soil_or_snow")
