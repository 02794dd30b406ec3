"""Layer-activation cosine similarity: the reconstruction loss of cross-modal distillation (paper 000, Eq. 2).

``L = 1 - mean over the chosen layers l of cos(student_l, teacher_l)``. Which axis the cosine runs over
is not given in the paper; ``reduction`` chooses it:

* ``pixel``: over channels at each spatial position, averaged over positions and samples;
* ``sample``: over the flattened (C x H x W) activation of each sample, averaged over samples;
* ``auto``: ``sample`` for 1-channel maps and ``pixel`` otherwise. A per-pixel cosine of a
  1-channel map is ``sign(s) * sign(t)``: +-1 with zero gradient almost everywhere.

Reference checked in ``tests/losses/test_cosine.py``: ``torch.nn.functional.cosine_similarity``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError

REDUCTIONS = ("auto", "pixel", "sample")


def _masked_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def layer_cosine(
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str = "auto",
    valid: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Mean cosine similarity of two activations of one layer (a scalar in [-1, 1]).

    Args:
        student: B x C x H x W (or B x C) activation that receives the gradient.
        teacher: Activation of the same shape (the target; detach it beforehand).
        reduction: ``pixel``, ``sample`` or ``auto`` (see the module docstring).
        valid: Optional B x H0 x W0 bool map of pixels that count, at any resolution (resampled to
            the activation's by area: a position counts when at least half of it is valid).
        eps: Floor of each vector norm; a zero vector gives a cosine of 0 (and no NaN).

    Raises:
        ConfigError: Shapes differ or the reduction is unknown.
    """
    if student.shape != teacher.shape:
        raise ConfigError(f"student activation {tuple(student.shape)} and teacher activation {tuple(teacher.shape)} differ")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction={reduction!r}; expected one of {list(REDUCTIONS)}")
    student, teacher = student.float(), teacher.float()
    spatial = student.dim() == 4
    if reduction == "auto":
        reduction = "sample" if student.shape[1] == 1 else "pixel"
    weight = None
    if valid is not None and spatial:
        share = F.interpolate(valid[:, None].float(), size=student.shape[-2:], mode="area")
        weight = (share >= 0.5).float()  # B x 1 x h x w
    if reduction == "pixel" or not spatial:
        dot = (student * teacher).sum(dim=1)
        norms = student.norm(dim=1).clamp(min=eps) * teacher.norm(dim=1).clamp(min=eps)
        return _masked_mean(dot / norms, weight[:, 0] if weight is not None else None)
    if weight is not None:  # per sample: zero out invalid positions in both maps before flattening
        student, teacher = student * weight, teacher * weight
    flat_s, flat_t = student.flatten(1), teacher.flatten(1)
    cosine = (flat_s * flat_t).sum(1) / (flat_s.norm(dim=1).clamp(min=eps) * flat_t.norm(dim=1).clamp(min=eps))
    if weight is not None:
        has_valid = (weight.flatten(1).sum(1) > 0).float()
        return _masked_mean(cosine, has_valid)
    return cosine.mean()


def reconstruction_loss(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    layers: Sequence[str],
    reduction: str = "auto",
    valid: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Paper 000's Eq. 2: ``1 - mean_l cos(student_l, teacher_l)``, with the cosine of each layer.

    Returns:
        (loss, {layer: mean cosine}); the cosines keep their graph.
    """
    if not layers:
        raise ConfigError("reconstruction_loss: no layers to match")
    cosines = {name: layer_cosine(student[name], teacher[name], reduction, valid, eps) for name in layers}
    return 1.0 - torch.stack(list(cosines.values())).mean(), cosines
