"""The method contract: what the engine gives a method, what a method declares, and the plumbing they share.

The engine owns the loop (epochs, data, checkpoints, reporting, resuming, data parallelism); a
method owns everything inside one step: its networks, losses, optimisers and evaluation. A method:

* declares its settings (``Settings``, a dataclass with defaults: a config's ``method_settings``
  section is validated against it before anything starts);
* declares, from its settings, what it needs of the data (:class:`DataNeeds`: batch fields,
  augmented views, extra streams, whether unlabelled tiles help), which metric selects its
  checkpoints and whether computing it uses labels (:class:`MetricSpec`), which input checkpoints
  it reads (:class:`InputSpec`) and which optimisers it has;
* builds its networks and optimisers in :meth:`Method.setup` through :meth:`Method.add_network`
  and :meth:`Method.add_optimizer`, which gives it working defaults for :meth:`Method.state_dict`,
  :meth:`Method.load_state_dict` and :meth:`Method.exports`;
* uses :class:`MethodContext` for the device, data-parallel wrapping and collectives
  (``all_gather`` with gradient, ``all_reduce``), which are no-ops with one worker and in the plain loop.

A method never imports Ray or ``torch.distributed`` and never imports another method.

Batches: a dict of tensors on the device. Every sample carries ``sar``, ``optical`` (B x C x H x W),
``sar_valid`` / ``optical_valid`` (B x H x W), ``label`` (B), ``index`` (B) and ``labelled`` (B, 0 for
a tile whose labels are withheld by a labelled subset), plus ``mask`` / ``noisy_mask`` (B x H x W)
when the data has those layers and ``optical_label`` (B, never withheld) when the method reads it. With ``views = V > 1`` every per-pixel field of a *training* batch
gets a view axis (``sar``: B x V x C x H x W; ``mask``: B x V x H x W): the views of one tile differ
in their geometric augmentation (shared by its modalities) and their photometric jitter (drawn per
modality). With ``streams = ("labelled",)`` a training batch also holds ``batch["streams"]["labelled"]``:
a batch of the labelled subset only, oversampled to the main stream's length and drawn in lockstep.
Validation and test batches have one view and no streams.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.methods.optim import MAIN, OptimSettings, Stepper
from xmodal.models import check_encoder_name, get_architecture, list_architectures, recipe_of, unwrap_model

# Batch fields a method may declare it reads.
FIELDS = ("sar", "optical", "mask", "noisy_mask", "label", "optical_label")
STREAMS = ("labelled",)
REDUCE_OPS = ("sum", "mean", "max", "min")


@dataclass
class ModelSettings:
    """Architecture used by a method (the ``model:`` section).

    Attributes:
        arch: Segmentation architecture (``unet``, ``deeplabv3plus``, ``pspnet``, ``fpn``, ``segnet``...).
        encoder: smp or timm (``tu-<name>``) encoder (``None``: the architecture's default).
        encoder_depth: Number of encoder stages (``None``: the architecture's default, e.g. 3 for
            PSPNet, 5 otherwise).
        decoder_channels: Decoder widths where the architecture takes them (Unet family).
        norm: Normalisation of encoders a method builds on their own (``batch``, ``instance``,
            ``none``); segmenters keep their architecture's.
        kwargs: Extra keyword arguments for the architecture.
    """

    arch: str = "unet"
    encoder: str | None = "resnet18"
    encoder_depth: int | None = None
    decoder_channels: list[int] | None = None
    norm: str = "batch"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.norm not in ("batch", "instance", "none"):
            raise ConfigError(f"model.norm={self.norm!r}; expected batch, instance or none")
        try:
            get_architecture(self.arch)
        except ConfigError:
            raise ConfigError(f"model.arch={self.arch!r} is not an architecture; expected one of {list_architectures()}") from None
        if self.encoder is not None:
            check_encoder_name(self.encoder, "model.encoder")

    def classifier_kwargs(self, in_channels: int, num_classes: int, input_size: int, **extra: Any) -> dict[str, Any]:
        """Arguments of ``build_network("classifier", ...)``: this encoder (depth 5 by default) with
        global pooling and a linear layer; ``input_size`` checks instance norm against 1 x 1 maps."""
        return {
            "encoder": self.encoder or "resnet18", "in_channels": in_channels, "num_classes": num_classes,
            "encoder_depth": self.encoder_depth or 5, "norm": self.norm, "input_size": input_size, **extra,
        }

    def segmenter_kwargs(self, in_channels: int, classes: int) -> dict[str, Any]:
        """Arguments of ``build_network("segmenter", ...)`` for this architecture."""
        return {
            "arch": self.arch,
            "encoder": self.encoder,
            "in_channels": in_channels,
            "classes": classes,
            "encoder_depth": self.encoder_depth,
            "decoder_channels": self.decoder_channels,
            **self.kwargs,
        }


@dataclass(frozen=True)
class DataSpec:
    """What a method needs to know about the data (no file access, no Ray).

    Attributes:
        num_classes / class_names: Classes of the mask layer, or the scene classes when the run
            uses no mask layer.
        scene_classes: Scene-class names of the dataset (``label``), possibly empty.
        mask_layer / noisy_layer: Label layers read as ``mask`` / ``noisy_mask`` (or ``None``).
        train_tiles / labelled_tiles: Training tiles, and how many of them keep their labels.
    """

    sar_channels: int
    optical_channels: int
    sar_bands: tuple[str, ...]
    optical_bands: tuple[str, ...]
    num_classes: int
    class_names: tuple[str, ...]
    mask_layer: str | None
    ignore_index: int
    sar_mean: tuple[float, ...]
    sar_std: tuple[float, ...]
    tile_size: int
    noisy_layer: str | None = None
    scene_classes: tuple[str, ...] = ()
    train_tiles: int = 0
    labelled_tiles: int = 0

    def channels(self, modality: str) -> int:
        """Input channels of ``sar``, ``optical`` or ``both`` (the two stacked)."""
        counts = {"sar": self.sar_channels, "optical": self.optical_channels, "both": self.sar_channels + self.optical_channels}
        if modality not in counts:
            raise ConfigError(f"modality {modality!r}; expected one of {list(counts)}")
        return counts[modality]


@dataclass(frozen=True)
class DataNeeds:
    """What a configured method needs from the data; checked before any worker starts.

    Attributes:
        fields: Batch fields it reads (:data:`FIELDS`): ``mask`` needs ``data.mask_layer``,
            ``noisy_mask`` needs ``data.noisy_layer``, ``label`` needs scene classes;
            ``optical_label`` (scene classes) is the scene label of the optical side, which a
            labelled subset never withholds (EO -> SAR transfer, where the subset counts SAR labels).
        views: Augmented views of each training tile (contrastive methods: 2 or more).
        streams: Extra training streams (``labelled``: the labelled subset in lockstep).
        unlabelled: Whether it learns from tiles whose labels are withheld. With
            ``data.labels.unlabelled: auto`` such tiles are kept (labels hidden) when this is true
            and dropped otherwise.
    """

    fields: tuple[str, ...] = ("sar", "optical")
    views: int = 1
    streams: tuple[str, ...] = ()
    unlabelled: bool = False

    def __post_init__(self) -> None:
        unknown = [f for f in self.fields if f not in FIELDS]
        if unknown:
            raise ConfigError(f"DataNeeds.fields {unknown}: expected some of {list(FIELDS)}")
        if self.views < 1:
            raise ConfigError(f"DataNeeds.views={self.views}; expected >= 1")
        bad = [s for s in self.streams if s not in STREAMS]
        if bad:
            raise ConfigError(f"DataNeeds.streams {bad}: expected some of {list(STREAMS)}")


@dataclass(frozen=True)
class MetricSpec:
    """The number that selects a configuration's checkpoints and ranks its sweep trials.

    Attributes:
        select: Validation metric (``val/iou``, ``val/loss``...).
        mode: ``max`` or ``min``.
        labelled: Whether computing it uses labels. A label-free pretext phase (reconstruction,
            contrastive pretraining) selects by its own loss and says ``False``: it must never be
            selected by a labelled metric of the downstream task.
        report: Test metrics a report shows for it, headline first (``test/iou``, ``test/f1``).
    """

    select: str = "val/loss"
    mode: str = "min"
    labelled: bool = False
    report: tuple[str, ...] = ("test/loss",)

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"metric mode {self.mode!r}; expected max or min")
        if not self.select.startswith("val/"):
            raise ConfigError(f"selection metric {self.select!r} must be a validation metric (val/...)")


@dataclass(frozen=True)
class InputSpec:
    """An input checkpoint a configured method reads (checked before any worker starts).

    Attributes:
        export: Name of the export it loads from that checkpoint.
        builder: Network builder the export is expected to come from (``segmenter``, ``encoder``...).
        modality: The modality that network reads.
        description: What it is for (shown in errors).
    """

    export: str = "model"
    builder: str = "segmenter"
    modality: str = "optical"
    description: str = ""


class Collectives:
    """Cross-worker operations. This base class is the single-process case: every op is the identity."""

    world_size = 1
    rank = 0

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` from every worker along dim 0 (rank order); see :meth:`MethodContext.all_gather`."""
        return tensor

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``tensor`` over workers (no gradient); see :meth:`MethodContext.all_reduce`."""
        if op not in REDUCE_OPS:
            raise ConfigError(f"all_reduce op={op!r}; expected one of {list(REDUCE_OPS)}")
        return tensor

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every worker's ``value`` (picklable), in rank order."""
        return [value]

    def broadcast_(self, tensor: torch.Tensor, source: int = 0) -> None:
        """Overwrite ``tensor`` in place with worker ``source``'s."""


def _identity_prepare(module: nn.Module, **_: Any) -> nn.Module:
    return module


@dataclass
class MethodContext:
    """What the engine gives a method at set-up.

    Attributes:
        device: Where tensors live on this worker.
        rank: This worker's rank; world_size: number of workers.
        prepare_module: ``prepare_module(module, find_unused_parameters=False, sync_batchnorm=False)``
            moves a module to ``device`` and wraps it for data parallelism (DDP when world_size > 1).
            :meth:`Method.add_network` calls it.
        steps_per_epoch: Optimiser steps per epoch on this worker (for schedules).
        epochs: Epochs of the run.
        inputs: Checkpoint folders handed over by earlier phases or the config, by name; read them
            in :meth:`Method.setup` (a worker's local copies are deleted after it).
        log: Prints a line (rank 0 only).
        collectives: Cross-worker operations (the engine's; identity in one process).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    prepare_module: Callable[..., nn.Module] = _identity_prepare
    steps_per_epoch: int = 1
    epochs: int = 1
    inputs: dict[str, Path] = field(default_factory=dict)
    log: Callable[[str], None] = print
    collectives: Collectives = field(default_factory=Collectives)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every worker's ``tensor`` concatenated along dim 0 in rank order, with gradient.

        Sizes along dim 0 may differ between workers. The gradient flows to the local shard; its
        backward sums the gradients every worker computes for that shard, so after DDP averages
        parameter gradients over workers they equal the gradients of the mean of the per-worker
        losses computed in one process on the whole global batch. Two patterns are exact: each
        worker's loss over its own queries against gathered keys (contrastive negatives from every
        worker), and every worker computing the same loss over fully gathered embeddings.
        Identity with one worker and in the plain loop.
        """
        return self.collectives.all_gather(tensor)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced over workers with ``op`` (``sum``, ``mean``, ``max``, ``min``), no gradient.

        For evaluation meters (confusion matrices, sums and counts) and thresholds over the
        data-parallel batch. Identity with one worker and in the plain loop.
        """
        return self.collectives.all_reduce(tensor, op)


@dataclass
class Export:
    """A trained network a later phase (or an inference script) can start from.

    Attributes:
        module: The network (unwrapped from DDP), built through :func:`xmodal.models.build_network`
            or the factory functions, so its recipe rebuilds it.
        modality: The input it reads (``sar``, ``optical``, ``both``; ``sar+optical`` for a composite).
        description: One line on what it is.
    """

    module: nn.Module
    modality: str
    description: str = ""

    def recipe(self) -> dict[str, Any]:
        return recipe_of(self.module)


@dataclass
class EvalResult:
    """What :meth:`Method.evaluate` returns.

    Attributes:
        metrics: Flat name -> float (no split prefix), identical on every worker (reduced).
        per_class: Class name -> {metric: value}.
        panels: Rows of :class:`~xmodal.methods.panels.PanelRow` (rank 0's are drawn).
        artifacts: Named :class:`~xmodal.methods.panels.Artifact` (histograms, curves, maps) the
            run saves and its report draws.
    """

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    panels: list[Any] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Network:
    module: nn.Module  # as prepared (possibly DDP-wrapped)
    export: str | None
    modality: str
    description: str


class Method(ABC):
    """Base class of every method.

    Subclasses set ``name`` and ``Settings`` (a dataclass of method-specific settings with
    defaults), implement :meth:`metrics`, :meth:`setup`, :meth:`train_step` and
    :meth:`evaluate`, and override the declarations their settings change (:meth:`needs`,
    :meth:`required_inputs`, :meth:`optimizer_names`). A method that reproduces a paper's table
    lists it in ``paper_tables`` (see :mod:`xmodal.report.runs`) and places runs in it with
    :meth:`report_cell`.
    """

    name: ClassVar[str]
    Settings: ClassVar[type]
    paper_tables: ClassVar[tuple[dict[str, Any], ...]] = ()

    def __init__(self, settings: Any, model: ModelSettings, optim: OptimSettings, data: DataSpec) -> None:
        self.settings = settings
        self.model_settings = model
        self.optim = optim
        self.data = data
        self.context = MethodContext(device=torch.device("cpu"))
        self._networks: dict[str, _Network] = {}
        self.optimizers: dict[str, Stepper] = {}

    # -- declarations ------------------------------------------------------------------------------
    @classmethod
    def parse_settings(cls, raw: dict[str, Any] | None) -> Any:
        """Validate a config's ``method_settings`` against this method's defaults."""
        from xmodal.settings import from_dict

        return from_dict(cls.Settings, raw, "method_settings")

    @classmethod
    def needs(cls, settings: Any) -> DataNeeds:
        """What this configuration needs of the data (default: SAR and optical, one view)."""
        return DataNeeds()

    @classmethod
    def check_data(cls, settings: Any, data: DataSpec) -> None:
        """Refuse data the configuration cannot use, beyond :meth:`needs` (e.g. too few classes)."""

    @classmethod
    @abstractmethod
    def metrics(cls, settings: Any, data: DataSpec | None = None) -> MetricSpec:
        """The metric that selects this configuration's checkpoints (``data`` may be unknown yet)."""

    @classmethod
    def required_inputs(cls, settings: Any) -> dict[str, InputSpec]:
        """Input checkpoints this configuration reads, by input name (default: none)."""
        return {}

    @classmethod
    def optimizer_names(cls, settings: Any) -> tuple[str, ...]:
        """Optimiser sections this configuration uses (``main`` plus ``train.optimizers`` names)."""
        return (MAIN,)

    @classmethod
    def report_cell(cls, table: dict[str, Any], run: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
        """Where a run summary goes in one of :attr:`paper_tables`: (row key, column key), or None
        (then the table's declarative ``match`` rules decide)."""
        return None

    @classmethod
    def report_notes(cls, table: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
        """Notes under one of :attr:`paper_tables` about the runs placed in it (e.g. where their
        settings depart from the paper's); the table's own ``notes`` are about the paper."""
        return []

    # -- lifecycle (the engine calls these) ---------------------------------------------------------
    @abstractmethod
    def setup(self, context: MethodContext) -> None:
        """Build networks and optimisers on ``context.device`` (called once per worker).

        Subclasses start with ``self.context = context`` (or ``super().setup(context)``).
        """

    @abstractmethod
    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        """One optimisation step on a batch already on the device; returns scalar logs."""

    @abstractmethod
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        """Metrics over this worker's share of a split, reduced over workers (dataset-level).

        Runs on every worker; meters reduce through ``self.context.all_reduce`` so every worker
        returns the same metrics (the engine checks they agree).
        """

    def begin_epoch(self, epoch: int) -> None:
        """Hook before epoch ``epoch`` (0-based) trains (epoch-level schedules of the method's own)."""

    def end_epoch(self, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        """Hook after epoch ``epoch`` trained and was validated; ``val_metrics`` (``val/...`` keys)
        is empty on epochs without validation. Returns scalar logs (``train/...``)."""
        return {}

    def finish_epoch(self, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        """Called by the engine after validation: plateau schedules, then :meth:`end_epoch`."""
        for stepper in self.optimizers.values():
            stepper.end_epoch(val_metrics)
        return self.end_epoch(epoch, val_metrics)

    # -- plumbing ----------------------------------------------------------------------------------
    def add_network(
        self,
        name: str,
        module: nn.Module,
        *,
        modality: str,
        export: str | bool = True,
        description: str = "",
        find_unused_parameters: bool = False,
        sync_batchnorm: bool = False,
    ) -> nn.Module:
        """Prepare a trained network for this worker (device, DDP) and register it.

        Registered networks are saved and restored by the default :meth:`state_dict` /
        :meth:`load_state_dict` and exported by the default :meth:`exports` (under ``name``, or the
        ``export`` name given; ``export=False`` keeps it out).

        Returns:
            The prepared module (call it in steps; :meth:`network` gives the unwrapped one).
        """
        if name in self._networks:
            raise ConfigError(f"{self.name}: network {name!r} is added twice")
        prepared = self.context.prepare_module(module, find_unused_parameters=find_unused_parameters, sync_batchnorm=sync_batchnorm)
        export_name = name if export is True else (export or None)
        self._networks[name] = _Network(prepared, export_name, modality, description)
        return prepared

    def network(self, name: str) -> nn.Module:
        """The registered network ``name`` without its data-parallel wrapper."""
        return unwrap_model(self._networks[name].module)

    def networks(self) -> dict[str, nn.Module]:
        """Every registered network, unwrapped (the engine syncs their buffers before evaluating)."""
        return {name: unwrap_model(entry.module) for name, entry in self._networks.items()}

    def add_optimizer(self, name: str, parameters: Iterable[nn.Parameter]) -> Stepper:
        """An optimiser from section ``name`` (``main`` = the ``train:`` section itself).

        Raises:
            ConfigError: ``name`` is not among :meth:`optimizer_names`, or is added twice.
        """
        declared = type(self).optimizer_names(self.settings)
        if name not in declared:
            raise ConfigError(f"{self.name}: optimiser {name!r} is not declared; optimizer_names() gives {list(declared)}")
        if name in self.optimizers:
            raise ConfigError(f"{self.name}: optimiser {name!r} is added twice")
        spec = type(self).metrics(self.settings, self.data)
        stepper = Stepper(name, parameters, self.optim.section(name), self.context.steps_per_epoch, self.context.epochs, (spec.select, spec.mode))
        self.optimizers[name] = stepper
        return stepper

    def extra_state(self) -> dict[str, Any]:
        """State beyond networks and optimisers to save with every checkpoint (counters, stages)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: registered networks, optimisers and schedules, extra state."""
        return {
            "networks": {name: unwrap_model(entry.module).state_dict() for name, entry in self._networks.items()},
            "optimizers": {name: stepper.state_dict() for name, stepper in self.optimizers.items()},
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ConfigError: The state holds other networks or optimisers than this configuration.
        """
        networks, optimizers = state.get("networks", {}), state.get("optimizers", {})
        if set(networks) != set(self._networks) or set(optimizers) != set(self.optimizers):
            raise ConfigError(
                f"{self.name}: a checkpoint with networks {sorted(networks)} and optimisers {sorted(optimizers)} does not fit "
                f"this configuration's {sorted(self._networks)} / {sorted(self.optimizers)}"
            )
        for name, weights in networks.items():
            unwrap_model(self._networks[name].module).load_state_dict(weights)
        for name, stepper_state in optimizers.items():
            self.optimizers[name].load_state_dict(stepper_state)
        self.load_extra_state(state.get("extra", {}))

    def exports(self) -> dict[str, Export]:
        """Networks a later phase may start from, by export name (saved with every checkpoint)."""
        return {
            entry.export: Export(unwrap_model(entry.module), entry.modality, entry.description)
            for entry in self._networks.values()
            if entry.export
        }


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` for a metric ranked in ``mode`` (``max`` or ``min``)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    return best is None or (value > best if mode == "max" else value < best)


def check_settings_dataclass(cls: type) -> None:
    """Refuse a method class without a ``Settings`` dataclass."""
    if not dataclasses.is_dataclass(getattr(cls, "Settings", None)):
        raise TypeError(f"method {cls.__name__} must declare a Settings dataclass")
