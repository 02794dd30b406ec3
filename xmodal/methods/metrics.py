"""Dataset-level metrics that every data-parallel worker accumulates on its share and reduces.

IoU is accumulated over the whole split (one confusion matrix), which is what the papers report;
averaging per-batch IoUs would weight small tiles wrongly. Each worker evaluates its share of a
split; ``compute(reduce)`` sums the meters over workers first (``reduce`` is the method context's
``all_reduce``), so every worker returns the same numbers.
"""

from __future__ import annotations

from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _confusion(prediction: torch.Tensor, target: torch.Tensor, classes: int, ignore_index: int | None) -> torch.Tensor:
    prediction, target = prediction.detach().reshape(-1).long().cpu(), target.detach().reshape(-1).long().cpu()
    keep = (target >= 0) & (target < classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    prediction, target = prediction[keep].clamp(0, classes - 1), target[keep]
    return torch.bincount(target * classes + prediction, minlength=classes * classes).reshape(classes, classes).double()


class ConfusionMeter:
    """A classes x classes confusion matrix (rows: truth, columns: prediction) over a split."""

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of class indices (any shape; ``ignore_index`` targets are skipped)."""
        self.matrix += _confusion(prediction, target, self.num_classes, self.ignore_index)

    def total(self, reduce: Reduce | None = None) -> torch.Tensor:
        return reduce(self.matrix.clone()) if reduce is not None else self.matrix.clone()


class SegmentationMeter(ConfusionMeter):
    """Per-pixel confusion matrix -> IoU metrics.

    Args:
        num_classes: Classes of the mask; 2 means binary (class 1 = foreground, e.g. building).
        class_names: Names for per-class reporting.
        ignore_index: Label value that is skipped.
    """

    def __init__(self, num_classes: int, class_names: list[str], ignore_index: int) -> None:
        super().__init__(num_classes, ignore_index)
        self.class_names = class_names
        self.binary = num_classes == 2

    def compute(self, reduce: Reduce | None = None) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Flat metrics and per-class IoU.

        Binary: ``iou`` (foreground IoU over the split), ``f1``, ``precision``, ``recall``,
        ``accuracy``, ``miou`` (mean of both classes). Multi-class: ``miou`` over classes present in
        the truth or the prediction, ``accuracy`` (overall, OA), ``average_accuracy`` (AA: the mean
        recall of the classes present in the truth), per-class IoU and recall.
        """
        matrix = self.total(reduce)
        true_positive = matrix.diag()
        false_positive = matrix.sum(0) - true_positive
        false_negative = matrix.sum(1) - true_positive
        union = true_positive + false_positive + false_negative
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
        total = matrix.sum().clamp(min=1)
        support = matrix.sum(1)
        recall = torch.where(support > 0, true_positive / support.clamp(min=1), torch.full_like(support, float("nan")))
        per_class = {name: {"iou": float(iou[i]), "recall": float(recall[i]), "pixels": float(support[i])} for i, name in enumerate(self.class_names)}
        metrics = {
            "accuracy": float(true_positive.sum() / total),
            "miou": float(torch.nanmean(iou)) if not torch.isnan(iou).all() else float("nan"),
        }
        if not self.binary:
            metrics["average_accuracy"] = float(torch.nanmean(recall)) if not torch.isnan(recall).all() else float("nan")
        if self.binary:
            tp, fp, fn = (float(v[1]) for v in (true_positive, false_positive, false_negative))
            precision = tp / (tp + fp) if tp + fp else 0.0
            recall = tp / (tp + fn) if tp + fn else 0.0
            metrics.update(
                iou=float(iou[1]) if not torch.isnan(iou[1]) else 0.0,
                precision=precision,
                recall=recall,
                f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            )
        return metrics, per_class


class ClassificationMeter(ConfusionMeter):
    """Overall accuracy, average (per-class) accuracy and Cohen's kappa over a split."""

    def __init__(self, num_classes: int, class_names: list[str]) -> None:
        super().__init__(num_classes, None)
        self.class_names = class_names

    def compute(self, reduce: Reduce | None = None) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        matrix = self.total(reduce)
        total = matrix.sum().clamp(min=1)
        support = matrix.sum(1)
        recall = torch.where(support > 0, matrix.diag() / support.clamp(min=1), torch.full_like(support, float("nan")))
        observed = matrix.diag().sum() / total
        expected = (matrix.sum(0) * matrix.sum(1)).sum() / total**2
        metrics = {
            "accuracy": float(observed),
            "average_accuracy": float(torch.nanmean(recall)) if not torch.isnan(recall).all() else float("nan"),
            "kappa": float((observed - expected) / (1 - expected)) if expected < 1 else 0.0,
        }
        per_class = {name: {"recall": float(recall[i]), "count": float(support[i])} for i, name in enumerate(self.class_names)}
        return metrics, per_class


class MeanMeter:
    """Weighted means of named scalars (losses, cosines) over a split."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0.0

    def update(self, values: dict[str, float | torch.Tensor], weight: float = 1.0) -> None:
        """Add one batch's values with its weight (e.g. its number of samples)."""
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
        self.count += weight

    def compute(self, reduce: Reduce | None = None, keys: list[str] | None = None) -> dict[str, float]:
        """The means; ``keys`` fixes the order (and set) of names, which every worker must share."""
        names = keys if keys is not None else sorted(self.sums)
        packed = torch.tensor([self.sums.get(k, 0.0) for k in names] + [self.count], dtype=torch.float64)
        if reduce is not None:
            packed = reduce(packed)
        count = float(packed[-1])
        return {k: float(packed[i]) / count if count else float("nan") for i, k in enumerate(names)}
