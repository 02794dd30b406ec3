"""What both benchmarks share: the generated world they read, the local Ray they start, epoch rates."""

from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import numpy as np

from xmodal.engine.session import connect

BENCH_WORLD = {"seed": 11, "regions": 4, "tile_size": 128}


def bench_data_root(data_root: str | None, tiles: int) -> str:
    """``data_root``, or a generated world of about ``tiles`` train tiles (made once, kept in the temp dir)."""
    if data_root:
        return data_root
    root = Path(tempfile.gettempdir()) / f"xmodal-bench-world-{tiles}"
    if not (root / "stats.json").is_file():
        from xmodal.data.synth import synthesize

        # Everything but a token val/test region goes to train so the train split has ~`tiles` tiles.
        per_region = max(4, int(np.ceil(tiles / 2)))
        synthesize(root, {**BENCH_WORLD, "scenes_per_region": per_region})
    return str(root)


def init_ray() -> bool:
    """Start a local Ray unless one is running; True when this call started it."""
    # The Train worker reserves one logical CPU; the data pipeline keeps every core's budget.
    return connect(None, (os.cpu_count() or 1) + 1, dashboard=False)


def epoch_rates(tiles: list[int], seconds: list[float]) -> dict[str, float]:
    rates = [t / s for t, s in zip(tiles, seconds)]
    steady = rates[1:] or rates
    return {"epoch1": rates[0], "steady": statistics.median(steady), "per_epoch": rates}
