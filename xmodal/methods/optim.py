"""Optimisation settings, optimisers, learning-rate schedules and the optimiser step every method uses.

The ``train:`` section is an :class:`OptimSettings`: the run's epochs and seed plus the settings of
the method's ``main`` optimiser. A method with several optimisers (an autoencoder and a critic, two
encoders with their own rates) names them; ``train.optimizers.<name>`` holds the fields that differ
from the main section::

    train:
      epochs: 100
      optimizer: adam
      lr: 5.0e-4
      betas: [0.9, 0.99]
      weight_decay: 1.0e-4
      schedule: onecycle
      min_lr: 5.0e-5                 # one-cycle between 5e-5 and 5e-4 (paper 004)
      optimizers:
        critic: {optimizer: sgd, lr: 4.0e-3, momentum: 0.9, weight_decay: 0.0, schedule: constant}

Schedules: ``onecycle`` (per step, from ``min_lr`` up to ``lr`` over ``onecycle_pct`` of the steps,
then down to ``min_lr``; without ``min_lr``, PyTorch's defaults lr/25 and lr/25/1e4), ``cosine``
(per step, optional linear warm-up over ``warmup_epochs``), ``constant`` and ``plateau``
(``ReduceLROnPlateau`` stepped after each validation on ``plateau_metric``, by default the metric
that selects the method's checkpoints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import torch
from torch import nn

from xmodal.errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant", "plateau")
MAIN = "main"


@dataclass
class OptimizerSettings:
    """One optimiser and its schedule.

    Attributes:
        optimizer: ``adamw``, ``adam`` or ``sgd``.
        lr: Peak learning rate.
        weight_decay: Decoupled (AdamW) or L2 (SGD, Adam) weight decay.
        momentum: SGD momentum.
        betas: Adam / AdamW betas.
        schedule: ``onecycle``, ``cosine``, ``constant`` or ``plateau``.
        warmup_epochs: Linear warm-up before a cosine schedule.
        min_lr: One-cycle: the lowest rate, where it starts and ends (``None``: lr/25 at the start,
            lr/25/1e4 at the end, as PyTorch). Plateau: the floor of the reductions.
        onecycle_pct: Share of the steps spent rising in a one-cycle schedule.
        plateau_metric: Validation metric a plateau schedule follows (``None``: the method's
            selection metric, in its direction).
        plateau_mode: ``max`` or ``min`` for a named ``plateau_metric`` (``None``: ``min`` for
            losses, ``max`` otherwise).
        plateau_factor: Factor of each plateau reduction.
        plateau_patience: Validated epochs without improvement before a reduction.
        grad_clip: Clip the gradient norm of this optimiser's parameters (``None``: off).
    """

    optimizer: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "onecycle"
    warmup_epochs: int = 0
    min_lr: float | None = None
    onecycle_pct: float = 0.25
    plateau_metric: str | None = None
    plateau_mode: str | None = None
    plateau_factor: float = 0.5
    plateau_patience: int = 10
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r}; expected one of {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r}; expected one of {list(SCHEDULES)}")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr}; expected > 0")
        if self.min_lr is not None and not 0 <= self.min_lr < self.lr:
            raise ConfigError(f"min_lr={self.min_lr}; expected 0 <= min_lr < lr={self.lr}")
        if not 0 < self.onecycle_pct < 1:
            raise ConfigError(f"onecycle_pct={self.onecycle_pct}; expected a share in (0, 1)")
        if self.plateau_mode not in (None, "max", "min"):
            raise ConfigError(f"plateau_mode={self.plateau_mode!r}; expected max or min")
        if not 0 < self.plateau_factor < 1 or self.plateau_patience < 0:
            raise ConfigError("plateau_factor must be in (0, 1) and plateau_patience >= 0")
        if any(not 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas={list(self.betas)}; expected two numbers in [0, 1)")


_OPTIMIZER_FIELDS = [f.name for f in fields(OptimizerSettings)]


@dataclass
class OptimSettings(OptimizerSettings):
    """The ``train:`` section: epochs, seed, the ``main`` optimiser, and named ones.

    Attributes:
        epochs: Passes over the training split.
        seed: Seed of model initialisation and sampling.
        optimizers: Named optimiser sections (``train.optimizers.<name>``): fields that differ from
            the main section (every other field is inherited).
    """

    epochs: int = 10
    seed: int = 0
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ConfigError as exc:
            raise ConfigError(f"train.{exc}") from None
        if self.epochs < 1:
            raise ConfigError(f"train.epochs={self.epochs}; expected >= 1")
        for name in self.optimizers:
            self.section(name)

    def section(self, name: str = MAIN) -> OptimizerSettings:
        """The settings of optimiser ``name`` (the main section with its own fields on top).

        Raises:
            ConfigError: An unknown or invalid field, naming ``train.optimizers.<name>.<field>``.
        """
        from xmodal.settings import from_dict

        base = {key: getattr(self, key) for key in _OPTIMIZER_FIELDS}
        if name == MAIN:
            return from_dict(OptimizerSettings, base, "train")
        own = self.optimizers.get(name) or {}
        if not isinstance(own, dict):
            raise ConfigError(f"train.optimizers.{name}: expected a mapping of optimiser settings, got {own!r}")
        return from_dict(OptimizerSettings, {**base, **own}, f"train.optimizers.{name}")


def build_optimizer(parameters: Iterable[nn.Parameter], settings: OptimizerSettings) -> torch.optim.Optimizer:
    """The optimiser a section names, over the parameters that require a gradient.

    Raises:
        ConfigError: No parameter requires a gradient.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ConfigError("an optimiser got no trainable parameter (everything is frozen)")
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    kind = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay)


def plateau_target(settings: OptimizerSettings, select_metric: tuple[str, str]) -> tuple[str, str]:
    """(metric, mode) a plateau schedule follows: the named one, or the method's selection metric."""
    if settings.plateau_metric is None:
        return select_metric
    mode = settings.plateau_mode or ("min" if "loss" in settings.plateau_metric.rsplit("/", 1)[-1] else "max")
    return settings.plateau_metric, mode


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    settings: OptimizerSettings,
    steps_per_epoch: int,
    epochs: int,
    select_metric: tuple[str, str] = ("val/loss", "min"),
) -> Any:
    """The schedule a section names: per-step schedules, or ``ReduceLROnPlateau`` for ``plateau``."""
    total = max(1, epochs * max(1, steps_per_epoch))
    if settings.schedule == "onecycle":
        kwargs: dict[str, float] = {}
        if settings.min_lr is not None:
            floor = max(settings.min_lr, 1e-12)
            kwargs = {"div_factor": settings.lr / floor, "final_div_factor": 1.0}
        # OneCycleLR divides by its phase lengths: very short runs (a few steps) need a floor.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total + 1, 16),
            pct_start=settings.onecycle_pct, **kwargs,
        )
    if settings.schedule == "cosine":
        warmup = settings.warmup_epochs * max(1, steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if settings.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=plateau_target(settings, select_metric)[1], factor=settings.plateau_factor, patience=settings.plateau_patience, min_lr=settings.min_lr or 0.0
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


class Stepper:
    """One optimiser with its schedule and gradient clipping: ``stepper.step(loss)`` does a step.

    Per-step schedules advance after every :meth:`update`; a plateau schedule advances only in
    :meth:`end_epoch`, on a validation metric.

    Args:
        name: Section name (``main``, ``critic``...).
        parameters: Parameters it updates (frozen ones are left out).
        settings: Its section.
        steps_per_epoch: Optimiser steps per epoch on this worker.
        epochs: Epochs of the run.
        select_metric: The method's selection metric and mode (the default plateau metric).
    """

    def __init__(
        self,
        name: str,
        parameters: Iterable[nn.Parameter],
        settings: OptimizerSettings,
        steps_per_epoch: int,
        epochs: int,
        select_metric: tuple[str, str] = ("val/loss", "min"),
    ) -> None:
        self.name = name
        self.settings = settings
        self.parameters = [p for p in parameters if p.requires_grad]
        self.optimizer = build_optimizer(self.parameters, settings)
        self.scheduler = build_scheduler(self.optimizer, settings, steps_per_epoch, epochs, select_metric)
        self.per_step = settings.schedule != "plateau"
        self.plateau_metric = plateau_target(settings, select_metric)[0]

    @property
    def lr(self) -> float:
        """The current learning rate (first parameter group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Clear this optimiser's gradients and back-propagate ``loss``."""
        self.zero_grad()
        loss.backward()

    def update(self) -> None:
        """Clip, step the optimiser and advance a per-step schedule."""
        if self.settings.grad_clip:
            nn.utils.clip_grad_norm_(self.parameters, self.settings.grad_clip)
        self.optimizer.step()
        if self.per_step:
            self.scheduler.step()

    def step(self, loss: torch.Tensor) -> None:
        """:meth:`backward` then :meth:`update`."""
        self.backward(loss)
        self.update()

    def end_epoch(self, val_metrics: dict[str, float]) -> None:
        """Advance a plateau schedule on its validation metric (nothing when it was not validated).

        Raises:
            ConfigError: The metric is not among the validation metrics.
        """
        if self.per_step or not val_metrics:
            return
        if self.plateau_metric not in val_metrics:
            raise ConfigError(
                f"train{'' if self.name == MAIN else '.optimizers.' + self.name}.plateau_metric={self.plateau_metric!r} "
                f"is not a validation metric; available: {sorted(val_metrics)}"
            )
        self.scheduler.step(float(val_metrics[self.plateau_metric]))

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint's optimiser and schedule position.

        A resumed run may have other epochs than the run it resumes (extending training): a
        one-cycle schedule keeps this run's length and phases, and goes on from the saved step
        (else it would stop at the old length: "Tried to step N times").
        """
        self.optimizer.load_state_dict(state["optimizer"])
        keep = {k: v for k, v in vars(self.scheduler).items() if k in ("total_steps", "_schedule_phases")}
        self.scheduler.load_state_dict(state["scheduler"])
        vars(self.scheduler).update(keep)
