"""Margin contrastive loss (paper 004, Eq. 4) against a hand-written reference and pytorch-metric-learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml
from pytorch_metric_learning import reducers

from xmodal.errors import ConfigError
from xmodal.losses import margin_contrastive


def pairs(n: int = 10, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.randn(n, 8, generator=generator), torch.randn(n, 8, generator=generator)
    corresponding = torch.rand(n, generator=generator) < 0.5
    return first, second, corresponding


def test_squared_form_equals_equation_4():
    first, second, y = pairs()
    a, b = F.normalize(first, dim=1), F.normalize(second, dim=1)
    d2 = ((a - b) ** 2).sum(1)
    expected = (y.float() * d2 + (1 - y.float()) * torch.clamp(1.5 - d2, min=0)).mean()
    assert torch.allclose(margin_contrastive(first, second, y, 1.5), expected, atol=1e-6)


@pytest.mark.parametrize("corresponding", [True, False])
def test_unsquared_form_equals_pml_contrastive_loss(corresponding: bool):
    first, second, _ = pairs()
    n = len(first)
    labels = torch.full((n,), corresponding, dtype=torch.bool)
    embeddings = torch.cat([first, second])
    index = torch.arange(n)
    empty = torch.tensor([], dtype=torch.long)
    tuples = (index, index + n, empty, empty) if corresponding else (empty, empty, index, index + n)
    loss = pml.ContrastiveLoss(pos_margin=0, neg_margin=1.2, reducer=reducers.MeanReducer())
    reference = loss(embeddings, indices_tuple=tuples)
    assert torch.allclose(margin_contrastive(first, second, labels, 1.2, squared=False), reference, atol=1e-5)


def test_margin_must_be_positive():
    first, second, y = pairs()
    with pytest.raises(ConfigError, match="margin"):
        margin_contrastive(first, second, y, 0.0)
