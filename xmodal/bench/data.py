"""``bench_data``: tiles/s of the Ray Data pipeline delivered into a Ray Train worker, beside a
plain PyTorch DataLoader reading the same files with the same transforms on the same cores, and
the raw single-process decode rate; for the GeoTIFF tree and for its packed Parquet store.

Several epoch sizes (``tiles=[256, 2048, 16384]``) add a scale table of the streaming path:
tiles/s of the first and later epochs, the peak memory of a streaming epoch and whether time is
linear in tiles. A size above the generated world's 256 training tiles streams that world's tiles
again (the records cycled, each read anew), so every size decodes the same files, kept in the
page cache as the small world is: the table then measures the pipeline, not the disk, and a
16384-tile epoch needs no 17 GB world (generating one costs about 0.14 CPU s per tile here).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
import ray.train
from ray.train.torch import TorchTrainer

from xmodal.bench.common import (
    ProcessCpuSampler,
    bench_data_root,
    cpu_table,
    epoch_rates,
    format_cpu_table,
    init_ray,
)
from xmodal.data.manifest import Manifest
from xmodal.data.prepared import DataSettings, PreparedData, prepare_data
from xmodal.data.store import PACKED_READER
from xmodal.engine.session import train_task_env
from xmodal.errors import ConfigError

BASE_TILES = 256  # training tiles of the generated world larger epochs cycle over
DATALOADER_WORKER = "DataLoader worker"
FLAT = 0.10  # the scale target: tiles/s and peak memory within 10 % from the smallest size to the largest


def parse_tile_sizes(text: str) -> list[int]:
    """``"256,2048,16384"`` -> ``[256, 2048, 16384]`` (sizes > 0, each once, in order given).

    Raises:
        ConfigError: Naming the value that is not a positive whole number.
    """
    sizes: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not re.fullmatch(r"[0-9]+", item) or int(item) <= 0:
            raise ConfigError(f"--tiles {text!r}: {item!r} is not a positive whole number; expected e.g. 256 or 256,2048,16384")
        if int(item) not in sizes:
            sizes.append(int(item))
    return sizes


def cycled_records(records: list[dict[str, Any]], tiles: int) -> list[dict[str, Any]]:
    """``tiles`` records: ``records`` in order, again and again (each repeat gets its own tile id)."""
    if not records:
        raise ConfigError("the benchmark's training split is empty")
    out = []
    for position in range(tiles):
        record = records[position % len(records)]
        passes = position // len(records)
        out.append(record if passes == 0 else {**record, "tile_id": f"{record['tile_id']}~{passes}"})
    return out


def spread(values: list[float]) -> float:
    """How far apart the values are: largest / smallest - 1 (0.1 = within 10 %)."""
    return max(values) / min(values) - 1.0 if values and min(values) > 0 else float("inf")


def _object_store_bytes() -> int | None:
    """Bytes in this Ray's object stores now, or ``None`` where Ray does not say."""
    try:
        from ray._private.internal_api import (
            get_memory_info_reply,
            get_state_from_address,
        )

        return int(get_memory_info_reply(get_state_from_address(), timeout_seconds=5).store_stats.object_store_bytes_used)
    except Exception:  # noqa: BLE001 - a private API: the figure is then reported as unavailable
        return None


class MemorySampler:
    """Peak memory of this process and every process it started (a local Ray's servers and
    workers), sampled in a background thread.

    The sum is of PSS (each page shared by several processes, such as the object store's,
    counted once over all of them), so it covers the Ray workers' own memory and the object
    store pages they use; the object store's own count is sampled beside it.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.peak_store_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xmodal-memory-sampler", daemon=True)

    def sample(self) -> None:
        me = psutil.Process()
        total = 0
        for process in (me, *me.children(recursive=True)):
            try:
                info = process.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        store = _object_store_bytes() if ray.is_initialized() else None
        if store is not None:
            self.peak_store_bytes = max(self.peak_store_bytes or 0, store)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def figures(self) -> dict[str, float | None]:
        mib = 2**20
        store = None if self.peak_store_bytes is None else round(self.peak_store_bytes / mib, 1)
        return {"peak_memory_mib": round(self.peak_bytes / mib, 1), "peak_object_store_mib": store}


def _consume_loop(config: dict[str, Any]) -> list[tuple[int, float, float, float]]:
    """Each epoch: (tiles, seconds, seconds to the first batch, wall time at its end)."""
    shard = ray.train.get_dataset_shard("train")
    out = []
    for _ in range(config["epochs"]):
        started, count, first = time.perf_counter(), 0, None
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], prefetch_batches=2, drop_last=False):
            if first is None:
                first = time.perf_counter() - started
            count += batch["sar"].shape[0]
        out.append((count, time.perf_counter() - started, first or 0.0, time.time()))
    return out


def _cpu_figures(sampler: ProcessCpuSampler, counts: list[int], seconds: list[float], ends: list[float]) -> dict[str, Any]:
    """Where the CPU of the epochs after the first went, per process, and per tile over all of them.

    The window runs from the first epoch's end to the last one's (the only epoch's, when one).
    """
    begin, end = (ends[0], ends[-1]) if len(ends) > 1 else (ends[0] - seconds[0], ends[0])
    window = max(end - begin, 1e-9)
    table = cpu_table(sampler.use_between(begin, end), window, os.cpu_count() or 1)
    later_tiles = sum(counts[1:]) or counts[0]
    return {
        "cpu_window_s": round(window, 2), "cpu_per_process": table,
        "cpu_ms_per_tile": round(1000.0 * sum(row["cpu_s"] for row in table) / later_tiles, 2),
    }


def _through_train(dataset: ray.data.Dataset, label: str, epochs: int, batch_size: int) -> dict[str, Any]:
    """Epoch rates of ``dataset`` consumed by one Train worker, with the peak memory and the CPU
    per process meanwhile (the decode tasks against what a tile costs to decode alone, and the
    rest: the Train worker's ingest, Ray's own processes)."""
    scratch = tempfile.mkdtemp(prefix="xmodal-bench-")
    trainer = TorchTrainer(
        _consume_loop,
        train_loop_config={"epochs": epochs, "batch_size": batch_size},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
        datasets={"train": dataset},
        run_config=ray.train.RunConfig(name=f"bench-{label}-{time.time_ns()}", storage_path=scratch),
    )
    sampler = ProcessCpuSampler().start()
    try:
        with MemorySampler() as memory:
            per_epoch = trainer.fit().return_value
    finally:
        sampler.stop()
        shutil.rmtree(scratch, ignore_errors=True)  # Train's run folder: nothing in it is a figure
    counts, seconds = [c for c, _, _, _ in per_epoch], [s for _, s, _, _ in per_epoch]
    return {
        **epoch_rates(counts, seconds), "epoch_seconds": seconds, "first_batch_seconds": [f for _, _, f, _ in per_epoch],
        **memory.figures(), **_cpu_figures(sampler, counts, seconds, [end for _, _, _, end in per_epoch]),
    }


def _dataloader(prepared: PreparedData, records: list[dict[str, Any]], epochs: int, workers: int) -> dict[str, Any]:
    """Epoch rates of the plain DataLoader, measured like the Ray paths: under the same memory and
    CPU samplers (their own CPU, a few % of a core, weighs on both sides alike)."""
    from xmodal.data.torch_data import torch_loader

    loader = torch_loader(prepared, "train", num_workers=workers, records=records)
    counts, seconds, ends = [], [], []
    sampler = ProcessCpuSampler(forks=DATALOADER_WORKER).start()
    try:
        with MemorySampler() as memory:
            for _ in range(epochs):
                started, count = time.perf_counter(), 0
                for batch in loader:
                    count += batch["sar"].shape[0]
                counts.append(count)
                seconds.append(time.perf_counter() - started)
                # A sample at the epoch's end: a window of short epochs then holds samples.
                ends.append(sampler.sample() or time.time())
    finally:
        sampler.stop()
    return {"num_workers": workers, **epoch_rates(counts, seconds), **memory.figures(), **_cpu_figures(sampler, counts, seconds, ends)}


def packed_root(root: str) -> str:
    """The packed Parquet store of ``root`` (``xmodal data pack``), made once beside it."""
    out = Path(tempfile.gettempdir()) / f"{Path(root).name}-packed"
    if not (out / "manifest.parquet").is_file():
        from xmodal.data.store import pack

        pack(Manifest.load(root), out)
    return str(out)


def bench_data(
    data_root: str | None = None, tiles: int | list[int] | None = None, epochs: int = 3, batch_size: int = 16, packed: bool = True
) -> dict[str, Any]:
    """Throughput of raw decoding, a plain DataLoader, and Ray Data into a Train worker.

    Args:
        data_root: A prepared dataset (default: a generated world of ``BASE_TILES`` training
            tiles, or of the one size given when that is smaller).
        tiles: Tiles per epoch, cycled over the training split (default: the whole split); several
            sizes add the scale table (``scale``).
        epochs: Epochs per path; the first is reported apart.
        batch_size: Tiles per batch.
        packed: Also measure the packed Parquet store of the same tiles (``xmodal data pack``).

    Returns:
        The figures of the smallest size (every path side by side), plus ``scale`` (the streaming
        path at every size) when several sizes are given.
    """
    from xmodal.data.pipeline import build_dataset

    sizes = sorted([tiles] if isinstance(tiles, int) else tiles) if tiles else []
    root = bench_data_root(data_root, min(sizes[0], BASE_TILES) if sizes else BASE_TILES)
    settings = DataSettings(root=root, batch_size=batch_size, mask_layer="buildings")
    prepared = prepare_data(settings)
    base = prepared.records("train")
    records = cycled_records(base, sizes[0]) if sizes else base
    cores = os.cpu_count() or 1
    figures: dict[str, Any] = {
        "tiles_per_epoch": len(records), "distinct_tiles": len({r["index"] for r in records}), "epochs": epochs,
        "cores": cores, "batch_size": batch_size, "data": root,
    }

    decoder = prepared.decoder()
    started = time.perf_counter()
    for record in records:
        decoder(record)
    figures["raw_decode_tiles_per_s"] = len(records) / (time.perf_counter() - started)
    figures["dataloader"] = _dataloader(prepared, records, epochs, cores)

    packed_prepared = None
    if packed and prepared.info.reader != PACKED_READER:
        # The store holds each distinct tile once: both packed paths read those.
        packed_prepared = prepare_data(DataSettings(root=packed_root(root), batch_size=batch_size, mask_layer="buildings"))
        wanted = {r["tile_id"] for r in records}
        packed_records = [r for r in packed_prepared.records("train") if r["tile_id"] in wanted]
        figures["packed_tiles_per_epoch"] = len(packed_records)
        figures["dataloader_packed"] = _dataloader(packed_prepared, packed_records, epochs, cores)

    started_ray = init_ray()
    task_env = train_task_env()  # the Train runs' tasks run in it: warm their decode workers there
    try:
        # Streaming first: in a fresh Ray its first epoch is what a run's first epoch pays.
        figures["ray_data_streaming"] = _through_train(build_dataset(prepared, "train", records=records, cache=False, task_env=task_env), "streaming", epochs, batch_size)
        figures["ray_data_cached"] = _through_train(build_dataset(prepared, "train", records=records, cache=True, task_env=task_env), "cached", epochs, batch_size)
        if packed_prepared is not None:
            figures["ray_data_packed"] = _through_train(
                build_dataset(packed_prepared, "train", records=packed_records, cache=False, task_env=task_env), "packed", epochs, batch_size
            )
        if len(sizes) > 1:
            rows = [{"tiles": sizes[0], **figures["ray_data_streaming"]}]
            for size in sizes[1:]:
                dataset = build_dataset(prepared, "train", records=cycled_records(base, size), cache=False, task_env=task_env)
                rows.append({"tiles": size, **_through_train(dataset, f"streaming-{size}", epochs, batch_size)})
            figures["scale"] = scale_figures(rows)
    finally:
        if started_ray:
            ray.shutdown()
    for label, reference in (("ray_data_streaming", "dataloader"), ("ray_data_cached", "dataloader"), ("ray_data_packed", "dataloader_packed")):
        if label in figures:
            entry, against = figures[label], figures[reference]
            entry["ratio_vs_dataloader"] = entry["steady"] / against["steady"]
            entry["epoch1_ratio_vs_dataloader"] = entry["epoch1"] / against["epoch1"]
    figures["target"] = "Ray Data streaming >= 1.0x DataLoader tiles/s (steady), >= 0.7x (epoch 1)"
    return figures


def scale_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The scale table: per size the streaming rates, memory and epoch time, and the verdicts.

    Time is linear in tiles when the later epochs' seconds per tile agree within ``FLAT`` over
    the sizes (the same as flat steady tiles/s); memory is flat likewise.
    """
    steady = [row["steady"] for row in rows]
    memory = [row["peak_memory_mib"] for row in rows]
    # Epoch time = a fixed cost per epoch + a cost per tile, fitted over the sizes' later epochs:
    # linear when every size sits within FLAT of the line (it takes 3 sizes to say).
    tiles = [row["tiles"] for row in rows]
    later = [float(np.mean(row["epoch_seconds"][1:] or row["epoch_seconds"])) for row in rows]
    per_tile, fixed = np.polyfit(tiles, later, 1) if len(rows) > 1 else (float("nan"), float("nan"))
    worst = max(abs(fixed + per_tile * t - s) / s for t, s in zip(tiles, later)) if len(rows) > 1 else float("nan")
    return {
        "epoch_fixed_s": float(fixed),
        "epoch_ms_per_tile": float(1000.0 * per_tile),
        "epoch_fit_worst": float(worst),
        "sizes": [
            {key: row[key] for key in ("tiles", "epoch1", "steady", "epoch_seconds", "peak_memory_mib", "peak_object_store_mib")}
            for row in rows
        ],
        "steady_spread": spread(steady),
        "memory_spread": spread(memory),
        "tiles_per_s_flat": spread(steady) <= FLAT,
        "memory_flat": spread(memory) <= FLAT,
        "time_linear_in_tiles": bool(worst <= FLAT) if len(rows) > 2 else None,
    }


def format_data_figures(figures: dict[str, Any]) -> str:
    """A readable table of :func:`bench_data`'s figures."""
    lines = [
        (
            f"data: {figures['tiles_per_epoch']} tiles/epoch ({figures['distinct_tiles']} distinct), {figures['epochs']} epochs, "
            f"batch {figures['batch_size']}, {figures['cores']} cores"
        )
    ]
    lines.append(f"{'path':38s} {'epoch 1':>9s} {'steady':>9s} {'vs DataLoader':>14s} {'epoch 1 vs DL':>14s} {'peak MiB':>9s}")
    lines.append(f"{'raw decode, 1 process':38s} {'':>9s} {figures['raw_decode_tiles_per_s']:9.1f}")
    rows = (
        ("PyTorch DataLoader", "dataloader"),
        ("Ray Data -> Train (streaming)", "ray_data_streaming"),
        ("Ray Data -> Train (cached decode)", "ray_data_cached"),
        ("PyTorch DataLoader (packed store)", "dataloader_packed"),
        ("Ray Data -> Train (packed, streaming)", "ray_data_packed"),
    )
    for name, key in rows:
        entry = figures.get(key)
        if entry is None:
            continue
        ratio, first = entry.get("ratio_vs_dataloader"), entry.get("epoch1_ratio_vs_dataloader")
        memory = entry.get("peak_memory_mib")
        lines.append(
            f"{name:38s} {entry['epoch1']:9.1f} {entry['steady']:9.1f} {'' if ratio is None else f'{ratio:.2f}x':>14s} "
            f"{'' if first is None else f'{first:.2f}x':>14s} {'' if memory is None else f'{memory:.0f}':>9s}"
        )
    lines.append("(tiles/s)  target: " + figures["target"])
    lines.append(f"raw decode costs {1000.0 / figures['raw_decode_tiles_per_s']:.2f} CPU ms per tile in one process")
    for name, key in rows:
        entry = figures.get(key)
        if entry and entry.get("cpu_per_process"):
            lines.append(f"{name}: {entry['cpu_ms_per_tile']:.2f} CPU ms per tile over all processes, later epochs")
            waits = entry.get("first_batch_seconds")
            if waits:
                # Each epoch is a new execution: what it pays before its first batch, beside its length.
                later = ", ".join(f"{wait:.2f}" for wait in waits[1:]) or "-"
                lines.append(f"  first batch after {waits[0]:.2f} s in epoch 1, after {later} s in later epochs (epoch seconds: "
                             + ", ".join(f"{second:.2f}" for second in entry["epoch_seconds"]) + ")")
            lines += format_cpu_table(entry["cpu_per_process"][:8], entry["cpu_window_s"], "later epochs, the 8 busiest")
    scale = figures.get("scale")
    if scale:
        lines.append("scale (Ray Data -> Train, streaming):")
        lines.append(f"  {'tiles':>7s} {'epoch 1':>9s} {'steady':>9s} {'s/epoch (later)':>16s} {'peak MiB':>9s} {'store MiB':>10s}")
        for row in scale["sizes"]:
            later = row["epoch_seconds"][1:] or row["epoch_seconds"]
            store = row["peak_object_store_mib"]
            lines.append(
                f"  {row['tiles']:7d} {row['epoch1']:9.1f} {row['steady']:9.1f} {sum(later) / len(later):16.2f} "
                f"{row['peak_memory_mib']:9.0f} {'?' if store is None else f'{store:.0f}':>10s}"
            )
        linear = scale["time_linear_in_tiles"]
        lines.append(
            f"  steady tiles/s spread {scale['steady_spread']:.0%} ({'flat' if scale['tiles_per_s_flat'] else 'not flat'}), peak memory spread "
            f"{scale['memory_spread']:.0%} ({'flat' if scale['memory_flat'] else 'not flat'}); target within {FLAT:.0%}"
        )
        lines.append(
            f"  epoch time = {scale['epoch_fixed_s']:.2f} s + {scale['epoch_ms_per_tile']:.2f} ms per tile "
            + ("(linearity needs 3 sizes)" if linear is None else f"({'linear' if linear else 'not linear'}: worst size {scale['epoch_fit_worst']:.0%} off the line)")
        )
    return "\n".join(lines)
