"""Squared sliced Wasserstein distance between two embedding sets (paper 002's alignment terms).

``SW^2(X, Y) = mean over L unit directions theta of W2^2(X theta, Y theta)``; in one dimension and
with equal counts, ``W2^2`` is the mean squared difference of the two sorted projections. The
directions are drawn again at every step in training (:func:`random_projections`); tests fix them.

:func:`class_sliced_wasserstein` is the class-conditional term: ``sum over classes present on both
sides of SW^2`` between the samples of that class, each side subsampled to the smaller count.

Reference checked in ``tests/losses/test_sliced_wasserstein.py``:
``ot.sliced_wasserstein_distance(X, Y, projections=P, p=2) ** 2`` (POT returns the square root).

Example::

    theta = random_projections(embedding_dim, 64, device=z_eo.device)
    align = sliced_wasserstein(z_eo, z_sar, theta)
"""

from __future__ import annotations

import torch

from xmodal.errors import ConfigError


def random_projections(dim: int, count: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """``count`` directions drawn uniformly on the unit sphere of R^dim, as a dim x count matrix."""
    if dim < 1 or count < 1:
        raise ConfigError(f"random_projections: dim={dim} and count={count} must be >= 1")
    directions = torch.randn(dim, count, generator=generator, device=generator.device if generator is not None else device)
    return directions / directions.norm(dim=0, keepdim=True).clamp(min=1e-12)


def sliced_wasserstein(source: torch.Tensor, target: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Squared sliced 2-Wasserstein distance of two equally sized sets.

    Args:
        source: N x D samples.
        target: N x D samples.
        projections: D x L unit directions.

    Raises:
        ConfigError: The sets differ in size or dimension, or the projections do not fit.
    """
    if source.dim() != 2 or source.shape != target.shape:
        raise ConfigError(f"sliced_wasserstein: expected two N x D sets of equal size, got {tuple(source.shape)} and {tuple(target.shape)}")
    if projections.dim() != 2 or projections.shape[0] != source.shape[1]:
        raise ConfigError(f"sliced_wasserstein: projections {tuple(projections.shape)} do not fit {source.shape[1]}-d samples")
    projected_source = torch.sort(source @ projections, dim=0).values
    projected_target = torch.sort(target @ projections, dim=0).values
    return ((projected_source - projected_target) ** 2).mean()


def class_sliced_wasserstein(
    source: torch.Tensor,
    source_labels: torch.Tensor,
    target: torch.Tensor,
    target_labels: torch.Tensor,
    projections: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum over classes present on both sides of the SW^2 between that class's samples.

    Each side is subsampled (without replacement, from ``generator``) to the smaller of the two
    counts; a class missing on either side is skipped. Labels < 0 (unlabelled) never count.

    Returns:
        (the sum, the number of classes that counted); the sum is 0 (with a graph) when none did.
    """
    total = source.sum() * 0.0 + target.sum() * 0.0
    counted = 0
    classes = torch.unique(source_labels[source_labels >= 0])
    for label in classes.tolist():
        source_rows = torch.nonzero(source_labels == label).flatten()
        target_rows = torch.nonzero(target_labels == label).flatten()
        size = min(len(source_rows), len(target_rows))
        if size == 0:
            continue
        if len(source_rows) > size:
            source_rows = source_rows[torch.randperm(len(source_rows), generator=generator)[:size].to(source_rows.device)]
        if len(target_rows) > size:
            target_rows = target_rows[torch.randperm(len(target_rows), generator=generator)[:size].to(target_rows.device)]
        total = total + sliced_wasserstein(source[source_rows], target[target_rows], projections)
        counted += 1
    return total, counted
