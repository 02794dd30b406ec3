"""Ray Data pipeline: manifest records -> decoded tiles -> prepared, augmented batches.

``build_datasets`` returns the ``ray.data.Dataset`` s of one run: ``train`` (split across workers,
with the method's augmented views), ``train_labelled`` when the method asks for the labelled stream
(the labelled subset oversampled to the main stream's length, split across workers and iterated in
lockstep with it), and per evaluation split one dataset per worker (``val@0``, ``val@1``...: an
exact partition, so every tile is scored once while every worker evaluates its share). The decode
stage (reader + unit conversion) is deterministic and, when the decoded tiles fit comfortably in
the object store, is materialised once (``data.cache``) so later epochs only pay for augmentation;
the prepare stage (crop, photometric jitter, normalisation, geometric transform) runs every epoch.

The same transforms without Ray (a plain DataLoader) live in :mod:`xmodal.data.torch_data`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import rasterio
import ray

from xmodal.data import ray_fixes
from xmodal.data.prepared import PreparedData
from xmodal.data.stats import convert_sar
from xmodal.data.storage import join
from xmodal.data.store import PACKED_READER, decode_row
from xmodal.data.transforms import Preparer, stack, unstack, withhold_labels
from xmodal.errors import DataError

ray_fixes.install()  # before any of this module's datasets executes, in every process that loads it

TRAIN = "train"
LABELLED_STREAM = "train_labelled"
EVAL_SPLITS = ("val", "test")

# Decoded tiles may take at most this share of the object store before caching is skipped.
_CACHE_SHARE = 0.3
# Every block is one task per stage, and a task costs tens of milliseconds on a small machine:
# with 4 tiles per block, Ray Data delivered 117 cached / 56 decoded tiles/s on 2 cores, with
# ~16-32 tiles per block 220-250 / 95-110 (bench world, 128 px). Blocks of about 16 MiB decoded,
# at most 64 tiles, and at least _MIN_BLOCKS of them so every CPU has work.
_BLOCK_BYTES = 16 * 2**20
_MAX_TILES_PER_BLOCK = 64
_MIN_BLOCKS = 8


# The map stages are stateless tasks, not actor pools: building a Decoder or Preparer is cheap,
# while an actor pool is started again at every epoch and holds CPUs the Train workers need.
# Each stage takes a whole block per task (``batch_size=None``): with a batch size, Ray Data
# bundles a block smaller than it with the next one, and 9 blocks of 28-29 tiles ran as 5 tasks
# of 29-57 (uneven tasks, one core idle while the longest finishes an epoch).


def _decode_batch(batch: dict[str, np.ndarray], prepared: PreparedData) -> dict[str, np.ndarray]:
    """A batch of manifest records -> stacked decoded arrays."""
    decoder = prepared.decoder()
    columns = list(batch)
    count = len(batch[columns[0]])
    records = [{column: _scalar(batch[column][i]) for column in columns} for i in range(count)]
    # One GDAL environment for the block: outside one, every file opened sets up and tears down
    # its own (5-8 % of a 128 px tile's decoding CPU, measured on 2 cores).
    with rasterio.Env():
        return stack([decoder(record) for record in records])


def _prepare_batch(batch: dict[str, np.ndarray], prepared: PreparedData, train: bool) -> dict[str, np.ndarray]:
    """Decoded arrays -> prepared arrays (augmented when training)."""
    settings = prepared.settings
    preparer = Preparer(prepared.info, prepared.stats, settings.tile_size, settings.augment if train else None, settings.clip_sigma)
    rng = np.random.default_rng()
    views = prepared.views if train else 1
    return stack([preparer.views(sample, rng, views) for sample in unstack(batch)])


def _decode_packed_batch(
    batch: dict[str, np.ndarray], prepared: PreparedData, indices: dict[str, int], labelled: dict[str, bool]
) -> dict[str, np.ndarray]:
    """Rows of packed Parquet parts -> stacked decoded arrays."""
    info, options, sar_db = prepared.info, prepared.settings.load_options(), prepared.settings.sar_db
    samples = []
    for i in range(len(batch["tile_id"])):
        row = {column: batch[column][i] for column in batch}
        arrays = decode_row(row, info, options)
        arrays["sar"] = convert_sar(arrays["sar"], info.sar_bands, sar_db)
        arrays["sar_valid"] = (arrays["sar_valid"] & np.isfinite(arrays["sar"]).all(axis=0)).astype(np.uint8)
        arrays["optical_valid"] = (arrays["optical_valid"] & np.isfinite(arrays["optical"]).all(axis=0)).astype(np.uint8)
        arrays["label"] = np.int64(row["scene_label"])
        arrays["index"] = np.int64(indices[str(row["tile_id"])])
        samples.append(withhold_labels(arrays, labelled[str(row["tile_id"])], info.ignore_index, prepared.optical_labels))
    return stack(samples)


def _read_packed_parts(batch: dict[str, np.ndarray], keep: list[str] | None, tiles_per_block: int) -> Iterator[pa.Table]:
    """Rows of the packed parts named in ``batch`` (only the tiles in ``keep``, if given), in
    blocks of ``tiles_per_block`` rows.

    Raises:
        DataError: A part that is not readable Parquet, naming it.
    """
    for part in batch["part"]:
        try:
            table = pq.read_table(str(part))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{part}: cannot be read as a packed Parquet part ({exc})") from exc
        if keep is not None:
            table = table.filter(pc.is_in(table["tile_id"], value_set=pa.array(keep)))
        for start in range(0, table.num_rows, tiles_per_block):
            yield table.slice(start, tiles_per_block)


def _read_packed(
    prepared: PreparedData, split: str, records: list[dict[str, Any]], shuffle_files: bool = False, tiles_per_block: int = 16
) -> ray.data.Dataset:
    """Whole Parquet parts of a packed store, read in parallel (object-store friendly), decoded in
    blocks of ``tiles_per_block`` tiles.

    ``shuffle_files`` reads the parts in a new random order every epoch.
    """
    root = prepared.manifest.data_root
    parts = sorted({record["sar_path"] for record in records})
    wanted = {record["tile_id"]: record["index"] for record in records}
    labelled = {record["tile_id"]: bool(record.get("labelled", True)) for record in records}
    # One task per part, not read_parquet: its file listing (a ListFiles task) took 5.8 s of wall
    # time (0.1 s CPU) in every epoch of a 256-tile part, more than decoding it (2.1 s, 2 cores).
    dataset = ray.data.from_items([{"part": join(root, part)} for part in parts], override_num_blocks=len(parts))
    if shuffle_files:
        dataset = dataset.randomize_block_order()
    subset = len(wanted) < sum(1 for r in prepared.manifest.records if r["sar_path"] in parts)
    keep = sorted(wanted) if subset else None
    dataset = dataset.map_batches(_read_packed_parts, fn_kwargs={"keep": keep, "tiles_per_block": tiles_per_block}, batch_size=1)
    if len(records) > len(wanted):
        # An oversampled stream: read its tiles once, then repeat the blocks and cut to length
        # (a union of unread datasets would read every part again per repeat: 75 s for 10 repeats here).
        once = dataset.materialize()
        repeats = -(-len(records) // len(wanted))
        dataset = once.union(*[once] * (repeats - 1)).limit(len(records))
    # A part (256 tiles by default) is read in one task, and decoding and preparing fused into it
    # ran a whole part on one core: the bench's 256 training tiles are one part. The read yields
    # blocks of a task's worth; a strict repartition between is an operator Ray Data fuses with
    # neither side (a non-strict one fused all three into one task again), so decoding runs in
    # tasks of its own on every CPU.
    dataset = dataset.repartition(target_num_rows_per_block=tiles_per_block, strict=True)
    return dataset.map_batches(_decode_packed_batch, fn_kwargs={"prepared": prepared, "indices": wanted, "labelled": labelled}, batch_size=None)


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def decoded_bytes(prepared: PreparedData, tiles: int) -> int:
    """Estimated object-store bytes of ``tiles`` decoded tiles."""
    info = prepared.info
    side = info.tile_size or prepared.settings.tile_size
    channels = len(info.sar_bands) + len(info.optical_bands)
    labels = sum(layer is not None for layer in (prepared.settings.mask_layer, prepared.settings.noisy_layer))
    return tiles * side * side * (4 * channels + 8 * labels + 2)


def default_blocks(prepared: PreparedData, tiles: int) -> int:
    """Ray Data blocks for ``tiles`` tiles: about 16 MiB decoded each (see ``_BLOCK_BYTES``)."""
    per_block = max(1, min(_MAX_TILES_PER_BLOCK, _BLOCK_BYTES // max(1, decoded_bytes(prepared, 1))))
    return max(min(tiles, _MIN_BLOCKS), -(-tiles // per_block))


_MAX_WARMED_WORKERS = 16
# Ray sessions (GCS address, job, task runtime environment) whose task workers were warmed by
# :func:`warm_workers`.
_WARMED: dict[tuple[str, str, str], list[ray.ObjectRef]] = {}


def import_decoding() -> int:
    """Import, in a Ray worker, what a decode task imports: Ray Data's block code (this module,
    with rasterio and the readers, comes with the function itself).

    Returns:
        The worker's process id (to see which processes later tasks run in).
    """
    import ray.data._internal.execution.operators.map_transformer  # noqa: F401

    return os.getpid()


def warm_key(task_env: dict[str, Any] | None = None) -> tuple[str, str, str]:
    """The key of :data:`_WARMED` for the connected Ray session and a task environment."""
    context = ray.get_runtime_context()
    return str(context.gcs_address), context.get_job_id(), json.dumps(task_env or {}, sort_keys=True)


def warm_workers(task_env: dict[str, Any] | None = None) -> None:
    """Start the imports of the first epoch's decode tasks now, once per Ray session and
    environment.

    A Ray task worker is a fresh interpreter: its first decode task imports Ray Data, pyarrow,
    rasterio and the readers, seconds each on a small machine, all inside the first epoch (a
    DataLoader forks workers that already hold them). Called when a dataset is built, the imports
    run beside the Train worker group's own start, and Ray keeps the warmed workers for the tasks
    (``engine.session`` keeps idle workers for 10 minutes). Nothing waits for them.

    Args:
        task_env: The runtime environment the decode tasks will run in: Ray runs a task only in a
            worker started with the same one. The tasks of a Ray Train run inherit its
            controller's (``engine.session.train_task_env``), not the driver's; workers warmed in
            the driver's were never used there (measured: epoch 1's first decode task started in
            a new process 7 s after the epoch began). None: the driver's own.
    """
    if not ray.is_initialized():
        return  # Ray Data starts a Ray of its own on first use: nothing to warm before that
    session = warm_key(task_env)
    if session in _WARMED:
        return
    # One per CPU Ray Data can use beside one Train worker (a few on a cluster: each node starts
    # its own workers as tasks arrive); no CPU held, so the worker group's placement never waits.
    count = max(1, min(_MAX_WARMED_WORKERS, int(ray.cluster_resources().get("CPU", 1)) - 1))
    task = ray.remote(num_cpus=0, max_retries=0)(import_decoding)
    options: dict[str, Any] = {"scheduling_strategy": "SPREAD"}
    if task_env:
        options["runtime_env"] = task_env
    _WARMED[session] = [task.options(**options).remote() for _ in range(count)]


def should_cache(prepared: PreparedData, tiles: int) -> bool:
    """Whether to materialise decoded tiles (``data.cache``; ``auto`` checks the object store)."""
    mode = prepared.settings.cache
    if mode != "auto":
        return mode == "always"
    store = ray.available_resources().get("object_store_memory", 0.0)
    return decoded_bytes(prepared, tiles) < _CACHE_SHARE * store


def build_dataset(
    prepared: PreparedData,
    split: str,
    *,
    records: list[dict[str, Any]] | None = None,
    train: bool | None = None,
    cache: bool | None = None,
    task_env: dict[str, Any] | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of prepared samples.

    Args:
        prepared: The checked dataset.
        split: ``train``, ``val`` or ``test``.
        records: The records to stream (default: the split's).
        train: Augment, with the method's views (defaults to ``split == "train"``).
        cache: Materialise decoded tiles (defaults to :func:`should_cache`).
        task_env: The runtime environment its tasks will run in (see :func:`warm_workers`).
    """
    # A decode error (a DataError naming the broken file) reaches the worker as itself rather than
    # as Ray Data's generic UserCodeException, so the run is not retried and says what is wrong.
    ray.data.DataContext.get_current().raise_original_map_exception = True
    train = split == TRAIN if train is None else train
    records = prepared.records(split) if records is None else records
    if not records:
        raise ValueError(f"split {split!r} of {prepared.info.name!r} is empty")
    blocks = prepared.settings.blocks or default_blocks(prepared, len(records))
    cache = should_cache(prepared, len(records)) if cache is None else cache
    if not cache:
        warm_workers(task_env)
    # Block order is shuffled before decoding when decoding streams: shuffling decoded blocks is an
    # all-to-all step that waits for the whole epoch's decoding and keeps decode and prepare from
    # fusing (measured on 2 cores, 256 tiles: 102 -> 119-133 tiles/s in the driver).
    shuffle_before_decode = train and not cache
    if prepared.info.reader == PACKED_READER:
        dataset = _read_packed(prepared, split, records, shuffle_files=shuffle_before_decode, tiles_per_block=-(-len(records) // blocks))
    else:
        dataset = ray.data.from_items(records, override_num_blocks=min(blocks, len(records)))
        if shuffle_before_decode:
            dataset = dataset.randomize_block_order()
        dataset = dataset.map_batches(_decode_batch, fn_kwargs={"prepared": prepared}, batch_size=None)
    if cache:
        dataset = dataset.materialize()
        if train:
            dataset = dataset.randomize_block_order()
    return dataset.map_batches(_prepare_batch, fn_kwargs={"prepared": prepared, "train": train}, batch_size=None)


def eval_dataset_name(split: str, rank: int, world_size: int) -> str:
    """Name of worker ``rank``'s share of an evaluation split (the split itself with one worker)."""
    return split if world_size == 1 else f"{split}@{rank}"


def build_datasets(
    prepared: PreparedData,
    splits: tuple[str, ...] = (TRAIN, "val"),
    *,
    world_size: int = 1,
    streams: tuple[str, ...] = (),
    task_env: dict[str, Any] | None = None,
) -> dict[str, ray.data.Dataset]:
    """The datasets of one run (see the module docstring); empty splits and shares are left out.

    ``task_env``: the runtime environment the run's Ray Data tasks will run in (a Ray Train run's:
    ``engine.session.train_task_env``), for :func:`warm_workers`.
    """
    datasets: dict[str, ray.data.Dataset] = {}
    for split in splits:
        records = prepared.records(split)
        if not records:
            continue
        if split == TRAIN:
            datasets[TRAIN] = build_dataset(prepared, TRAIN, records=records, task_env=task_env)
            if "labelled" in streams:
                datasets[LABELLED_STREAM] = build_dataset(prepared, TRAIN, records=prepared.labelled_stream(), task_env=task_env)
            continue
        for rank in range(world_size):
            share = records[rank::world_size]
            if share:
                datasets[eval_dataset_name(split, rank, world_size)] = build_dataset(prepared, split, records=share, train=False, task_env=task_env)
    return datasets
