"""A prepared dataset: manifest + splits + statistics, checked and ready to stream.

This module has no Ray dependency, so methods and tests can use it directly; the Ray Data
pipeline (:mod:`xmodal.data.pipeline`) and the plain PyTorch loader both build on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.manifest import DATASET_FILE, STATS_FILE, Manifest
from xmodal.data.readers.base import LoadOptions, detect_reader
from xmodal.data.splits import check_no_leakage
from xmodal.data.stats import DatasetStats, compute_stats, load_stats, save_stats
from xmodal.data.transforms import AugmentSettings
from xmodal.errors import ConfigError, DataError


@dataclass
class DataSettings:
    """How a run reads its data (the ``data:`` section of a config).

    Attributes:
        root: A prepared dataset folder (with ``dataset.json``) or a raw dataset folder of a
            supported layout (indexed into ``prepared_dir`` on first use).
        prepared_dir: Where to keep the manifest and statistics of a raw dataset (default:
            ``<root>/.xmodal``).
        mask_layer: Label layer used as ``mask`` (e.g. ``buildings``, ``landcover``), or null.
        noisy_layer: Label layer used as ``noisy_mask``, or null.
        tile_size: Fixed tile height/width fed to models.
        batch_size: Per-worker batch size.
        sar_db: Convert SAR intensity bands (linear, amplitude) to dB before normalising.
        clip_sigma: Clip normalised values to this many standard deviations.
        label_fraction: Share of training tiles whose labels are used (seeded subset).
        label_seed: Seed of that subset.
        cache: ``auto`` (cache decoded tiles in the object store when they fit), ``always``, ``never``.
        blocks: Ray Data blocks per split (``None``: about 16 MiB of decoded tiles per block).
        shuffle_buffer: Local shuffle buffer (rows) on each training worker.
        augment: Training augmentation.
        reader_options: Options passed to the reader when indexing a raw folder.
    """

    root: str = "data/synthetic"
    prepared_dir: str | None = None
    mask_layer: str | None = "buildings"
    noisy_layer: str | None = None
    tile_size: int = 128
    batch_size: int = 8
    sar_db: bool = True
    clip_sigma: float = 6.0
    label_fraction: float = 1.0
    label_seed: int = 0
    cache: str = "auto"
    blocks: int | None = None
    shuffle_buffer: int = 64
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    reader_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.cache not in ("auto", "always", "never"):
            raise ConfigError(f"data.cache={self.cache!r}; expected auto, always or never")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"data.label_fraction={self.label_fraction}; expected a share in (0, 1]")
        if self.tile_size <= 0 or self.batch_size <= 0:
            raise ConfigError("data.tile_size and data.batch_size must be positive")

    def load_options(self) -> LoadOptions:
        return LoadOptions(mask_layer=self.mask_layer, noisy_layer=self.noisy_layer)


def split_signature(manifest: Manifest) -> str:
    """A fingerprint of which tiles are in the training split (stats must match it)."""
    ids = sorted(r["tile_id"] for r in manifest.split("train"))
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


@dataclass
class PreparedData:
    """A checked dataset ready to stream."""

    manifest: Manifest
    stats: DatasetStats
    settings: DataSettings

    @property
    def info(self):
        return self.manifest.info

    def records(self, split: str) -> list[dict[str, Any]]:
        """Records of ``split``; for ``train``, the labelled subset when ``label_fraction`` < 1."""
        records = self.manifest.split(split)
        if split == "train" and self.settings.label_fraction < 1.0:
            rng = np.random.default_rng(self.settings.label_seed)
            keep = max(1, int(round(len(records) * self.settings.label_fraction)))
            chosen = sorted(rng.choice(len(records), size=keep, replace=False))
            records = [records[i] for i in chosen]
        return records

    def num_classes(self) -> int:
        """Classes of the mask layer (or scene classes when no mask layer is used)."""
        layer = self.settings.mask_layer
        if layer is None:
            return len(self.info.scene_classes)
        return len(self.info.layers[layer].classes)

    def class_names(self) -> list[str]:
        layer = self.settings.mask_layer
        return list(self.info.scene_classes) if layer is None else list(self.info.layers[layer].classes)


def resolve_manifest(settings: DataSettings) -> Manifest:
    """Load a prepared folder, or index a raw dataset folder once and keep its manifest."""
    root = Path(settings.root)
    if not root.exists():
        raise DataError(f"data.root {root}: not found (make a synthetic world with `xmodal data synth {root}`)")
    if (root / DATASET_FILE).is_file():
        return Manifest.load(root)
    prepared = Path(settings.prepared_dir) if settings.prepared_dir else root / ".xmodal"
    if (prepared / DATASET_FILE).is_file():
        return Manifest.load(prepared)
    reader = detect_reader(root)
    result = reader.index(root, **settings.reader_options)
    result.manifest.save(prepared)
    return Manifest.load(prepared)


def prepare_data(settings: DataSettings, *, compute_missing_stats: bool = True) -> PreparedData:
    """Load, check and (if needed) compute statistics for the dataset a run uses.

    Raises:
        DataError: Splits are missing, a label layer does not exist, or statistics are stale.
        LeakageError: Train and held-out tiles overlap on the ground.
    """
    manifest = resolve_manifest(settings)
    info = manifest.info
    for key in ("mask_layer", "noisy_layer"):
        layer = getattr(settings, key)
        if layer is not None and layer not in info.layers:
            raise ConfigError(f"data.{key}={layer!r}: dataset {info.name!r} has layers {sorted(info.layers)}")
    if not manifest.split("train"):
        raise DataError(
            f"{manifest.folder}: no record is in the train split; assign splits with `xmodal data split {manifest.folder}`"
        )
    check_no_leakage(manifest.records)
    folder = manifest.folder
    assert folder is not None
    signature = split_signature(manifest)
    stats_path = folder / STATS_FILE
    if not stats_path.is_file():
        if not compute_missing_stats:
            raise DataError(f"{stats_path}: not found; compute it once with `xmodal data stats {folder}`")
        write_stats(manifest, sar_db=settings.sar_db)
    stats = load_stats(folder)
    stats.check_bands(manifest, str(stats_path))
    stored = _read_signature(folder)
    if stored is not None and stored != signature:
        raise DataError(f"{stats_path}: computed for another training split; recompute with `xmodal data stats {folder}`")
    if stats.sar_db != settings.sar_db:
        raise DataError(f"{stats_path}: computed with sar_db={stats.sar_db} but data.sar_db={settings.sar_db}; recompute")
    return PreparedData(manifest=manifest, stats=stats, settings=settings)


def _signature_path(folder: Path) -> Path:
    return folder / "stats.split.json"


def _write_signature(folder: Path, signature: str) -> None:
    _signature_path(folder).write_text(json.dumps({"train_split": signature}))


def _read_signature(folder: Path) -> str | None:
    path = _signature_path(folder)
    return json.loads(path.read_text())["train_split"] if path.is_file() else None


def write_stats(manifest: Manifest, *, sar_db: bool = True, max_tiles: int | None = 2000) -> DatasetStats:
    """Compute and store statistics (and the split fingerprint) for ``manifest``'s folder."""
    stats = compute_stats(manifest, sar_db=sar_db, max_tiles=max_tiles)
    assert manifest.folder is not None
    save_stats(stats, manifest.folder)
    _write_signature(manifest.folder, split_signature(manifest))
    return stats
