"""The method interface the engine drives, and the method registry.

The engine owns the loop (epochs, data iteration, checkpoints, reporting, resuming); a method owns
everything inside one step: its models, losses, optimisers and evaluation. Each method declares
its own settings dataclass with defaults (``Settings``); a config's ``method_settings`` section is
validated against it before anything starts.
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


@dataclass
class ModelSettings:
    """Architecture used by a method (the ``model:`` section).

    Attributes:
        arch: Segmentation architecture (``unet``, ``deeplabv3plus``, ``pspnet``, ``fpn``, ``segnet``...).
        encoder: smp or timm (``tu-<name>``) encoder (``None``: the architecture's default).
        encoder_depth: Number of encoder stages (``None``: the architecture's default, e.g. 3 for
            PSPNet, 5 otherwise).
        decoder_channels: Decoder widths where the architecture takes them (Unet family).
        kwargs: Extra keyword arguments for the architecture.
    """

    arch: str = "unet"
    encoder: str | None = "resnet18"
    encoder_depth: int | None = None
    decoder_channels: list[int] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSettings:
    """Optimisation shared by methods (the ``train:`` section).

    Attributes:
        epochs: Passes over the training split.
        lr: Peak learning rate.
        optimizer: ``adamw``, ``adam`` or ``sgd``.
        weight_decay: Decoupled (AdamW) or L2 (SGD/Adam) weight decay.
        momentum: SGD momentum.
        schedule: ``onecycle``, ``cosine`` or ``constant``.
        warmup_epochs: Linear warm-up before a cosine schedule.
        grad_clip: Clip the gradient norm to this value (``None``: off).
        seed: Seed of model initialisation and sampling.
    """

    epochs: int = 10
    lr: float = 2e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "onecycle"
    warmup_epochs: int = 0
    grad_clip: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adam", "sgd"):
            raise ConfigError(f"train.optimizer={self.optimizer!r}; expected adamw, adam or sgd")
        if self.schedule not in ("onecycle", "cosine", "constant"):
            raise ConfigError(f"train.schedule={self.schedule!r}; expected onecycle, cosine or constant")
        if self.epochs < 1 or self.lr <= 0:
            raise ConfigError("train.epochs must be >= 1 and train.lr > 0")


@dataclass(frozen=True)
class DataSpec:
    """What a method needs to know about the data (no file access, no Ray)."""

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


@dataclass
class MethodContext:
    """What the engine gives a method at set-up.

    Attributes:
        device: Where tensors live on this worker.
        rank: This worker's rank; world_size: number of workers.
        prepare_module: Moves a module to ``device`` and wraps it for data-parallel training
            (DDP when world_size > 1). Call it on every module that is trained; pass
            ``find_unused_parameters=True`` when a step's loss may leave trainable parameters
            without a gradient.
        steps_per_epoch: Optimiser steps per epoch on this worker (for schedules).
        inputs: Checkpoint folders handed over by earlier phases or the config, by name.
        log: Prints a line (rank 0 only).
    """

    device: torch.device
    rank: int
    world_size: int
    prepare_module: Callable[..., nn.Module]
    steps_per_epoch: int
    inputs: dict[str, Path] = field(default_factory=dict)
    log: Callable[[str], None] = print


@dataclass
class PanelItem:
    """One row of an evaluation panel: images as H x W x 3 or H x W arrays."""

    optical_rgb: np.ndarray
    sar_db: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    title: str = ""


@dataclass
class Export:
    """A trained network a later phase can start from, with what is needed to rebuild it.

    Attributes:
        module: The network (unwrapped from DDP).
        in_channels: Input channels it expects.
        classes: Output channels of its head.
        model: Architecture settings it was built with.
        modality: Which input it was trained on (``sar``, ``optical``, ``both``).
        classification: Whether it is a scene classifier rather than a segmenter.
    """

    module: nn.Module
    in_channels: int
    classes: int
    model: ModelSettings
    modality: str
    classification: bool = False


@dataclass
class EvalResult:
    """Metrics (flat name -> float) plus optional panel rows."""

    metrics: dict[str, float]
    panels: list[PanelItem] = field(default_factory=list)
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)


class Method(ABC):
    """Base class of every method.

    Subclasses set ``name``, ``Settings`` (a dataclass of method-specific settings with defaults),
    ``metric`` / ``metric_mode`` (the number that ranks checkpoints and trials) and
    ``required_fields`` (batch keys the method reads).
    """

    name: ClassVar[str]
    Settings: ClassVar[type]
    metric: ClassVar[str] = "val/loss"
    metric_mode: ClassVar[str] = "min"
    required_fields: ClassVar[tuple[str, ...]] = ("sar",)

    def __init__(self, settings: Any, model: ModelSettings, optim: OptimSettings, data: DataSpec) -> None:
        self.settings = settings
        self.model_settings = model
        self.optim = optim
        self.data = data

    @classmethod
    def parse_settings(cls, raw: dict[str, Any] | None) -> Any:
        """Validate a config's ``method_settings`` against this method's defaults."""
        from xmodal.settings import from_dict

        return from_dict(cls.Settings, raw, "method_settings")

    @classmethod
    def check_data(cls, data: DataSpec) -> None:
        """Refuse data the method cannot use (e.g. no mask layer for a segmentation method)."""

    @classmethod
    def metric_for(cls, settings: Any, data: DataSpec | None = None) -> str:
        """The validation metric that ranks this configuration's checkpoints and trials.

        Defaults to the class's ``metric``; a method whose number depends on its settings or data
        (accuracy for scene classes, mean IoU for multi-class masks) overrides this.
        """
        return cls.metric

    @abstractmethod
    def setup(self, context: MethodContext) -> None:
        """Build models and optimisers on ``context.device`` (called once per worker)."""

    @abstractmethod
    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        """One optimisation step on a batch already on the device; returns scalar logs."""

    @abstractmethod
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        """Metrics over a whole split (dataset-level, not averaged per batch)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model weights, optimiser and scheduler state."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Hook after each epoch (epoch-level schedules); returns scalar logs."""
        return {}

    def exports(self) -> dict[str, Export]:
        """Networks a later phase may start from, by name (saved with every checkpoint)."""
        return {}


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    if not dataclasses.is_dataclass(getattr(cls, "Settings", None)):
        raise TypeError(f"method {cls.__name__} must declare a Settings dataclass")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    """The method registered as ``name``."""
    import xmodal.methods.registry  # noqa: F401  (imports every built-in method)

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)
