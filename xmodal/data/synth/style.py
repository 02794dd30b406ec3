"""Region styles: what makes one region of the synthetic world differ from another.

Each region draws an archetype (dense high-rise core, mid-rise grid, suburbs, industrial estate,
rural, coastal town, alpine village) and jitters its parameters from the seed, so a geographic
split holds out genuinely different urban form, vegetation and water.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from xmodal.data.synth.classes import ROOF_MATERIALS
from xmodal.data.synth.config import WorldConfig

_ORDER_TAG = 0x5EED0  # seed-sequence tags keep the streams of different purposes apart
_STYLE_TAG = 0x57E1E


@dataclass(frozen=True)
class RegionStyle:
    """Parameters of one region (all lengths in metres).

    Attributes:
        name: Region name used in paths and manifests (``r00_dense_core``).
        archetype: Archetype the style was drawn from.
        urban_share: Mean share of a tile inside the developed zone.
        lot_size_m: Range of the side of one building lot (street grid cell).
        street_width_m: Width of the streets between blocks.
        lots_per_block: Lots along the two grid axes of one block (streets run between blocks).
        setback_m: Distance kept between a building and its lot boundary.
        occupancy: Probability that a lot inside the developed zone holds a building.
        rural_building_rate: Probability that a lot outside the developed zone holds a building.
        building_fill: Range of the share of the buildable lot half-width a building covers.
        height_median_m: Median building height (log-normal).
        height_spread: Log-normal sigma of building heights.
        height_range_m: Building heights are clipped to this range.
        grid_angle_deg: Orientation of the street grid (degrees from the image x axis).
        orientation_jitter_deg: Standard deviation of each building's extra rotation.
        l_shape_prob: Probability that a building is L-shaped.
        pitched_roof_prob: Probability that a building has a pitched roof.
        paved_lot_prob: Probability that the unbuilt part of an occupied lot is paved.
        natural_weights: Relative shares of natural cover outside the developed zone.
        river_prob: Probability that a tile holds a river.
        lake_share: Mean share of a tile covered by lakes/ponds.
        coast: Whether tiles have a sea coast.
        wetland_prob: Probability that the water of a tile is fringed by flooded vegetation.
        tree_height_m: Typical canopy height.
        terrain_relief_m: Standard deviation of the ground elevation within a tile.
        base_elevation_m: Mean ground elevation of the region.
        roof_materials: Probability of each roof material (order of ``ROOF_MATERIALS``).
        car_density: Share of paved pixels holding a car or street furniture (bright points).
        water_vv_db: Range of calm-to-windy open-water VV backscatter.
        wet_snow: Snow is wet (dark in SAR) rather than dry.
    """

    name: str
    archetype: str
    urban_share: float
    lot_size_m: tuple[float, float]
    street_width_m: float
    lots_per_block: tuple[int, int]
    setback_m: float
    occupancy: float
    rural_building_rate: float
    building_fill: tuple[float, float]
    height_median_m: float
    height_spread: float
    height_range_m: tuple[float, float]
    grid_angle_deg: float
    orientation_jitter_deg: float
    l_shape_prob: float
    pitched_roof_prob: float
    paved_lot_prob: float
    natural_weights: dict[str, float]
    river_prob: float
    lake_share: float
    coast: bool
    wetland_prob: float
    tree_height_m: float
    terrain_relief_m: float
    base_elevation_m: float
    roof_materials: tuple[float, ...]
    car_density: float
    water_vv_db: tuple[float, float]
    wet_snow: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _roofs(**weights: float) -> tuple[float, ...]:
    raw = np.array([weights.get(name, 0.0) for name in ROOF_MATERIALS])
    return tuple(float(v) for v in raw / raw.sum())


# Natural-cover keys: "agri" becomes crop/grass/bare parcels.
ARCHETYPES: dict[str, dict[str, Any]] = {
    "dense_core": dict(
        urban_share=0.92, lot_size_m=(30.0, 50.0), street_width_m=16.0, lots_per_block=(2, 3), setback_m=1.0,
        occupancy=0.9, rural_building_rate=0.05, building_fill=(0.75, 0.98),
        height_median_m=32.0, height_spread=0.45, height_range_m=(12.0, 90.0),
        orientation_jitter_deg=2.0, l_shape_prob=0.35, pitched_roof_prob=0.0, paved_lot_prob=0.9,
        natural_weights=dict(trees=0.35, grass=0.4, shrub=0.05, bare=0.2),
        river_prob=0.25, lake_share=0.0, coast=False, wetland_prob=0.0,
        tree_height_m=12.0, terrain_relief_m=1.5, base_elevation_m=20.0,
        roof_materials=_roofs(concrete=0.35, bitumen=0.25, metal=0.1, white_membrane=0.15, green_roof=0.05, gravel=0.1),
        car_density=0.06, water_vv_db=(-23.0, -16.0), wet_snow=False,
    ),
    "midrise_grid": dict(
        urban_share=0.8, lot_size_m=(22.0, 34.0), street_width_m=12.0, lots_per_block=(2, 4), setback_m=1.5,
        occupancy=0.8, rural_building_rate=0.05, building_fill=(0.65, 0.95),
        height_median_m=15.0, height_spread=0.35, height_range_m=(6.0, 40.0),
        orientation_jitter_deg=4.0, l_shape_prob=0.3, pitched_roof_prob=0.25, paved_lot_prob=0.6,
        natural_weights=dict(trees=0.4, grass=0.4, shrub=0.1, bare=0.1),
        river_prob=0.2, lake_share=0.01, coast=False, wetland_prob=0.1,
        tree_height_m=14.0, terrain_relief_m=2.0, base_elevation_m=60.0,
        roof_materials=_roofs(clay_tile=0.2, concrete=0.3, bitumen=0.25, metal=0.05, white_membrane=0.05, gravel=0.15),
        car_density=0.05, water_vv_db=(-23.0, -16.0), wet_snow=False,
    ),
    "suburban": dict(
        urban_share=0.75, lot_size_m=(18.0, 28.0), street_width_m=9.0, lots_per_block=(2, 6), setback_m=2.5,
        occupancy=0.75, rural_building_rate=0.04, building_fill=(0.5, 0.85),
        height_median_m=7.0, height_spread=0.25, height_range_m=(3.5, 14.0),
        orientation_jitter_deg=12.0, l_shape_prob=0.3, pitched_roof_prob=0.75, paved_lot_prob=0.15,
        natural_weights=dict(trees=0.45, grass=0.35, shrub=0.1, agri=0.1),
        river_prob=0.15, lake_share=0.02, coast=False, wetland_prob=0.2,
        tree_height_m=15.0, terrain_relief_m=3.0, base_elevation_m=80.0,
        roof_materials=_roofs(clay_tile=0.45, concrete=0.1, bitumen=0.3, metal=0.05, gravel=0.05, green_roof=0.05),
        car_density=0.03, water_vv_db=(-24.0, -17.0), wet_snow=False,
    ),
    "industrial": dict(
        urban_share=0.8, lot_size_m=(50.0, 90.0), street_width_m=16.0, lots_per_block=(1, 2), setback_m=4.0,
        occupancy=0.7, rural_building_rate=0.05, building_fill=(0.55, 0.9),
        height_median_m=10.0, height_spread=0.3, height_range_m=(5.0, 22.0),
        orientation_jitter_deg=3.0, l_shape_prob=0.25, pitched_roof_prob=0.1, paved_lot_prob=0.7,
        natural_weights=dict(grass=0.4, bare=0.35, shrub=0.15, trees=0.1),
        river_prob=0.2, lake_share=0.02, coast=False, wetland_prob=0.05,
        tree_height_m=10.0, terrain_relief_m=1.0, base_elevation_m=10.0,
        roof_materials=_roofs(metal=0.45, white_membrane=0.2, bitumen=0.15, concrete=0.15, gravel=0.05),
        car_density=0.05, water_vv_db=(-22.0, -15.0), wet_snow=False,
    ),
    "rural": dict(
        urban_share=0.1, lot_size_m=(22.0, 40.0), street_width_m=7.0, lots_per_block=(2, 3), setback_m=3.0,
        occupancy=0.55, rural_building_rate=0.02, building_fill=(0.35, 0.75),
        height_median_m=6.0, height_spread=0.3, height_range_m=(3.0, 14.0),
        orientation_jitter_deg=25.0, l_shape_prob=0.25, pitched_roof_prob=0.7, paved_lot_prob=0.2,
        natural_weights=dict(agri=0.6, trees=0.2, grass=0.12, shrub=0.08),
        river_prob=0.3, lake_share=0.02, coast=False, wetland_prob=0.4,
        tree_height_m=18.0, terrain_relief_m=4.0, base_elevation_m=120.0,
        roof_materials=_roofs(clay_tile=0.35, metal=0.3, bitumen=0.15, concrete=0.1, gravel=0.1),
        car_density=0.01, water_vv_db=(-24.0, -17.0), wet_snow=False,
    ),
    "coastal": dict(
        urban_share=0.55, lot_size_m=(20.0, 32.0), street_width_m=10.0, lots_per_block=(2, 3), setback_m=2.0,
        occupancy=0.75, rural_building_rate=0.03, building_fill=(0.5, 0.85),
        height_median_m=12.0, height_spread=0.5, height_range_m=(4.0, 50.0),
        orientation_jitter_deg=6.0, l_shape_prob=0.25, pitched_roof_prob=0.35, paved_lot_prob=0.4,
        natural_weights=dict(grass=0.35, shrub=0.3, bare=0.25, trees=0.1),
        river_prob=0.1, lake_share=0.0, coast=True, wetland_prob=0.35,
        tree_height_m=8.0, terrain_relief_m=2.0, base_elevation_m=5.0,
        roof_materials=_roofs(white_membrane=0.25, concrete=0.3, clay_tile=0.2, metal=0.1, gravel=0.15),
        car_density=0.04, water_vv_db=(-21.0, -12.0), wet_snow=False,
    ),
    "alpine": dict(
        urban_share=0.3, lot_size_m=(20.0, 30.0), street_width_m=7.0, lots_per_block=(2, 3), setback_m=3.0,
        occupancy=0.6, rural_building_rate=0.02, building_fill=(0.4, 0.75),
        height_median_m=8.0, height_spread=0.3, height_range_m=(4.0, 16.0),
        orientation_jitter_deg=20.0, l_shape_prob=0.2, pitched_roof_prob=0.85, paved_lot_prob=0.2,
        natural_weights=dict(trees=0.35, snow=0.25, bare=0.2, grass=0.15, shrub=0.05),
        river_prob=0.35, lake_share=0.01, coast=False, wetland_prob=0.05,
        tree_height_m=20.0, terrain_relief_m=12.0, base_elevation_m=1200.0,
        roof_materials=_roofs(metal=0.35, clay_tile=0.2, bitumen=0.25, gravel=0.2),
        car_density=0.01, water_vv_db=(-22.0, -15.0), wet_snow=True,
    ),
}


def archetype_order(seed: int) -> list[str]:
    """The seed's permutation of archetypes; region ``i`` takes entry ``i % len``.

    Independent of the number of regions, so region ``i`` keeps its style when regions are added.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, _ORDER_TAG]))
    names = list(ARCHETYPES)
    return [names[i] for i in rng.permutation(len(names))]


def region_style(config: WorldConfig, region_index: int) -> RegionStyle:
    """The style of one region, drawn from ``(config.seed, region_index)`` only."""
    archetype = archetype_order(config.seed)[region_index % len(ARCHETYPES)]
    base = ARCHETYPES[archetype]
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _STYLE_TAG, region_index]))

    def jitter(value: float, spread: float = 0.15) -> float:
        return float(value * rng.uniform(1.0 - spread, 1.0 + spread))

    low_h, high_h = base["height_range_m"]
    median = float(np.clip(jitter(base["height_median_m"], 0.2), low_h, high_h))
    weights = {k: jitter(v, 0.3) for k, v in base["natural_weights"].items()}
    total = sum(weights.values())
    return RegionStyle(
        name=f"r{region_index:02d}_{archetype}",
        archetype=archetype,
        urban_share=float(np.clip(jitter(base["urban_share"], 0.1), 0.0, 1.0)),
        lot_size_m=tuple(jitter(v, 0.1) for v in base["lot_size_m"]),
        street_width_m=jitter(base["street_width_m"], 0.15),
        lots_per_block=base["lots_per_block"],
        setback_m=base["setback_m"],
        occupancy=float(np.clip(jitter(base["occupancy"], 0.1), 0.0, 1.0)),
        rural_building_rate=jitter(base["rural_building_rate"], 0.3),
        building_fill=base["building_fill"],
        height_median_m=median,
        height_spread=jitter(base["height_spread"], 0.15),
        height_range_m=(low_h, high_h),
        grid_angle_deg=float(rng.uniform(0.0, 90.0)),
        orientation_jitter_deg=jitter(base["orientation_jitter_deg"], 0.3),
        l_shape_prob=base["l_shape_prob"],
        pitched_roof_prob=base["pitched_roof_prob"],
        paved_lot_prob=float(np.clip(jitter(base["paved_lot_prob"], 0.15), 0.0, 1.0)),
        natural_weights={k: v / total for k, v in weights.items()},
        river_prob=base["river_prob"],
        lake_share=base["lake_share"],
        coast=base["coast"],
        wetland_prob=base["wetland_prob"],
        tree_height_m=jitter(base["tree_height_m"], 0.2),
        terrain_relief_m=jitter(base["terrain_relief_m"], 0.3),
        base_elevation_m=jitter(base["base_elevation_m"], 0.3),
        roof_materials=base["roof_materials"],
        car_density=jitter(base["car_density"], 0.3),
        water_vv_db=base["water_vv_db"],
        wet_snow=base["wet_snow"],
    )
