"""Running a config's phase chain: each phase's inputs resolved to checkpoints of earlier phases.

Both engines (Ray Train and the plain loop) run chains through :func:`run_chain`; they differ only
in the function that trains one phase. A phase input naming an earlier phase receives the
checkpoint that phase *tested* (best on its own selection metric), or its last one with
``{source: <phase>, checkpoint: last}``; any input may instead be a checkpoint folder or URI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xmodal.engine.config import ExperimentConfig, InputRef, phase_config
from xmodal.engine.results import RunResult, read_run_result
from xmodal.engine.storage import is_remote
from xmodal.errors import ConfigError


@dataclass(frozen=True)
class ResolvedInput:
    """An input checkpoint: where it is and which run (if any) produced it."""

    location: str
    run: str | None = None
    checkpoint: str = "tested"

    def record(self) -> dict[str, str | None]:
        """How a run summary records it."""
        return {"run": self.run, "checkpoint": self.location, "which": self.checkpoint if self.run else None}


RunOne = Callable[[ExperimentConfig, dict[str, ResolvedInput]], RunResult]


def resolve_input(value: str | InputRef, finished: dict[str, RunResult], where: str) -> ResolvedInput:
    """An input given as an earlier phase's name (or ``{source, checkpoint}``) or a checkpoint folder/URI.

    Raises:
        ConfigError: The phase has not finished / has no such checkpoint, or the folder does not exist.
    """
    ref = InputRef.of(value)
    if ref.source in finished:
        result = finished[ref.source]
        location = result.checkpoint_for(ref.checkpoint)
        if location is None:
            raise ConfigError(f"{where}: phase {ref.source!r} finished without a {ref.checkpoint} checkpoint")
        return ResolvedInput(location=str(location), run=result.name, checkpoint=ref.checkpoint)
    if not is_remote(ref.source) and not Path(ref.source).is_dir():
        raise ConfigError(
            f"{where}: {ref.source!r} is neither a finished earlier phase ({sorted(finished) or 'none'}) nor a checkpoint folder"
        )
    return ResolvedInput(location=ref.source)


def upstream_phases(runs: dict[str, ExperimentConfig], phase: str, *, read: bool = False) -> list[str]:
    """The earlier phases a phase takes inputs from, directly or through their own inputs.

    Args:
        runs: Every phase's run config (:func:`~xmodal.engine.config.phase_config`), by phase
            name in chain order.
        phase: The phase whose inputs are followed.
        read: Follow only the inputs each method reads (its ``required_inputs``), not every
            input its config declares (supervised with ``init: null`` declares but reads none).

    Returns:
        Phase names in chain order.
    """
    from xmodal.methods.registry import get_method

    found: set[str] = set()

    def visit(name: str) -> None:
        run = runs[name]
        names = get_method(run.method).required_inputs(run.method_settings) if read else run.inputs
        for input_name in names:
            source = InputRef.of(run.inputs[input_name]).source
            if source in runs and source not in found:
                found.add(source)
                visit(source)

    visit(phase)
    return [name for name in runs if name in found]


def run_chain(config: ExperimentConfig, run_one: RunOne, only_phases: list[str] | None = None) -> list[RunResult]:
    """Run a config: a single run, or its phases in order.

    Args:
        config: A validated experiment.
        run_one: Trains one (phase) config with its resolved inputs.
        only_phases: Run just these phases; earlier phases they read must have finished before
            (their ``run.json`` is read back).
    """
    if not config.phases:
        inputs = {k: resolve_input(v, {}, f"inputs.{k}") for k, v in config.inputs.items()}
        return [run_one(config, inputs)]
    unknown = sorted(set(only_phases or []) - {p.name for p in config.phases})
    if unknown:
        raise ConfigError(f"--phase {unknown}: not phases of {config.source}; phases: {[p.name for p in config.phases]}")
    finished: dict[str, RunResult] = {}
    results = []
    for phase in config.phases:
        phase_run = phase_config(config, phase)
        if only_phases and phase.name not in only_phases:
            done = read_run_result(phase_run)
            if done is not None:
                finished[phase.name] = done
            continue
        inputs = {k: resolve_input(v, finished, f"phase {phase.name!r} input {k!r}") for k, v in phase_run.inputs.items()}
        result = run_one(phase_run, inputs)
        finished[phase.name] = result
        results.append(result)
    return results
