"""The pipeline's transforms without Ray: a map-style PyTorch dataset and DataLoader.

Benchmarks compare Ray Data against :func:`torch_loader`; tests and GPU machines without Ray
use :class:`TileDataset` and :func:`iterate_numpy` directly.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from xmodal.data.prepared import PreparedData
from xmodal.data.transforms import Preparer, stack


class TileDataset(torch.utils.data.Dataset):
    """Map-style PyTorch dataset over the same transforms (no Ray); training samples carry the
    method's augmented views."""

    def __init__(
        self,
        prepared: PreparedData,
        split: str,
        train: bool | None = None,
        seed: int | None = None,
        records: list | None = None,
    ) -> None:
        train = split == "train" if train is None else train
        self.records = prepared.records(split) if records is None else records
        self.views = prepared.views if train else 1
        settings = prepared.settings
        self.decoder = prepared.decoder()
        self.preparer = Preparer(prepared.info, prepared.stats, settings.tile_size, settings.augment if train else None, settings.clip_sigma)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(None if self.seed is None else (self.seed, position))
        return self.preparer.views(self.decoder(self.records[position]), rng, self.views)


def torch_loader(
    prepared: PreparedData, split: str, *, num_workers: int = 0, shuffle: bool | None = None, records: list | None = None
) -> torch.utils.data.DataLoader:
    """A plain DataLoader reading the same files with the same transforms (``records``: these
    records of ``split`` rather than all of them, e.g. the tiles a benchmark gives Ray Data too)."""
    train = split == "train"
    return torch.utils.data.DataLoader(
        TileDataset(prepared, split, records=records),
        batch_size=prepared.settings.batch_size,
        shuffle=train if shuffle is None else shuffle,
        num_workers=num_workers,
        drop_last=train,
        persistent_workers=num_workers > 0,
    )


def labelled_loader(prepared: PreparedData, *, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """The labelled stream without Ray: the labelled tiles, drawn (reshuffled each epoch, each tile
    as evenly as possible) to as many samples as the main training loader has."""
    dataset = TileDataset(prepared, "train", records=prepared.labelled_records())
    sampler = torch.utils.data.RandomSampler(dataset, replacement=False, num_samples=len(prepared.records("train")))
    return torch.utils.data.DataLoader(
        dataset, batch_size=prepared.settings.batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
        persistent_workers=num_workers > 0,
    )


def iterate_numpy(prepared: PreparedData, split: str) -> Iterator[dict[str, np.ndarray]]:
    """Prepared evaluation batches without Ray or torch workers (for tests and small sets)."""
    dataset = TileDataset(prepared, split, train=False)
    size = prepared.settings.batch_size
    for start in range(0, len(dataset), size):
        yield stack([dataset[i] for i in range(start, min(start + size, len(dataset)))])
