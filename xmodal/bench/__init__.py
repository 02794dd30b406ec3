"""Benchmarks: commands that print figures (never timed tests).

``bench_data``: tiles/s of the Ray Data pipeline delivered into a Ray Train worker, beside a
plain PyTorch DataLoader reading the same files with the same transforms on the same cores, and
the raw single-process decode rate.

``bench_train``: step time of xmodal's training loop inside a Ray Train worker beside the same
loop in one process without Ray, for the same model, method and batches, and their ratio.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from xmodal.data.prepared import DataSettings, prepare_data
from xmodal.engine.config import build_config
from xmodal.engine.session import connect

BENCH_WORLD = {"seed": 11, "regions": 4, "tile_size": 128}


def _bench_data_root(data_root: str | None, tiles: int) -> str:
    if data_root:
        return data_root
    root = Path(tempfile.gettempdir()) / f"xmodal-bench-world-{tiles}"
    if not (root / "stats.json").is_file():
        from xmodal.data.synth import synthesize

        # Everything but a token val/test region goes to train so the train split has ~`tiles` tiles.
        per_region = max(4, int(np.ceil(tiles / 2)))
        synthesize(root, {**BENCH_WORLD, "scenes_per_region": per_region})
    return str(root)


def _init_ray() -> bool:
    """Start a local Ray unless one is running; True when this call started it."""
    # The Train worker reserves one logical CPU; the data pipeline keeps every core's budget.
    return connect(None, (os.cpu_count() or 1) + 1, dashboard=False)


def _rates(tiles: list[int], seconds: list[float]) -> dict[str, float]:
    rates = [t / s for t, s in zip(tiles, seconds)]
    steady = rates[1:] or rates
    return {"epoch1": rates[0], "steady": statistics.median(steady), "per_epoch": rates}


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

    root = _bench_data_root(data_root, tiles)
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
    figures["dataloader"] = {"num_workers": cores, **_rates(counts, seconds)}
    del loader

    started_ray = _init_ray()
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
        figures[label] = _rates([c for c, _ in per_epoch], [s for _, s in per_epoch])
    if started_ray:
        ray.shutdown()
    base = figures["dataloader"]["steady"]
    for label in ("ray_data_streaming", "ray_data_cached"):
        figures[label]["ratio_vs_dataloader"] = figures[label]["steady"] / base
    figures["target"] = "Ray Data >= 1.0x DataLoader tiles/s (steady state)"
    return figures


def _bench_config(root: str, epochs: int, batch_size: int) -> Any:
    return build_config(
        {
            "name": f"bench-train-{time.time_ns()}",
            "method": "supervised",
            "method_settings": {"input": "sar"},
            "data": {"root": root, "batch_size": batch_size, "mask_layer": "buildings"},
            "model": {"arch": "unet", "encoder": "resnet18", "decoder_channels": [128, 64, 32, 16, 16]},
            "train": {"epochs": epochs, "schedule": "constant"},
            "run": {"storage": tempfile.mkdtemp(prefix="xmodal-bench-"), "panels": 0, "eval_every": 1000, "keep_checkpoints": epochs},
        },
        source="bench",
    )


def _plain_epoch_seconds(method: Any, config: Any, batches: list[dict[str, Any]], epochs: int) -> list[float]:
    """Epoch times of the shared training loop over ready batches in this process (no Ray)."""
    from xmodal.engine.setup import BestTracker, metric_spec
    from xmodal.engine.training import LoopData, LoopState, run_epochs
    from xmodal.methods.base import Collectives

    seconds: list[float] = []
    run = copy.deepcopy(config)
    run.train.epochs = epochs
    data = LoopData(train=lambda: batches, evaluation=lambda split: iter(()), splits=(), batch_size=config.data.batch_size)
    run_epochs(
        method, run, data, LoopState(tracker=BestTracker(metric_spec(config, None))), device=torch.device("cpu"),
        collectives=Collectives(), on_epoch=lambda epoch, metrics, tracker: seconds.append(metrics["epoch_seconds"]),
        restore_weights=lambda epoch: None, log=lambda line: None,
    )
    return seconds


def bench_train(data_root: str | None = None, tiles: int = 128, epochs: int = 5, batch_size: int = 8) -> dict[str, Any]:
    """Step time of the Ray Train loop vs the same loop in one process, on the same prepared batches."""
    from xmodal.data.torch_data import TileDataset
    from xmodal.data.transforms import stack
    from xmodal.engine.runner import make_trainer, plan_run
    from xmodal.engine.setup import build_method, prepare_run_data
    from xmodal.methods.base import MethodContext

    root = _bench_data_root(data_root, tiles)
    config = _bench_config(root, epochs, batch_size)
    threads = os.cpu_count() or 1
    config.scaling.torch_threads = threads
    prepared, spec, _ = prepare_run_data(config)
    dataset = TileDataset(prepared, "train", train=False)
    samples = [dataset[i] for i in range(min(tiles, len(dataset)))]
    steps = len(samples) // batch_size
    batches = [stack(samples[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]

    # The same loop in one process: the same method, the same batches, the same thread count. It
    # runs before and after the Ray run: this machine's speed drifts by 10-20 % between minutes,
    # and bracketing keeps that drift out of the ratio.
    torch.set_num_threads(threads)
    method = build_method(config, spec)
    method.setup(MethodContext(device=torch.device("cpu"), steps_per_epoch=steps, epochs=epochs))
    tensors = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()} for batch in batches]
    _plain_epoch_seconds(method, config, tensors, 1)  # warm-up, like the Ray run's first epoch
    plain_seconds = _plain_epoch_seconds(method, config, tensors, max(1, (epochs - 1) // 2))
    started_ray = _init_ray()
    plan, prepared = plan_run(config)
    plan.splits = ("train",)
    plan.train_tiles = len(samples)
    data = ray.data.from_items(samples).materialize()
    result = make_trainer(config, plan, prepared, datasets={"train": data}).fit()
    history = result.metrics_dataframe if result.metrics_dataframe is not None else None
    ray_epochs = list(history["epoch_seconds"]) if history is not None and "epoch_seconds" in history else []
    if started_ray:
        ray.shutdown()
    plain_seconds += _plain_epoch_seconds(method, config, tensors, max(1, (epochs - 1) - (epochs - 1) // 2))
    plain = statistics.median(plain_seconds) / steps
    ray_step = statistics.median(ray_epochs[1:] or ray_epochs) / steps if ray_epochs else float("nan")
    return {
        "model": "unet/resnet18 (slim decoder), SAR input",
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "torch_threads": threads,
        "plain_step_s": plain,
        "ray_train_step_s": ray_step,
        "ratio": ray_step / plain,
        "overhead_percent": 100.0 * (ray_step / plain - 1.0),
        "target": "Ray Train step overhead <= 5 %",
    }


def format_figures(figures: dict[str, Any]) -> str:
    """A readable table of either benchmark's figures."""
    lines = []
    if "dataloader" in figures:
        lines.append(f"data: {figures['tiles_per_epoch']} tiles/epoch, {figures['epochs']} epochs, batch {figures['batch_size']}, {figures['cores']} cores")
        lines.append(f"{'path':34s} {'epoch 1':>10s} {'steady':>10s} {'vs DataLoader':>14s}")
        lines.append(f"{'raw decode, 1 process':34s} {'':>10s} {figures['raw_decode_tiles_per_s']:10.1f} {'':>14s}")
        rows = (("PyTorch DataLoader", "dataloader"), ("Ray Data -> Train (streaming)", "ray_data_streaming"), ("Ray Data -> Train (cached decode)", "ray_data_cached"))
        for name, key in rows:
            entry = figures[key]
            ratio = entry.get("ratio_vs_dataloader")
            lines.append(f"{name:34s} {entry['epoch1']:10.1f} {entry['steady']:10.1f} {'' if ratio is None else f'{ratio:.2f}x':>14s}")
        lines.append("(tiles/s)  target: " + figures["target"])
    else:
        lines.append(f"train step, {figures['model']}, batch {figures['batch_size']}, {figures['torch_threads']} threads")
        lines.append(f"  plain PyTorch loop : {figures['plain_step_s'] * 1000:8.1f} ms/step")
        lines.append(f"  Ray Train loop     : {figures['ray_train_step_s'] * 1000:8.1f} ms/step")
        lines.append(f"  ratio              : {figures['ratio']:.3f}  (overhead {figures['overhead_percent']:+.1f} %)  target: {figures['target']}")
    return "\n".join(lines)
