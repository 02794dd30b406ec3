"""The one generic Ray Train loop, driven by a method object.

Each worker: builds the method, resumes from the latest checkpoint if there is one, runs the
epochs over its shard of the training split, validates on rank 0, and reports metrics with a
checkpoint after every epoch (Train V2 keeps metrics only with checkpoints). After the last epoch,
rank 0 evaluates the test split and returns the result to the driver.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from xmodal.data.prepared import PreparedData
from xmodal.engine.config import ExperimentConfig
from xmodal.engine.plain import build_method, cpu_copy, is_better
from xmodal.errors import DataError
from xmodal.methods.base import DataSpec, MethodContext
from xmodal.methods.exports import save_exports

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.json"
# Ranks checkpoints for Ray (which keeps the best ones and always the latest): the method's
# metric on epochs that were validated, the worst possible value on the others.
SELECTION_KEY = "selection_score"
WORST = {"max": -1e30, "min": 1e30}


@dataclass
class WorkerPlan:
    """Everything a worker needs, computed once by the driver and pickled to each worker."""

    config: ExperimentConfig
    prepared: PreparedData
    spec: DataSpec
    train_tiles: int
    splits: tuple[str, ...]
    results_dir: str
    fingerprint: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)  # name -> ray.train.Checkpoint

    def steps_per_epoch(self, world_size: int) -> int:
        per_worker = self.train_tiles // world_size
        steps = per_worker // self.config.data.batch_size
        if steps == 0:
            raise DataError(
                f"{self.train_tiles} training tiles over {world_size} worker(s) give fewer than one batch of "
                f"{self.config.data.batch_size}; lower data.batch_size or scaling.num_workers"
            )
        return steps


def _local_inputs(inputs: dict[str, Any], scratch: Path) -> dict[str, Path]:
    """Input checkpoints as local folders (downloaded when they live on remote storage)."""
    local = {}
    for name, checkpoint in inputs.items():
        if isinstance(checkpoint, (str, Path)):
            local[name] = Path(checkpoint)
            continue
        target = scratch / name
        checkpoint.to_directory(str(target))
        local[name] = target
    return local


def _batches(split: str, batch_size: int, device: torch.device, shuffle_buffer: int = 0, drop_last: bool = False):
    shard = ray.train.get_dataset_shard(split)
    return shard.iter_torch_batches(
        batch_size=batch_size,
        device=device,
        drop_last=drop_last,
        local_shuffle_buffer_size=shuffle_buffer or None,
        prefetch_batches=2,
    )


def prepare_module(module: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
    """Move to this worker's device and wrap in DDP when there are several workers.

    Methods whose loss leaves some trainable parameters without a gradient in a step (e.g. a
    reconstruction loss on encoder layers only) pass ``find_unused_parameters=True``.
    """
    kwargs = {"find_unused_parameters": True} if find_unused_parameters else None
    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kwargs)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Body of every Ray Train worker."""
    plan: WorkerPlan = loop_config["plan"]
    config = plan.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = config.scaling.torch_threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()

    def log(message: str) -> None:
        if rank == 0:
            print(f"[{config.name}] {message}", flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="xmodal-inputs-"))
    steps_per_epoch = plan.steps_per_epoch(world)
    method = build_method(config, plan.spec)
    method.setup(
        MethodContext(
            device=device,
            rank=rank,
            world_size=world,
            prepare_module=prepare_module,
            steps_per_epoch=steps_per_epoch,
            inputs=_local_inputs(plan.inputs, scratch),
            log=log,
        )
    )
    metric_name = type(method).metric_for(config.method_settings, plan.spec)
    metric_mode = type(method).metric_mode
    # The weights that score best on validation are the ones tested at the end (model selection
    # on val, as in the papers); rank 0 keeps a CPU copy, and Ray keeps their checkpoint.
    best: dict[str, Any] = {}
    best_weights: dict[str, Any] | None = None

    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False)
        if state["fingerprint"] != plan.fingerprint:
            raise DataError(
                f"run {config.name!r} already exists in {config.run.storage} with another method, model or data; "
                "choose another name, or delete that run folder to start over"
            )
        method.load_state_dict(state["method"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        best = state.get("best", {})
        log(f"resumed from epoch {state['epoch'] + 1} checkpoint")

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(plan.results_dir) / "tensorboard"), purge_step=global_step or None)

    batch_size = config.data.batch_size
    epochs = config.train.epochs
    last_val: dict[str, float] = {}
    for epoch in range(start_epoch, epochs):
        started = time.perf_counter()
        totals: dict[str, float] = {}
        steps = 0
        waiting = 0.0  # time spent waiting for Ray Data, to tell input-bound from compute-bound epochs
        fetched = time.perf_counter()
        for batch in _batches("train", batch_size, device, config.data.shuffle_buffer, drop_last=True):
            waiting += time.perf_counter() - fetched
            logs = method.train_step(batch, global_step)
            steps += 1
            global_step += 1
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value
            if writer is not None and global_step % config.run.log_every == 0:
                for key, value in logs.items():
                    writer.add_scalar(f"train/{key}", value, global_step)
            fetched = time.perf_counter()
        train_seconds = time.perf_counter() - started
        metrics: dict[str, float] = {f"train/{k}": v / max(steps, 1) for k, v in totals.items()}
        metrics.update({f"train/{k}": v for k, v in method.end_epoch(epoch).items()})
        metrics.update(epoch=epoch + 1, step=global_step, epoch_seconds=train_seconds, data_wait_seconds=waiting)
        metrics["train/tiles_per_s"] = steps * batch_size * world / max(train_seconds, 1e-9)
        is_last = epoch + 1 == epochs
        if rank == 0 and "val" in plan.splits and ((epoch + 1) % config.run.eval_every == 0 or is_last):
            result = method.evaluate(_batches("val", batch_size, device))
            last_val = {f"val/{k}": v for k, v in result.metrics.items()}
            score = last_val.get(metric_name)
            if score is not None and is_better(score, best.get("score"), metric_mode):
                best = {"epoch": epoch + 1, "score": score, "val": last_val, "val_per_class": result.per_class}
                best_weights = cpu_copy(method.state_dict())
            metrics[SELECTION_KEY] = score if score is not None else WORST[metric_mode]
        else:
            metrics[SELECTION_KEY] = WORST[metric_mode]  # not validated: never kept as "best"
        metrics.update(last_val)
        if best:
            metrics["best_epoch"] = best["epoch"]
        if writer is not None:
            for key, value in metrics.items():
                if "/" in key:
                    writer.add_scalar(key, value, global_step)
            writer.flush()
        shown = f"  {metric_name} {metrics[metric_name]:.4f}" if metric_name in metrics else ""
        log(
            f"epoch {epoch + 1}/{epochs}  loss {metrics.get('train/loss', float('nan')):.4f}{shown}  "
            f"{train_seconds:.1f} s ({waiting:.1f} s waiting for data)  {metrics['train/tiles_per_s']:.1f} tiles/s"
        )
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                torch.save(
                    {
                        "method": method.state_dict(),
                        "epoch": epoch,
                        "global_step": global_step,
                        "fingerprint": plan.fingerprint,
                        "metrics": metrics,
                        "best": best,
                    },
                    Path(folder) / STATE_FILE,
                )
                (Path(folder) / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
                save_exports(method.exports(), folder)
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=report_checkpoint)

    if writer is not None:
        writer.close()
    if rank != 0:
        return None
    outcome: dict[str, Any] = {"epochs": epochs, "metric": metric_name, "metric_mode": metric_mode, "tested_epoch": epochs}
    if best and best["epoch"] != epochs:
        weights = best_weights if best_weights is not None else _reported_state(best["epoch"], device)
        if weights is not None:
            method.load_state_dict(weights)
            outcome["tested_epoch"] = best["epoch"]
        else:
            log(f"the epoch-{best['epoch']} checkpoint (best on validation) is gone; testing the last weights")
    for split in ("val", "test"):
        if split not in plan.splits:
            continue
        if split == "val" and best and outcome["tested_epoch"] == best["epoch"]:
            outcome["val"] = {k.split("/", 1)[1]: v for k, v in best["val"].items()}
            outcome["val_per_class"] = best["val_per_class"]
            continue
        result = method.evaluate(_batches(split, batch_size, device), panels=config.run.panels if split == "test" else 0)
        outcome[split] = result.metrics
        outcome[f"{split}_per_class"] = result.per_class
        if split == "test":
            outcome["panels"] = result.panels
    return outcome


def _reported_state(epoch: int, device: torch.device) -> dict[str, Any] | None:
    """The method state of the checkpoint reported after ``epoch`` (after a resume), if Ray kept it."""
    for reported in ray.train.get_all_reported_checkpoints():
        if reported.metrics.get("epoch") == epoch:
            with reported.checkpoint.as_directory() as folder:
                return torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False)["method"]
    return None
