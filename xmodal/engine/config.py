"""Experiment configs: YAML files under ``experiments/``, validated before anything starts.

A config has these sections (all optional except ``name`` and ``method``)::

    name: sar-buildings            # run name: relaunching the same name resumes it
    method: supervised             # a registered method
    method_settings: {...}         # validated against the method's own Settings dataclass
    data: {...}                    # xmodal.data.prepared.DataSettings
    world: {...}                   # synthetic world to generate when data.root does not exist
                                   # (its optional split: {...} is xmodal.data.splits.SplitSettings)
    model: {...}                   # xmodal.methods.base.ModelSettings
    train: {...}                   # xmodal.methods.base.OptimSettings
    scaling: {...}                 # ScalingSettings
    run: {...}                     # RunSettings
    inputs: {teacher: path/to/checkpoint_dir}
    phases: [...]                  # optional chain: each phase overrides sections of the base

A phase's ``inputs`` name earlier phases (or checkpoint folders): ``{student: reconstruct}`` hands
over the checkpoint that phase tested (best on its own validation selection), ``{student:
{source: reconstruct, checkpoint: last}}`` its last one.

``extends: other.yaml`` (relative to the file) merges a base config under this one. Overrides on
the command line use dotted keys: ``train.epochs=3 data.batch_size=4``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xmodal.data.prepared import DataSettings
from xmodal.engine.storage import portable_paths
from xmodal.errors import ConfigError
from xmodal.methods.base import ModelSettings
from xmodal.methods.optim import MAIN, OptimSettings
from xmodal.methods.registry import get_method
from xmodal.settings import flatten_dotted, from_dict, merge, set_dotted, to_dict


@dataclass
class ScalingSettings:
    """Workers and resources of one training run.

    Attributes:
        num_workers: Ray Train workers (DDP ranks).
        use_gpu: Train each worker on a GPU.
        gpus_per_worker: GPUs each worker holds with ``use_gpu`` (a fraction, e.g. 0.5, puts two
            workers, of one trial or of two, on one GPU; above 1, a whole number).
        accelerator_type: GPU model the workers must land on (``H100``, ``A10G``...: Ray's
            ``accelerator_type:<name>`` node resource), ``None`` for any.
        cpus_per_worker: CPUs reserved per worker (leave the rest to Ray Data).
        data_cpus: CPUs kept free for Ray Data decoding (local runs size Ray to leave them).
        torch_threads: Intra-op threads per worker (``None``: the machine's cores / workers).
    """

    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    accelerator_type: str | None = None
    cpus_per_worker: float = 1.0
    data_cpus: int = 1
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scaling.num_workers={self.num_workers}; expected >= 1")
        if self.gpus_per_worker <= 0 or (self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker)):
            raise ConfigError(f"scaling.gpus_per_worker={self.gpus_per_worker}; expected a fraction in (0, 1] or a whole number of GPUs")
        if self.accelerator_type is not None and (not self.use_gpu or not self.accelerator_type.strip() or ":" in self.accelerator_type):
            raise ConfigError(
                f"scaling.accelerator_type={self.accelerator_type!r}: expected a GPU model name such as H100 or A10G "
                "(without 'accelerator_type:'), with scaling.use_gpu: true"
            )

    def worker_resources(self) -> dict[str, float]:
        """What each Train worker holds (``accelerator_type`` goes to Ray's ScalingConfig apart)."""
        resources = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            resources["GPU"] = float(self.gpus_per_worker)
        return resources


@dataclass
class RunSettings:
    """Where results go and how failures are handled.

    Attributes:
        storage: Ray Train storage path (local folder, shared mount, ``s3://``, ``gs://``).
        results: Local folder for run.json, panels, artifacts and TensorBoard (default: ``storage``
            when it is a local path, else ``results/``).
        max_failures: Worker-group restarts from the last checkpoint before a run fails.
        keep_checkpoints: Best checkpoints kept (ranked by the method's metric on validation), besides the latest.
        eval_every: Validate every N epochs (and always after the last).
        panels: Sample rows in the evaluation PNG.
        log_every: Steps between TensorBoard points / progress lines.
        select: Which epoch's weights are tested and handed to later phases: ``best`` (the best
            on the method's selection metric: a labelled validation metric for supervised
            methods, the method's own validation loss for label-free pretext phases) or ``last``.
        address: Ray cluster address (``None``: ``RAY_ADDRESS`` or a local Ray).
        dashboard: Start a local Ray with its dashboard (on 127.0.0.1). Off by default: on 2
            cores an idle dashboard slowed training steps from 0.47 to 0.71 s.
        mlflow: MLflow tracking (:mod:`xmodal.engine.tracking`): ``local`` (an SQLite store and
            artifact folder beside the results: ``mlflow ui --backend-store-uri sqlite:///...``
            opens it), a tracking server URL (``http://host:5000``) or any tracking URI
            MLflow takes; ``None`` (the default): no tracking. A sweep reads it from its
            experiment: one parent run, a child run per trial. Needs ``pip install xmodal[mlflow]``.
    """

    storage: str = "runs"
    results: str | None = None
    max_failures: int = 1
    keep_checkpoints: int = 2
    eval_every: int = 1
    panels: int = 4
    log_every: int = 10
    select: str = "best"
    address: str | None = None
    dashboard: bool = False
    mlflow: str | None = None

    def __post_init__(self) -> None:
        from xmodal.engine.tracking import check_tracking_uri

        check_tracking_uri(self.mlflow, "run.mlflow")
        if self.select not in ("best", "last"):
            raise ConfigError(f"run.select={self.select!r}; expected best or last")
        if self.eval_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("run.eval_every and run.keep_checkpoints must be >= 1")


CHECKPOINT_CHOICES = ("tested", "last")


@dataclass
class InputRef:
    """An input checkpoint named by source: an earlier phase (or a checkpoint folder / URI).

    Attributes:
        source: Phase name, or a checkpoint folder / URI.
        checkpoint: For a phase: ``tested`` (the checkpoint it tested, best on its own selection)
            or ``last``.
    """

    source: str
    checkpoint: str = "tested"

    def __post_init__(self) -> None:
        if self.checkpoint not in CHECKPOINT_CHOICES:
            raise ConfigError(f"input checkpoint={self.checkpoint!r}; expected one of {list(CHECKPOINT_CHOICES)}")

    @classmethod
    def of(cls, value: "str | InputRef") -> "InputRef":
        return value if isinstance(value, InputRef) else cls(source=value)


@dataclass
class PhaseSettings:
    """One phase of a chained run (e.g. teacher -> distillation -> finetuning).

    Attributes:
        name: Phase name; its checkpoint can be handed to later phases under this name.
        overrides: Sections of the experiment this phase changes (method, method_settings, train...).
        inputs: Checkpoints this phase reads: input name -> earlier phase name or checkpoint path
            (the tested checkpoint), or ``{source: <phase>, checkpoint: tested | last}``.
    """

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str | InputRef] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    """A validated experiment."""

    name: str
    method: str
    method_settings: Any = None
    data: DataSettings = field(default_factory=DataSettings)
    world: dict[str, Any] | None = None
    model: ModelSettings = field(default_factory=ModelSettings)
    train: OptimSettings = field(default_factory=OptimSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    inputs: dict[str, str | InputRef] = field(default_factory=dict)
    phases: list[PhaseSettings] = field(default_factory=list)
    source: str = "<dict>"

    def __post_init__(self) -> None:
        self.data.worker_batch_size(self.scaling.num_workers)  # a global batch must divide over the workers

    def to_plain(self) -> dict[str, Any]:
        """Plain values (for YAML dumps, Tune configs and fingerprints)."""
        plain = to_dict(self)
        plain.pop("source", None)
        return plain


_TOP_LEVEL = {f for f in ExperimentConfig.__dataclass_fields__ if f != "source"}


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, following ``extends:`` chains, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is not None:
        data = merge(read_yaml(path.parent / base), data)
    return data


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "model.arch=fpn"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        set_dotted(out, key.strip(), value)
    return out


def build_config(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a plain config mapping (every section, the method's settings, every phase)."""
    raw = copy.deepcopy(raw)
    unknown = set(raw) - _TOP_LEVEL
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(_TOP_LEVEL)}")
    for key in ("name", "method"):
        if key not in raw:
            raise ConfigError(f"{source}: missing required key {key!r}")
    try:
        config = from_dict(ExperimentConfig, {**raw, "method_settings": None, "source": source})
        config.method_settings = get_method(config.method).parse_settings(raw.get("method_settings"))
        if config.world is not None:
            from xmodal.data.synth import parse_world

            parse_world(config.world)
        names = [phase.name for phase in config.phases]
        if len(set(names)) != len(names):
            raise ConfigError(f"phase names repeat: {names}")
        for index, phase in enumerate(config.phases):
            for key, value in phase.inputs.items():
                ref = InputRef.of(value)
                if ref.source in names[index:]:
                    raise ConfigError(f"phase {phase.name!r} input {key!r}: phase {ref.source!r} does not run before it")
            phase_config(config, phase)
        if not config.phases:
            check_declarations(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, merge overrides into and validate a config file."""
    raw = merge(read_yaml(path), parse_overrides(overrides or []))
    return build_config(raw, str(path))


def phase_config(config: ExperimentConfig, phase: PhaseSettings) -> ExperimentConfig:
    """The experiment one phase runs: the base with the phase's overrides, named ``<name>/<phase>``."""
    plain = config.to_plain()
    plain.pop("phases")
    overrides = copy.deepcopy(phase.overrides)
    if overrides.get("method", plain["method"]) != plain["method"]:
        plain["method_settings"] = {}  # another method's settings do not carry over
    merged = merge(plain, overrides)
    merged["name"] = f"{config.name}/{phase.name}"
    merged["phases"] = []
    merged["inputs"] = {**plain.get("inputs", {}), **to_dict(phase.inputs)}
    try:
        return build_config(merged, f"{config.source} phase {phase.name!r}")
    except ConfigError as exc:
        raise ConfigError(f"phase {phase.name!r}: {exc}") from exc


def phase_configs(config: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """Every phase's run config, by phase name in chain order (empty for a config without phases)."""
    return {phase.name: phase_config(config, phase) for phase in config.phases}


def check_declarations(config: ExperimentConfig) -> None:
    """Refuse what the configured method declares it cannot do without: optimiser sections it has
    no optimiser for, and input checkpoints it reads that the config does not give."""
    method = get_method(config.method)
    declared = method.optimizer_names(config.method_settings)
    unknown = sorted(set(config.train.optimizers) - set(declared) - {MAIN})
    if unknown:
        raise ConfigError(f"train.optimizers {unknown}: method {config.method!r} has optimisers {list(declared)} with these settings")
    for name, spec in method.required_inputs(config.method_settings).items():
        if name not in config.inputs:
            what = f" ({spec.description})" if spec.description else ""
            raise ConfigError(
                f"method {config.method!r} reads input checkpoint {name!r}{what}, export {spec.export!r}; give it in "
                f"inputs: {{{name}: <earlier phase or checkpoint folder>}} (inputs given: {sorted(config.inputs)})"
            )


def fingerprint(config: ExperimentConfig) -> dict[str, Any]:
    """The parts of a config a resumed run must share with the run it resumes.

    Epochs, scaling and run settings may change between launches (e.g. to extend training on more
    workers); the method, its settings, the model and the data may not.
    """
    plain = config.to_plain()
    data = dict(plain["data"])
    for key in ("batch_size", "batch_scope", "blocks", "cache", "shuffle_buffer", "check_tiles", "allow_padding"):
        data.pop(key, None)
    train = {k: v for k, v in plain["train"].items() if k != "epochs"}
    return {
        "method": plain["method"],
        "method_settings": plain["method_settings"],
        "model": plain["model"],
        "data": data,
        "train": train,
    }


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings two fingerprints differ in, as ``key: saved -> current`` (dotted keys)."""
    old, new = flatten_dotted(saved), flatten_dotted(current)
    missing = object()
    return [
        f"{key}: {old.get(key, 'unset')!r} -> {new.get(key, 'unset')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]


def same_fingerprint(saved: dict[str, Any] | None, config: ExperimentConfig) -> bool:
    """Whether a recorded fingerprint is ``config``'s, as stored (JSON) and with job working dirs
    written relative (a resubmitted job after a code change is unpacked under another name)."""
    if saved is None:
        return False
    as_stored = [json.loads(json.dumps(value, default=str)) for value in (saved, fingerprint(config))]
    return portable_paths(as_stored[0]) == portable_paths(as_stored[1])


def check_same_run(saved: dict[str, Any] | None, config: ExperimentConfig, where: str) -> None:
    """Refuse to resume a run whose checkpoint was trained with other settings.

    Raises:
        ConfigError: Listing the settings that differ, and the ways out.
    """
    if same_fingerprint(saved, config):
        return
    changes = fingerprint_changes(portable_paths(saved or {}), portable_paths(fingerprint(config)))
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    raise ConfigError(
        f"run {config.name!r} already exists in {where} with other settings ({shown}); "
        "launch it with the settings it was started with to resume it, choose another name, or delete that folder to start over"
    )
