"""Geographic splits and the leakage check.

Random tile splits leak: neighbouring tiles share buildings, fields and speckle statistics, and some
datasets ship overlapping patches. xmodal splits by region or by spatial blocks, and refuses a
manifest whose train and test footprints overlap on the ground.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, fields
from typing import Any, Iterable

from xmodal.data.manifest import record_extra, record_meta
from xmodal.errors import ConfigError, LeakageError


def _stable_fraction(key: str, seed: int) -> float:
    """A number in [0, 1) that depends only on ``key`` and ``seed`` (not on Python's hash seed)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# A record its reader keeps out of every split says so in ``extra[SPLIT_LOCKED]`` (the reason):
# e.g. SpaceNet 6's public test tiles, SAR only with no labels, on which nothing can be scored.
SPLIT_LOCKED = "split_locked"


def is_split_locked(record: dict[str, Any]) -> bool:
    """True when no split may take this record (its reader left it ``unassigned`` for good)."""
    return bool(record_extra(record).get(SPLIT_LOCKED))


def _check_fractions(val: float, test: float) -> None:
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(f"split fractions val={val}, test={test}: each must be in [0, 1) and their sum below 1")


def split_by_region(
    records: list[dict[str, Any]],
    *,
    test_regions: Iterable[str] | None = None,
    val_regions: Iterable[str] | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Assign whole regions to train / val / test.

    Named regions go where they are named (the others to train). Otherwise regions are ranked by
    a deterministic draw from ``seed``; the first ``round(test_fraction * n)`` go to test and the
    next ``round(val_fraction * n)`` to val (at least one each when there are 3 or more regions,
    and a fraction of 0 keeps that split empty); the rest train.
    """
    _check_fractions(val_fraction, test_fraction)
    regions = sorted({r["region"] for r in records})
    test_named, val_named = set(test_regions or ()), set(val_regions or ())
    unknown = (test_named | val_named) - set(regions)
    if unknown:
        raise ConfigError(f"split regions {sorted(unknown)} are not in the data; regions present: {regions}")
    assignment: dict[str, str] = {}
    if test_regions is not None or val_regions is not None:
        for region in regions:
            assignment[region] = "test" if region in test_named else "val" if region in val_named else "train"
    else:
        assignment = _allocate(regions, val_fraction, test_fraction, seed)
    return [{**r, "split": assignment[r["region"]]} for r in records]


def _allocate(keys: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Rank ``keys`` by a deterministic draw; the first ``round(test_fraction * n)`` go to test,
    the next ``round(val_fraction * n)`` to val (at least one each when there are 3 or more keys,
    and a fraction of 0 keeps that split empty), the rest to train."""
    ranked = sorted(keys, key=lambda key: _stable_fraction(key, seed))
    minimum = 1 if len(keys) >= 3 else 0
    n_test = max(minimum if test_fraction > 0 else 0, round(test_fraction * len(keys)))
    n_val = max(minimum if val_fraction > 0 else 0, round(val_fraction * len(keys)))
    return {key: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, key in enumerate(ranked)}


def split_by_blocks(
    records: list[dict[str, Any]],
    *,
    block_size: float,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Assign square ground blocks of ``block_size`` CRS units to splits, within every region.

    Each region's blocks are allocated as :func:`split_by_region` allocates regions, so every
    region holds out its share of ground and held-out tiles share the training regions' styles
    (the setting of SpaceNet 6: train and test are different parts of one city). A tile belongs
    to the block holding its centre; tiles straddling a block edge can still touch a neighbour
    block, which :func:`check_no_leakage` then reports.
    """
    _check_fractions(val_fraction, test_fraction)
    if block_size <= 0:
        raise ConfigError(f"split block_size must be positive, got {block_size}")

    def block_of(record: dict[str, Any]) -> str:
        centre_x = (record["left"] + record["right"]) / 2
        centre_y = (record["bottom"] + record["top"]) / 2
        return f"{record['crs']}:{int(centre_x // block_size)}:{int(centre_y // block_size)}"

    blocks_by_region: dict[str, set[str]] = defaultdict(set)
    for record in records:
        blocks_by_region[record["region"]].add(block_of(record))
    assignment: dict[tuple[str, str], str] = {}
    for region, blocks in blocks_by_region.items():
        for block, split in _allocate(sorted(blocks), val_fraction, test_fraction, seed).items():
            assignment[region, block] = split
    return [{**record, "split": assignment[record["region"], block_of(record)]} for record in records]


@dataclass
class SplitSettings:
    """How a dataset is split into train / val / test (``xmodal data split``, ``world.split``).

    Attributes:
        by: ``region`` (whole regions held out) or ``blocks`` (ground blocks held out in
            every region).
        val_fraction: Share of regions (or of each region's blocks) for validation.
        test_fraction: Share for test.
        block_size: Block side in CRS units (metres), required with ``by: blocks``.
        test_regions: Regions to hold out for test by name (``by: region``).
        val_regions: Regions to hold out for validation by name (``by: region``).
        seed: Seed of the draw.
    """

    by: str = "region"
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    block_size: float | None = None
    test_regions: list[str] | None = None
    val_regions: list[str] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.by not in ("region", "blocks"):
            raise ConfigError(f"split.by={self.by!r}; expected 'region' or 'blocks'")
        if self.by == "blocks" and self.block_size is None:
            raise ConfigError("split.block_size is required with split.by=blocks (in CRS units, e.g. metres)")
        _check_fractions(self.val_fraction, self.test_fraction)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> SplitSettings:
        """Build from a plain mapping; unknown keys are refused."""
        data = dict(data or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"split: unknown key(s) {unknown}; known keys: {known}")
        return cls(**data)

    def apply(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records with their ``split`` assigned, checked for train/held-out overlap.

        Records locked out of every split (:func:`is_split_locked`) keep their split.
        """
        free = [record for record in records if not is_split_locked(record)]
        if self.by == "region":
            out = split_by_region(
                free, test_regions=self.test_regions, val_regions=self.val_regions,
                val_fraction=self.val_fraction, test_fraction=self.test_fraction, seed=self.seed,
            )
        else:
            out = split_by_blocks(
                free, block_size=float(self.block_size), val_fraction=self.val_fraction,
                test_fraction=self.test_fraction, seed=self.seed,
            )
        assigned = iter(out)
        out = [record if is_split_locked(record) else next(assigned) for record in records]
        check_no_leakage(out)
        return out


def find_leaks(records: list[dict[str, Any]], held_out: tuple[str, ...] = ("val", "test")) -> list[tuple[str, str]]:
    """Pairs (train tile, held-out tile) whose footprints overlap.

    Uses a grid index on tile bounds so the check stays near-linear for large manifests.
    """
    by_crs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if record["crs"]:
            by_crs[record["crs"]].append(record)
    leaks: list[tuple[str, str]] = []
    for crs_records in by_crs.values():
        widths = [r["right"] - r["left"] for r in crs_records] + [r["top"] - r["bottom"] for r in crs_records]
        cell = max(max(widths), 1e-9)
        grid: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
        for record in crs_records:
            if record["split"] == "train":
                grid[(int(record["left"] // cell), int(record["bottom"] // cell))].append(record)
        for record in crs_records:
            if record["split"] not in held_out:
                continue
            meta = record_meta(record)
            cx, cy = int(record["left"] // cell), int(record["bottom"] // cell)
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    for train in grid.get((cx + dx, cy + dy), ()):
                        if meta.overlaps(record_meta(train)):
                            leaks.append((train["tile_id"], record["tile_id"]))
    return leaks


def check_no_leakage(records: list[dict[str, Any]], held_out: tuple[str, ...] = ("val", "test")) -> None:
    """Raise :class:`LeakageError` naming overlapping train / held-out tiles."""
    leaks = find_leaks(records, held_out)
    if leaks:
        shown = ", ".join(f"{a} <-> {b}" for a, b in leaks[:5])
        raise LeakageError(
            f"{len(leaks)} train tile(s) overlap held-out tiles on the ground ({shown}"
            f"{' ...' if len(leaks) > 5 else ''}); split by region or by larger blocks"
        )
