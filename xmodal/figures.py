"""Drawing what methods hand over: evaluation panels and artifacts (the only matplotlib user besides reports).

Imported by the engine (a run's test panel and artifacts) and by the report layer; never by a
method. See :mod:`xmodal.methods.panels` for the data types.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xmodal.methods.panels import Artifact, PanelImage, PanelRow  # noqa: E402

ARTIFACTS_DIR = "artifacts"


def _show(figure: Any, axis: Any, item: PanelImage) -> None:
    if item.kind == "rgb":
        axis.imshow(item.image, interpolation="nearest")
    elif item.kind == "labels":
        classes = max(item.classes, 2)
        cmap = plt.get_cmap("tab10" if classes <= 10 else "tab20", classes)
        axis.imshow(np.ma.masked_greater_equal(item.image, classes), cmap=cmap, vmin=0, vmax=classes - 1, interpolation="nearest")
    else:
        finite = item.image[np.isfinite(item.image)]
        low, high = np.percentile(finite, [2, 98]) if item.kind == "gray" and finite.size else (None, None)
        shown = axis.imshow(item.image, cmap="gray" if item.kind == "gray" else "viridis", vmin=low, vmax=high, interpolation="nearest")
        bar = figure.colorbar(shown, ax=axis, fraction=0.046)
        if item.unit:
            bar.set_label(item.unit)


def render_panels(rows: Sequence[PanelRow], path: str | Path, title: str = "") -> Path:
    """Write a PNG with one row per :class:`PanelRow`, its images side by side."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = max((len(row.images) for row in rows), default=1)
    figure, axes = plt.subplots(max(1, len(rows)), columns, figsize=(3 * columns, 3 * max(1, len(rows))), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(columns):
            axis = axes[r][c]
            axis.axis("off")
            if c >= len(row.images):
                continue
            item = row.images[c]
            _show(figure, axis, item)
            axis.set_title(f"{item.title}{' - ' + row.title if c == 0 and row.title else ''}", fontsize=9)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def draw_artifact(artifact: Artifact, path: str | Path) -> Path | None:
    """A PNG of one artifact (``values`` artifacts have no picture: ``None``)."""
    if artifact.kind == "values":
        return None
    path = Path(path)
    figure, axis = plt.subplots(figsize=(5, 3.6))
    data = artifact.data
    if artifact.kind == "histogram":
        edges, counts = np.asarray(data["edges"], dtype=float), np.asarray(data["counts"], dtype=float)
        axis.stairs(counts, edges, fill=True, alpha=0.7)
    elif artifact.kind == "curve":
        axis.plot(np.asarray(data["x"]), np.asarray(data["y"]), marker="o", ms=3)
    else:
        shown = axis.imshow(np.asarray(data["image"]), cmap="viridis", interpolation="nearest")
        figure.colorbar(shown, ax=axis, fraction=0.046)
    axis.set_title(artifact.title, fontsize=10)
    axis.set_xlabel(artifact.xlabel)
    axis.set_ylabel(artifact.ylabel)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def save_artifacts(artifacts: dict[str, Artifact], folder: str | Path) -> list[str]:
    """Write each artifact as ``<name>.npz`` (its arrays), ``<name>.json`` (kind and labels) and,
    when it has a picture, ``<name>.png``; returns the names written."""
    folder = Path(folder)
    if artifacts:
        folder.mkdir(parents=True, exist_ok=True)
    for name, artifact in artifacts.items():
        np.savez(folder / f"{name}.npz", **{k: np.asarray(v) for k, v in artifact.data.items()})
        meta = {"kind": artifact.kind, "title": artifact.title, "xlabel": artifact.xlabel, "ylabel": artifact.ylabel, "meta": artifact.meta}
        (folder / f"{name}.json").write_text(json.dumps(meta, indent=2, default=str))
        draw_artifact(artifact, folder / f"{name}.png")
    return sorted(artifacts)


def load_artifacts(folder: str | Path) -> dict[str, Artifact]:
    """The artifacts :func:`save_artifacts` wrote into ``folder`` (empty when there are none)."""
    folder = Path(folder)
    out = {}
    for meta_path in sorted(folder.glob("*.json")):
        arrays = folder / f"{meta_path.stem}.npz"
        if not arrays.is_file():
            continue
        meta = json.loads(meta_path.read_text())
        with np.load(arrays) as stored:
            data = {k: stored[k] for k in stored.files}
        out[meta_path.stem] = Artifact(meta["kind"], data, meta.get("title", ""), meta.get("xlabel", ""), meta.get("ylabel", ""), meta.get("meta", {}))
    return out
