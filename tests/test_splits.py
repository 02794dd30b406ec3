"""Geographic splits and the leakage check."""

from __future__ import annotations

import pytest

from xmodal.data.manifest import make_record
from xmodal.data.splits import SplitSettings, check_no_leakage, find_leaks, split_by_blocks, split_by_region
from xmodal.errors import ConfigError, LeakageError


def grid_records(regions: int = 5, per_region: int = 4, size: float = 100.0):
    records = []
    for r in range(regions):
        for i in range(per_region):
            left = r * 10_000 + i * size
            records.append(
                make_record(tile_id=f"r{r}_{i}", region=f"r{r}", crs="EPSG:32631", bounds=(left, 0, left + size, size), sar_path="s", optical_path="o")
            )
    return records


def test_region_split_keeps_regions_whole_and_fills_each_split():
    records = split_by_region(grid_records(), seed=1)
    by_region = {}
    for record in records:
        by_region.setdefault(record["region"], set()).add(record["split"])
    assert all(len(splits) == 1 for splits in by_region.values())
    assert {s for splits in by_region.values() for s in splits} == {"train", "val", "test"}
    check_no_leakage(records)


def test_named_regions_and_unknown_region():
    records = split_by_region(grid_records(), test_regions=["r2"], val_regions=["r0"])
    assert {r["split"] for r in records if r["region"] == "r2"} == {"test"}
    assert {r["split"] for r in records if r["region"] == "r0"} == {"val"}
    with pytest.raises(ConfigError, match="r9"):
        split_by_region(grid_records(), test_regions=["r9"])


def test_block_split_is_deterministic():
    a = split_by_blocks(grid_records(), block_size=1000.0, seed=4)
    b = split_by_blocks(grid_records(), block_size=1000.0, seed=4)
    assert [r["split"] for r in a] == [r["split"] for r in b]


def test_leakage_check_catches_an_overlap():
    records = grid_records(regions=1, per_region=3)
    records[0]["split"], records[1]["split"], records[2]["split"] = "train", "test", "test"
    shifted = dict(records[1], tile_id="overlapping", left=records[0]["left"] + 50, right=records[0]["right"] + 50)
    shifted["split"] = "test"
    assert find_leaks(records) == []  # edge-touching tiles share no area
    with pytest.raises(LeakageError, match="r0_0 <-> overlapping"):
        check_no_leakage(records + [shifted])


def test_other_crs_never_overlaps():
    records = grid_records(regions=1, per_region=2)
    records[1] = dict(records[0], tile_id="copy", crs="EPSG:32632", split="test")
    records[0]["split"] = "train"
    assert find_leaks(records) == []


def test_block_split_holds_out_ground_in_every_region():
    # 5 regions x 4 tiles, one block per tile: each region keeps 2 for train, 1 for val, 1 for test.
    records = split_by_blocks(grid_records(), block_size=100.0, val_fraction=0.2, test_fraction=0.2, seed=3)
    for region in {r["region"] for r in records}:
        splits = sorted(r["split"] for r in records if r["region"] == region)
        assert splits == ["test", "train", "train", "val"], (region, splits)
    check_no_leakage(records)


def test_split_settings_validate_and_apply():
    with pytest.raises(ConfigError, match="block_size is required"):
        SplitSettings(by="blocks")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['blocksize'\]"):
        SplitSettings.from_dict({"by": "blocks", "blocksize": 100})
    with pytest.raises(ConfigError, match="split.by='tiles'"):
        SplitSettings(by="tiles")
    by_region = SplitSettings(test_regions=["r1"], val_regions=["r2"]).apply(grid_records())
    assert {r["region"] for r in by_region if r["split"] == "test"} == {"r1"}
    overlapping = grid_records(regions=1, per_region=2, size=100.0)
    overlapping[1]["left"] -= 50  # the second tile now overlaps the first
    overlapping[1]["right"] -= 50
    with pytest.raises(LeakageError):
        SplitSettings(by="blocks", block_size=50.0, val_fraction=0.0, test_fraction=0.5).apply(overlapping)
