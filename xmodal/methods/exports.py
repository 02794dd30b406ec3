"""Saving and loading the networks one phase hands to the next.

A checkpoint folder holds ``exports/<name>.pt`` for every :class:`~xmodal.methods.base.Export` of
the method: the weights plus the architecture, channel counts and modality, so a later phase (or
an inference script) can rebuild the network without the config that trained it.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xmodal.errors import ConfigError, DataError
from xmodal.methods.base import Export, ModelSettings
from xmodal.models.factory import copy_matching_weights, create_classifier, create_model

EXPORTS_DIR = "exports"


def build_network(model: ModelSettings, in_channels: int, classes: int, classification: bool = False) -> nn.Module:
    """A randomly initialised network from architecture settings."""
    if classification:
        return create_classifier(
            model.encoder or "resnet18", in_channels=in_channels, num_classes=classes, encoder_depth=model.encoder_depth or 5
        )
    return create_model(
        model.arch,
        encoder=model.encoder,
        in_channels=in_channels,
        classes=classes,
        encoder_depth=model.encoder_depth,
        decoder_channels=model.decoder_channels,
        **model.kwargs,
    )


def save_exports(exports: dict[str, Export], checkpoint_dir: str | Path) -> None:
    """Write every export into ``checkpoint_dir/exports``."""
    folder = Path(checkpoint_dir) / EXPORTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, export in exports.items():
        torch.save(
            {
                "state_dict": export.module.state_dict(),
                "in_channels": export.in_channels,
                "classes": export.classes,
                "model": asdict(export.model),
                "modality": export.modality,
                "classification": export.classification,
            },
            folder / f"{name}.pt",
        )


def read_export(checkpoint_dir: str | Path, name: str) -> dict[str, Any]:
    """The saved export ``name`` of a checkpoint folder."""
    path = Path(checkpoint_dir) / EXPORTS_DIR / f"{name}.pt"
    if not path.is_file():
        available = sorted(p.stem for p in (Path(checkpoint_dir) / EXPORTS_DIR).glob("*.pt"))
        raise DataError(f"{path}: not found; this checkpoint exports {available or 'nothing'}")
    return torch.load(path, map_location="cpu", weights_only=False)


def rebuild_export(checkpoint_dir: str | Path, name: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load an exported network; returns it with its saved description."""
    saved = read_export(checkpoint_dir, name)
    model = ModelSettings(**saved["model"])
    network = build_network(model, saved["in_channels"], saved["classes"], saved["classification"])
    network.load_state_dict(saved["state_dict"])
    return network, saved


def load_export_into(network: nn.Module, inputs: dict[str, Path], key: str, name: str = "model") -> dict[str, Any]:
    """Copy weights of export ``name`` from input checkpoint ``key`` into ``network``.

    Matching parameters are copied; a first convolution with another channel count is adapted
    (see :func:`xmodal.models.factory.copy_matching_weights`).
    """
    if key not in inputs:
        raise ConfigError(f"input checkpoint {key!r} was not provided; inputs available: {sorted(inputs)}")
    source, _ = rebuild_export(inputs[key], name)
    return copy_matching_weights(source, network)
