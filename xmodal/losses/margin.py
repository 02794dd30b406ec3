"""Margin contrastive loss for matched / non-matched descriptor pairs (paper 004, Eq. 4).

For pair distance ``d = ||a - b||_2`` and label ``y`` (1: corresponding, 0: not):

* ``squared=True`` (the paper's form): ``y d^2 + (1 - y) max(0, m - d^2)``, the margin on the
  squared distance;
* ``squared=False``: ``y d + (1 - y) max(0, m - d)``.

averaged over pairs. Paper 004 L2-normalises both descriptors first (``normalize=True``), which
bounds d^2 by 4 and makes the margin easy to set.

References checked in ``tests/losses/test_margin.py``: a hand-written Eq. 4 (squared form) and
``pytorch_metric_learning.losses.ContrastiveLoss(pos_margin=0, neg_margin=m, reducer=MeanReducer())``
(unsquared form, on positive-only and negative-only pair sets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError


def margin_contrastive(
    first: torch.Tensor,
    second: torch.Tensor,
    corresponding: torch.Tensor,
    margin: float,
    *,
    squared: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """Mean margin contrastive loss over N pairs.

    Args:
        first, second: N x D descriptors of the two sides of each pair.
        corresponding: N bools (or 0/1): whether pair i corresponds.
        margin: m > 0.
        squared: Use squared distances (paper 004) or plain distances.
        normalize: L2-normalise both descriptors first.
    """
    if margin <= 0:
        raise ConfigError(f"margin_contrastive: margin={margin}; expected > 0")
    if first.shape != second.shape or first.dim() != 2 or corresponding.shape != first.shape[:1]:
        raise ConfigError(f"margin_contrastive: expected two N x D sets and N labels, got {tuple(first.shape)}, {tuple(second.shape)}, {tuple(corresponding.shape)}")
    if normalize:
        first, second = F.normalize(first, dim=1), F.normalize(second, dim=1)
    squared_distance = ((first - second) ** 2).sum(dim=1)
    distance = squared_distance if squared else squared_distance.clamp(min=1e-12).sqrt()
    positive = corresponding.bool()
    per_pair = torch.where(positive, distance, F.relu(margin - distance))
    return per_pair.mean()
