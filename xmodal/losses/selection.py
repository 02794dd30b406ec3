"""Cross-modal sample selection of CromSS (paper 003): per-pixel confidences, selection weights,
the consistency loss between two branches, and the ramps of the selection ratio and weighting factor.

Per pixel, from a branch's *detached* softmax ``p`` over C classes and the noisy label ``y``:

* label confidence ``F_l = p[y]``;
* entity confidence ``F_e = 1 - H(p) / log C`` (Eq. 1; ``0 log 0 = 0``, so a one-hot ``p`` gives
  exactly 1 and never NaN), or the Gini form ``sum p^2`` (the official code's other option);
* cross-modal ``F'_d = (F_d + F_1 F_2) / 2`` (Eq. 2);
* segmentation weight ``W_l = min(1, F'_l / w)`` with ``w`` the ``floor(alpha n)``-th highest
  ``F'_l`` (Eq. 3). Class-balanced (the official code's default): ``n`` and ``w`` per noisy class,
  a class whose ``floor(alpha n_c)`` is 0 gets weight 0, and a class whose threshold is 0 gets
  weight 1; global (the paper text): one threshold over every labelled pixel. ``alpha = 1`` keeps
  every pixel at weight 1, ``alpha = 0`` uses ``F'_l`` itself, as the official code does;
* consistency weight ``W_e = (1 - gamma) + gamma F'_e``.

Thresholds are order statistics of the whole data-parallel batch: callers gather the confidences
and labels of every worker first (:func:`selection_thresholds` works on any flat tensors).

The consistency loss of one direction (``student`` learns the ``target`` branch's detached
distribution) is weighted per pixel by the *target* modality's ``W_e`` and normalised by the sum
of those weights: soft-target cross-entropy (official default), KL divergence (the paper; the
same gradient) or the squared difference of probabilities.

References checked in ``tests/losses/test_selection.py``: a hand-computed example, and
``torch.nn.KLDivLoss(reduction="none", log_target=True)`` for the KL form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CONFIDENCES = ("entropy", "gini")
BALANCES = ("class", "global")
CONSISTENCIES = ("ce", "kl", "mse", "none")
RAMPS = ("exp", "linear", "none")


def entity_confidence(probabilities: torch.Tensor, kind: str = "entropy") -> torch.Tensor:
    """B x H x W confidence of each pixel's class distribution, in [0, 1].

    Args:
        probabilities: B x C x H x W softmax outputs (detach them first).
        kind: ``entropy`` (``1 - H / log C``, Eq. 1) or ``gini`` (``sum_c p_c^2``).
    """
    if kind not in CONFIDENCES:
        raise ValueError(f"confidence kind {kind!r}; expected one of {list(CONFIDENCES)}")
    if kind == "gini":
        return (probabilities**2).sum(dim=1).clamp(0.0, 1.0)
    classes = probabilities.shape[1]
    entropy = -torch.special.xlogy(probabilities, probabilities).sum(dim=1)  # xlogy(0, 0) = 0: no NaN at p = 0
    return (1.0 - entropy / math.log(classes)).clamp(0.0, 1.0)


def label_confidence(probabilities: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """B x H x W probability each pixel gives its (noisy) label; 0 where the label is ``ignore_index``."""
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    picked = probabilities.gather(1, safe.unsqueeze(1)).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def cross_modal_confidence(own: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``(F_own + F_own * F_other) / 2`` (Eq. 2): high where both branches are confident."""
    return 0.5 * (own + own * other)


def selection_thresholds(
    confidence: torch.Tensor, target: torch.Tensor, ratio: float, num_classes: int, ignore_index: int, balance: str = "class"
) -> torch.Tensor:
    """The threshold ``w`` of Eq. 3 for each class (one value repeated for ``balance="global"``).

    Args:
        confidence: Cross-modal label confidences ``F'_l`` of any shape (e.g. gathered over workers).
        target: Noisy labels of the same shape.
        ratio: Selection ratio alpha in [0, 1].
        num_classes: C.
        ignore_index: Label value that never counts.
        balance: ``class`` (per noisy class) or ``global``.

    Returns:
        C thresholds: the ``floor(alpha n)``-th highest confidence; NaN where that count is 0 (the
        class gets weight 0; also a class absent from ``target``).
    """
    if balance not in BALANCES:
        raise ValueError(f"selection balance {balance!r}; expected one of {list(BALANCES)}")
    values, labels = confidence.detach().reshape(-1), target.reshape(-1)
    valid = labels != ignore_index
    thresholds = torch.full((num_classes,), float("nan"), dtype=values.dtype, device=values.device)

    def kth_highest(pool: torch.Tensor) -> torch.Tensor | None:
        count = int(pool.numel() * ratio)
        return torch.topk(pool, count, largest=True).values[-1] if count > 0 else None

    if balance == "global":
        threshold = kth_highest(values[valid])
        return thresholds if threshold is None else thresholds.fill_(float(threshold))
    for c in range(num_classes):
        threshold = kth_highest(values[valid & (labels == c)])
        if threshold is not None:
            thresholds[c] = threshold
    return thresholds


def selection_weights(
    confidence: torch.Tensor, target: torch.Tensor, thresholds: torch.Tensor, ignore_index: int, ratio: float
) -> torch.Tensor:
    """Soft selection weights ``W_l = min(1, F'_l / w)`` (Eq. 3), no gradient.

    Args:
        confidence: B x H x W cross-modal label confidences ``F'_l``.
        target: B x H x W noisy labels.
        thresholds: C thresholds from :func:`selection_thresholds` (over the data-parallel batch).
        ignore_index: Label value that never counts (weight 0).
        ratio: The selection ratio the thresholds came from: 1 keeps every labelled pixel at
            weight 1, 0 uses ``F'_l`` as the weight (the official code's two limits).
    """
    confidence = confidence.detach()
    valid = target != ignore_index
    zero = torch.zeros_like(confidence)
    if ratio >= 1:
        return torch.where(valid, torch.ones_like(confidence), zero)
    if ratio <= 0:
        return torch.where(valid, confidence, zero)
    safe = torch.where(valid, target, torch.zeros_like(target)).long()
    threshold = thresholds.to(confidence)[safe]
    scaled = (confidence / threshold.clamp(min=torch.finfo(confidence.dtype).tiny)).clamp(0.0, 1.0)
    weight = torch.where(threshold > 0, scaled, torch.ones_like(confidence))  # a threshold of 0: every pixel of the class
    weight = torch.where(torch.isnan(threshold), zero, weight)  # no pixel of the class selected
    return torch.where(valid, weight, zero)


def consistency_weights(entity: torch.Tensor, gamma: float) -> torch.Tensor:
    """``W_e = (1 - gamma) + gamma * F'_e``, no gradient."""
    return (1.0 - gamma) + gamma * entity.detach()


def consistency_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, weight: torch.Tensor | None = None, kind: str = "ce") -> torch.Tensor:
    """One direction of the consistency loss: ``student`` learns the detached ``target`` distribution.

    Args:
        student_logits / target_logits: B x C x H x W scores of the two branches.
        weight: B x H x W pixel weights (the *target* modality's ``W_e``; 0 drops a pixel);
            ``None``: every pixel at 1.
        kind: ``ce`` (soft-target cross-entropy), ``kl`` (``KL(target || student)``) or ``mse``
            (squared difference of probabilities, summed over classes).

    Returns:
        ``sum(w * loss per pixel) / sum(w)`` (0 with a graph when the weights sum to 0).
    """
    if kind not in CONSISTENCIES or kind == "none":
        raise ValueError(f"consistency kind {kind!r}; expected one of {[k for k in CONSISTENCIES if k != 'none']}")
    log_student = F.log_softmax(student_logits, dim=1)
    log_target = F.log_softmax(target_logits.detach(), dim=1)
    if kind == "ce":
        per_pixel = -(log_target.exp() * log_student).sum(dim=1)
    elif kind == "kl":
        per_pixel = F.kl_div(log_student, log_target, reduction="none", log_target=True).sum(dim=1)
    else:
        per_pixel = ((log_student.exp() - log_target.exp()) ** 2).sum(dim=1)
    if weight is None:
        return per_pixel.mean()
    weight = weight.detach().to(per_pixel)
    total = weight.sum()
    if total <= 0:
        return student_logits.sum() * 0.0
    return (per_pixel * weight).sum() / total


def ramp(epoch: int, length: int, kind: str = "exp") -> float:
    """The official ramp-up factor r at ``epoch`` (0-based) over ``length`` epochs, in [0, 1].

    ``exp``: ``exp(-5 (1 - t / length)^2)`` for t < length (the "sigmoid" ramp of Laine & Aila);
    ``linear``: ``t / length``; ``none``: 1. 1 from ``length`` on (and for ``length`` 0).
    """
    if kind not in RAMPS:
        raise ValueError(f"ramp kind {kind!r}; expected one of {list(RAMPS)}")
    if kind == "none" or length <= 0 or epoch >= length:
        return 1.0
    t = max(0.0, float(epoch)) / length
    return math.exp(-5.0 * (1.0 - t) ** 2) if kind == "exp" else t
