"""Layer cosine (paper 000, Eq. 2) against torch.nn.functional.cosine_similarity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.losses import layer_cosine, reconstruction_loss


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (3, 7)])
def test_cosine_matches_torch_both_reductions(shape):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(*shape, generator=generator), torch.randn(*shape, generator=generator)
    pixel = F.cosine_similarity(student, teacher, dim=1).mean()
    sample = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()
    assert torch.allclose(layer_cosine(student, teacher, "pixel"), pixel, atol=1e-6)
    assert torch.allclose(layer_cosine(student, teacher, "sample"), sample, atol=1e-6)
    assert torch.allclose(layer_cosine(student, teacher, "auto"), pixel, atol=1e-6)  # C > 1: per pixel
    # Eq. 2 over two layers: 1 - mean of the per-layer cosines.
    features_s, features_t = {"a": student, "b": teacher}, {"a": teacher, "b": teacher}
    loss, cosines = reconstruction_loss(features_s, features_t, ["a", "b"], "sample")
    assert torch.allclose(loss, 1 - (sample + 1) / 2, atol=1e-6) and set(cosines) == {"a", "b"}


def test_one_channel_logits_get_a_gradient_only_per_sample():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 1, 8, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 1, 8, 8, generator=generator)
    # Per pixel over one channel: sign(s) * sign(t), a constant +-1, no gradient.
    (1 - layer_cosine(student, teacher, "pixel")).backward()
    assert student.grad.abs().max() == 0
    student.grad = None
    (1 - layer_cosine(student, teacher)).backward()  # the default: auto -> per sample here
    assert student.grad.abs().max() > 1e-4
    expected = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()
    assert torch.allclose(layer_cosine(student, teacher), expected)


def test_zero_activations_and_invalid_pixels():
    student = torch.zeros(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4)
    for reduction in ("pixel", "sample"):
        value = layer_cosine(student, teacher, reduction)
        value.backward()
        assert value == 0 and torch.isfinite(student.grad).all()
    # Invalid input pixels are left out, at the layer's resolution (here 8x8 input -> 4x4 layer).
    student, teacher = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[:, :, 4:] = False  # right half missing
    kept = F.cosine_similarity(student[..., :2], teacher[..., :2], dim=1).mean()
    assert torch.allclose(layer_cosine(student, teacher, "pixel", valid), kept, atol=1e-6)
    halves = F.cosine_similarity(student[..., :2].flatten(1), teacher[..., :2].flatten(1), dim=1).mean()
    assert torch.allclose(layer_cosine(student, teacher, "sample", valid), halves, atol=1e-6)



def test_shape_mismatch_and_unknown_reduction_are_refused():
    with pytest.raises(ConfigError, match="differ"):
        layer_cosine(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))
    with pytest.raises(ConfigError, match="reduction"):
        layer_cosine(torch.zeros(2, 3), torch.zeros(2, 3), "channel")
