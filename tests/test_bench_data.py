"""``bench data``'s own logic: tile sizes, cycled epochs, the scale verdicts, the memory sampler."""

from __future__ import annotations

import mmap

import pytest

from xmodal.bench.data import (
    MemorySampler,
    cycled_records,
    format_data_figures,
    parse_tile_sizes,
    scale_figures,
)
from xmodal.cli.main import main
from xmodal.errors import ConfigError


def test_tile_sizes_parse_and_refuse_bad_values():
    assert parse_tile_sizes("256,2048,16384") == [256, 2048, 16384]
    assert parse_tile_sizes(" 64 , 64,16") == [64, 16]
    for bad in ("256,0", "256,-1", "2k", "256,,512"):
        with pytest.raises(ConfigError, match="not a positive whole number"):
            parse_tile_sizes(bad)


def test_bench_train_takes_one_size(capsys):
    assert main(["bench", "train", "--tiles", "16,32"]) == 2
    assert "give one size" in capsys.readouterr().err


def test_cycled_records_repeat_the_split_with_their_own_ids():
    base = [{"tile_id": f"t{i}", "index": i} for i in range(3)]
    out = cycled_records(base, 8)
    assert [r["index"] for r in out] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert len({r["tile_id"] for r in out}) == 8 and out[:3] == base
    assert cycled_records(base, 2) == base[:2]


def _row(tiles: int, steady: float, memory: float) -> dict:
    return {"tiles": tiles, "epoch1": steady / 2, "steady": steady, "epoch_seconds": [2 * tiles / steady, tiles / steady],
            "peak_memory_mib": memory, "peak_object_store_mib": 40.0}


def test_scale_verdicts_follow_the_ten_percent_target():
    flat = scale_figures([_row(256, 200.0, 1000.0), _row(2048, 210.0, 1050.0), _row(16384, 215.0, 1090.0)])
    assert flat["tiles_per_s_flat"] and flat["time_linear_in_tiles"] and flat["memory_flat"]
    assert flat["steady_spread"] == pytest.approx(0.075)
    slow_start = scale_figures([_row(256, 150.0, 1000.0), _row(16384, 215.0, 1500.0)])
    assert not slow_start["tiles_per_s_flat"] and slow_start["time_linear_in_tiles"] is None and not slow_start["memory_flat"]
    # A fixed cost per epoch is still linear in tiles; a per-tile cost that grows with the size is not.
    fixed_cost = [_row(t, t / (1.0 + t / 100.0), 1000.0) for t in (256, 2048, 16384)]  # 1 s + 10 ms per tile
    assert scale_figures(fixed_cost)["time_linear_in_tiles"] and scale_figures(fixed_cost)["epoch_fixed_s"] == pytest.approx(1.0)
    assert scale_figures(fixed_cost)["epoch_ms_per_tile"] == pytest.approx(10.0)
    slowing = scale_figures([_row(256, 200.0, 1000.0), _row(2048, 200.0, 1000.0), _row(16384, 100.0, 1000.0)])
    assert slowing["time_linear_in_tiles"] is False
    figures = {
        "tiles_per_epoch": 256, "distinct_tiles": 256, "epochs": 3, "batch_size": 16, "cores": 2, "raw_decode_tiles_per_s": 239.0,
        "dataloader": {"epoch1": 334.0, "steady": 385.0}, "target": "t", "scale": slow_start,
        "ray_data_streaming": {"epoch1": 300.0, "steady": 400.0, "ratio_vs_dataloader": 400 / 385, "epoch1_ratio_vs_dataloader": 300 / 334,
                               "peak_memory_mib": 1000.0, "cpu_ms_per_tile": 9.5, "cpu_window_s": 4.0,
                               "first_batch_seconds": [7.18, 0.78, 0.85], "epoch_seconds": [8.2, 1.7, 1.75],
                               "cpu_per_process": [{"process": "ray::MapBatches(decode)", "count": 2, "cpu_s": 3.1, "cpu_percent": 77.5}]},
    }
    text = format_data_figures(figures)
    assert "1.04x" in text and "0.90x" in text and "16384" in text and "not flat" in text and "linearity needs 3 sizes" in text
    # Where the CPU went: a tile's decode alone against the streaming path's CPU per tile, by process.
    assert "raw decode costs 4.18 CPU ms per tile" in text and "(streaming): 9.50 CPU ms per tile" in text
    assert "ray::MapBatches(decode)" in text and "later epochs, the 8 busiest (4.0 s" in text
    assert "first batch after 7.18 s in epoch 1, after 0.78, 0.85 s in later epochs (epoch seconds: 8.20, 1.70, 1.75)" in text


def test_memory_sampler_sees_an_allocation(monkeypatch):
    import psutil

    # This process only: in the suite the session's Ray workers are children too, and one of them
    # exiting between two samples frees more than the allocation adds.
    monkeypatch.setattr(psutil.Process, "children", lambda self, recursive=False: [])
    with MemorySampler(interval=60) as memory:
        before = memory.peak_bytes
        # 64 MiB of fresh pages, touched: a fresh anonymous mapping, because malloc may hand back
        # pages that earlier tests freed and that are still resident (no growth to see then).
        block = mmap.mmap(-1, 64 * 2**20)
        block.write(b"\x01" * len(block))
        memory.sample()
        assert memory.peak_bytes - before >= 48 * 2**20
        block.close()
    assert memory.figures()["peak_memory_mib"] >= 48
