"""Making a ready-to-train dataset folder in one call (synthetic world + splits + statistics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.data.manifest import Manifest
from xmodal.data.prepared import write_stats
from xmodal.data.splits import SplitSettings


def parse_world(world: dict[str, Any] | None) -> tuple[Any, SplitSettings]:
    """A config's ``world:`` section as a validated WorldConfig and its optional ``split:``."""
    from xmodal.data.synth.config import WorldConfig

    fields = dict(world or {})
    split = SplitSettings.from_dict(fields.pop("split", None))
    return WorldConfig.from_dict(fields), split


def synthesize(out: str | Path, world: dict[str, Any] | None = None, split: SplitSettings | dict[str, Any] | None = None) -> Manifest:
    """Generate a synthetic world, split it, check leakage and compute statistics.

    Args:
        out: Folder to write (created).
        world: :class:`~xmodal.data.synth.WorldConfig` fields (defaults for missing ones), with an
            optional ``split`` mapping.
        split: How to split (:class:`~xmodal.data.splits.SplitSettings`); overrides ``world``'s
            ``split``. Default: whole regions, 15 % val and 20 % test.
    """
    from xmodal.data.synth.world import generate_world

    world_config, world_split = parse_world(world)
    if split is None:
        split = world_split
    elif not isinstance(split, SplitSettings):
        split = SplitSettings.from_dict(split)
    manifest = generate_world(out, world_config)
    manifest = manifest.with_records(split.apply(manifest.records))
    manifest.save(out)
    write_stats(manifest)
    return manifest
