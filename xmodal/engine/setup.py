"""Set-up shared by the Ray loop, the plain loop, the runner, sweeps and benchmarks (no Ray here).

:func:`prepare_run_data` turns a config into the data one run reads, checked against what its method
declares it needs (:class:`~xmodal.methods.base.DataNeeds`) before any worker starts;
:func:`build_method` instantiates the method; :class:`BestTracker` keeps the best-on-validation
weights both loops test at the end.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from xmodal.data.prepared import PreparedData, prepare_data
from xmodal.engine.config import ExperimentConfig
from xmodal.errors import ConfigError
from xmodal.methods.base import DataNeeds, DataSpec, Method, MetricSpec, is_better
from xmodal.methods.registry import get_method


def data_spec(prepared: PreparedData) -> DataSpec:
    """The method-facing description of a prepared dataset."""
    info = prepared.info
    sar_mean, sar_std = prepared.stats.mean_std("sar")
    train = prepared.records("train")
    return DataSpec(
        sar_channels=len(info.sar_bands),
        optical_channels=len(info.optical_bands),
        sar_bands=tuple(info.sar_bands.names),
        optical_bands=tuple(info.optical_bands.names),
        num_classes=prepared.num_classes(),
        class_names=tuple(prepared.class_names()),
        mask_layer=prepared.settings.mask_layer,
        ignore_index=info.ignore_index,
        sar_mean=tuple(float(v) for v in sar_mean),
        sar_std=tuple(float(v) for v in sar_std),
        tile_size=prepared.settings.tile_size,
        noisy_layer=prepared.settings.noisy_layer,
        scene_classes=tuple(info.scene_classes),
        train_tiles=len({r["tile_id"] for r in train}),
        labelled_tiles=len(prepared.labelled_records()),
    )


def method_needs(config: ExperimentConfig) -> DataNeeds:
    """What the configured method needs of the data."""
    return get_method(config.method).needs(config.method_settings)


def check_needs(config: ExperimentConfig, prepared: PreparedData, needs: DataNeeds) -> None:
    """Refuse data that cannot give what the method needs, naming the setting to change.

    Raises:
        ConfigError: A field the data has no layer for, views without augmentation to tell them
            apart, or a labelled stream with no labelled tile.
    """
    where = f"method {config.method!r}"
    data = config.data
    if "mask" in needs.fields and data.mask_layer is None:
        raise ConfigError(f"{where} reads masks; set data.mask_layer (dataset layers: {sorted(prepared.info.layers)})")
    if "noisy_mask" in needs.fields and data.noisy_layer is None:
        raise ConfigError(f"{where} reads noisy masks; set data.noisy_layer (dataset layers: {sorted(prepared.info.layers)})")
    if {"label", "optical_label"} & set(needs.fields) and not prepared.info.scene_classes:
        raise ConfigError(f"{where} reads scene labels, but dataset {prepared.info.name!r} has no scene classes")
    augment = data.augment
    if needs.views > 1 and augment.geometric == "none" and not augment.photometric:
        raise ConfigError(
            f"{where} asks for {needs.views} augmented views of each tile, but data.augment turns augmentation off "
            "(geometric: none, photometric: false): the views would be identical"
        )
    if "labelled" in needs.streams and not any(r["labelled"] for r in prepared.records("train")):
        raise ConfigError(f"{where} reads the labelled stream, but no training tile keeps its labels (data.labels)")


def prepare_run_data(config: ExperimentConfig) -> tuple[PreparedData, DataSpec, DataNeeds]:
    """The data of one run as its method reads it (labelled subset, views), checked.

    Raises:
        ConfigError / DataError: The data is missing or cannot give what the method needs.
    """
    ensure_data(config)
    needs = method_needs(config)
    mode = config.data.labels.unlabelled
    keep = needs.unlabelled if mode == "auto" else mode == "keep"
    prepared = prepare_data(config.data).for_method(keep_unlabelled=keep, views=needs.views, optical_labels="optical_label" in needs.fields)
    check_needs(config, prepared, needs)
    spec = data_spec(prepared)
    get_method(config.method).check_data(config.method_settings, spec)
    return prepared, spec, needs


def build_method(config: ExperimentConfig, spec: DataSpec) -> Method:
    """Instantiate the configured method (its data was checked by :func:`prepare_run_data`)."""
    return get_method(config.method)(config.method_settings, config.model, config.train, spec)


def metric_spec(config: ExperimentConfig, spec: DataSpec | None) -> MetricSpec:
    """The configured method's selection metric."""
    return get_method(config.method).metrics(config.method_settings, spec)


def ensure_data(config: ExperimentConfig) -> None:
    """Generate the synthetic world named in ``world:`` when ``data.root`` does not exist yet."""
    root = Path(config.data.root)
    if root.exists() or config.world is None:
        return
    from xmodal.data.synth import synthesize

    print(f"[{config.name}] generating synthetic world in {root}", flush=True)
    synthesize(root, config.world)


def cpu_copy(state: Any) -> Any:
    """A detached CPU copy of a (nested) state dict: best weights kept off the accelerator."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return copy.deepcopy(state)


class BestTracker:
    """The validated epoch whose weights are tested at the end, and a CPU copy of those weights.

    With ``select="best"`` that is the epoch that scores best on the selection metric; with
    ``select="last"`` every validated epoch replaces the previous one. The record (not the weights)
    is saved with every checkpoint, so a resumed run keeps it; the weights then come back from the
    checkpoint of that epoch.

    Args:
        metric: The method's selection metric.
        select: ``best`` or ``last`` (``run.select``).
    """

    def __init__(self, metric: MetricSpec, select: str = "best") -> None:
        self.metric = metric
        self.select = select
        self.record: dict[str, Any] = {}
        self.weights: dict[str, Any] | None = None

    @property
    def epoch(self) -> int | None:
        return self.record.get("epoch")

    def score(self, val: dict[str, float], epoch: int) -> float | None:
        """The number that ranks this epoch's checkpoint (``None`` when the metric is missing)."""
        if self.select == "last":
            return float(epoch)
        value = val.get(self.metric.select)
        return None if value is None else float(value)

    @property
    def mode(self) -> str:
        """Direction of :meth:`score`."""
        return "max" if self.select == "last" else self.metric.mode

    def offer(self, epoch: int, val: dict[str, float], per_class: dict[str, Any], state: dict[str, Any]) -> bool:
        """Consider a validated epoch (1-based); keep its weights if it becomes the one to test."""
        score = self.score(val, epoch)
        if score is None:
            available = sorted(val)
            raise ConfigError(f"selection metric {self.metric.select!r} is not among the validation metrics {available}")
        if not is_better(score, self.record.get("score"), self.mode):
            return False
        self.record = {"epoch": epoch, "score": score, "val": dict(val), "val_per_class": per_class}
        self.weights = cpu_copy(state)
        return True

    def restore(self, record: dict[str, Any] | None) -> None:
        """Take back the record saved with a checkpoint (its weights are not in memory any more)."""
        self.record = dict(record or {})
        self.weights = None


def run_header(config: ExperimentConfig, prepared: PreparedData, engine: str, world_size: int | None = None) -> list[str]:
    """The lines a run starts with: what it trains, on which data, where, and where results go.

    Args:
        engine: How it runs, e.g. ``2 Ray Train worker(s) x 1 CPU`` or ``the plain loop on cpu``.
        world_size: Processes sharing each step (default ``scaling.num_workers``; the plain loop: 1).
    """
    from xmodal.engine.results import results_dir

    info = prepared.info
    counts = " / ".join(f"{split} {len(prepared.records(split))}" for split in ("train", "val", "test") if prepared.records(split))
    head = f"[{config.name}]"
    return [
        f"{head} {config.method} from {config.source}; model {config.model.arch} {config.model.encoder or ''}".rstrip(),
        f"{head} data {config.data.root}: {counts} tiles of {config.data.tile_size} px (SAR {', '.join(info.sar_bands.names)}; "
        f"optical {', '.join(info.optical_bands.names)}); {config.train.epochs} epoch(s) of "
        f"{config.data.describe_batch(config.scaling.num_workers if world_size is None else world_size)}",
        f"{head} {engine}; results in {results_dir(config)}",
    ]


def result_line(name: str, summary: dict[str, Any]) -> str:
    """The line a run ends with: its test metrics, tested epoch and wall time."""
    metrics = summary.get("metrics") or {}
    names = summary.get("report_metrics") or sorted(k for k in metrics if k.startswith("test/"))[:4]
    shown = ", ".join(f"{k.split('/', 1)[1]} {metrics[k]:.3f}" for k in names if isinstance(metrics.get(k), (int, float)))
    wall = summary.get("wall_seconds")
    took = f" in {wall:.0f} s" if isinstance(wall, (int, float)) else ""
    return f"[{name}] done{took}: test {shown or 'not scored'} (tested epoch {summary.get('tested_epoch')})"
