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

from xmodal.data.labels import LabelSettings, choose_labelled, oversample
from xmodal.data.manifest import DATASET_FILE, SIGNATURE_FILE, STATS_FILE, Manifest, declared_reader
from xmodal.data.readers.base import LoadOptions, detect_reader, get_reader
from xmodal.data.splits import check_no_leakage
from xmodal.data.stats import DatasetStats, compute_stats, load_stats, save_stats
from xmodal.data.storage import is_remote, join, upload
from xmodal.data.transforms import AugmentSettings, Decoder
from xmodal.errors import ConfigError, DataError


BATCH_SCOPES = ("worker", "global")


def describe_batch(batch_size: int, batch_scope: str, world_size: int) -> str:
    """A run's batch in words (run headers, reports), e.g. ``batch 32 (global: 16 per worker x 2)``."""
    if batch_scope == "global":
        return f"batch {batch_size} (global: {batch_size // world_size} per worker x {world_size})" if world_size > 1 else f"batch {batch_size}"
    return f"batch {batch_size} per worker" if world_size > 1 else f"batch {batch_size}"


@dataclass
class DataSettings:
    """How a run reads its data (the ``data:`` section of a config).

    Attributes:
        root: A prepared dataset folder (with ``dataset.json``) or a raw dataset folder of a
            supported layout (indexed into ``prepared_dir`` on first use); or a prepared folder
            on object storage (``s3://bucket/world``, ``gs://...``: a packed store, or a prepared
            GeoTIFF tree read through GDAL), read from there by every node.
        prepared_dir: Where to keep the manifest and statistics of a raw dataset (default:
            ``<root>/.xmodal``).
        mask_layer: Label layer used as ``mask`` (e.g. ``buildings``, ``landcover``), or null.
        noisy_layer: Label layer used as ``noisy_mask``, or null.
        tile_size: Fixed tile height/width fed to models.
        batch_size: Training batch size, per worker or over all workers (``batch_scope``).
        batch_scope: ``worker``: every DDP worker takes ``batch_size`` tiles per step (the global
            batch grows with ``scaling.num_workers``); ``global``: ``batch_size`` tiles per step
            over all workers together (each takes ``batch_size / num_workers``; refused when it
            does not divide), so a paper's batch stays the paper's on any worker count. The plain
            engine is one process: both mean the same there.
        sar_db: Convert SAR intensity bands (linear, amplitude) to dB before normalising.
        clip_sigma: Clip normalised values to this many standard deviations.
        labels: Which training tiles keep their labels (:class:`~xmodal.data.labels.LabelSettings`).
        cache: ``auto`` (cache decoded tiles in the object store when they fit), ``always``, ``never``.
        blocks: Ray Data blocks per split (``None``: about 16 MiB of decoded tiles per block).
        shuffle_buffer: Local shuffle buffer (rows) on each training worker.
        augment: Training augmentation.
        reader_options: Options passed to the reader when indexing a raw folder.
        allow_padding: Let ``tile_size`` exceed the dataset's tiles, padding them with no-data
            (e.g. 120 px tiles fed to a model that needs 128); refused otherwise.
        check_tiles: Tiles decoded before a run starts, to refuse broken data before any worker
            does: every tile when the run's splits hold no more, else this many evenly spread
            (0: none).
    """

    root: str = "data/synthetic"
    prepared_dir: str | None = None
    mask_layer: str | None = "buildings"
    noisy_layer: str | None = None
    tile_size: int = 128
    batch_size: int = 8
    batch_scope: str = "worker"
    sar_db: bool = True
    clip_sigma: float = 6.0
    labels: LabelSettings = field(default_factory=LabelSettings)
    cache: str = "auto"
    blocks: int | None = None
    shuffle_buffer: int = 64
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    reader_options: dict[str, Any] = field(default_factory=dict)
    allow_padding: bool = False
    check_tiles: int = 256

    def __post_init__(self) -> None:
        if self.check_tiles < 0:
            raise ConfigError(f"data.check_tiles={self.check_tiles}; expected >= 0 (0 decodes none before the run)")
        if self.cache not in ("auto", "always", "never"):
            raise ConfigError(f"data.cache={self.cache!r}; expected auto, always or never")
        if self.tile_size <= 0 or self.batch_size <= 0:
            raise ConfigError(f"data.tile_size={self.tile_size}, data.batch_size={self.batch_size}; expected both > 0")
        if self.batch_scope not in BATCH_SCOPES:
            raise ConfigError(f"data.batch_scope={self.batch_scope!r}; expected one of {list(BATCH_SCOPES)}")

    def worker_batch_size(self, world_size: int) -> int:
        """Tiles each of ``world_size`` workers takes per training step.

        Raises:
            ConfigError: A global batch that ``world_size`` does not divide.
        """
        if self.batch_scope == "worker":
            return self.batch_size
        if self.batch_size % world_size:
            raise ConfigError(
                f"data.batch_size={self.batch_size} with data.batch_scope=global does not divide over "
                f"{world_size} workers; give a multiple of scaling.num_workers={world_size}"
            )
        return self.batch_size // world_size

    def describe_batch(self, world_size: int) -> str:
        """E.g. ``batch 32 (global: 16 per worker x 2)`` or ``batch 8 per worker``."""
        self.worker_batch_size(world_size)  # refuses a global batch that does not divide
        return describe_batch(self.batch_size, self.batch_scope, world_size)

    def load_options(self) -> LoadOptions:
        return LoadOptions(mask_layer=self.mask_layer, noisy_layer=self.noisy_layer)


def split_signature(manifest: Manifest) -> str:
    """A fingerprint of which tiles are in the training split (stats must match it)."""
    ids = sorted(r["tile_id"] for r in manifest.split("train"))
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


@dataclass
class PreparedData:
    """A checked dataset ready to stream, as one run reads it.

    Attributes:
        manifest: The records and the dataset description.
        stats: Per-band statistics of the training split.
        settings: The run's ``data:`` section.
        keep_unlabelled: Keep the training tiles outside the labelled subset (labels withheld)
            rather than dropping them (resolved from ``data.labels.unlabelled`` and the method).
        views: Augmented views of each training tile.
        optical_labels: Give every sample an ``optical_label`` the labelled subset never withholds
            (EO -> SAR transfer: the subset counts SAR labels, every optical tile is labelled).
    """

    manifest: Manifest
    stats: DatasetStats
    settings: DataSettings
    keep_unlabelled: bool = False
    views: int = 1
    optical_labels: bool = False

    @property
    def info(self):
        return self.manifest.info

    def _labelled_positions(self) -> np.ndarray:
        cached = getattr(self, "_labelled_cache", None)
        if cached is None:
            cached = choose_labelled(self.manifest.split("train"), self.settings.labels)
            object.__setattr__(self, "_labelled_cache", cached)
        return cached

    def records(self, split: str) -> list[dict[str, Any]]:
        """Records of ``split``, each with a ``labelled`` flag.

        For ``train`` with a labelled subset: the labelled tiles only (``data.labels.epoch: full``:
        oversampled to the size of the whole split), or (``keep_unlabelled``) every tile with
        ``labelled`` False outside the subset.
        """
        records = self.manifest.split(split)
        labels = self.settings.labels
        if split != "train" or not labels.is_subset:
            return [{**r, "labelled": True} for r in records]
        chosen = set(self._labelled_positions().tolist())
        if not self.keep_unlabelled:
            subset = [{**records[i], "labelled": True} for i in sorted(chosen)]
            if labels.epoch == "full" and subset:
                return [subset[i] for i in oversample(len(subset), len(records), labels.seed)]
            return subset
        return [{**r, "labelled": i in chosen} for i, r in enumerate(records)]

    def labelled_records(self) -> list[dict[str, Any]]:
        """The training tiles that keep their labels (each once)."""
        records = self.manifest.split("train")
        if not self.settings.labels.is_subset:
            return [{**r, "labelled": True} for r in records]
        return [{**records[i], "labelled": True} for i in sorted(set(self._labelled_positions().tolist()))]

    def labelled_stream(self) -> list[dict[str, Any]]:
        """The labelled stream of one epoch: the labelled tiles oversampled (seeded) to as many
        records as the main training stream has."""
        labelled = self.labelled_records()
        order = oversample(len(labelled), len(self.records("train")), self.settings.labels.seed)
        return [labelled[i] for i in order]

    def for_method(self, keep_unlabelled: bool, views: int, optical_labels: bool = False) -> "PreparedData":
        """This dataset as a method with these needs reads it."""
        return PreparedData(self.manifest, self.stats, self.settings, keep_unlabelled=keep_unlabelled, views=views, optical_labels=optical_labels)

    def decoder(self) -> Decoder:
        """The record decoder of this dataset as the method reads it."""
        settings = self.settings
        return Decoder(self.info, self.manifest.data_root, settings.load_options(), settings.sar_db, keep_optical_label=self.optical_labels)

    def tile_id(self, index: int) -> str:
        """The id of the tile at ``index`` in the manifest (a sample's ``index`` field)."""
        return str(self.manifest.records[index]["tile_id"])

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
    if is_remote(settings.root):
        return Manifest.load(settings.root)  # only a prepared folder: indexing walks a local tree
    root = Path(settings.root)
    if not root.exists():
        raise DataError(f"data.root {root}: not found (make a synthetic world with `xmodal data synth {root}`)")
    if (root / DATASET_FILE).is_file():
        return Manifest.load(root)
    prepared = index_folder(settings)
    if (prepared / DATASET_FILE).is_file():
        recorded = json.loads((prepared / READER_OPTIONS_FILE).read_text()) if (prepared / READER_OPTIONS_FILE).is_file() else {}
        if recorded != settings.reader_options:
            raise ConfigError(
                f"data.prepared_dir {prepared}: indexed with reader options {recorded}, not {settings.reader_options}; "
                "leave prepared_dir unset (each set of options gets its own index) or delete that folder"
            )
        if _index_is_current(prepared):
            return Manifest.load(prepared)
        # Made by an older version of its reader: statistics describe that index, so both go.
        for stale in (STATS_FILE, _signature_path(prepared).name):
            (prepared / stale).unlink(missing_ok=True)
    reader = detect_reader(root)
    result = reader.index(root, **settings.reader_options)
    result.manifest.save(prepared)
    (prepared / READER_OPTIONS_FILE).write_text(json.dumps(settings.reader_options, sort_keys=True))
    (prepared / INDEXED_BY_FILE).write_text(json.dumps({"reader": reader.name, "version": reader.version}))
    return Manifest.load(prepared)


READER_OPTIONS_FILE = "reader_options.json"
INDEXED_BY_FILE = "indexed_by.json"  # the reader and its version that made a kept index


def _index_is_current(prepared: Path) -> bool:
    """True when the index kept in ``prepared`` was made by its reader's current version (an index
    from before versions were recorded counts as version 1)."""
    recorded = json.loads((prepared / INDEXED_BY_FILE).read_text()) if (prepared / INDEXED_BY_FILE).is_file() else {}
    name = recorded.get("reader") or declared_reader(prepared)
    if name is None:
        return False
    return int(recorded.get("version", 1)) == get_reader(name, source=str(prepared / DATASET_FILE)).version


def index_folder(settings: DataSettings) -> Path:
    """Where the index of a raw dataset folder is kept: ``prepared_dir``, else ``<root>/.xmodal``,
    in a sub-folder per set of reader options (a swept class subset never reads a stale index).

    A file root (a ``scenes.yaml`` listing) is indexed beside it, into
    ``<its folder>/.xmodal/<its stem>-<digest of its contents>``: an edited listing gets a new index."""
    if settings.prepared_dir:
        return Path(settings.prepared_dir)
    root = Path(settings.root)
    if root.is_file():
        digest = hashlib.sha256(root.read_bytes()).hexdigest()[:12]
        base = root.parent / ".xmodal" / f"{root.stem}-{digest}"
    else:
        base = root / ".xmodal"
    if not settings.reader_options:
        return base
    digest = hashlib.sha256(json.dumps(settings.reader_options, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return base / f"options-{digest}"


def prepare_data(settings: DataSettings, *, compute_missing_stats: bool = True) -> PreparedData:
    """Load, check and (if needed) compute statistics for the dataset a run uses.

    Raises:
        DataError: Splits are missing, a label layer does not exist, or statistics are stale.
        LeakageError: Train and held-out tiles overlap on the ground.
    """
    manifest = resolve_manifest(settings)
    info = manifest.info
    get_reader(info.reader, source=str(Path(manifest.folder or settings.root) / DATASET_FILE))
    if info.tile_size and settings.tile_size > info.tile_size and not settings.allow_padding:
        raise ConfigError(
            f"data.tile_size={settings.tile_size} is larger than the {info.tile_size} px tiles of dataset {info.name!r} "
            f"({Path(manifest.folder or settings.root) / DATASET_FILE}); expected <= {info.tile_size}, or data.allow_padding: "
            f"true to pad them with no-data ({padding_share(info.tile_size, settings.tile_size):.0%} of each tile)"
        )
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


def padding_share(tile: int, wanted: int) -> float:
    """The share of a ``wanted`` x ``wanted`` input that a ``tile`` x ``tile`` tile leaves as padding."""
    return 1.0 - (min(tile, wanted) / wanted) ** 2


def _signature_path(folder: Path) -> Path:
    return folder / SIGNATURE_FILE


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
    if manifest.location is not None:  # the cache is a copy: the dataset's own folder keeps them
        for name in (STATS_FILE, SIGNATURE_FILE):
            upload(manifest.folder / name, join(manifest.location, name))
    return stats
