"""``bench_train``: step time of xmodal's training loop inside a Ray Train worker beside the same
loop in one process without Ray, for the same model, method and batches, and their ratio."""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import ray
import ray.train
import torch

from xmodal.engine.config import build_config

from xmodal.bench.common import bench_data_root, init_ray


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

    root = bench_data_root(data_root, tiles)
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
    started_ray = init_ray()
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


def format_train_figures(figures: dict[str, Any]) -> str:
    """A readable summary of :func:`bench_train`'s figures."""
    lines = [f"train step, {figures['model']}, batch {figures['batch_size']}, {figures['torch_threads']} threads"]
    lines.append(f"  plain PyTorch loop : {figures['plain_step_s'] * 1000:8.1f} ms/step")
    lines.append(f"  Ray Train loop     : {figures['ray_train_step_s'] * 1000:8.1f} ms/step")
    lines.append(f"  ratio              : {figures['ratio']:.3f}  (overhead {figures['overhead_percent']:+.1f} %)  target: {figures['target']}")
    return "\n".join(lines)
