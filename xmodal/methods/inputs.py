"""Choosing a model's input from a batch, and labels gated by input validity."""

from __future__ import annotations

import torch

INPUTS = ("sar", "optical", "both")


def select_input(batch: dict[str, torch.Tensor], modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input of ``modality`` (``both``: SAR and optical channels stacked) and its validity
    mask (bool, the input's shape without the channel axis)."""
    if modality == "both":
        channel_axis = batch["sar"].dim() - 3
        image = torch.cat([batch["sar"], batch["optical"]], dim=channel_axis)
        return image, batch["sar_valid"].bool() & batch["optical_valid"].bool()
    return batch[modality], batch[f"{modality}_valid"].bool()


def gate_labels(labels: torch.Tensor, valid: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels with pixels of invalid input turned to ``ignore_index``."""
    return torch.where(valid, labels, torch.full_like(labels, ignore_index))
