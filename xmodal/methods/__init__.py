"""Methods layer: one package per method (its settings, its steps, its paper tables), found by the registry.

A method never imports Ray or ``torch.distributed`` and never imports another method: the engine
hands it a :class:`~xmodal.methods.base.MethodContext` (device, data-parallel wrapping, collectives).
Shared plumbing lives here: :mod:`.base` (the contract), :mod:`.registry`, :mod:`.optim` (optimiser
sections and steps), :mod:`.exports` (networks handed between phases), :mod:`.inputs`,
:mod:`.metrics` (meters reduced across workers) and :mod:`.panels` (what reports draw).
"""

from xmodal.methods.base import (
    DataNeeds,
    DataSpec,
    EvalResult,
    Export,
    InputSpec,
    Method,
    MethodContext,
    MetricSpec,
    ModelSettings,
)
from xmodal.methods.optim import OptimSettings, OptimizerSettings
from xmodal.methods.registry import METHODS, get_method, load_methods, register_method

__all__ = [
    "METHODS",
    "DataNeeds",
    "DataSpec",
    "EvalResult",
    "Export",
    "InputSpec",
    "Method",
    "MethodContext",
    "MetricSpec",
    "ModelSettings",
    "OptimSettings",
    "OptimizerSettings",
    "get_method",
    "load_methods",
    "register_method",
]
