"""Class lists shared by the scene, the renderers and the labels."""

from __future__ import annotations

from xmodal.data.classes import DYNAMIC_WORLD_CLASSES

# Dynamic World land-cover classes, index = stored value of the ``landcover`` layers.
LANDCOVER_CLASSES: tuple[str, ...] = DYNAMIC_WORLD_CLASSES
WATER, TREES, GRASS, FLOODED, CROPS, SHRUB, BUILT, BARE, SNOW = range(len(LANDCOVER_CLASSES))
VEGETATION_CLASSES = (TREES, GRASS, FLOODED, CROPS, SHRUB)

BUILDING_CLASSES: tuple[str, ...] = ("background", "building")

# Scene classes in the spirit of the local climate zones (Stewart & Oke), derived from building
# density, mean building height, footprint size and land cover (see labels.scene_class).
SCENE_CLASSES: tuple[str, ...] = (
    "compact_highrise",
    "compact_midrise",
    "compact_lowrise",
    "open_highrise",
    "open_midrise",
    "open_lowrise",
    "large_lowrise",
    "sparsely_built",
    "dense_trees",
    "low_plants",
    "bare_soil_or_snow",
    "water",
)

# Roof materials: index = ``Buildings.roof_material``.
ROOF_MATERIALS: tuple[str, ...] = (
    "clay_tile",
    "concrete",
    "bitumen",
    "metal",
    "white_membrane",
    "green_roof",
    "gravel",
)

LABEL_NODATA = 255
