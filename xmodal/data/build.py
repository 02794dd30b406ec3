"""Making a ready-to-train dataset folder in one call (synthetic world + splits + statistics)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xmodal.data.manifest import Manifest
from xmodal.data.prepared import write_stats
from xmodal.data.splits import check_no_leakage, split_by_region


def synthesize(
    out: str | Path,
    world: dict[str, Any] | None = None,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    test_regions: list[str] | None = None,
    val_regions: list[str] | None = None,
    split_seed: int = 0,
) -> Manifest:
    """Generate a synthetic world, split it by region, check leakage and compute statistics.

    Args:
        out: Folder to write (created).
        world: :class:`~xmodal.data.synth.WorldConfig` fields (defaults for missing ones).
        val_fraction: Share of regions drawn for validation (when no region is named).
        test_fraction: Share of regions drawn for test.
        test_regions: Regions to hold out for test by name.
        val_regions: Regions to hold out for validation by name.
        split_seed: Seed of the region draw.
    """
    from xmodal.data.synth import WorldConfig, generate_world

    manifest = generate_world(out, WorldConfig.from_dict(world or {}))
    records = split_by_region(
        manifest.records,
        test_regions=test_regions,
        val_regions=val_regions,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=split_seed,
    )
    check_no_leakage(records)
    manifest = manifest.with_records(records)
    manifest.save(out)
    write_stats(manifest)
    return manifest
