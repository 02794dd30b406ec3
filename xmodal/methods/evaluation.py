"""Dataset-level metrics and evaluation panels.

IoU is accumulated over the whole split (one confusion matrix), which is what the papers report;
averaging per-batch IoUs would weight small tiles wrongly. Metric objects never synchronise across
workers here: the engine evaluates on rank 0 over the whole split.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.classification import BinaryConfusionMatrix, MulticlassConfusionMatrix  # noqa: E402

from xmodal.methods.base import PanelItem  # noqa: E402


class SegmentationMeter:
    """Accumulates a confusion matrix over a split and turns it into IoU metrics.

    Args:
        num_classes: Classes of the mask; 2 means binary (class 1 = foreground, e.g. building).
        class_names: Names for per-class reporting.
        ignore_index: Label value that is skipped.
    """

    def __init__(self, num_classes: int, class_names: list[str], ignore_index: int) -> None:
        self.num_classes = num_classes
        self.class_names = class_names
        self.binary = num_classes == 2
        if self.binary:
            self.matrix = BinaryConfusionMatrix(ignore_index=ignore_index, sync_on_compute=False)
        else:
            self.matrix = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, sync_on_compute=False)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``prediction`` holds class indices (B x H x W), ``target`` labels."""
        self.matrix.update(prediction.detach().cpu(), target.detach().cpu())

    def compute(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Flat metrics and per-class IoU.

        Binary: ``iou`` (foreground IoU over the split), ``f1``, ``precision``, ``recall``,
        ``accuracy``, ``miou`` (mean of both classes). Multi-class: ``miou`` over classes present in
        the truth or the prediction, ``accuracy`` (overall), per-class IoU.
        """
        matrix = self.matrix.compute().double()
        true_positive = matrix.diag()
        false_positive = matrix.sum(0) - true_positive
        false_negative = matrix.sum(1) - true_positive
        union = true_positive + false_positive + false_negative
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
        total = matrix.sum().clamp(min=1)
        per_class = {
            name: {"iou": float(iou[i]), "pixels": float(matrix[i].sum())} for i, name in enumerate(self.class_names)
        }
        metrics = {
            "accuracy": float(true_positive.sum() / total),
            "miou": float(torch.nanmean(iou)) if not torch.isnan(iou).all() else float("nan"),
        }
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


class ClassificationMeter:
    """Overall accuracy, average (per-class) accuracy and Cohen's kappa over a split."""

    def __init__(self, num_classes: int, class_names: list[str]) -> None:
        self.class_names = class_names
        self.matrix = MulticlassConfusionMatrix(num_classes, sync_on_compute=False)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        self.matrix.update(prediction.detach().cpu(), target.detach().cpu())

    def compute(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        matrix = self.matrix.compute().double()
        total = matrix.sum().clamp(min=1)
        support = matrix.sum(1)
        recall = torch.where(support > 0, matrix.diag() / support.clamp(min=1), torch.full_like(support, float("nan")))
        observed = matrix.diag().sum() / total
        expected = (matrix.sum(0) * matrix.sum(1)).sum() / total**2
        metrics = {
            "accuracy": float(observed),
            "average_accuracy": float(torch.nanmean(recall)),
            "kappa": float((observed - expected) / (1 - expected)) if expected < 1 else 0.0,
        }
        per_class = {name: {"recall": float(recall[i]), "count": float(support[i])} for i, name in enumerate(self.class_names)}
        return metrics, per_class


def optical_to_rgb(optical: np.ndarray, band_names: list[str]) -> np.ndarray:
    """A displayable RGB (H x W x 3 in [0, 1]) from normalised optical bands, percentile-stretched."""
    wanted = [name for name in ("B04", "B03", "B02") if name in band_names]
    indices = [band_names.index(n) for n in wanted] if len(wanted) == 3 else list(range(min(3, optical.shape[0])))
    while len(indices) < 3:
        indices.append(indices[-1])
    rgb = np.stack([optical[i] for i in indices], axis=-1).astype(np.float64)
    low, high = np.percentile(rgb, 2), np.percentile(rgb, 98)
    return np.clip((rgb - low) / max(high - low, 1e-6), 0, 1)


def render_panels(items: list[PanelItem], path: str | Path, class_count: int, title: str = "") -> Path:
    """Write a PNG with one row per item: optical | SAR (dB) | truth | prediction."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = max(1, len(items))
    figure, axes = plt.subplots(rows, 4, figsize=(12, 3 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10" if class_count <= 10 else "tab20", max(class_count, 2))
    for row, item in enumerate(items):
        sar_low, sar_high = np.nanpercentile(item.sar_db, [2, 98])
        panels = [
            ("optical", item.optical_rgb, {}),
            ("SAR (dB)", item.sar_db, {"cmap": "gray", "vmin": sar_low, "vmax": sar_high}),
            ("truth", np.ma.masked_greater_equal(item.truth, class_count), {"cmap": cmap, "vmin": 0, "vmax": max(class_count - 1, 1)}),
            ("prediction", item.prediction, {"cmap": cmap, "vmin": 0, "vmax": max(class_count - 1, 1)}),
        ]
        for column, (name, image, style) in enumerate(panels):
            axis = axes[row][column]
            shown = axis.imshow(image, interpolation="nearest", **style)
            if name == "SAR (dB)":
                figure.colorbar(shown, ax=axis, fraction=0.046)
            axis.set_title(f"{name}{' - ' + item.title if column == 0 and item.title else ''}", fontsize=9)
            axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
