"""Losses shared by several methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def binary_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of a 1-channel logit map against a 0/1 target, over valid pixels of the batch.

    Args:
        logits: B x 1 x H x W (or B x H x W) raw scores.
        target: B x H x W with values 0/1 (other values must be masked by ``valid``).
        valid: B x H x W bool, pixels that count.
    """
    probability = torch.sigmoid(logits.reshape(target.shape))
    weight = valid.float()
    target = target.float() * weight
    intersection = (probability * target * weight).sum()
    total = (probability * weight).sum() + target.sum()
    return 1.0 - (2.0 * intersection + eps) / (total + eps)


def multiclass_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss averaged over classes present in the batch (B x C x H x W logits)."""
    classes = logits.shape[1]
    probability = logits.softmax(dim=1)
    weight = valid.unsqueeze(1).float()
    one_hot = F.one_hot(torch.where(valid, target, torch.zeros_like(target)), classes).permute(0, 3, 1, 2).float() * weight
    dims = (0, 2, 3)
    intersection = (probability * one_hot * weight).sum(dims)
    total = (probability * weight).sum(dims) + one_hot.sum(dims)
    present = one_hot.sum(dims) > 0
    dice = (2.0 * intersection + eps) / (total + eps)
    return 1.0 - dice[present].mean() if present.any() else logits.sum() * 0.0


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, dice_weight: float = 1.0
) -> torch.Tensor:
    """BCE + Dice for 1-channel logits, CE + Dice otherwise; ``ignore_index`` pixels never count."""
    valid = target != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    if logits.shape[1] == 1:
        scores = logits[:, 0]
        loss = F.binary_cross_entropy_with_logits(scores[valid], target[valid].float())
        if dice_weight:
            loss = loss + dice_weight * binary_dice_loss(scores, target, valid)
        return loss
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
    if dice_weight:
        loss = loss + dice_weight * multiclass_dice_loss(logits, target, valid)
    return loss


def predict_classes(logits: torch.Tensor) -> torch.Tensor:
    """Class indices from B x C x H x W (or B x 1 x H x W binary) logits."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)
