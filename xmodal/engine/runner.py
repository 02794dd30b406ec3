"""Running an experiment on Ray Train: data checks, trainer construction, phases, results.

``run_experiment`` is what ``xmodal train`` and ``xmodal run`` call. A config with ``phases``
runs them in order; each phase's latest checkpoint is handed to later phases by name, through
the run's storage, and any phase input can instead be an existing checkpoint folder.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from xmodal.data.pipeline import build_datasets
from xmodal.data.prepared import PreparedData, prepare_data
from xmodal.engine.config import ExperimentConfig, fingerprint, phase_config
from xmodal.engine.loop import SELECTION_KEY, STATE_FILE, WorkerPlan, train_loop_per_worker
from xmodal.engine.plain import data_spec, ensure_data
from xmodal.engine.session import connect
from xmodal.errors import ConfigError, XmodalError
from xmodal.methods.base import get_method
from xmodal.methods.evaluation import render_panels
from xmodal.settings import to_dict

SUMMARY_FILE = "metrics.json"


class RunFailedError(XmodalError):
    """A training run failed after its retries."""


def root_cause(exc: BaseException) -> str:
    """The innermost error message of a (possibly wrapped) exception."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
PANELS_FILE = "panels_test.png"


@dataclass
class RunResult:
    """What one training run produced."""

    name: str
    metrics: dict[str, float]
    checkpoint: str | None
    results_dir: str
    summary: dict[str, Any] = field(default_factory=dict)


def is_remote(path: str) -> bool:
    return "://" in path


def storage_path(config: ExperimentConfig) -> str:
    storage = config.run.storage
    return storage if is_remote(storage) else str(Path(storage).expanduser().resolve())


def results_dir(config: ExperimentConfig) -> Path:
    """Local folder for metrics.json, panels and TensorBoard of this run."""
    if config.run.results:
        base = Path(config.run.results)
    elif not is_remote(config.run.storage):
        base = Path(config.run.storage)
    else:
        base = Path("results")
    return (base / config.name).expanduser().resolve()


def ensure_ray(config: ExperimentConfig) -> None:
    """Connect to the configured cluster, or start a local Ray sized to leave CPUs for Ray Data."""
    scaling = config.scaling
    needed = scaling.num_workers * scaling.cpus_per_worker + scaling.data_cpus + 1
    connect(config.run.address, int(max(os.cpu_count() or 1, needed + 0.999)), dashboard=config.run.dashboard)


def plan_run(config: ExperimentConfig, inputs: dict[str, Any] | None = None) -> tuple[WorkerPlan, PreparedData]:
    """Check the data and build the plan every worker receives."""
    ensure_data(config)
    prepared = prepare_data(config.data)
    splits = tuple(s for s in ("train", "val", "test") if prepared.records(s))
    out = results_dir(config)
    plan = WorkerPlan(
        config=config,
        prepared=prepared,
        spec=data_spec(prepared),
        train_tiles=len(prepared.records("train")),
        splits=splits,
        results_dir=str(out),
        fingerprint=fingerprint(config),
        inputs=dict(inputs or {}),
    )
    get_method(config.method).check_data(plan.spec)
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
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        datasets=datasets if datasets is not None else build_datasets(prepared, plan.splits),
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(
            name=leaf,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            # Ray keeps the best-scoring checkpoints and always the latest (resume starts there).
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.run.keep_checkpoints,
                checkpoint_score_attribute=SELECTION_KEY,
                checkpoint_score_order=get_method(config.method).metric_mode,
            ),
            callbacks=callbacks or [],
        ),
    )


def summarise(
    config: ExperimentConfig,
    outcome: dict[str, Any],
    checkpoint: str | None,
    seconds: float,
    inputs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics.json of a run: what ran, on what, from which checkpoints, and what it scored."""
    metrics = {f"{split}/{k}": v for split in ("val", "test") for k, v in (outcome.get(split) or {}).items()}
    return {
        "name": config.name,
        "method": config.method,
        "method_settings": to_dict(config.method_settings),
        "model": to_dict(config.model),
        "data": {"root": config.data.root, "mask_layer": config.data.mask_layer, "label_fraction": config.data.label_fraction},
        "epochs": outcome.get("epochs"),
        "metric": outcome.get("metric"),
        "tested_epoch": outcome.get("tested_epoch"),
        "metrics": metrics,
        "per_class": {split: outcome.get(f"{split}_per_class", {}) for split in ("val", "test")},
        "checkpoint": checkpoint,
        "inputs": {name: str(getattr(value, "path", value)) for name, value in (inputs or {}).items()},
        "wall_seconds": round(seconds, 1),
    }


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
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint(config):
        raise ConfigError(
            f"run {config.name!r} already exists in {folder} with another method, model or data; "
            "choose another name, or delete that folder to start over"
        )


def run_single(config: ExperimentConfig, inputs: dict[str, Any] | None = None, callbacks: list[Any] | None = None) -> RunResult:
    """Train one configuration to the end (resuming it if a run of that name exists).

    Raises:
        RunFailedError: The workers failed more often than ``run.max_failures``; the message
            carries the workers' error, and finished checkpoints stay where they are.
    """
    started = time.perf_counter()
    check_resumable(config)
    ensure_ray(config)
    plan, prepared = plan_run(config, inputs)
    try:
        result = make_trainer(config, plan, prepared, callbacks).fit()
    except ray.train.TrainingFailedError as exc:
        raise RunFailedError(f"run {config.name!r} failed: {root_cause(exc)}; checkpoints so far are kept in {run_folder(config) or config.run.storage}") from exc
    outcome = result.return_value or {}
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    summary = summarise(config, outcome, checkpoint, time.perf_counter() - started, inputs)
    out = Path(plan.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if outcome.get("panels"):
        render_panels(outcome["panels"], out / PANELS_FILE, max(plan.spec.num_classes, 2), title=config.name)
    return RunResult(name=config.name, metrics=summary["metrics"], checkpoint=checkpoint, results_dir=str(out), summary=summary)


def resolve_input(value: str, finished: dict[str, RunResult], where: str) -> ray.train.Checkpoint:
    """An input given as an earlier phase's name or as a checkpoint folder/URI."""
    if value in finished:
        checkpoint = finished[value].checkpoint
        if checkpoint is None:
            raise ConfigError(f"{where}: phase {value!r} finished without a checkpoint")
        return ray.train.Checkpoint(checkpoint)
    if not is_remote(value) and not Path(value).is_dir():
        raise ConfigError(f"{where}: {value!r} is neither an earlier phase ({sorted(finished)}) nor a checkpoint folder")
    return ray.train.Checkpoint(value)


def run_experiment(config: ExperimentConfig, only_phases: list[str] | None = None) -> list[RunResult]:
    """Run a config: a single run, or its phases in order.

    Args:
        config: A validated experiment.
        only_phases: Run just these phases (their inputs must then be checkpoint paths or
            phases that ran before in this call).
    """
    base_inputs = {k: resolve_input(v, {}, f"inputs.{k}") for k, v in config.inputs.items()}
    if not config.phases:
        return [run_single(config, base_inputs)]
    finished: dict[str, RunResult] = {}
    results = []
    for phase in config.phases:
        if only_phases and phase.name not in only_phases:
            continue
        inputs = dict(base_inputs)
        inputs.update({k: resolve_input(v, finished, f"phase {phase.name!r} input {k!r}") for k, v in phase.inputs.items()})
        result = run_single(phase_config(config, phase), inputs)
        finished[phase.name] = result
        results.append(result)
    return results
