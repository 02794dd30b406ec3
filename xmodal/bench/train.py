"""``bench_train``: step time of xmodal's training loop inside a Ray Train worker beside the same
loop in one process without Ray, for the same model, method and batches, and their ratio; the CPU
each process of the local Ray burns meanwhile; and the start-up of the Ray run, split into its
parts. With ``device="cuda"``: the GPU's busy share while Ray Data feeds a kd reconstruction step.
"""

from __future__ import annotations

import copy
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch

from xmodal.bench.common import (
    DRIVER,
    ProcessCpuSampler,
    bench_data_root,
    cpu_table,
    format_cpu_table,
    init_ray,
)
from xmodal.data.pipeline import default_blocks
from xmodal.engine.config import build_config
from xmodal.errors import ConfigError

DEVICES = ("cpu", "cuda")
TRAIN_WORKER = "ray::RayTrainWorker"
# Train V2 names each reported checkpoint folder after the local time it was reported at.
CHECKPOINT_TIME_FORMAT = "checkpoint_%Y-%m-%d_%H-%M-%S.%f"


def overhead_target(cores: int) -> float:
    """The step overhead (percent) Ray Train may add on a machine of ``cores`` cores (issue 19):
    its own processes share the cores with the step, which weighs most on a small machine."""
    return 10.0 if cores <= 2 else 5.0 if cores >= 4 else 7.5


def _bench_config(root: str, epochs: int, batch_size: int, *, modality: str = "sar", device: str = "cpu", teacher: str | None = None) -> Any:
    """The benchmark's run: a U-Net trained supervised on ``modality``, or (with a ``teacher``
    checkpoint folder) the kd reconstruction step of a SAR student."""
    raw: dict[str, Any] = {
        "name": f"bench-train-{time.time_ns()}",
        "method": "supervised",
        "method_settings": {"input": modality},
        "data": {"root": root, "batch_size": batch_size, "mask_layer": "buildings"},
        "model": {"arch": "unet", "encoder": "resnet18", "decoder_channels": [128, 64, 32, 16, 16]},
        "train": {"epochs": epochs, "schedule": "constant"},
        "run": {"storage": tempfile.mkdtemp(prefix="xmodal-bench-"), "panels": 0, "eval_every": 1000, "keep_checkpoints": epochs},
    }
    if teacher is not None:
        raw.update(method="kd", method_settings={"teacher": "teacher", "layers": "int"}, inputs={"teacher": teacher})
    if device == "cuda":
        raw["scaling"] = {"use_gpu": True}
    return build_config(raw, source="bench")


def _plain_epoch_seconds(method: Any, config: Any, batches: list[dict[str, Any]] | Callable[[], Iterable[dict[str, Any]]], epochs: int) -> list[float]:
    """Epoch times of the shared training loop in this process (no Ray Train) over ready batches,
    or over the batches a callable yields anew each epoch."""
    from xmodal.engine.setup import BestTracker, metric_spec
    from xmodal.engine.training import LoopData, LoopState, run_epochs
    from xmodal.methods.base import Collectives

    seconds: list[float] = []
    run = copy.deepcopy(config)
    run.train.epochs = epochs
    data = LoopData(train=batches if callable(batches) else lambda: batches, evaluation=lambda split: iter(()), splits=(), batch_size=config.data.batch_size)
    run_epochs(
        method, run, data, LoopState(tracker=BestTracker(metric_spec(config, None))), device=torch.device("cpu"),
        collectives=Collectives(), on_epoch=lambda epoch, metrics, tracker: seconds.append(metrics["epoch_seconds"]),
        restore_weights=lambda epoch: None, log=lambda line: None,
    )
    return seconds


def checkpoint_times(result: Any) -> dict[int, float]:
    """When (``time.time()``) each kept checkpoint of a finished Train run was reported, by epoch."""
    times = {}
    for checkpoint, metrics in getattr(result, "best_checkpoints", None) or []:
        try:
            reported = datetime.strptime(Path(checkpoint.path).name, CHECKPOINT_TIME_FORMAT)
        except ValueError:
            continue
        times[int(metrics["epoch"])] = reported.timestamp()
    return times


def start_up_parts(launched: float, ray_ready: float, planned: float, outcome: dict[str, Any]) -> dict[str, float | None]:
    """The start-up of a Ray run, from its launch to its first optimiser step, in seconds.

    Args:
        launched: ``time.time()`` when the run was launched (before Ray started).
        ray_ready: When the local Ray answered (equal to ``launched`` when it was running already).
        planned: When the data was planned and the trainer built (``fit`` starts).
        outcome: Rank 0's return value (:func:`~xmodal.engine.loop.train_loop_per_worker`), with
            ``worker_start_time``, ``setup_end_time`` and ``first_step_time``.

    Returns:
        ``ray_start_s``, ``planning_s``, ``worker_group_start_s`` (controller, placement group,
        worker processes, process group), ``setup_s`` (method build, inputs, resume),
        ``first_batch_s`` (until the first batch reached the method) and ``total_s``.
    """
    worker, ready, first = (outcome.get(k) for k in ("worker_start_time", "setup_end_time", "first_step_time"))

    def span(begin: float | None, end: float | None) -> float | None:
        return None if begin is None or end is None else round(end - begin, 2)

    return {
        "ray_start_s": span(launched, ray_ready),
        "planning_s": span(ray_ready, planned),
        "worker_group_start_s": span(planned, worker),
        "setup_s": span(worker, ready),
        "first_batch_s": span(ready, first),
        "total_s": span(launched, first),
    }


def _start_up_figures(sampler: ProcessCpuSampler, launched: float, ray_ready: float, planned: float, outcome: dict[str, Any], cores: int) -> dict[str, Any]:
    """The start-up split and the CPU each process burnt in it (process starts are mostly imports)."""
    first = outcome.get("first_step_time") or launched
    return {
        "start_up": start_up_parts(launched, ray_ready, planned, outcome),
        "start_up_cpu_per_process": cpu_table(sampler.use_between(launched, first), max(first - launched, 1e-9), cores),
    }


def _prepared_batches(config: Any, tiles: int, batch_size: int) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    """The run's data spec, its first ``tiles`` training tiles decoded once (no augmentation), and
    whole batches of them."""
    from xmodal.data.torch_data import TileDataset
    from xmodal.data.transforms import stack
    from xmodal.engine.setup import prepare_run_data

    prepared, spec, _ = prepare_run_data(config)
    dataset = TileDataset(prepared, "train", train=False)
    samples = [dataset[i] for i in range(min(tiles, len(dataset)))]
    steps = len(samples) // batch_size
    return spec, samples, [stack(samples[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]


def bench_train(
    data_root: str | None = None, tiles: int = 128, epochs: int = 5, batch_size: int = 8, device: str = "cpu", threads: int | None = None
) -> dict[str, Any]:
    """Step time of the Ray Train loop vs the same loop in one process, on the same prepared batches.

    Also samples the CPU of every process of the local Ray over the Ray run's epochs after the
    first, and splits the Ray run's start-up into Ray start, planning, worker-group start, method
    set-up and first batch.

    Args:
        device: ``cpu``; or ``cuda``: the kd reconstruction step on one GPU fed by the Ray Data
            pipeline, reporting the GPU's busy share (:func:`bench_train_gpu`).
        threads: Intra-op threads of both loops on the CPU (default: the machine's cores, as a run
            of one worker takes them). Fewer leave cores to Ray's own processes.

    Raises:
        ConfigError: An unknown device, ``cuda`` where PyTorch sees no CUDA device, or threads
            below 1 or with ``cuda``.
    """
    if device not in DEVICES:
        raise ConfigError(f"bench train --device {device!r}: expected one of {list(DEVICES)}")
    if threads is not None and threads < 1:
        raise ConfigError(f"bench train --threads {threads}: expected 1 or more")
    if device == "cuda":
        if threads is not None:
            raise ConfigError("bench train --threads: an option of the CPU step (--device cpu)")
        return bench_train_gpu(data_root, tiles, epochs, batch_size)
    from xmodal.engine.runner import make_trainer, plan_run
    from xmodal.engine.setup import build_method
    from xmodal.methods.base import MethodContext

    root = bench_data_root(data_root, tiles)
    config = _bench_config(root, epochs, batch_size)
    cores = os.cpu_count() or 1
    threads = threads or cores
    config.scaling.torch_threads = threads
    spec, samples, batches = _prepared_batches(config, tiles, batch_size)
    steps = len(batches)
    if steps == 0:
        raise ConfigError(f"bench train: {len(samples)} training tile(s) in {root} give no batch of {batch_size}; raise --tiles")

    # The same loop in one process: the same method, the same batches, the same thread count. It
    # runs before and after the Ray run: this machine's speed drifts by 10-20 % between minutes,
    # and bracketing keeps that drift out of the ratio.
    torch.set_num_threads(threads)
    method = build_method(config, spec)
    method.setup(MethodContext(device=torch.device("cpu"), steps_per_epoch=steps, epochs=epochs))
    tensors = [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()} for batch in batches]
    _plain_epoch_seconds(method, config, tensors, 1)  # warm-up, like the Ray run's first epoch
    cpu_before = time.process_time()
    plain_seconds = _plain_epoch_seconds(method, config, tensors, max(1, (epochs - 1) // 2))
    plain_cpu = time.process_time() - cpu_before

    sampler = ProcessCpuSampler().start()
    launched = time.time()
    started_ray = init_ray()
    ray_ready = time.time()
    try:  # the run's checkpoints are scratch: removed however the run ends
        plan, prepared = plan_run(config)
        plan.splits = ("train",)
        plan.train_tiles = len(samples)
        # Blocks as the pipeline cuts them: ``from_items`` alone makes one block per tile, whose
        # per-block fetch and concatenation cost 14 ms of CPU a batch of 8 here against 3 ms.
        data = ray.data.from_items(samples, override_num_blocks=default_blocks(prepared, len(samples))).materialize()
        trainer = make_trainer(config, plan, prepared, datasets={"train": data})
        planned = time.time()
        result = trainer.fit()
        # The third leg: the same loop in this process, fed by the same Ray Data iterator a Train
        # worker uses. Its excess over the plain loop is Ray Data's ingest; the Train loop's
        # excess over it is Train's own (worker process, controller, reporting). It runs after
        # the Train run so that the start-up split stays the Train run's own.
        ingest_epochs = max(2, epochs // 2)  # the first is discarded, as the Ray run's
        ingest_cpu = time.process_time()
        ingest_seconds = _plain_epoch_seconds(
            method, config, lambda: data.iter_torch_batches(batch_size=batch_size, drop_last=True, prefetch_batches=2), ingest_epochs
        )[1:]
        ingest_cpu = time.process_time() - ingest_cpu
    finally:
        sampler.stop()
        if started_ray:
            ray.shutdown()
        shutil.rmtree(config.run.storage, ignore_errors=True)
    cpu_before = time.process_time()
    plain_seconds += _plain_epoch_seconds(method, config, tensors, max(1, (epochs - 1) - (epochs - 1) // 2))
    plain_cpu += time.process_time() - cpu_before
    history = result.metrics_dataframe
    ray_epochs = list(history["epoch_seconds"]) if history is not None and "epoch_seconds" in history else []
    plain = statistics.median(plain_seconds) / steps
    ingest_step = statistics.median(ingest_seconds) / steps
    ray_step = statistics.median(ray_epochs[1:] or ray_epochs) / steps if ray_epochs else float("nan")
    overhead = 100.0 * (ray_step / plain - 1.0)
    target = overhead_target(cores)
    reported = checkpoint_times(result)
    # The CPU window: from the first epoch's report to the last one's (steady epochs only), or the
    # whole Ray run when there is a single epoch.
    begin, end = (reported[min(reported)], reported[max(reported)]) if len(reported) > 1 else (launched, time.time())
    table = cpu_table(sampler.use_between(begin, end), end - begin, cores)
    # CPU seconds, which other work on the machine hardly changes (wall times it does): what Ray's
    # own processes (all but the Train worker, and the driver running this sampler) burn per step
    # of the steady epochs, against the CPU of one plain step. On a machine whose cores the step
    # keeps busy, that share is taken from the step.
    window_steps = steps * (max(reported) - min(reported)) if len(reported) > 1 else None
    helpers = sum(row["cpu_s"] for row in table if row["process"] not in (DRIVER, TRAIN_WORKER))
    helpers_per_step = helpers / window_steps if window_steps else float("nan")
    plain_cpu_step = plain_cpu / (steps * len(plain_seconds))
    worker = sum(row["cpu_s"] for row in table if row["process"] == TRAIN_WORKER)
    worker_per_step = worker / window_steps if window_steps else float("nan")
    return {
        "model": "unet/resnet18 (slim decoder), SAR input",
        "device": "cpu",
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "cores": cores,
        "torch_threads": threads,
        "plain_step_s": plain,
        "ray_train_step_s": ray_step,
        "ray_data_in_process_step_s": ingest_step,
        "ray_data_in_process_percent": 100.0 * (ingest_step / plain - 1.0),
        "ray_train_over_in_process_percent": 100.0 * (ray_step / ingest_step - 1.0),
        "ratio": ray_step / plain,
        "overhead_percent": overhead,
        "target": f"Ray Train step overhead <= {target:g} % on {cores} core(s) (<= 10 % on 2 cores, <= 5 % on 4 or more)",
        "target_met": bool(overhead <= target),
        "plain_cpu_per_step_s": plain_cpu_step,
        "ray_helpers_cpu_per_step_s": helpers_per_step,
        "train_worker_cpu_per_step_s": worker_per_step,
        # This process's CPU over the in-process Ray Data leg (its first, discarded epoch included).
        "ray_data_in_process_cpu_per_step_s": ingest_cpu / (steps * ingest_epochs),
        "ray_helpers_cpu_percent_of_step": 100.0 * helpers_per_step / plain_cpu_step,
        "cpu_window_s": round(end - begin, 2),
        "cpu_per_process": table,
        **_start_up_figures(sampler, launched, ray_ready, planned, result.return_value or {}, cores),
    }


def require_cuda() -> None:
    """Refuse a GPU benchmark where PyTorch sees no CUDA device (never silently on the CPU).

    Raises:
        ConfigError: Saying what was found.
    """
    if not torch.cuda.is_available():
        built = torch.version.cuda
        raise ConfigError(
            "bench train --device cuda: PyTorch sees no CUDA device (torch.cuda.is_available() is False; "
            + (f"this torch is built for CUDA {built}, so check the driver and CUDA_VISIBLE_DEVICES)" if built else "this torch is a CPU-only build)")
        )


def parse_gpu_utilisation(text: str) -> list[tuple[int, float]]:
    """``(gpu index, utilisation percent)`` per line of ``nvidia-smi --query-gpu=index,utilization.gpu
    --format=csv,noheader,nounits`` output (lines without a number, e.g. ``[N/A]``, are skipped)."""
    values = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) == 2 and fields[0].isdigit() and fields[1].replace(".", "", 1).isdigit():
            values.append((int(fields[0]), float(fields[1])))
    return values


class GpuBusySampler:
    """Each GPU's busy share (NVML's ``utilization.gpu``: the share of time a kernel ran), sampled
    by ``nvidia-smi`` every ``interval_ms`` from :meth:`start` to :meth:`stop`, with wall times."""

    def __init__(self, interval_ms: int = 200) -> None:
        if shutil.which("nvidia-smi") is None:
            raise ConfigError("bench train --device cuda: nvidia-smi is not on PATH (it reads the GPU's busy share)")
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        command = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}"]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as reader:
            assert reader.stdout is not None
            for line in reader.stdout:
                self.samples += [(time.time(), index, value) for index, value in parse_gpu_utilisation(line)]
                if self._stop.is_set():
                    reader.terminate()
                    break

    def start(self) -> GpuBusySampler:
        self._thread = threading.Thread(target=self._run, name="xmodal-gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def busy_share(self, begin: float, end: float) -> tuple[int, float] | None:
        """The busiest GPU between two wall times (the one Ray gave the worker) and its mean
        utilisation (0-1); ``None`` without samples."""
        per_gpu: dict[int, list[float]] = {}
        for at, index, value in self.samples:
            if begin <= at <= end:
                per_gpu.setdefault(index, []).append(value)
        if not per_gpu:
            return None
        index = max(per_gpu, key=lambda gpu: statistics.fmean(per_gpu[gpu]))
        return index, statistics.fmean(per_gpu[index]) / 100.0


def write_random_teacher(config: Any, spec: Any, folder: Path) -> Path:
    """A checkpoint folder exporting the (random) network of an optical supervised ``config`` as
    kd's teacher: the benchmark times the reconstruction step, whatever the teacher learnt."""
    from xmodal.engine.setup import build_method
    from xmodal.methods.base import MethodContext
    from xmodal.methods.exports import save_exports

    teacher = build_method(config, spec)
    teacher.setup(MethodContext(device=torch.device("cpu"), steps_per_epoch=1, epochs=1))
    save_exports(teacher.exports(), folder)
    return folder


def bench_train_gpu(data_root: str | None = None, tiles: int = 128, epochs: int = 5, batch_size: int = 8) -> dict[str, Any]:
    """The GPU's busy share while the Ray Data pipeline (decode and transforms in Ray Data tasks)
    feeds a kd reconstruction step (SAR student, frozen optical teacher, six Int layers) in one
    Ray Train worker with one GPU, over the epochs after the first.

    Raises:
        ConfigError: PyTorch sees no CUDA device, or ``nvidia-smi`` is missing.
    """
    from xmodal.engine.runner import make_trainer, plan_run
    from xmodal.engine.setup import prepare_run_data

    require_cuda()
    gpu = GpuBusySampler()
    root = bench_data_root(data_root, tiles)
    scratch = Path(tempfile.mkdtemp(prefix="xmodal-bench-teacher-"))
    optical = _bench_config(root, epochs, batch_size, modality="optical")
    _, spec, _ = prepare_run_data(optical)
    teacher = write_random_teacher(optical, spec, scratch)
    config = _bench_config(root, epochs, batch_size, device="cuda", teacher=str(teacher))
    sampler = ProcessCpuSampler().start()
    gpu.start()
    launched = time.time()
    started_ray = init_ray()  # Ray finds the GPU itself
    ray_ready = time.time()
    try:
        plan, prepared = plan_run(config, {"teacher": str(teacher)})
        plan.splits = ("train",)
        trainer = make_trainer(config, plan, prepared)  # the Ray Data pipeline of the training split
        planned = time.time()
        result = trainer.fit()
    finally:
        gpu.stop()
        sampler.stop()
        if started_ray:
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(config.run.storage, ignore_errors=True)
        shutil.rmtree(optical.run.storage, ignore_errors=True)
    history = result.metrics_dataframe
    seconds = list(history["epoch_seconds"]) if history is not None and "epoch_seconds" in history else []
    waits = list(history["data_wait_seconds"]) if history is not None and "data_wait_seconds" in history else []
    reported = checkpoint_times(result)
    begin, end = (reported[min(reported)], reported[max(reported)]) if len(reported) > 1 else (launched, time.time())
    steps = plan.steps_per_epoch(1)
    steady = seconds[1:] or seconds
    busiest = gpu.busy_share(begin, end)
    return {
        "model": "kd reconstruction (Int layers), unet/resnet18 (slim decoder), SAR student, optical teacher",
        "device": "cuda",
        "gpu": torch.cuda.get_device_name(0),
        "gpu_index": None if busiest is None else busiest[0],
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "cores": os.cpu_count() or 1,
        "ray_train_step_s": statistics.median(steady) / steps if steady else float("nan"),
        "data_wait_share": (sum(waits[1:] or waits) / sum(steady)) if steady and waits else None,
        "gpu_busy_share": None if busiest is None else busiest[1],
        "gpu_samples": len(gpu.samples),
        "cpu_window_s": round(end - begin, 2),
        "cpu_per_process": cpu_table(sampler.use_between(begin, end), end - begin, os.cpu_count() or 1),
        **_start_up_figures(sampler, launched, ray_ready, planned, result.return_value or {}, os.cpu_count() or 1),
    }


def format_start_up(parts: dict[str, float | None]) -> str:
    """The start-up split as one line."""
    names = (("ray_start_s", "Ray start"), ("planning_s", "planning"), ("worker_group_start_s", "worker group"), ("setup_s", "set-up"), ("first_batch_s", "first batch"))
    shown = ", ".join(f"{label} {parts[key]:.1f} s" for key, label in names if parts.get(key) is not None)
    total = parts.get("total_s")
    return f"  start-up to the first step: {'?' if total is None else f'{total:.1f} s'} ({shown})"


def format_train_figures(figures: dict[str, Any]) -> str:
    """A readable summary of :func:`bench_train`'s figures."""
    if figures.get("device") == "cuda":
        busy = figures["gpu_busy_share"]
        wait = figures["data_wait_share"]
        lines = [
            f"train step on {figures['gpu']}, {figures['model']}, batch {figures['batch_size']}, {figures['cores']} cores",
            f"  Ray Train loop     : {figures['ray_train_step_s'] * 1000:8.1f} ms/step (Ray Data pipeline feeding)",
            (
                f"  GPU busy           : {'?' if busy is None else f'{100 * busy:.0f} %'} of the steady epochs ({figures['gpu_samples']} samples)"
                f"; waiting for data {'?' if wait is None else f'{100 * wait:.0f} %'} of the step time"
            ),
        ]
    else:
        lines = [f"train step, {figures['model']}, batch {figures['batch_size']}, {figures['torch_threads']} threads, {figures['cores']} cores"]
        lines.append(f"  plain PyTorch loop : {figures['plain_step_s'] * 1000:8.1f} ms/step")
        lines.append(
            f"  same loop + Ray Data iterator (no Train): {figures['ray_data_in_process_step_s'] * 1000:8.1f} ms/step "
            f"({figures['ray_data_in_process_percent']:+.1f} % over plain)"
        )
        lines.append(
            f"  Ray Train loop     : {figures['ray_train_step_s'] * 1000:8.1f} ms/step "
            f"({figures['ray_train_over_in_process_percent']:+.1f} % over the in-process Ray Data loop)"
        )
        lines.append(
            f"  CPU per step       : plain {figures['plain_cpu_per_step_s']:.3f} s, in-process Ray Data {figures['ray_data_in_process_cpu_per_step_s']:.3f} s, "
            f"Train worker {figures['train_worker_cpu_per_step_s']:.3f} s"
        )
        met = "met" if figures["target_met"] else "NOT met"
        lines.append(f"  ratio              : {figures['ratio']:.3f}  (overhead {figures['overhead_percent']:+.1f} %)  target: {figures['target']}: {met}")
        lines.append(
            f"  Ray's own processes: {figures['ray_helpers_cpu_per_step_s']:.3f} CPU s per step = {figures['ray_helpers_cpu_percent_of_step']:.1f} % "
            f"of a plain step's {figures['plain_cpu_per_step_s']:.3f} CPU s (all but the Train worker and the driver)"
        )
    lines += format_cpu_table(figures["cpu_per_process"], figures["cpu_window_s"], "steady epochs")
    lines.append(format_start_up(figures["start_up"]))
    total = figures["start_up"].get("total_s")
    if total:
        lines += format_cpu_table(figures["start_up_cpu_per_process"], total, "start-up")
    return "\n".join(lines)
