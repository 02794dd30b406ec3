"""CromSS sample selection (paper 003): confidences, thresholds and weights against a small example
computed by hand, the ramps of the official code, and the consistency loss against torch's KLDivLoss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmodal.losses import (
    consistency_loss,
    consistency_weights,
    cross_modal_confidence,
    entity_confidence,
    label_confidence,
    ramp,
    selection_thresholds,
    selection_weights,
)

IGNORE = 255


def pixels(rows: list[list[float]]) -> torch.Tensor:
    """N class distributions -> a 1 x C x 1 x N probability map."""
    return torch.tensor(rows).T.reshape(1, len(rows[0]), 1, len(rows))


# Six pixels, three classes. Noisy labels: class 0 three times, class 1 twice, class 2 once, one ignored.
TARGET = torch.tensor([[[0, 0, 0, 1, 1, 2, IGNORE]]])
SAR = pixels([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3], [1.0, 0.0, 0.0], [0.2, 0.6, 0.2], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
OPTICAL = pixels([[0.9, 0.05, 0.05], [0.2, 0.4, 0.4], [0.5, 0.5, 0.0], [0.1, 0.8, 0.1], [0.6, 0.2, 0.2], [0.3, 0.3, 0.4], [0.8, 0.1, 0.1]])


def hand_entity(p: list[float]) -> float:
    return 1 + sum(q * math.log(q) for q in p if q > 0) / math.log(len(p))


def test_confidences_and_class_balanced_weights_match_a_hand_computed_example():
    label_sar = label_confidence(SAR, TARGET, IGNORE)[0, 0].tolist()
    label_optical = label_confidence(OPTICAL, TARGET, IGNORE)[0, 0].tolist()
    assert label_sar == pytest.approx([0.7, 0.4, 1.0, 0.6, 0.25, 0.8, 0.0])  # the ignored pixel: 0
    assert label_optical == pytest.approx([0.9, 0.2, 0.5, 0.8, 0.2, 0.4, 0.0])
    entity = entity_confidence(SAR)[0, 0]
    assert not torch.isnan(entity).any()  # p = 0 entries (pixel 2) give no NaN
    assert entity.tolist() == pytest.approx([hand_entity(SAR[0, :, 0, i].tolist()) for i in range(7)], abs=1e-6)
    assert entity[2] == pytest.approx(1.0) and entity[6] == pytest.approx(0.0, abs=1e-6)  # one-hot: 1; uniform: 0
    # Eq. 2 by hand: (F_sar + F_sar * F_opt) / 2
    crossed = cross_modal_confidence(label_confidence(SAR, TARGET, IGNORE), label_confidence(OPTICAL, TARGET, IGNORE))
    expected = [(s + s * o) / 2 for s, o in zip(label_sar, label_optical)]  # 0.665, 0.24, 0.75, 0.54, 0.15, 0.56, 0
    assert crossed[0, 0].tolist() == pytest.approx(expected)
    # alpha = 0.5: class 0 keeps floor(1.5) = 1 pixel (w = 0.75), class 1 floor(1.0) = 1 (w = 0.54),
    # class 2 floor(0.5) = 0: weight 0.
    thresholds = selection_thresholds(crossed, TARGET, 0.5, 3, IGNORE, "class")
    assert thresholds[:2].tolist() == pytest.approx([0.75, 0.54]) and math.isnan(thresholds[2])
    weights = selection_weights(crossed, TARGET, thresholds, IGNORE, 0.5)[0, 0].tolist()
    assert weights == pytest.approx([0.665 / 0.75, 0.24 / 0.75, 1.0, 1.0, 0.15 / 0.54, 0.0, 0.0])


def test_global_threshold_and_the_limits_of_the_selection_ratio():
    crossed = cross_modal_confidence(label_confidence(SAR, TARGET, IGNORE), label_confidence(OPTICAL, TARGET, IGNORE))
    # Global: floor(0.5 * 6 labelled pixels) = 3rd highest of (0.665, 0.24, 0.75, 0.54, 0.15, 0.56) = 0.56
    thresholds = selection_thresholds(crossed, TARGET, 0.5, 3, IGNORE, "global")
    assert thresholds.tolist() == pytest.approx([0.56] * 3)
    weights = selection_weights(crossed, TARGET, thresholds, IGNORE, 0.5)[0, 0].tolist()
    assert weights == pytest.approx([1.0, 0.24 / 0.56, 1.0, 0.54 / 0.56, 0.15 / 0.56, 1.0, 0.0])
    # alpha = 1 keeps every labelled pixel at 1; alpha = 0 uses F' itself (the official code's limits).
    every = selection_weights(crossed, TARGET, selection_thresholds(crossed, TARGET, 1.0, 3, IGNORE), IGNORE, 1.0)
    assert every[0, 0].tolist() == [1.0] * 6 + [0.0]
    assert torch.allclose(selection_weights(crossed, TARGET, thresholds, IGNORE, 0.0), crossed)
    # A class whose threshold is 0 (every pixel confident 0) keeps all its pixels.
    zero = torch.zeros(1, 1, 4)
    labels = torch.tensor([[[1, 1, 1, 1]]])
    assert selection_weights(zero, labels, selection_thresholds(zero, labels, 0.5, 3, IGNORE), IGNORE, 0.5).tolist() == [[[1.0] * 4]]


def test_ramps_of_alpha_and_gamma_at_epochs_0_40_80():
    from xmodal.methods.cromss import CromssSettings

    settings = CromssSettings()  # exp ramp over 80 epochs to alpha 0.5, gamma 1
    expected_r = {0: math.exp(-5), 40: math.exp(-5 * 0.25), 80: 1.0}
    for epoch, r in expected_r.items():
        alpha, gamma = settings.schedule(epoch)
        assert alpha == pytest.approx(1 - 0.5 * r) and gamma == pytest.approx(r)
    assert settings.schedule(0)[0] == pytest.approx(0.99663, abs=1e-5) and settings.schedule(200) == (0.5, 1.0)
    assert ramp(40, 80, "linear") == 0.5 and ramp(3, 80, "none") == 1.0 and ramp(5, 0) == 1.0


def test_consistency_kl_matches_torch_and_soft_ce_has_the_same_gradient():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 4, 3, 3, generator=generator, requires_grad=True)
    target = torch.randn(2, 4, 3, 3, generator=generator)
    weight = torch.rand(2, 3, 3, generator=generator)
    reference = torch.nn.KLDivLoss(reduction="none", log_target=True)(F.log_softmax(student.detach(), 1), F.log_softmax(target, 1)).sum(1)
    kl = consistency_loss(student, target, weight, "kl")
    assert kl.detach().item() == pytest.approx(float((reference * weight).sum() / weight.sum()), rel=1e-5)
    (kl_grad,) = torch.autograd.grad(kl, student)
    (ce_grad,) = torch.autograd.grad(consistency_loss(student, target, weight, "ce"), student)
    assert torch.allclose(kl_grad, ce_grad, atol=1e-6)  # CE = KL + the target's entropy, a constant
    target.requires_grad_(True)
    consistency_loss(student, target, weight, "mse").backward()
    assert target.grad is None  # the target branch is detached
    assert consistency_loss(student, target, torch.zeros(2, 3, 3), "kl").item() == 0.0
    assert consistency_weights(torch.tensor([0.0, 0.5, 1.0]), 0.25).tolist() == [0.75, 0.875, 1.0]
