"""Optimisers and per-step learning-rate schedules shared by methods."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from xmodal.methods.base import OptimSettings


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimSettings, lr: float | None = None) -> torch.optim.Optimizer:
    """The optimiser named in ``train.optimizer``."""
    params = [p for p in params if p.requires_grad]
    lr = optim.lr if lr is None else lr
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSettings, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler stepped once per optimiser step."""
    total = max(1, optim.epochs * max(1, steps_per_epoch))
    if optim.schedule == "onecycle":
        # OneCycleLR divides by its phase lengths: very short runs (a few steps) need a floor.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total + 1, 16), pct_start=0.25
        )
    if optim.schedule == "cosine":
        warmup = optim.warmup_epochs * max(1, steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
