"""Saving and loading the networks one phase hands to the next.

A checkpoint folder holds ``exports/<name>.pt`` for every :class:`~xmodal.methods.base.Export` of
the method: the weights, the recipe that rebuilds the network (builder name and arguments, see
:mod:`xmodal.models.networks`) and the modality it reads. So a later phase, or an inference script,
rebuilds any exported network without the config that trained it::

    network, saved = rebuild_export("runs/kd-demo/reconstruct/checkpoint_000005", "model")

:func:`load_export_into` initialises a network, or one part of it, from an export: a pretrained
encoder into a segmenter's ``encoder``, a whole student into a finetuning copy. Every load reports
which keys it loaded and refuses one that matches nothing.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.errors import ConfigError, DataError
from xmodal.methods.base import Export
from xmodal.models import FIRST_CONV_MODES, copy_matching_weights, rebuild_network, unwrap_model

EXPORTS_DIR = "exports"
FORMAT_VERSION = 2
PARTS = ("all", "encoder")


def save_exports(exports: dict[str, Export], checkpoint_dir: str | Path) -> None:
    """Write every export into ``checkpoint_dir/exports``."""
    folder = Path(checkpoint_dir) / EXPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, export in exports.items():
        torch.save(
            {
                "format": FORMAT_VERSION,
                "state_dict": unwrap_model(export.module).state_dict(),
                "recipe": export.recipe(),
                "modality": export.modality,
                "description": export.description,
            },
            folder / f"{name}.pt",
        )


def _upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """Exports written before recipes (format 1): rebuild their recipe from the stored fields."""
    if "recipe" in saved:
        return saved
    model = dict(saved["model"])
    if saved.get("classification"):
        recipe = {"builder": "classifier", "kwargs": {
            "encoder": model.get("encoder") or "resnet18", "in_channels": saved["in_channels"],
            "num_classes": saved["classes"], "encoder_depth": model.get("encoder_depth") or 5,
        }}
    else:
        recipe = {"builder": "segmenter", "kwargs": {
            "arch": model["arch"], "encoder": model.get("encoder"), "in_channels": saved["in_channels"], "classes": saved["classes"],
            "encoder_depth": model.get("encoder_depth"), "decoder_channels": model.get("decoder_channels"), **(model.get("kwargs") or {}),
        }}
    return {**saved, "recipe": recipe}


def read_export(checkpoint_dir: str | Path, name: str) -> dict[str, Any]:
    """The saved export ``name`` of a checkpoint folder (weights, recipe, modality).

    Raises:
        DataError: No such export; the message lists the exports the checkpoint has.
    """
    path = Path(checkpoint_dir) / EXPORTS_DIR / f"{name}.pt"
    if not path.is_file():
        available = sorted(p.stem for p in (Path(checkpoint_dir) / EXPORTS_DIR).glob("*.pt"))
        raise DataError(f"{path}: not found; this checkpoint exports {available or 'nothing'}")
    return _upgrade(read_torch_file(path))


class DamagedFileError(DataError):
    """A checkpoint or export file that does not load (truncated by a kill, a full disk)."""


def read_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's state or an export, loaded without running code (``weights_only``).

    Every file xmodal writes holds tensors and plain values only, so unpickling anything else
    (an object whose loading would call arbitrary code) is refused.

    Raises:
        DataError: Naming the file, holding objects other than tensors and plain values.
        DamagedFileError: Naming the file, which does not load.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"{path}: holds objects other than tensors and plain values, refused without loading them "
            f"(a checkpoint that could run code; {str(exc).splitlines()[0]})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any other failure to read is a bad file for the user
        raise DamagedFileError(f"{path}: cannot be read ({type(exc).__name__}: {exc}); the checkpoint is damaged") from exc


def rebuild_export(checkpoint_dir: str | Path, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load an exported network; returns it with its saved description."""
    saved = read_export(checkpoint_dir, name)
    network = rebuild_network(saved["recipe"])
    network.load_state_dict(saved["state_dict"])
    return network, saved


def _part(module: nn.Module, part: str, where: str) -> nn.Module:
    if part == "all":
        return module
    child = module
    for attribute in part.split("."):
        child = getattr(child, attribute, None)
        if not isinstance(child, nn.Module):
            raise ConfigError(f"{where}: {type(module).__name__} has no part {part!r}")
    return child


def load_export_into(
    network: nn.Module,
    inputs: dict[str, Path],
    key: str,
    name: str = "model",
    *,
    part: str = "all",
    first_conv: str = "mean_tile",
) -> dict[str, list[str]]:
    """Copy the weights of export ``name`` of input checkpoint ``key`` into ``network`` (or one part).

    ``part="all"`` copies every parameter and buffer whose name and shape match. ``part="encoder"``
    copies into ``network.encoder`` only: from the export itself when it is an encoder (builder
    ``encoder``), else from the export's own ``encoder``. A first convolution that differs only in
    input channels is adapted (``first_conv``, see :func:`xmodal.models.copy_matching_weights`).

    Returns:
        The copy report with keys as ``network`` names them (``encoder.`` prefixed for a part):
        ``copied``, ``adapted``, ``skipped`` (network keys left as they were), ``unused``.

    Raises:
        ConfigError: The input is missing, the part does not exist, or nothing matched.
    """
    if key not in inputs:
        raise ConfigError(f"input checkpoint {key!r} was not provided; inputs available: {sorted(inputs)}")
    if part not in PARTS:
        raise ConfigError(f"part={part!r}; expected one of {list(PARTS)}")
    if first_conv not in FIRST_CONV_MODES:
        raise ConfigError(f"first_conv={first_conv!r}; expected one of {list(FIRST_CONV_MODES)}")
    where = f"input {key!r} export {name!r}"
    source, saved = rebuild_export(inputs[key], name)
    target_part = _part(unwrap_model(network), part, "the network being initialised")
    source_part = source if part == "all" or saved["recipe"]["builder"] == "encoder" else _part(source, part, where)
    report = copy_matching_weights(source_part, target_part, adapt_first_conv=first_conv)
    if not report["copied"] and not report["adapted"]:
        raise ConfigError(
            f"{where} ({saved['recipe']['builder']}) matches nothing of the network's {part!r}: no parameter name and shape "
            f"agree (network keys like {list(target_part.state_dict())[:3]}, export keys like {list(source_part.state_dict())[:3]})"
        )
    if part != "all":
        for field in ("copied", "adapted", "skipped"):
            report[field] = [f"{part}.{k}" for k in report[field]]
    return report


def describe_load(report: dict[str, list[str]]) -> str:
    """One line for the log: how many keys were copied, adapted and left as they were."""
    skipped = report["skipped"]
    shown = f" (e.g. {', '.join(skipped[:3])})" if skipped else ""
    return f"{len(report['copied'])} keys copied, {len(report['adapted'])} adapted, {len(skipped)} left as initialised{shown}"
