"""Labelled subsets: which training tiles keep their labels (the ``data.labels:`` section).

Semi-supervised and few-shot protocols train on a labelled subset of the training split, given as a
share (``fraction: 0.2``) or a count (``count: 32``, as paper 002's 32 / 128 / 1024 samples),
optionally stratified by scene class, drawn from ``seed``. The other tiles are either dropped
(``unlabelled: drop``) or kept with their labels withheld (``unlabelled: keep``: masks set to the
ignore value, the scene label to -1 and the sample's ``labelled`` flag to 0), for methods that learn
from unlabelled tiles too. ``auto`` keeps them exactly when the method declares it can use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from xmodal.errors import ConfigError, DataError

UNLABELLED_MODES = ("auto", "keep", "drop")
EPOCH_MODES = ("subset", "full")


@dataclass
class LabelSettings:
    """Which training tiles keep their labels.

    Attributes:
        fraction: Share of the training tiles that keep their labels (ignored when ``count`` is set).
        count: Exact number of labelled training tiles (``None``: use ``fraction``).
        seed: Seed of the draw (also a sweep's seed key for repeated subsets).
        stratify: Draw per scene class (``scene_label`` of the manifest), each class getting a share
            of the subset proportional to its size (largest remainders, so the total is exact).
        unlabelled: ``drop`` the other tiles, ``keep`` them with labels withheld, or ``auto``
            (keep them when the method learns from unlabelled tiles).
        epoch: With the other tiles dropped, what one training epoch is: ``subset`` (one pass over
            the labelled tiles) or ``full`` (the labelled tiles drawn, each as evenly as possible, to
            as many samples as the whole training split has), so that a run on 32 labelled tiles
            takes as many optimiser steps as one on all of them, or as a method that keeps the
            unlabelled tiles (few-shot comparisons at equal training budget).
    """

    fraction: float = 1.0
    count: int | None = None
    seed: int = 0
    stratify: bool = False
    unlabelled: str = "auto"
    epoch: str = "subset"

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"data.labels.fraction={self.fraction}; expected a share in (0, 1]")
        if self.count is not None:
            if self.count < 1:
                raise ConfigError(f"data.labels.count={self.count}; expected >= 1")
            if self.fraction != 1.0:
                raise ConfigError(f"data.labels: give fraction ({self.fraction}) or count ({self.count}), not both")
        if self.unlabelled not in UNLABELLED_MODES:
            raise ConfigError(f"data.labels.unlabelled={self.unlabelled!r}; expected one of {list(UNLABELLED_MODES)}")
        if self.epoch not in EPOCH_MODES:
            raise ConfigError(f"data.labels.epoch={self.epoch!r}; expected one of {list(EPOCH_MODES)}")

    @property
    def is_subset(self) -> bool:
        """Whether some training tiles lose their labels (a count may still cover every tile)."""
        return self.count is not None or self.fraction < 1.0

    def describe(self) -> dict[str, Any]:
        """The subset as recorded in a run's summary and fingerprint."""
        described = {"fraction": self.fraction, "count": self.count, "seed": self.seed, "stratify": self.stratify}
        return described if self.epoch == "subset" else {**described, "epoch": self.epoch}  # old runs keep their fingerprint


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Per-class counts proportional to ``sizes`` summing to ``total`` (largest remainders)."""
    exact = sizes * total / sizes.sum()
    counts = np.minimum(np.floor(exact).astype(int), sizes)
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    for index in order:
        if counts.sum() >= total:
            break
        if counts[index] < sizes[index]:
            counts[index] += 1
    while counts.sum() < total:  # classes capped at their size: fill from the others
        room = np.nonzero(counts < sizes)[0]
        counts[room[np.argmax(sizes[room] - counts[room])]] += 1
    return counts


def choose_labelled(records: Sequence[dict[str, Any]], settings: LabelSettings) -> np.ndarray:
    """Positions (sorted) of the training records that keep their labels.

    Raises:
        DataError: ``count`` exceeds the training split, or stratification finds records
            without a scene class.
    """
    total = len(records)
    if not settings.is_subset:
        return np.arange(total)
    wanted = settings.count if settings.count is not None else max(1, int(round(total * settings.fraction)))
    if wanted > total:
        raise DataError(f"data.labels.count={wanted}: the training split has only {total} tiles")
    rng = np.random.default_rng(settings.seed)
    if not settings.stratify:
        return np.sort(rng.choice(total, size=wanted, replace=False))
    labels = np.array([int(r.get("scene_label", -1)) for r in records])
    if (labels < 0).any():
        missing = [r["tile_id"] for r, label in zip(records, labels) if label < 0][:3]
        raise DataError(
            f"data.labels.stratify needs a scene class for every training tile; {int((labels < 0).sum())} have none "
            f"(e.g. {missing}); set stratify: false"
        )
    classes, sizes = np.unique(labels, return_counts=True)
    counts = _allocate(sizes, wanted)
    chosen = [rng.choice(np.nonzero(labels == c)[0], size=k, replace=False) for c, k in zip(classes, counts) if k]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def oversample(count: int, target: int, seed: int) -> np.ndarray:
    """``target`` positions over ``range(count)``: every position ``target // count`` or one more
    times, in a seeded random order (the labelled stream's epoch, as long as the main stream's)."""
    if count < 1:
        raise DataError("the labelled stream is empty: no training tile keeps its labels")
    rng = np.random.default_rng(seed)
    repeats = -(-target // count)
    positions = np.concatenate([rng.permutation(count) for _ in range(repeats)])[:target]
    return rng.permutation(positions)
