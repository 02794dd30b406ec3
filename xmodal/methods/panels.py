"""What a method hands the report layer to draw: evaluation panels and artifacts (no plotting here).

A panel is rows of images laid out as the method chooses (:class:`PanelRow` of
:class:`PanelImage`); an artifact is a named figure's data (:class:`Artifact`: a histogram, a
curve, an image or plain values) that the run saves under ``artifacts/`` and ``xmodal report``
draws. Drawing lives in :mod:`xmodal.figures` so that importing a method never imports matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

IMAGE_KINDS = ("rgb", "gray", "labels", "heat")
ARTIFACT_KINDS = ("histogram", "curve", "image", "values")


@dataclass
class PanelImage:
    """One image of a panel row.

    Attributes:
        title: Column title.
        image: H x W (gray, labels, heat) or H x W x 3 in [0, 1] (rgb).
        kind: ``rgb``, ``gray`` (percentile-stretched, with a colour bar), ``labels`` (class
            indices; values >= ``classes`` are shown as unknown) or ``heat`` (a score map with a colour bar).
        classes: Number of classes of a ``labels`` image.
        unit: Colour-bar label of ``gray`` / ``heat`` images.
    """

    title: str
    image: np.ndarray
    kind: str = "gray"
    classes: int = 0
    unit: str = ""

    def __post_init__(self) -> None:
        if self.kind not in IMAGE_KINDS:
            raise ValueError(f"PanelImage kind={self.kind!r}; expected one of {IMAGE_KINDS}")


@dataclass
class PanelRow:
    """One row of a panel (e.g. one test tile)."""

    images: list[PanelImage]
    title: str = ""


@dataclass
class Artifact:
    """Data of a figure a run saves and its report draws.

    Attributes:
        kind: ``histogram`` (``data["counts"]`` over ``data["edges"]``), ``curve`` (``data["x"]``,
            ``data["y"]``), ``image`` (``data["image"]``, 2-D) or ``values`` (any named arrays).
        data: Named arrays or lists.
        title, xlabel, ylabel: Figure labels.
    """

    kind: str
    data: dict[str, Any]
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ARTIFACT_KINDS:
            raise ValueError(f"Artifact kind={self.kind!r}; expected one of {ARTIFACT_KINDS}")


def optical_to_rgb(optical: np.ndarray, band_names: Sequence[str]) -> np.ndarray:
    """A displayable RGB (H x W x 3 in [0, 1]) from normalised optical bands, percentile-stretched."""
    names = list(band_names)
    wanted = [name for name in ("B04", "B03", "B02") if name in names]
    indices = [names.index(n) for n in wanted] if len(wanted) == 3 else list(range(min(3, optical.shape[0])))
    while len(indices) < 3:
        indices.append(indices[-1])
    rgb = np.stack([optical[i] for i in indices], axis=-1).astype(np.float64)
    low, high = np.percentile(rgb, 2), np.percentile(rgb, 98)
    return np.clip((rgb - low) / max(high - low, 1e-6), 0, 1)


def segmentation_rows(
    batch: dict[str, Any],
    truth: np.ndarray,
    prediction: np.ndarray,
    *,
    optical_bands: Sequence[str],
    sar_mean: float,
    sar_std: float,
    classes: int,
    limit: int,
) -> list[PanelRow]:
    """Rows of optical | SAR (first band, dB) | truth | prediction for the first ``limit`` tiles of a
    batch; the prediction is blanked where the truth is unknown (no data: not scored either)."""
    prediction = np.where(truth >= classes, truth, prediction)
    rows = []
    for i in range(min(limit, truth.shape[0])):
        rows.append(
            PanelRow(
                images=[
                    PanelImage("optical", optical_to_rgb(np.asarray(batch["optical"][i].cpu()), optical_bands), "rgb"),
                    PanelImage("SAR (dB)", np.asarray(batch["sar"][i, 0].cpu()) * sar_std + sar_mean, "gray", unit="dB"),
                    PanelImage("truth", truth[i], "labels", classes=classes),
                    PanelImage("prediction", prediction[i], "labels", classes=classes),
                ],
                title=f"tile {int(batch['index'][i])}",
            )
        )
    return rows
