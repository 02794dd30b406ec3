"""Running an experiment on Ray Train: data checks, trainer construction, phases, results.

``run_experiment`` is what ``xmodal run`` calls. A config with ``phases`` runs
them in order (:mod:`xmodal.engine.chain`); each phase's tested checkpoint is handed to later phases
by name, through the run's storage, and any phase input can instead be an existing checkpoint folder.
Everything a run can be refused for (data, method needs, inputs, batch size) is checked here, in
the driver, before any worker starts.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.failure_handling import FailureDecision, FailurePolicy, create_failure_policy

from xmodal.data.pipeline import LABELLED_STREAM, TRAIN, build_datasets
from xmodal.data.prepared import PreparedData
from xmodal.engine.chain import ResolvedInput, run_chain
from xmodal.engine.config import ExperimentConfig, check_same_run, fingerprint
from xmodal.engine.console import CONSOLE, LOG_FILE
from xmodal.engine.loop import WorkerPlan, train_loop_per_worker
from xmodal.engine.preflight import preflight
from xmodal.engine.results import (
    SNAPSHOT_FILE, RunResult, checkpoint_location, publish_results, read_snapshot, record_failure, results_dir, results_location, storage_path, summarise, write_run_results,
)
from xmodal.engine.session import connect, placement_group_cleaner_can_work, train_task_env
from xmodal.engine.setup import BestTracker, metric_spec, prepare_run_data, result_line, run_header
from xmodal.engine.storage import is_remote, refuse_job_scratch
from xmodal.engine.tracking import track_run
from xmodal.engine.tracking_train import epoch_callbacks
from xmodal.engine.training import SELECTION_KEY, STATE_FILE
from xmodal.methods.exports import DamagedFileError, read_torch_file
from xmodal.errors import RunFailedError, cuda_out_of_memory, error_line, permanent_cause


# Ray forwards worker output to the driver within about a second; a failed run waits that long
# before closing its log file, so the file ends with the workers' tracebacks.
LOG_DRAIN_SECONDS = 2.0


class NoRetryOfPermanentErrors(FailurePolicy):
    """Ray Train's failure policy, except that a worker error running again cannot fix (a bad
    config, bad data, a non-finite loss: :func:`~xmodal.errors.permanent_cause`; CUDA out of
    memory: :func:`~xmodal.errors.cuda_out_of_memory`) ends the run at
    once instead of restarting the worker group ``run.max_failures`` times."""

    def __init__(self, failure_config: ray.train.FailureConfig) -> None:
        super().__init__(failure_config)
        self.default = create_failure_policy(failure_config)

    def make_decision(self, training_failed_error: ray.train.TrainingFailedError) -> FailureDecision:
        if permanent_cause(training_failed_error) is not None or cuda_out_of_memory(training_failed_error) is not None:
            return FailureDecision.RAISE
        return self.default.make_decision(training_failed_error)


class XmodalTrainer(TorchTrainer):
    """A TorchTrainer with :class:`NoRetryOfPermanentErrors` (Ray 2.60 takes no policy argument;
    this hook is where its ``fit`` hands the policy to the controller), and without Train's
    placement-group cleaner where it cannot work (:func:`~xmodal.engine.session.placement_group_cleaner_can_work`)."""

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        controller_init_kwargs["failure_policy"] = NoRetryOfPermanentErrors(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        if placement_group_cleaner_can_work():
            return callbacks
        return [callback for callback in callbacks if not isinstance(callback, PlacementGroupCleanerCallback)]


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
) -> XmodalTrainer:
    """The TorchTrainer of one run (used directly by runs and inside Tune trials).

    ``datasets`` replaces the Ray Data pipeline (benchmarks feed pre-made tensors).
    """
    scaling = config.scaling
    *parents, leaf = config.name.split("/")
    storage = storage_path(config)
    if parents:
        storage = storage.rstrip("/") + "/" + "/".join(parents)
    if datasets is None:
        datasets = build_datasets(prepared, plan.splits, world_size=scaling.num_workers, streams=plan.needs.streams, task_env=train_task_env())
    plan.datasets = tuple(datasets)
    tracker = BestTracker(metric_spec(config, plan.spec), config.run.select)
    return XmodalTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=scaling.worker_resources(),
            accelerator_type=scaling.accelerator_type,
        ),
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


def reconcile_checkpoints(config: ExperimentConfig, log: Callable[[str], None] = print) -> str | None:
    """Adopt or clean the checkpoint folders of this run that Ray's snapshot does not record.

    A kill between a checkpoint folder reaching storage and Ray recording it leaves a folder Ray
    neither resumes from nor ever deletes. A complete one later than Ray's latest is adopted (the
    workers resume from it); a damaged one (a file cut short) is removed; an earlier one is a
    leftover and is removed too. Runs on remote storage are left to Ray's records.

    Returns:
        The adopted checkpoint folder, or ``None``.
    """
    folder = run_folder(config)
    if folder is None or not folder.is_dir():
        return None
    tracked, latest = read_snapshot(folder)
    if not tracked and (folder / SNAPSHOT_FILE).is_file():
        return None  # a record Ray wrote but this cannot read: touch nothing
    strays: list[tuple[int, Path]] = []
    for path in sorted(p for p in folder.glob("checkpoint_*") if p.is_dir() and p.name not in tracked):
        try:
            strays.append((read_torch_file(path / STATE_FILE)["epoch"] + 1, path))
        except (DamagedFileError, FileNotFoundError, KeyError):
            shutil.rmtree(path, ignore_errors=True)
            log(f"[{config.name}] removed {path.name}: an incomplete checkpoint (the run was stopped while writing it)")
    adopted = max(strays) if strays and (latest is None or max(strays)[0] > latest) else None
    for epoch, path in strays:
        if adopted is None or path != adopted[1]:
            shutil.rmtree(path, ignore_errors=True)
            log(f"[{config.name}] removed {path.name}: an epoch-{epoch} checkpoint Ray's records had left behind")
    if adopted is None:
        return None
    log(f"[{config.name}] resuming from {adopted[1].name} (epoch {adopted[0]}), written before the run was stopped but not recorded by Ray")
    return str(adopted[1])


def remove_untracked_checkpoints(config: ExperimentConfig) -> None:
    """After a run: delete checkpoint folders Ray does not record (an adopted one, now superseded)."""
    folder = run_folder(config)
    if folder is None or not (folder / SNAPSHOT_FILE).is_file():
        return
    tracked, _ = read_snapshot(folder)
    for path in folder.glob("checkpoint_*"):
        if path.is_dir() and path.name not in tracked:
            shutil.rmtree(path, ignore_errors=True)


def check_resumable(config: ExperimentConfig, adopted: str | None = None) -> None:
    """Refuse to resume a run of the same name that was trained with other settings.

    Ray Train resumes any run launched again under the same storage and name; loading weights of
    another architecture or method into it would be silently wrong (or crash inside a worker).

    Raises:
        ConfigError: Listing the settings that differ.
    """
    folder = run_folder(config)
    if folder is None or not folder.is_dir():
        return
    tracked, _ = read_snapshot(folder)
    candidates = [folder / name for name in sorted(tracked)] + ([Path(adopted)] if adopted else [])
    states = [path / STATE_FILE for path in candidates if (path / STATE_FILE).is_file()]
    if states:
        check_same_run(read_torch_file(states[-1]).get("fingerprint"), config, str(folder))


def _checkpoint_of_epoch(result: Any, epoch: int | None) -> str | None:
    """The kept checkpoint reported after ``epoch``: the one that was tested."""
    for checkpoint, metrics in getattr(result, "best_checkpoints", None) or []:
        if metrics.get("epoch") == epoch:
            return checkpoint_location(checkpoint)
    latest = result.checkpoint
    return checkpoint_location(latest) if latest is not None and epoch == (result.metrics or {}).get("epoch") else None


def run_single(config: ExperimentConfig, inputs: dict[str, ResolvedInput] | None = None, callbacks: list[Any] | None = None) -> RunResult:
    """Train one configuration to the end (resuming it if a run of that name exists).

    Raises:
        RunFailedError: The workers failed more often than ``run.max_failures``, or once with an
            error that would come back (not retried); the message carries the workers' error in
            one line, and finished checkpoints stay where they are.
    """
    started = time.time()
    inputs = inputs or {}
    for key, value in (("run.storage", config.run.storage), ("run.results", config.run.results)):
        if value is not None:
            refuse_job_scratch(value, key)
    adopted = reconcile_checkpoints(config, CONSOLE.line)
    check_resumable(config, adopted)
    plan, prepared = plan_run(config, {name: ray.train.Checkpoint(ref.location) for name, ref in inputs.items()})
    plan.adopted_checkpoint = adopted
    scaling = config.scaling
    device = "GPU" if scaling.use_gpu else "CPU"
    for line in run_header(config, prepared, f"{scaling.num_workers} Ray Train worker(s) x {scaling.cpus_per_worker:g} CPU{' + 1 GPU' if scaling.use_gpu else ''} ({device})"):
        CONSOLE.line(line)
    preflight(
        config, prepared, plan.spec, inputs={name: ref.location for name, ref in inputs.items()},
        steps_per_epoch=plan.steps_per_epoch(scaling.num_workers), log=CONSOLE.line,
    )
    CONSOLE.log_to(Path(plan.results_dir) / LOG_FILE)
    try:  # run.mlflow: an MLflow run around the fit (tracking adds its per-epoch callback)
        return track_run(config, lambda tracker: _fit(config, plan, prepared, inputs, [*(callbacks or []), *epoch_callbacks(tracker)], adopted, started))
    finally:
        CONSOLE.log_to(None)
        publish_results(config)  # results on object storage: the staged folder goes up, finished or failed


def _fit(
    config: ExperimentConfig, plan: WorkerPlan, prepared: PreparedData, inputs: dict[str, ResolvedInput],
    callbacks: list[Any] | None, adopted: str | None, started: float,
) -> RunResult:
    """The Ray Train part of :func:`run_single`, with the console's log file open."""
    try:
        ensure_ray(config)
        result = make_trainer(config, plan, prepared, callbacks).fit()
    except ray.train.TrainingFailedError as exc:
        permanent = permanent_cause(exc) is not None
        kept = f"checkpoints so far are kept in {run_folder(config) or config.run.storage}"
        record_failure(config, error_line(exc))
        time.sleep(LOG_DRAIN_SECONDS)  # the workers' last lines (their tracebacks) reach the log file
        CONSOLE.to_file(f"[{config.name}] failed: {error_line(exc)}")
        raise RunFailedError(
            f"run {config.name!r} failed: {error_line(exc)}; {kept}; Ray's full output: {Path(plan.results_dir) / LOG_FILE}",
            permanent=permanent,
        ) from exc
    if adopted is not None:
        remove_untracked_checkpoints(config)
    outcome = result.return_value or {}
    last = checkpoint_location(result.checkpoint) if result.checkpoint is not None else None
    tested = _checkpoint_of_epoch(result, outcome.get("tested_epoch")) or last
    summary = summarise(
        config, outcome, spec=plan.spec, checkpoint=tested, last_checkpoint=last, started=started,
        inputs={name: ref.record() for name, ref in inputs.items()},
    )
    write_run_results(plan.results_dir, summary, outcome, title=config.name)
    CONSOLE.line(result_line(config.name, summary))
    return RunResult(
        name=config.name, metrics=summary["metrics"], checkpoint=tested, last_checkpoint=last, results_dir=results_location(config), summary=summary,
    )


def run_experiment(config: ExperimentConfig, only_phases: list[str] | None = None) -> list[RunResult]:
    """Run a config on Ray Train: a single run, or its phases in order (see :func:`~xmodal.engine.chain.run_chain`)."""
    return run_chain(config, lambda phase, inputs: run_single(phase, inputs), only_phases)
