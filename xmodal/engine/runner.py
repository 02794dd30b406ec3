"""Running an experiment on Ray Train: data checks, trainer construction, phases, results.

``run_experiment`` is what ``xmodal train`` and ``xmodal run`` call. A config with ``phases`` runs
them in order (:mod:`xmodal.engine.chain`); each phase's tested checkpoint is handed to later phases
by name, through the run's storage, and any phase input can instead be an existing checkpoint folder.
Everything a run can be refused for (data, method needs, inputs, batch size) is checked here, in
the driver, before any worker starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from xmodal.data.pipeline import LABELLED_STREAM, TRAIN, build_datasets
from xmodal.data.prepared import PreparedData
from xmodal.engine.chain import ResolvedInput, run_chain
from xmodal.engine.config import ExperimentConfig, fingerprint
from xmodal.engine.loop import STATE_FILE, WorkerPlan, train_loop_per_worker
from xmodal.engine.results import RunResult, results_dir, storage_path, summarise, write_run_results
from xmodal.engine.session import connect
from xmodal.engine.setup import BestTracker, metric_spec, prepare_run_data
from xmodal.engine.storage import is_remote
from xmodal.engine.training import SELECTION_KEY
from xmodal.methods.exports import read_torch_file
from xmodal.errors import ConfigError, XmodalError


class RunFailedError(XmodalError):
    """A training run failed after its retries."""


def root_cause(exc: BaseException) -> str:
    """The innermost error message of a (possibly wrapped) exception."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def ensure_ray(config: ExperimentConfig) -> None:
    """Connect to the configured cluster, or start a local Ray sized to leave CPUs for Ray Data."""
    scaling = config.scaling
    needed = scaling.num_workers * scaling.cpus_per_worker + scaling.data_cpus + 1
    connect(config.run.address, int(max(os.cpu_count() or 1, needed + 0.999)), dashboard=config.run.dashboard)


def plan_run(config: ExperimentConfig, inputs: dict[str, Any] | None = None) -> tuple[WorkerPlan, PreparedData]:
    """Check the data against the method's needs and build the plan every worker receives."""
    prepared, spec, needs = prepare_run_data(config)
    splits = tuple(s for s in (TRAIN, "val", "test") if prepared.records(s))
    plan = WorkerPlan(
        config=config,
        prepared=prepared,
        spec=spec,
        needs=needs,
        train_tiles=len(prepared.records(TRAIN)),
        splits=splits,
        results_dir=str(results_dir(config)),
        fingerprint=fingerprint(config),
        inputs=dict(inputs or {}),
    )
    plan.steps_per_epoch(config.scaling.num_workers)
    return plan, prepared


def make_trainer(
    config: ExperimentConfig,
    plan: WorkerPlan,
    prepared: PreparedData,
    callbacks: list[Any] | None = None,
    datasets: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The TorchTrainer of one run (used directly by runs and inside Tune trials).

    ``datasets`` replaces the Ray Data pipeline (benchmarks feed pre-made tensors).
    """
    scaling = config.scaling
    resources: dict[str, float] = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    *parents, leaf = config.name.split("/")
    storage = storage_path(config)
    if parents:
        storage = storage.rstrip("/") + "/" + "/".join(parents)
    if datasets is None:
        datasets = build_datasets(prepared, plan.splits, world_size=scaling.num_workers, streams=plan.needs.streams)
    plan.datasets = tuple(datasets)
    tracker = BestTracker(metric_spec(config, plan.spec), config.run.select)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[name for name in (TRAIN, LABELLED_STREAM) if name in datasets]),
        run_config=ray.train.RunConfig(
            name=leaf,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            # Ray keeps the best-scoring checkpoints and always the latest (resume starts there).
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.run.keep_checkpoints, checkpoint_score_attribute=SELECTION_KEY, checkpoint_score_order=tracker.mode,
            ),
            callbacks=callbacks or [],
        ),
    )


def run_folder(config: ExperimentConfig) -> Path | None:
    """The Ray Train folder of this run when its storage is local."""
    if is_remote(config.run.storage):
        return None
    return Path(storage_path(config)) / config.name


def check_resumable(config: ExperimentConfig) -> None:
    """Refuse to resume a run of the same name that was trained with another config.

    Ray Train resumes any run launched again under the same storage and name; loading weights of
    another architecture or method into it would be silently wrong (or crash inside a worker).
    """
    folder = run_folder(config)
    if folder is None or not folder.is_dir():
        return
    checkpoints = sorted(folder.glob("checkpoint_*/" + STATE_FILE))
    if not checkpoints:
        return
    state = read_torch_file(checkpoints[-1])
    if state.get("fingerprint") != fingerprint(config):
        raise ConfigError(
            f"run {config.name!r} already exists in {folder} with another method, model or data; "
            "choose another name, or delete that folder to start over"
        )


def _checkpoint_of_epoch(result: Any, epoch: int | None) -> str | None:
    """The kept checkpoint reported after ``epoch``: the one that was tested."""
    for checkpoint, metrics in getattr(result, "best_checkpoints", None) or []:
        if metrics.get("epoch") == epoch:
            return checkpoint.path
    latest = result.checkpoint
    return latest.path if latest is not None and epoch == (result.metrics or {}).get("epoch") else None


def run_single(config: ExperimentConfig, inputs: dict[str, ResolvedInput] | None = None, callbacks: list[Any] | None = None) -> RunResult:
    """Train one configuration to the end (resuming it if a run of that name exists).

    Raises:
        RunFailedError: The workers failed more often than ``run.max_failures``; the message
            carries the workers' error, and finished checkpoints stay where they are.
    """
    started = time.time()
    inputs = inputs or {}
    check_resumable(config)
    plan, prepared = plan_run(config, {name: ray.train.Checkpoint(ref.location) for name, ref in inputs.items()})
    ensure_ray(config)
    try:
        result = make_trainer(config, plan, prepared, callbacks).fit()
    except ray.train.TrainingFailedError as exc:
        raise RunFailedError(f"run {config.name!r} failed: {root_cause(exc)}; checkpoints so far are kept in {run_folder(config) or config.run.storage}") from exc
    outcome = result.return_value or {}
    last = result.checkpoint.path if result.checkpoint is not None else None
    tested = _checkpoint_of_epoch(result, outcome.get("tested_epoch")) or last
    summary = summarise(
        config, outcome, spec=plan.spec, checkpoint=tested, last_checkpoint=last, started=started,
        inputs={name: ref.record() for name, ref in inputs.items()},
    )
    write_run_results(plan.results_dir, summary, outcome, title=config.name)
    return RunResult(name=config.name, metrics=summary["metrics"], checkpoint=tested, last_checkpoint=last, results_dir=plan.results_dir, summary=summary)


def run_experiment(config: ExperimentConfig, only_phases: list[str] | None = None) -> list[RunResult]:
    """Run a config on Ray Train: a single run, or its phases in order (see :func:`~xmodal.engine.chain.run_chain`)."""
    return run_chain(config, lambda phase, inputs: run_single(phase, inputs), only_phases)
