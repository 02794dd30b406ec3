"""The Ray Train worker: a method's epochs over Ray Data shards, checkpointed and reported every epoch.

Each worker builds the method, resumes from the latest checkpoint if there is one, and runs
:func:`~xmodal.engine.training.run_epochs` over its shard of the training stream(s) and its share of
each evaluation split. Every epoch ends with ``ray.train.report`` and a checkpoint (Train V2 keeps
metrics only with checkpoints). Rank 0 returns the outcome to the driver.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from xmodal.data.pipeline import LABELLED_STREAM, TRAIN, eval_dataset_name
from xmodal.data.prepared import PreparedData
from xmodal.engine.collectives import current_collectives
from xmodal.engine.config import ExperimentConfig
from xmodal.engine.console import throttled, worker_line, worker_progress
from xmodal.engine.results import inference_record, publish_tensorboard, worker_results_dir
from xmodal.engine.setup import BestTracker, build_method, metric_spec
from xmodal.engine.training import STATE_FILE, LoopData, LoopState, open_tensorboard, resume_from, run_epochs, write_checkpoint
from xmodal.errors import DataError
from xmodal.methods.base import DataNeeds, DataSpec, MethodContext
from xmodal.methods.exports import read_torch_file



@dataclass
class WorkerPlan:
    """Everything a worker needs, computed once by the driver and pickled to each worker."""

    config: ExperimentConfig
    prepared: PreparedData
    spec: DataSpec
    needs: DataNeeds
    train_tiles: int
    splits: tuple[str, ...]
    results_dir: str
    fingerprint: dict[str, Any]
    inputs: dict[str, Any] = field(default_factory=dict)  # name -> ray.train.Checkpoint or folder
    datasets: tuple[str, ...] = ()  # names of the Ray datasets the trainer was given
    adopted_checkpoint: str | None = None  # a complete checkpoint folder Ray's records miss (see the runner)

    def steps_per_epoch(self, world_size: int) -> int:
        per_worker = self.train_tiles // world_size
        batch = self.config.data.worker_batch_size(world_size)
        steps = per_worker // batch
        if steps == 0:
            raise DataError(
                f"{self.train_tiles} training tiles over {world_size} worker(s) give fewer than one batch of "
                f"{batch} per worker; lower data.batch_size or scaling.num_workers"
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


def _shard(name: str, batch_size: int, device: torch.device, *, shuffle_buffer: int = 0, drop_last: bool = False):
    """One pass over dataset ``name`` (this worker's shard), as torch batches on ``device``."""
    return ray.train.get_dataset_shard(name).iter_torch_batches(
        batch_size=batch_size, device=device, drop_last=drop_last, local_shuffle_buffer_size=shuffle_buffer or None, prefetch_batches=2
    )


def prepare_module(module: torch.nn.Module, find_unused_parameters: bool = False, sync_batchnorm: bool = False) -> torch.nn.Module:
    """Move to this worker's device and wrap in DDP when there are several workers.

    Args:
        module: The network.
        find_unused_parameters: For losses that leave some trainable parameters without a
            gradient in a step (e.g. a reconstruction loss on encoder layers only).
        sync_batchnorm: Convert BatchNorm layers to SyncBatchNorm (statistics over the global
            batch; only with several workers).
    """
    if sync_batchnorm and ray.train.get_context().get_world_size() > 1:
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    kwargs = {"find_unused_parameters": True} if find_unused_parameters else None
    return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=kwargs)


def _reported_state(epoch: int, device: torch.device) -> dict[str, Any] | None:
    """The method state of the checkpoint reported after ``epoch`` (after a resume), if Ray kept it."""
    for reported in ray.train.get_all_reported_checkpoints():
        if reported.metrics.get("epoch") == epoch:
            with reported.checkpoint.as_directory() as folder:
                return read_torch_file(Path(folder) / STATE_FILE, device)["method"]
    return None


def _latest_state(plan: WorkerPlan, device: torch.device) -> dict[str, Any] | None:
    """The state to resume from: Ray's latest checkpoint, or the checkpoint the driver adopted
    (written before a kill but never recorded by Ray) when that one is later."""
    states = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            states.append(read_torch_file(Path(folder) / STATE_FILE, device))
    if plan.adopted_checkpoint is not None:
        states.append(read_torch_file(Path(plan.adopted_checkpoint) / STATE_FILE, device))
    return max(states, key=lambda saved: saved["epoch"], default=None)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Body of every Ray Train worker.

    Rank 0 returns :func:`~xmodal.engine.training.run_epochs`'s outcome, with
    ``worker_start_time`` (this function entered: the worker group is up) and ``setup_end_time``
    (method built, inputs read, resumed) for the start-up split.
    """
    worker_started = time.time()
    plan: WorkerPlan = loop_config["plan"]
    config = plan.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.scaling.torch_threads or max(1, (os.cpu_count() or 1) // world))
    device = ray.train.torch.get_device()

    def log(message: str) -> None:
        if rank == 0:
            worker_line(f"[{config.name}] {message}")

    collectives = current_collectives(device)
    method = build_method(config, plan.spec)
    # Methods read their input checkpoints in setup only: the local copies go right after it (every
    # run of a chain or sweep would otherwise leave hundreds of MB in the temp folder).
    with tempfile.TemporaryDirectory(prefix="xmodal-inputs-") as scratch:
        method.setup(
            MethodContext(
                device=device,
                rank=rank,
                world_size=world,
                prepare_module=prepare_module,
                steps_per_epoch=plan.steps_per_epoch(world),
                epochs=config.train.epochs,
                inputs=_local_inputs(plan.inputs, Path(scratch)),
                log=log,
                collectives=collectives,
            )
        )
    state = LoopState(tracker=BestTracker(metric_spec(config, plan.spec), config.run.select))
    saved = _latest_state(plan, device)
    if saved is not None:
        resume_from(saved, method, state, config, config.run.storage, log)
    staged = worker_results_dir(config, plan.results_dir)
    writer = open_tensorboard(staged, state) if rank == 0 else None
    setup_ended = time.time()

    batch_size, shuffle = config.data.worker_batch_size(world), config.data.shuffle_buffer
    labelled = "labelled" in plan.needs.streams

    def evaluation(split: str):
        name = eval_dataset_name(split, rank, world)
        return _shard(name, batch_size, device) if name in plan.datasets else iter(())

    data = LoopData(
        train=lambda: _shard(TRAIN, batch_size, device, shuffle_buffer=shuffle, drop_last=True),
        labelled=(lambda: _shard(LABELLED_STREAM, batch_size, device, shuffle_buffer=shuffle, drop_last=True)) if labelled else None,
        evaluation=evaluation,
        splits=tuple(s for s in plan.splits if s != TRAIN),
        batch_size=batch_size,
        tile_id=plan.prepared.tile_id,
        steps=plan.steps_per_epoch(world),
    )

    def on_epoch(epoch: int, metrics: dict[str, Any], tracker: BestTracker) -> None:
        with tempfile.TemporaryDirectory() as folder:
            report_checkpoint = None
            if rank == 0:
                record = {
                    "method": method.state_dict(), "epoch": epoch, "global_step": metrics["step"],
                    "fingerprint": plan.fingerprint, "metrics": metrics, "best": tracker.record,
                }
                write_checkpoint(folder, record, method.exports(), inference_record(plan.prepared))
                report_checkpoint = ray.train.Checkpoint.from_directory(folder)
                if writer is not None:  # curves on object storage as the run goes (rank 0 may be on any node)
                    writer.flush()
                    publish_tensorboard(config, staged)
            ray.train.report(metrics, checkpoint=report_checkpoint)

    outcome = run_epochs(
        method, config, data, state, device=device, collectives=collectives, on_epoch=on_epoch,
        restore_weights=lambda epoch: _reported_state(epoch, device), log=log, writer=writer,
        progress=throttled(1.0, worker_progress) if rank == 0 else None,
    )
    if writer is not None:
        writer.close()
        publish_tensorboard(config, staged)
    outcome.update(worker_start_time=worker_started, setup_end_time=setup_ended)
    return outcome if rank == 0 else None
