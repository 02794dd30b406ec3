"""InfoNCE, NT-Xent and SupCon against pytorch-metric-learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml

from xmodal.errors import ConfigError
from xmodal.losses import info_nce, nt_xent, supervised_contrastive


def embeddings(n: int = 8, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=generator), torch.randn(n, d, generator=generator)


@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_directed_pair_term_equals_ntxent_with_reference_embeddings(temperature: float):
    z_i, z_j = embeddings()
    index = torch.arange(len(z_i))
    # ref_labels must be another tensor object, or pytorch-metric-learning drops the positives.
    reference = pml.NTXentLoss(temperature=temperature)(z_i, index, ref_emb=z_j, ref_labels=index.clone())
    assert torch.allclose(info_nce(z_i, z_j, temperature), reference, atol=1e-5)
    direct = F.cross_entropy(F.normalize(z_i, dim=1) @ F.normalize(z_j, dim=1).T / temperature, index)
    assert torch.allclose(info_nce(z_i, z_j, temperature), direct, atol=1e-6)


def test_info_nce_with_a_larger_key_set_and_explicit_positives():
    z_i, z_j = embeddings(6)
    keys = torch.cat([torch.randn(4, 5, generator=torch.Generator().manual_seed(3)), z_j])  # 4 extra keys before
    shifted = info_nce(z_i, keys, 0.2, positives=torch.arange(6) + 4)
    expected = F.cross_entropy(F.normalize(z_i, dim=1) @ F.normalize(keys, dim=1).T / 0.2, torch.arange(6) + 4)
    assert torch.allclose(shifted, expected, atol=1e-6)


def test_nt_xent_equals_pml_over_both_views():
    first, second = embeddings()
    labels = torch.arange(len(first)).repeat(2)
    reference = pml.NTXentLoss(temperature=0.3)(torch.cat([first, second]), labels)
    assert torch.allclose(nt_xent(first, second, 0.3), reference, atol=1e-5)


def test_supcon_equals_pml_on_normalised_features():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(10, 2, 6, generator=generator)
    labels = torch.randint(0, 3, (10,), generator=generator)
    flat = F.normalize(torch.cat(torch.unbind(features, dim=1)), dim=1)
    reference = pml.SupConLoss(temperature=0.1)(flat, labels.repeat(2))
    assert torch.allclose(supervised_contrastive(features, labels, 0.1), reference, atol=1e-5)


def test_aligned_views_score_lower_than_shuffled_ones_and_temperature_is_checked():
    z, _ = embeddings(16)
    noisy = z + 0.05 * torch.randn(z.shape, generator=torch.Generator().manual_seed(5))
    shuffled = noisy[torch.randperm(16, generator=torch.Generator().manual_seed(6))]
    assert info_nce(z, noisy, 0.1) < info_nce(z, shuffled, 0.1)
    with pytest.raises(ConfigError, match="temperature"):
        info_nce(z, noisy, 0.0)
