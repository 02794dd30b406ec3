"""Class lists shared by readers, the synthetic world and methods."""

from __future__ import annotations

# Dynamic World land-cover classes (Brown et al. 2022), index = stored label value. Used by the
# synthetic world's land cover, SSL4EO-S12's Dynamic World labels and paper 003 (CromSS).
DYNAMIC_WORLD_CLASSES: tuple[str, ...] = (
    "water",
    "trees",
    "grass",
    "flooded_vegetation",
    "crops",
    "shrub_and_scrub",
    "built",
    "bare",
    "snow_and_ice",
)
