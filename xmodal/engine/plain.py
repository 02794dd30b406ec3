"""The engine's Ray-free pieces, and a plain PyTorch loop over the same method and transforms.

:func:`train_plain` runs a config in one process with a ``torch.utils.data.DataLoader``: the
reference side of ``xmodal bench train``, and the way to train on a machine without Ray (a lone
GPU box, a debugger). It keeps the weights that score best on validation and evaluates the test
split with them, as the Ray engine does. Nothing here imports Ray.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch

from xmodal.data.prepared import PreparedData, prepare_data
from xmodal.data.torch_data import iterate_numpy, torch_loader
from xmodal.engine.config import ExperimentConfig
from xmodal.methods.base import DataSpec, Method, MethodContext, get_method


def data_spec(prepared: PreparedData) -> DataSpec:
    """The method-facing description of a prepared dataset."""
    info = prepared.info
    sar_mean, sar_std = prepared.stats.mean_std("sar")
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
    )


def build_method(config: ExperimentConfig, spec: DataSpec) -> Method:
    """Instantiate the configured method (after checking it can use the data)."""
    method_cls = get_method(config.method)
    method_cls.check_data(spec)
    return method_cls(config.method_settings, config.model, config.train, spec)


def ensure_data(config: ExperimentConfig) -> None:
    """Generate the synthetic world named in ``world:`` when ``data.root`` does not exist yet."""
    root = Path(config.data.root)
    if root.exists() or config.world is None:
        return
    from xmodal.data.build import synthesize

    print(f"[{config.name}] generating synthetic world in {root}", flush=True)
    synthesize(root, config.world)


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether ``value`` beats ``best`` for a metric ranked in ``mode`` (``max`` or ``min``)."""
    return best is None or (value > best if mode == "max" else value < best)


def cpu_copy(state: Any) -> Any:
    """A detached CPU copy of a (nested) state dict: best weights kept off the accelerator."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return copy.deepcopy(state)


def _to_torch(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}


def train_plain(
    config: ExperimentConfig,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``config`` to the end in this process and evaluate it.

    Args:
        config: A validated single-phase experiment.
        device: Torch device to train on.
        num_workers: DataLoader worker processes for the training split.
        log: Where the per-epoch lines go.

    Returns:
        ``epochs``, ``metric``, ``best_epoch``, ``epoch_seconds`` (a list), and the ``val/...``
        and ``test/...`` metrics of the best-on-validation weights.
    """
    device = torch.device(device)
    ensure_data(config)
    prepared = prepare_data(config.data)
    loader = torch_loader(prepared, "train", num_workers=num_workers)
    spec = data_spec(prepared)
    method = build_method(config, spec)
    steps = len(loader)
    method.setup(MethodContext(device=device, rank=0, world_size=1, prepare_module=lambda m, **_: m.to(device), steps_per_epoch=steps))
    metric, mode = type(method).metric_for(config.method_settings, spec), type(method).metric_mode
    has_val = bool(prepared.records("val"))
    best: tuple[float, int, dict[str, Any], dict[str, float]] | None = None
    epoch_seconds = []
    step = 0
    for epoch in range(config.train.epochs):
        started = time.perf_counter()
        totals: dict[str, float] = {}
        for batch in loader:
            for key, value in method.train_step(_to_torch(batch, device), step).items():
                totals[key] = totals.get(key, 0.0) + value
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_seconds.append(time.perf_counter() - started)
        method.end_epoch(epoch)
        line = f"epoch {epoch + 1}/{config.train.epochs}  loss {totals.get('loss', float('nan')) / max(len(loader), 1):.4f}  {epoch_seconds[-1]:.1f} s"
        if has_val:
            val = method.evaluate(_to_torch(b, device) for b in iterate_numpy(prepared, "val")).metrics
            score = val[metric.split("/", 1)[1]]
            if is_better(score, None if best is None else best[0], mode):
                best = (score, epoch + 1, cpu_copy(method.state_dict()), val)
            line += f"  {metric} {score:.4f}"
        log(f"[{config.name}] {line}")
    outcome: dict[str, Any] = {"epochs": config.train.epochs, "metric": metric, "epoch_seconds": epoch_seconds, "best_epoch": config.train.epochs}
    if best is not None:
        outcome["best_epoch"] = best[1]
        outcome.update({f"val/{k}": v for k, v in best[3].items()})
        method.load_state_dict(best[2])
    if prepared.records("test"):
        test = method.evaluate(_to_torch(b, device) for b in iterate_numpy(prepared, "test")).metrics
        outcome.update({f"test/{k}": v for k, v in test.items()})
    return outcome
