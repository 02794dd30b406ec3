"""Benchmarks: commands that print figures (never timed tests).

``bench_data`` (:mod:`xmodal.bench.data`): tiles/s of the Ray Data pipeline into a Ray Train worker
beside a plain PyTorch DataLoader on the same files and cores. ``bench_train``
(:mod:`xmodal.bench.train`): step time of the Ray Train loop beside the same loop without Ray.
"""

from __future__ import annotations

from typing import Any

from xmodal.bench.data import bench_data, format_data_figures
from xmodal.bench.train import bench_train, format_train_figures

__all__ = ["bench_data", "bench_train", "format_figures"]


def format_figures(figures: dict[str, Any]) -> str:
    """A readable table of either benchmark's figures."""
    return format_data_figures(figures) if "dataloader" in figures else format_train_figures(figures)
