"""Squared sliced Wasserstein distance against POT, and its class-conditional form."""

from __future__ import annotations

import ot
import pytest
import torch

from xmodal.errors import ConfigError
from xmodal.losses import class_sliced_wasserstein, random_projections, sliced_wasserstein


def sets(n: int = 20, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator, dtype=torch.float64), torch.randn(n, d, generator=generator, dtype=torch.float64) + 0.5


def test_equals_pot_with_fixed_projections():
    x, y = sets()
    theta = random_projections(6, 16, generator=torch.Generator().manual_seed(1)).double()
    assert torch.allclose(theta.norm(dim=0), torch.ones(16, dtype=torch.float64))
    reference = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), projections=theta.numpy(), p=2) ** 2
    assert sliced_wasserstein(x, y, theta).item() == pytest.approx(reference, rel=1e-9)


def test_zero_for_identical_sets_and_invariant_to_sample_order():
    x, y = sets()
    theta = random_projections(6, 8, generator=torch.Generator().manual_seed(2)).double()
    assert sliced_wasserstein(x, x, theta).item() == pytest.approx(0.0, abs=1e-12)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    assert sliced_wasserstein(x[order], y, theta).item() == pytest.approx(sliced_wasserstein(x, y, theta).item(), rel=1e-12)
    with pytest.raises(ConfigError, match="equal size"):
        sliced_wasserstein(x, y[:5], theta)


def test_class_term_skips_absent_classes_and_subsamples_to_equal_counts():
    x, y = sets(12)
    theta = random_projections(6, 8, generator=torch.Generator().manual_seed(4)).double()
    labels_x = torch.tensor([0] * 6 + [1] * 4 + [2] * 2)
    labels_y = torch.tensor([0] * 3 + [1] * 4 + [-1] * 5)  # class 2 missing, 5 unlabelled
    total, counted = class_sliced_wasserstein(x, labels_x, y, labels_y, theta, generator=torch.Generator().manual_seed(5))
    assert counted == 2
    # Class 1 has 4 on both sides: exact. Class 0: 6 vs 3, so 3 of the 6 are drawn.
    class1 = sliced_wasserstein(x[6:10], y[3:7], theta)
    class0_options = [sliced_wasserstein(x[list(c)], y[:3], theta).item() for c in __import__("itertools").combinations(range(6), 3)]
    class0 = total.item() - class1.item()
    assert min(abs(class0 - option) for option in class0_options) < 1e-9
    none, zero = class_sliced_wasserstein(x, torch.zeros(12, dtype=torch.long), y, torch.ones(12, dtype=torch.long), theta)
    assert zero == 0 and none.item() == 0.0
