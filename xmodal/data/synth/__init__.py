"""The synthetic paired SAR/optical world: xmodal's default data for demos, tests and benchmarks.

Usage::

    from xmodal.data.synth import WorldConfig, generate_world
    manifest = generate_world("data/synthetic", WorldConfig(seed=0, regions=6, scenes_per_region=40))

Modules: :mod:`.config` (settings, geometry conventions), :mod:`.style` (region styles),
:mod:`.scene` (land cover, buildings, surface model), :mod:`.optical` and :mod:`.sar` (forward
models), :mod:`.labels` (noisy labels, scene classes), :mod:`.world` (tiles, files, manifest).
"""

from xmodal.data.synth.classes import LANDCOVER_CLASSES, SCENE_CLASSES
from xmodal.data.synth.config import WorldConfig
from xmodal.data.synth.style import RegionStyle, region_style
from xmodal.data.synth.world import dataset_info, generate_scene, generate_world, tile_bounds
from xmodal.data.synth.dataset import parse_world, synthesize
from xmodal.data.synth.scenes import simulate_scene, synth_scenes

__all__ = [
    "LANDCOVER_CLASSES",
    "SCENE_CLASSES",
    "RegionStyle",
    "WorldConfig",
    "dataset_info",
    "generate_scene",
    "generate_world",
    "parse_world",
    "region_style",
    "simulate_scene",
    "synth_scenes",
    "synthesize",
    "tile_bounds",
]
