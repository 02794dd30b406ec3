"""The plain PyTorch engine: the same methods, data contract, chains and results in one process, no Ray.

:func:`run_plain` runs a config (a single run or its phase chain) with ``torch.utils.data``
loaders and the same :func:`~xmodal.engine.training.run_epochs` the Ray workers run: views,
labelled streams, selection and testing behave alike; collectives are the identity (one worker).
For a machine without Ray (a lone GPU box), a debugger, and the reference side of ``xmodal bench
train``. Checkpoints go to ``<run.storage>/<name>/checkpoint_last`` (every epoch; a relaunch
resumes from it) and ``checkpoint_tested`` (the weights tested at the end, handed to later
phases); results to the same ``run.json`` / panels / artifacts as a Ray run. Nothing here imports Ray.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from xmodal.data.torch_data import iterate_numpy, labelled_loader, torch_loader
from xmodal.engine.chain import ResolvedInput, run_chain
from xmodal.engine.config import ExperimentConfig, fingerprint
from xmodal.engine.preflight import preflight
from xmodal.engine.results import RunResult, inference_record, record_failure, results_dir, summarise, write_run_results
from xmodal.engine.setup import BestTracker, build_method, metric_spec, prepare_run_data, result_line, run_header
from xmodal.engine.storage import is_remote
from xmodal.engine.tracking import track_run
from xmodal.engine.training import STATE_FILE, LoopData, LoopState, open_tensorboard, resume_from, run_epochs, write_checkpoint
from xmodal.errors import ConfigError, DataError, error_line
from xmodal.methods.base import Collectives, MethodContext
from xmodal.methods.exports import read_torch_file
from xmodal.progress import EpochBar

LAST_DIR = "checkpoint_last"
TESTED_DIR = "checkpoint_tested"


def _replace_folder(folder: Path, fill: Callable[[Path], None]) -> None:
    """Fill a scratch folder beside ``folder``, then swap it in (a crash never leaves half a checkpoint)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    fill(scratch)
    previous = folder.with_name(folder.name + ".previous")
    if folder.exists():
        folder.rename(previous)
    scratch.rename(folder)
    shutil.rmtree(previous, ignore_errors=True)


def _save_checkpoint(folder: Path, state: dict[str, Any], exports: dict[str, Any], inference: dict[str, Any] | None = None) -> None:
    """Write state.pt, exports and the inference record into ``folder`` atomically."""
    _replace_folder(folder, lambda scratch: write_checkpoint(scratch, state, exports, inference))


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _link_checkpoint(source: Path, folder: Path) -> None:
    """Make ``folder`` the same checkpoint as ``source`` atomically, by hard links: checkpoint files
    are replaced by renaming, never rewritten in place, so the second name costs no disk and no
    second serialisation."""
    _replace_folder(folder, lambda scratch: shutil.copytree(source, scratch, copy_function=_link_or_copy, dirs_exist_ok=True))


def recover_checkpoints(folder: Path, log: Callable[[str], None]) -> None:
    """Finish what a kill inside :func:`_save_checkpoint` left: a checkpoint moved aside whose
    replacement never arrived is put back, and unfinished scratch folders are removed."""
    for name in (LAST_DIR, TESTED_DIR):
        previous = folder / f"{name}.previous"
        if previous.is_dir() and not (folder / name).exists():
            previous.rename(folder / name)
            log(f"recovered {name} from {previous.name} (the run was stopped while replacing it)")
        shutil.rmtree(previous, ignore_errors=True)
        for scratch in folder.glob(f".{name}-*"):
            shutil.rmtree(scratch, ignore_errors=True)


def run_plain_single(
    config: ExperimentConfig,
    inputs: dict[str, ResolvedInput] | None = None,
    *,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    log: Callable[[str], None] = print,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train one configuration in this process (resuming its ``checkpoint_last``) and test it.

    Args:
        report: Called with each epoch's metrics after its checkpoint is written (a sweep's
            ``tune.report``, as Ray Train runs forward theirs).

    Raises:
        ConfigError: Remote storage (the plain engine writes local checkpoints).
        DataError: Fewer training tiles than one batch.
    """
    started = time.time()
    if is_remote(config.run.storage):
        raise ConfigError(f"run.storage={config.run.storage!r}: the plain engine writes local checkpoints; give a folder")
    device = torch.device(device)
    inputs = inputs or {}
    prepared, spec, needs = prepare_run_data(config)
    for line in run_header(config, prepared, f"the plain loop on {device.type}", world_size=1):
        log(line)
    preflight(config, prepared, spec, set_up=False, log=log)
    loader = torch_loader(prepared, "train", num_workers=num_workers)
    if len(loader) == 0:
        raise DataError(f"{spec.train_tiles} training tiles give fewer than one batch of {config.data.batch_size}; lower data.batch_size")
    labelled = labelled_loader(prepared, num_workers=num_workers) if "labelled" in needs.streams else None
    method = build_method(config, spec)
    method.setup(
        MethodContext(
            device=device, steps_per_epoch=len(loader), epochs=config.train.epochs,
            inputs={name: Path(ref.location) for name, ref in inputs.items()}, log=lambda line: log(f"[{config.name}] {line}"),
        )
    )
    folder = Path(config.run.storage).expanduser().resolve() / config.name
    state = LoopState(tracker=BestTracker(metric_spec(config, spec), config.run.select))
    plan_fingerprint = fingerprint(config)
    inference = inference_record(prepared)
    recover_checkpoints(folder, lambda line: log(f"[{config.name}] {line}"))
    if (folder / LAST_DIR / STATE_FILE).is_file():
        saved = read_torch_file(folder / LAST_DIR / STATE_FILE, device)
        resume_from(saved, method, state, config, str(folder), lambda line: log(f"[{config.name}] {line}"))

    def on_epoch(epoch: int, metrics: dict[str, Any], tracker: BestTracker) -> None:
        record = {"method": method.state_dict(), "epoch": epoch, "global_step": metrics["step"], "fingerprint": plan_fingerprint, "metrics": metrics, "best": tracker.record}
        _save_checkpoint(folder / LAST_DIR, record, method.exports(), inference)
        if tracker.epoch == epoch + 1:
            _link_checkpoint(folder / LAST_DIR, folder / TESTED_DIR)
        if report is not None:
            report(metrics)

    def restore(epoch: int) -> dict[str, Any] | None:
        path = folder / TESTED_DIR / STATE_FILE
        if path.is_file():
            saved = read_torch_file(path, device)
            if saved["epoch"] + 1 == epoch:
                return saved["method"]
        return None

    out = results_dir(config)
    writer = open_tensorboard(out, state)
    bar = EpochBar()

    def say(line: str) -> None:  # an epoch's line ends its bar
        bar.close()
        log(f"[{config.name}] {line}")
    data = LoopData(
        train=lambda: loader,
        labelled=(lambda: labelled) if labelled is not None else None,
        evaluation=lambda split: iterate_numpy(prepared, split),
        splits=tuple(s for s in ("val", "test") if prepared.records(s)),
        batch_size=config.data.batch_size,
        tile_id=prepared.tile_id,
        steps=len(loader),
    )
    try:
        outcome = run_epochs(
            method, config, data, state, device=device, collectives=Collectives(), on_epoch=on_epoch,
            restore_weights=restore, log=say, writer=writer, progress=bar.update,
        )
    except Exception as exc:
        record_failure(config, error_line(exc))
        raise
    finally:
        bar.close()
        writer.close()
    if outcome["tested_epoch"] == config.train.epochs or not (folder / TESTED_DIR).is_dir():
        _link_checkpoint(folder / LAST_DIR, folder / TESTED_DIR)
    summary = summarise(
        config, outcome, spec=spec, checkpoint=str(folder / TESTED_DIR), last_checkpoint=str(folder / LAST_DIR),
        started=started, inputs={name: ref.record() for name, ref in inputs.items()}, engine="plain",
    )
    write_run_results(out, summary, outcome, title=config.name)
    log(result_line(config.name, summary))
    return RunResult(config.name, summary["metrics"], summary["checkpoint"], str(out), summary["last_checkpoint"], summary)


def run_plain(
    config: ExperimentConfig,
    only_phases: list[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    log: Callable[[str], None] = print,
) -> list[RunResult]:
    """Run a config in this process: a single run, or its phases in order, as the Ray engine would."""
    torch.set_num_threads(config.scaling.torch_threads or os.cpu_count() or 1)

    def run_one(phase: ExperimentConfig, inputs: dict[str, ResolvedInput]) -> RunResult:  # run.mlflow: an MLflow run, epochs from report
        return track_run(phase, lambda tracker: run_plain_single(
            phase, inputs, device=device, num_workers=num_workers, log=log, report=tracker.log_epoch if tracker else None,
        ))

    return run_chain(config, run_one, only_phases)
