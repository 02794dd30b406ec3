"""Making a ready-to-train dataset folder in one call (synthetic world + splits + statistics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.data.manifest import Manifest
from xmodal.data.prepared import write_stats
from xmodal.data.splits import SplitSettings


def synthesize(out: str | Path, world: dict[str, Any] | None = None, split: SplitSettings | dict[str, Any] | None = None) -> Manifest:
    """Generate a synthetic world, split it, check leakage and compute statistics.

    Args:
        out: Folder to write (created).
        world: :class:`~xmodal.data.synth.WorldConfig` fields (defaults for missing ones).
        split: How to split (:class:`~xmodal.data.splits.SplitSettings`; default: whole regions,
            15 % val and 20 % test).
    """
    from xmodal.data.synth import WorldConfig, generate_world

    if not isinstance(split, SplitSettings):
        split = SplitSettings.from_dict(split)
    manifest = generate_world(out, WorldConfig.from_dict(world or {}))
    manifest = manifest.with_records(split.apply(manifest.records))
    manifest.save(out)
    write_stats(manifest)
    return manifest
