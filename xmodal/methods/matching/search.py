"""Template matching by descriptors (paper 004, Sec. 4): crops, the cosine correspondence map of an
optical template over a SAR search region, its peak, and the error statistics of Fig. 4.

A search region of side S and a template of side t give ``n = (S - t) / stride + 1`` window
positions per axis (S = 256, t = 128, stride 1: the paper's 129 x 129 map). Window (i, j) is the
SAR crop whose top-left corner is ``(i * stride, j * stride)``; a template cut from the optical
tile at the same corner corresponds to it, so the truth of a template cut at ``(dy, dx)`` is the
window ``(dy / stride, dx / stride)`` (``(64, 64)`` for the paper's centred pairs).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


def crop(images: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """B x C x size x size crops of B x C x H x W images, each at its own top-left ``corners[b] = (row, col)``."""
    return torch.stack([images[b, :, int(r) : int(r) + size, int(c) : int(c) + size] for b, (r, c) in enumerate(corners.tolist())])


def window_count(search: int, template: int, stride: int) -> int:
    """Window positions per axis of a ``search``-sided region for a ``template``-sided window."""
    if template > search or (search - template) % stride:
        raise ValueError(f"search side {search}, template side {template}, stride {stride}: (search - template) must be a multiple of the stride")
    return (search - template) // stride + 1


def correspondence_map(
    encode: Callable[[torch.Tensor], torch.Tensor],
    search: torch.Tensor,
    template_descriptor: torch.Tensor,
    template: int,
    stride: int = 1,
    chunk: int = 256,
) -> torch.Tensor:
    """n x n cosine similarities between one template's descriptor and every window of a search region.

    Args:
        encode: SAR descriptor network (N x C x t x t -> N x D), in eval mode.
        search: C x S x S search region.
        template_descriptor: D descriptor of the optical template.
        template: Window side t.
        stride: Step between window positions.
        chunk: Windows encoded per call.
    """
    n = window_count(search.shape[-1], template, stride)
    windows = search.unfold(1, template, stride).unfold(2, template, stride)  # C x n x n x t x t
    windows = windows.permute(1, 2, 0, 3, 4).reshape(n * n, search.shape[0], template, template)
    reference = F.normalize(template_descriptor.reshape(1, -1), dim=1)
    scores = [F.normalize(encode(windows[i : i + chunk]), dim=1) @ reference.T for i in range(0, n * n, chunk)]
    return torch.cat(scores).reshape(n, n)


def peak(similarity: torch.Tensor) -> tuple[int, int]:
    """(row, col) of the highest value of a map (the first one on ties)."""
    index = int(torch.argmax(similarity))
    return index // similarity.shape[1], index % similarity.shape[1]


def error_statistics(errors: np.ndarray, thresholds: tuple[int, ...] = (1, 2, 3)) -> dict[str, float]:
    """Fig. 4's summary of pixel errors: mean, median, 1st percentile, and the share within each threshold."""
    if errors.size == 0:
        return {}
    stats = {"mean_error": float(errors.mean()), "median_error": float(np.median(errors)), "p1_error": float(np.percentile(errors, 1))}
    stats.update({f"within_{t}px": float((errors <= t).mean()) for t in thresholds})
    return stats
