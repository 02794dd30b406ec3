"""Contrastive losses on embeddings: InfoNCE (one directed view pair), NT-Xent (SimCLR) and SupCon.

Every function L2-normalises its inputs, so similarities are cosines divided by the temperature.

* :func:`info_nce` is one directed pair term of contrastive multiview coding (paper 001): each query
  of view i must pick its own sample among the keys of view j (in-batch negatives of the *other*
  view only). ``positives`` lets the keys be a larger set than the queries, e.g. keys gathered from
  every data-parallel worker while the queries stay local.
* :func:`nt_xent` is SimCLR's loss over both views (negatives from both).
* :func:`supervised_contrastive` is Khosla et al.'s SupCon (paper 002 pretrains its EO encoder with it).
* :func:`multiview_info_nce` is contrastive multiview coding's full graph (paper 001, Eq. 2): the
  directed InfoNCE term of every ordered pair of views, summed or averaged.

References checked in ``tests/losses/test_contrastive.py``: ``pytorch_metric_learning.losses.NTXentLoss``
(one directed pair, ``ref_emb``; and NT-Xent over both views) and ``SupConLoss``.

Example::

    z_sar, z_eo = head_sar(f_sar), head_eo(f_eo)                  # B x D each
    loss = 0.5 * (info_nce(z_sar, z_eo, 0.1) + info_nce(z_eo, z_sar, 0.1))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import Callable, Sequence

from xmodal.errors import ConfigError


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ConfigError(f"contrastive temperature={temperature!r}; expected a number > 0")


def info_nce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    temperature: float = 0.1,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Directed InfoNCE: ``cross_entropy(q @ k.T / T, positives)`` on L2-normalised vectors.

    Args:
        queries: N x D embeddings of one view.
        keys: M x D embeddings of the other view (M >= N); by default key i is query i's positive.
        temperature: Softmax temperature (> 0; paper 001 uses 0.1).
        positives: N indices into ``keys`` of each query's positive (default ``arange(N)``).

    Returns:
        The mean over queries.
    """
    _check_temperature(temperature)
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ConfigError(f"info_nce: expected N x D queries and M x D keys, got {tuple(queries.shape)} and {tuple(keys.shape)}")
    logits = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T / temperature
    if positives is None:
        if keys.shape[0] < queries.shape[0]:
            raise ConfigError(f"info_nce: {keys.shape[0]} keys for {queries.shape[0]} queries; give positives")
        positives = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, positives)


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent over two views: each of the 2N embeddings against the other 2N - 1.

    Args:
        first, second: N x D embeddings of the same N samples under two views.
        temperature: Softmax temperature (> 0).
    """
    _check_temperature(temperature)
    if first.shape != second.shape:
        raise ConfigError(f"nt_xent: views have shapes {tuple(first.shape)} and {tuple(second.shape)}")
    count = first.shape[0]
    embeddings = F.normalize(torch.cat([first, second]), dim=1)
    logits = embeddings @ embeddings.T / temperature
    logits = logits.masked_fill(torch.eye(2 * count, dtype=torch.bool, device=logits.device), float("-inf"))
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(logits.device)
    return F.cross_entropy(logits, partner)


def supervised_contrastive(
    features: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.1,
    base_temperature: float | None = None,
) -> torch.Tensor:
    """SupCon (Khosla et al. 2020, the "L_out" form) over V views of B samples.

    For every anchor (each of the B x V embeddings), the mean log-probability of its positives (all
    other embeddings with the same label, including its other views) against every other embedding.
    Anchors without a positive are left out.

    Args:
        features: B x V x D embeddings (V >= 1 views per sample).
        labels: B class labels.
        temperature: Softmax temperature (> 0).
        base_temperature: The official code's rescaling ``temperature / base_temperature`` (default:
            equal to ``temperature``, i.e. no rescaling).
    """
    _check_temperature(temperature)
    if features.dim() != 3 or labels.shape != features.shape[:1]:
        raise ConfigError(f"supervised_contrastive: expected B x V x D features and B labels, got {tuple(features.shape)} and {tuple(labels.shape)}")
    batch, views = features.shape[:2]
    embeddings = F.normalize(torch.cat(torch.unbind(features, dim=1)), dim=1)  # (V B) x D, view-major
    anchor_labels = labels.repeat(views)
    logits = embeddings @ embeddings.T / temperature
    self_mask = torch.eye(batch * views, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_probability = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (anchor_labels[:, None] == anchor_labels[None, :]) & ~self_mask
    counts = positive.sum(1)
    has_positive = counts > 0
    if not has_positive.any():
        return features.sum() * 0.0
    mean_log_probability = torch.where(positive, log_probability, torch.zeros_like(log_probability)).sum(1)[has_positive] / counts[has_positive]
    scale = temperature / (base_temperature if base_temperature is not None else temperature)
    return -scale * mean_log_probability.mean()


def view_pairs(count: int, groups: Sequence[object] | None = None, same_group: bool = True) -> list[tuple[int, int]]:
    """Ordered pairs ``(a, b)``, ``a != b``, of ``count`` views; with ``same_group=False`` pairs of
    views in the same group (e.g. two augmentations of one modality) are left out."""
    pairs = [(a, b) for a in range(count) for b in range(count) if a != b]
    if groups is not None and not same_group:
        pairs = [(a, b) for a, b in pairs if groups[a] != groups[b]]
    return pairs


def multiview_info_nce(
    views: Sequence[torch.Tensor],
    temperature: float,
    pairs: Sequence[tuple[int, int]],
    *,
    reduction: str = "mean",
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    offset: int = 0,
) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]:
    """The full-graph loss of contrastive multiview coding over ordered view pairs.

    For each ordered pair ``(a, b)``: the directed term :func:`info_nce` with the queries of view a
    and the keys of view b (negatives: the other samples of view b).

    Args:
        views: V tensors of N x D embeddings, row i of every view from the same sample.
        temperature: Softmax temperature (> 0).
        pairs: Ordered pairs of view indices (see :func:`view_pairs`).
        reduction: ``sum`` (paper 001, Eq. 2) or ``mean`` over the pairs (the scale does not grow with
            the number of views).
        gather: Collects the keys of every data-parallel worker (``MethodContext.all_gather``), so
            negatives come from the whole global batch; ``None``: this worker's batch only.
        offset: Row of this worker's first sample among the gathered keys (rank x batch).

    Returns:
        (loss, {pair: directed term}).
    """
    if reduction not in ("sum", "mean"):
        raise ConfigError(f"multiview_info_nce reduction={reduction!r}; expected sum or mean")
    if not pairs:
        raise ConfigError("multiview_info_nce: no view pairs (at least two views are needed)")
    keys = [gather(view) if gather is not None else view for view in views]
    positives = torch.arange(views[0].shape[0], device=views[0].device) + offset
    terms = {(a, b): info_nce(views[a], keys[b], temperature, positives) for a, b in pairs}
    total = torch.stack(list(terms.values())).sum()
    return (total / len(terms) if reduction == "mean" else total), terms
