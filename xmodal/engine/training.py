"""The training loop both engines run: a method's epochs over batches, validation, selection, test.

The Ray Train worker (:mod:`xmodal.engine.loop`) and the plain PyTorch loop (:mod:`xmodal.engine.plain`)
differ only in where batches come from, how an epoch is checkpointed and how workers talk; both
drive :func:`run_epochs`, so a method behaves the same under either. Per epoch:

1. ``method.begin_epoch(epoch)``; one pass over the training stream (zipped in lockstep with the
   labelled stream when the method declares one); ``method.train_step`` per batch;
2. when due, validation on every worker (its share of the split, networks' buffers synchronised
   from worker 0 first so every share is scored by the same model), metrics checked to agree;
3. ``method.finish_epoch(epoch, val_metrics)`` (plateau schedules, then ``end_epoch``);
4. the tracker keeps the epoch to test (:class:`~xmodal.engine.setup.BestTracker`); ``on_epoch``
   checkpoints and reports.

After the last epoch the tested weights are loaded and the validation and test splits scored.
Nothing here imports Ray.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from xmodal.engine.config import ExperimentConfig, check_same_run
from xmodal.engine.results import INFERENCE_FILE
from xmodal.engine.setup import BestTracker
from xmodal.errors import TrainingError, XmodalError
from xmodal.methods.base import Collectives, EvalResult, Method
from xmodal.methods.exports import save_exports
from xmodal.settings import json_safe

# Ranks checkpoints for Ray (which keeps the best ones and always the latest): the tracker's score
# on validated epochs, the worst possible value on the others.
SELECTION_KEY = "selection_score"
WORST = {"max": -1e30, "min": 1e30}
STREAMS_KEY = "streams"


class MethodContractError(XmodalError):
    """A method broke the engine's contract (e.g. unreduced evaluation meters)."""


@dataclass
class LoopData:
    """Where one worker's batches come from.

    Attributes:
        train: Callable giving one epoch of training batches (a fresh iterator per call).
        labelled: Same for the labelled stream, or ``None``.
        evaluation: ``evaluation(split)`` gives this worker's share of ``split`` (possibly empty).
        splits: Evaluation splits the data has (``val``, ``test``).
        batch_size: Samples per training batch (throughput figures).
        tile_id: The tile id of a batch's ``index`` value (errors name the tiles), if known.
        steps: Training batches per epoch on this worker (progress), 0 if unknown.
    """

    train: Callable[[], Iterable[dict[str, Any]]]
    evaluation: Callable[[str], Iterable[dict[str, Any]]]
    splits: tuple[str, ...]
    batch_size: int
    labelled: Callable[[], Iterable[dict[str, Any]]] | None = None
    tile_id: Callable[[int], str] | None = None
    steps: int = 0


@dataclass
class LoopState:
    """Where a (resumed) run starts: the next epoch, the step count and the tracker."""

    tracker: BestTracker
    start_epoch: int = 0
    global_step: int = 0
    last_val: dict[str, float] = field(default_factory=dict)


STATE_FILE = "state.pt"  # a checkpoint's method state, epoch, step, fingerprint and tracker record
METRICS_FILE = "metrics.json"  # its epoch's metrics (the run's summary is run.json)


def write_checkpoint(folder: str | Path, record: dict[str, Any], exports: dict[str, Any], inference: dict[str, Any] | None = None) -> None:
    """A checkpoint's files in ``folder``: the state, its metrics as strict JSON, the exports, and
    the inference record (:func:`~xmodal.engine.results.inference_record`) when given."""
    folder = Path(folder)
    torch.save(record, folder / STATE_FILE)
    (folder / METRICS_FILE).write_text(json.dumps(json_safe(record["metrics"]), indent=2, allow_nan=False))
    save_exports(exports, folder)
    if inference is not None:
        (folder / INFERENCE_FILE).write_text(json.dumps(json_safe(inference), indent=2, default=str))


def resume_from(saved: dict[str, Any], method: Method, state: LoopState, config: ExperimentConfig, where: str, log: Callable[[str], None]) -> None:
    """Take a run's saved checkpoint state back (weights, next epoch, step, tracker record).

    Raises:
        ConfigError: The checkpoint was trained with other settings (they are listed).
    """
    check_same_run(saved.get("fingerprint"), config, where)
    method.load_state_dict(saved["method"])
    state.start_epoch, state.global_step = saved["epoch"] + 1, saved["global_step"]
    state.tracker.restore(saved.get("best"))
    log(f"resumed from epoch {saved['epoch'] + 1} checkpoint")


def open_tensorboard(folder: str | Path, state: LoopState) -> Any:
    """A TensorBoard writer for a run's ``tensorboard`` folder that, on a resume, drops only the
    points logged after the checkpoint (those steps are trained again), not the checkpoint's own."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=state.global_step + 1 if state.global_step else None)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch (and its streams) as tensors on ``device`` (already-placed tensors stay as they are)."""
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = to_device(value, device)
        else:
            out[key] = torch.as_tensor(value).to(device, non_blocking=True)
    return out


def _lockstep(main: Iterable[dict[str, Any]], labelled: Iterable[dict[str, Any]] | None) -> Iterator[dict[str, Any]]:
    if labelled is None:
        yield from main
        return
    for batch, extra in zip(main, labelled):
        yield {**batch, STREAMS_KEY: {"labelled": extra}}


def sync_buffers(method: Method, collectives: Collectives) -> None:
    """Give every worker worker 0's buffers (BatchNorm statistics drift apart by one local step
    under DDP), so every share of a split is scored by the same model."""
    if collectives.world_size == 1:
        return
    for network in method.networks().values():
        for buffer in network.buffers():
            collectives.broadcast_(buffer, 0)


def evaluate_split(
    method: Method, batches: Iterable[dict[str, Any]], device: torch.device, collectives: Collectives, panels: int = 0
) -> EvalResult:
    """Evaluate this worker's share of a split; check every worker got the same metrics.

    Raises:
        MethodContractError: Workers disagree, i.e. the method did not reduce its meters.
    """
    sync_buffers(method, collectives)
    result = method.evaluate((to_device(b, device) for b in batches), panels=panels)
    if collectives.world_size > 1:
        everyone = collectives.all_gather_object(result.metrics)
        for rank, metrics in enumerate(everyone[1:], start=1):
            differs = [k for k in sorted(set(metrics) | set(everyone[0])) if not _same(metrics.get(k), everyone[0].get(k))]
            if differs:
                key = differs[0]
                raise MethodContractError(
                    f"method {method.name!r}: evaluation metric {key!r} is {everyone[0].get(key)} on worker 0 but "
                    f"{metrics.get(key)} on worker {rank}; reduce evaluation meters with context.all_reduce "
                    "(every worker evaluates its share of the split)"
                )
    return result


def check_finite_losses(
    logs: dict[str, float], epoch: int, step: int, batch: dict[str, Any], tile_id: Callable[[int], str] | None = None
) -> None:
    """Stop at the first non-finite loss, before it reaches a checkpoint or a metrics file.

    Raises:
        TrainingError: Naming the loss terms, the epoch and step, and the batch's tiles (their ids
            when ``tile_id`` is given, else their index in the prepared manifest).
    """
    bad = {key: value for key, value in logs.items() if "loss" in key and not math.isfinite(value)}
    if bad:
        index = batch.get("index")
        positions = [int(i) for i in torch.as_tensor(index).flatten().tolist()] if index is not None else []
        tiles = f"tiles {[tile_id(i) for i in positions]}" if tile_id and positions else f"tiles (prepared manifest index) {positions or 'unknown'}"
        terms = ", ".join(f"{key}={value}" for key, value in bad.items())
        raise TrainingError(
            f"non-finite training loss ({terms}) at epoch {epoch}, step {step}; batch {tiles}: "
            "check the data's statistics (stats.json) and no-data, or lower train.lr"
        )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def run_epochs(
    method: Method,
    config: ExperimentConfig,
    data: LoopData,
    state: LoopState,
    *,
    device: torch.device,
    collectives: Collectives,
    on_epoch: Callable[[int, dict[str, Any], BestTracker], None],
    restore_weights: Callable[[int], dict[str, Any] | None],
    log: Callable[[str], None],
    writer: Any = None,
    progress: Callable[[str, int, int, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train from ``state.start_epoch`` to ``train.epochs``, then test; returns the outcome.

    Args:
        method: The set-up method.
        config: The run's config.
        data: This worker's batches.
        state: Start epoch, step and tracker (restored on resume).
        device: This worker's device.
        collectives: Cross-worker operations.
        on_epoch: ``on_epoch(epoch, metrics, tracker)`` after each epoch (checkpoint, report).
        restore_weights: Method state of a reported epoch (1-based), for a resumed run whose tested
            weights are no longer in memory; ``None`` when that checkpoint is gone.
        log: Where per-epoch lines go (rank 0 prints).
        writer: A TensorBoard ``SummaryWriter`` (rank 0), or ``None``.
        progress: ``progress(run, epoch, epochs, step, steps, tiles_per_s)`` after every training
            step (1-based epoch and step), for a progress bar; ``None`` on other ranks.

    Returns:
        ``epochs``, ``metric``, ``metric_mode``, ``select``, ``tested_epoch``, per split ``val`` /
        ``test`` metrics and ``<split>_per_class``, the test ``panels`` and ``artifacts``, and
        ``history`` (the scalar metrics of each epoch trained in this call) and ``first_step_time``
        (``time.time()`` of its first training step; ``None`` when it trained none).
    """
    tracker = state.tracker
    epochs, global_step, last_val = config.train.epochs, state.global_step, dict(state.last_val)
    metric = tracker.metric
    history: list[dict[str, float]] = []
    first_step: float | None = None  # when the first batch reached the method (start-up ends)
    for epoch in range(state.start_epoch, epochs):
        method.begin_epoch(epoch)
        started = time.perf_counter()
        totals: dict[str, float] = {}
        steps, waiting = 0, 0.0  # time spent waiting for data tells input-bound from compute-bound epochs
        fetched = time.perf_counter()
        for batch in _lockstep(data.train(), data.labelled() if data.labelled else None):
            waiting += time.perf_counter() - fetched
            if first_step is None:
                first_step = time.time()
            logs = method.train_step(to_device(batch, device), global_step)
            check_finite_losses(logs, epoch + 1, global_step, batch, data.tile_id)
            steps += 1
            global_step += 1
            if progress is not None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress(config.name, epoch + 1, epochs, steps, data.steps or steps, steps * data.batch_size * collectives.world_size / elapsed)
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value
            if writer is not None and global_step % config.run.log_every == 0:
                for key, value in logs.items():
                    writer.add_scalar(f"train/{key}", value, global_step)
            fetched = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - started
        metrics: dict[str, Any] = {f"train/{k}": v / max(steps, 1) for k, v in totals.items()}
        # ``epochs``: a sweep's ASHA lets a trial's last epoch finish (its test report comes after it).
        metrics.update(epoch=epoch + 1, epochs=epochs, step=global_step, epoch_seconds=train_seconds, data_wait_seconds=waiting)
        metrics["train/tiles_per_s"] = steps * data.batch_size * collectives.world_size / max(train_seconds, 1e-9)
        is_last = epoch + 1 == epochs
        validated: dict[str, float] = {}
        if "val" in data.splits and ((epoch + 1) % config.run.eval_every == 0 or is_last):
            result = evaluate_split(method, data.evaluation("val"), device, collectives)
            validated = {f"val/{k}": v for k, v in result.metrics.items()}
            last_val = validated
            tracker.offer(epoch + 1, validated, result.per_class, method.state_dict())
            metrics[SELECTION_KEY] = tracker.score(validated, epoch + 1)
        else:
            metrics[SELECTION_KEY] = WORST[tracker.mode]  # not validated: never kept as the tested checkpoint
        metrics.update({f"train/{k}": v for k, v in method.finish_epoch(epoch, validated).items()})
        metrics.update(last_val)
        if tracker.epoch is not None:
            metrics["best_epoch"] = tracker.epoch
        if writer is not None:
            for key, value in metrics.items():
                if "/" in key and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, global_step)
            writer.flush()
        shown = f"  {metric.select} {metrics[metric.select]:.4f}" if metric.select in metrics else ""
        log(
            f"epoch {epoch + 1}/{epochs}  loss {metrics.get('train/loss', float('nan')):.4f}{shown}  "
            f"{train_seconds:.1f} s ({waiting:.1f} s waiting for data)  {metrics['train/tiles_per_s']:.1f} tiles/s"
        )
        on_epoch(epoch, metrics, tracker)
        history.append({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("val/")} | validated)
    outcome = _test(method, config, data, tracker, device, collectives, restore_weights, log)
    outcome["history"] = history
    outcome["first_step_time"] = first_step
    return outcome


def _test(
    method: Method,
    config: ExperimentConfig,
    data: LoopData,
    tracker: BestTracker,
    device: torch.device,
    collectives: Collectives,
    restore_weights: Callable[[int], dict[str, Any] | None],
    log: Callable[[str], None],
) -> dict[str, Any]:
    epochs = config.train.epochs
    outcome: dict[str, Any] = {
        "epochs": epochs, "metric": tracker.metric.select, "metric_mode": tracker.metric.mode,
        "metric_labelled": tracker.metric.labelled, "select": tracker.select, "tested_epoch": epochs,
    }
    best = tracker.epoch
    if best is not None and best != epochs:
        weights = tracker.weights if tracker.weights is not None else restore_weights(best)
        if weights is not None:
            method.load_state_dict(weights)
            outcome["tested_epoch"] = best
        else:
            log(f"the epoch-{best} checkpoint (the one to test) is gone; testing the last weights")
    for split in ("val", "test"):
        if split not in data.splits:
            continue
        if split == "val" and best is not None and outcome["tested_epoch"] == best:
            outcome["val"] = {k.split("/", 1)[1]: v for k, v in tracker.record["val"].items()}
            outcome["val_per_class"] = tracker.record["val_per_class"]
            continue
        panels = config.run.panels if split == "test" else 0
        result = evaluate_split(method, data.evaluation(split), device, collectives, panels=panels)
        outcome[split] = result.metrics
        outcome[f"{split}_per_class"] = result.per_class
        if split == "test":
            outcome["panels"] = result.panels
            outcome["artifacts"] = result.artifacts
    return outcome
