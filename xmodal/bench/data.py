"""``bench_data``: tiles/s of the Ray Data pipeline delivered into a Ray Train worker, beside a
plain PyTorch DataLoader reading the same files with the same transforms on the same cores, and
the raw single-process decode rate."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from xmodal.data.prepared import DataSettings, prepare_data

from xmodal.bench.common import bench_data_root, init_ray, epoch_rates


def _consume_loop(config: dict[str, Any]) -> list[tuple[int, float]]:
    shard = ray.train.get_dataset_shard("train")
    out = []
    for _ in range(config["epochs"]):
        started, count = time.perf_counter(), 0
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], prefetch_batches=2, drop_last=False):
            count += batch["sar"].shape[0]
        out.append((count, time.perf_counter() - started))
    return out


def bench_data(data_root: str | None = None, tiles: int = 256, epochs: int = 3, batch_size: int = 16) -> dict[str, Any]:
    """Throughput of raw decoding, a plain DataLoader, and Ray Data into a Train worker."""
    from xmodal.data.pipeline import build_dataset
    from xmodal.data.torch_data import torch_loader

    root = bench_data_root(data_root, tiles)
    settings = DataSettings(root=root, batch_size=batch_size, mask_layer="buildings")
    prepared = prepare_data(settings)
    records = prepared.records("train")
    cores = os.cpu_count() or 1
    figures: dict[str, Any] = {"tiles_per_epoch": len(records), "epochs": epochs, "cores": cores, "batch_size": batch_size, "data": root}

    decoder = prepared.decoder()
    started = time.perf_counter()
    for record in records:
        decoder(record)
    figures["raw_decode_tiles_per_s"] = len(records) / (time.perf_counter() - started)

    loader = torch_loader(prepared, "train", num_workers=cores)
    counts, seconds = [], []
    for _ in range(epochs):
        started, count = time.perf_counter(), 0
        for batch in loader:
            count += batch["sar"].shape[0]
        counts.append(count)
        seconds.append(time.perf_counter() - started)
    figures["dataloader"] = {"num_workers": cores, **epoch_rates(counts, seconds)}
    del loader

    started_ray = init_ray()
    for label, cache in (("ray_data_streaming", False), ("ray_data_cached", True)):
        dataset = build_dataset(prepared, "train", cache=cache)
        trainer = TorchTrainer(
            _consume_loop,
            train_loop_config={"epochs": epochs, "batch_size": batch_size},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            datasets={"train": dataset},
            run_config=ray.train.RunConfig(name=f"bench-{label}-{time.time_ns()}", storage_path=tempfile.mkdtemp(prefix="xmodal-bench-")),
        )
        per_epoch = trainer.fit().return_value
        figures[label] = epoch_rates([c for c, _ in per_epoch], [s for _, s in per_epoch])
    if started_ray:
        ray.shutdown()
    base = figures["dataloader"]["steady"]
    for label in ("ray_data_streaming", "ray_data_cached"):
        figures[label]["ratio_vs_dataloader"] = figures[label]["steady"] / base
    figures["target"] = "Ray Data >= 1.0x DataLoader tiles/s (steady state)"
    return figures


def format_data_figures(figures: dict[str, Any]) -> str:
    """A readable table of :func:`bench_data`'s figures."""
    lines = [f"data: {figures['tiles_per_epoch']} tiles/epoch, {figures['epochs']} epochs, batch {figures['batch_size']}, {figures['cores']} cores"]
    lines.append(f"{'path':34s} {'epoch 1':>10s} {'steady':>10s} {'vs DataLoader':>14s}")
    lines.append(f"{'raw decode, 1 process':34s} {'':>10s} {figures['raw_decode_tiles_per_s']:10.1f} {'':>14s}")
    rows = (("PyTorch DataLoader", "dataloader"), ("Ray Data -> Train (streaming)", "ray_data_streaming"), ("Ray Data -> Train (cached decode)", "ray_data_cached"))
    for name, key in rows:
        entry = figures[key]
        ratio = entry.get("ratio_vs_dataloader")
        lines.append(f"{name:34s} {entry['epoch1']:10.1f} {entry['steady']:10.1f} {'' if ratio is None else f'{ratio:.2f}x':>14s}")
    lines.append("(tiles/s)  target: " + figures["target"])
    return "\n".join(lines)
