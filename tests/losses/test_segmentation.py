"""Segmentation losses against torch's cross-entropy and segmentation-models-pytorch's DiceLoss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss

from xmodal.losses import pixel_cross_entropy, predict_classes, segmentation_loss, soft_dice_loss

IGNORE = 255


def example(classes: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, classes, 6, 5, generator=generator, requires_grad=True)
    target = torch.randint(0, max(classes, 2), (3, 6, 5), generator=generator)
    target[0, :2] = IGNORE
    return logits, target


def test_cross_entropy_matches_torch_with_unit_weights():
    logits, target = example(4)
    assert torch.allclose(pixel_cross_entropy(logits, target, IGNORE), F.cross_entropy(logits, target, ignore_index=IGNORE), atol=1e-6)
    binary, mask = example(1)
    valid = mask != IGNORE
    expected = F.binary_cross_entropy_with_logits(binary[:, 0][valid], mask[valid].float())
    assert torch.allclose(pixel_cross_entropy(binary, mask, IGNORE), expected, atol=1e-6)


def test_weighted_cross_entropy_is_normalised_by_the_weights():
    logits, target = example(4)
    weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(1))
    valid = (target != IGNORE).float()
    per_pixel = F.cross_entropy(logits, torch.where(target == IGNORE, 0, target), reduction="none")
    expected = (per_pixel * weight * valid).sum() / (weight * valid).sum()
    assert torch.allclose(pixel_cross_entropy(logits, target, IGNORE, weight), expected, atol=1e-6)
    # Weights that are constant change nothing; zero weights give zero loss and no NaN.
    assert torch.allclose(pixel_cross_entropy(logits, target, IGNORE, torch.full(target.shape, 3.0)), pixel_cross_entropy(logits, target, IGNORE), atol=1e-6)
    zero = pixel_cross_entropy(logits, target, IGNORE, torch.zeros(target.shape))
    assert zero == 0 and torch.isfinite(zero)


@pytest.mark.parametrize("classes", [1, 4])
def test_soft_dice_matches_smp_without_smoothing(classes: int):
    logits, target = example(classes)
    ours = soft_dice_loss(logits, target, IGNORE, smooth=0.0)
    mode = "binary" if classes == 1 else "multiclass"
    reference = DiceLoss(mode, from_logits=True, smooth=0.0, eps=1e-12, ignore_index=IGNORE)(logits, target)
    if classes > 1:
        # smp averages over every class with absent ones counted as 0 loss; ours over present classes.
        present = torch.unique(target[target != IGNORE]).numel()
        reference = reference * classes / present
    assert torch.allclose(ours, reference, atol=1e-5)


def test_weighted_dice_equals_the_hand_formula():
    logits, target = example(3)
    weight = torch.rand(target.shape, generator=torch.Generator().manual_seed(2))
    valid = (target != IGNORE).float() * weight
    probability = logits.softmax(1)
    one_hot = F.one_hot(torch.where(target == IGNORE, 0, target), 3).permute(0, 3, 1, 2).float()
    intersection = (probability * one_hot * valid[:, None]).sum((0, 2, 3))
    cardinality = (probability * valid[:, None]).sum((0, 2, 3)) + (one_hot * valid[:, None]).sum((0, 2, 3))
    present = (one_hot * valid[:, None]).sum((0, 2, 3)) > 0
    expected = 1 - ((2 * intersection + 1) / (cardinality + 1))[present].mean()
    assert torch.allclose(soft_dice_loss(logits, target, IGNORE, weight), expected, atol=1e-6)


def test_a_batch_with_no_label_contributes_nothing_but_keeps_the_graph():
    logits, _ = example(4)
    unknown = torch.full((3, 6, 5), IGNORE)
    loss = segmentation_loss(logits, unknown, IGNORE)
    loss.backward()
    assert loss == 0 and logits.grad is not None and logits.grad.abs().max() == 0


def test_predict_classes_for_binary_and_multiclass():
    assert predict_classes(torch.tensor([[[[0.5, -0.5]]]])).tolist() == [[[1, 0]]]
    assert predict_classes(torch.tensor([[[[0.1]], [[0.9]]]])).tolist() == [[[1]]]
