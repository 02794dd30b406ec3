"""Per-pixel segmentation losses: (binary) cross-entropy and soft Dice, with optional per-pixel weights.

A 1-channel logit map is a binary problem (sigmoid, target 0/1); C > 1 channels are C classes
(softmax). ``ignore_index`` pixels never count. Per-pixel weights (e.g. CromSS's sample-selection
weights, paper 003) scale each pixel's term; the weighted cross-entropy is normalised by the sum of
the weights over counted pixels, so a weight of 1 everywhere gives the plain mean.

References checked in ``tests/losses/test_segmentation.py``: ``F.cross_entropy`` /
``F.binary_cross_entropy_with_logits`` (unit weights) and ``segmentation_models_pytorch.losses.DiceLoss``
(unit weights, no smoothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _weights(valid: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    counted = valid.float()
    return counted if weight is None else counted * weight.float()


def pixel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean (or weighted mean) cross-entropy over counted pixels.

    Args:
        logits: B x C x H x W scores (C = 1: binary, sigmoid).
        target: B x H x W class indices (0/1 when C = 1); ``ignore_index`` pixels are skipped.
        ignore_index: Label value that never counts.
        weight: Optional B x H x W non-negative weights; the result is
            ``sum(w * ce) / sum(w)`` over counted pixels (0 when the weights sum to 0).

    Returns:
        A scalar; 0 (with a graph) when no pixel counts.
    """
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    if logits.shape[1] == 1:
        per_pixel = F.binary_cross_entropy_with_logits(logits[:, 0], safe.float(), reduction="none")
    else:
        per_pixel = F.cross_entropy(logits, safe, reduction="none")
    counted = _weights(valid, weight)
    total = counted.sum()
    if total <= 0:
        return logits.sum() * 0.0
    return (per_pixel * counted).sum() / total


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    weight: torch.Tensor | None = None,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft Dice loss, ``1 - mean over classes present in the target of their soft Dice``.

    Binary (1 channel): the foreground class alone. Multi-class: every class that has at least one
    counted pixel in the target (absent classes are left out of the mean rather than counted as a
    perfect 0 loss, so the loss does not shrink with the number of absent classes).

    Args:
        logits: B x C x H x W scores.
        target: B x H x W class indices.
        ignore_index: Label value that never counts.
        weight: Optional B x H x W pixel weights (a weight multiplies the pixel's probability
            and its one-hot target in both the intersection and the cardinality).
        smooth: Added to numerator and denominator (1.0 keeps empty predictions finite).
    """
    valid = target != ignore_index
    counted = _weights(valid, weight).unsqueeze(1)
    safe = torch.where(valid, target, torch.zeros_like(target))
    if logits.shape[1] == 1:
        probability = torch.sigmoid(logits)
        one_hot = safe.unsqueeze(1).float()
    else:
        probability = logits.softmax(dim=1)
        one_hot = F.one_hot(safe, logits.shape[1]).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    intersection = (probability * one_hot * counted).sum(dims)
    cardinality = (probability * counted).sum(dims) + (one_hot * counted).sum(dims)
    present = (one_hot * counted).sum(dims) > 0
    if logits.shape[1] == 1:
        present = torch.ones_like(present)  # binary: the foreground term counts even when absent
    if not present.any():
        return logits.sum() * 0.0
    dice = (2.0 * intersection + smooth) / (cardinality + smooth).clamp(min=1e-12)
    return 1.0 - dice[present].mean()


def segmentation_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    dice_weight: float = 1.0,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy (BCE for 1 channel) + ``dice_weight`` x soft Dice, ignoring ``ignore_index``.

    Returns 0 (with a graph, so DDP sees every parameter) when no pixel counts: a batch of
    unlabelled tiles contributes nothing.
    """
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    loss = pixel_cross_entropy(logits, target, ignore_index, weight)
    if dice_weight:
        loss = loss + dice_weight * soft_dice_loss(logits, target, ignore_index, weight)
    return loss


def predict_classes(logits: torch.Tensor) -> torch.Tensor:
    """Class indices from B x C x H x W (or B x 1 x H x W binary) logits."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)
