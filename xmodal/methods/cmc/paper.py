"""Paper 001's Tables I and II and where each finetuning run goes in them.

Rows are the pretraining source of the SAR segmenter: (1) random initialisation, (2) ImageNet,
(3) SAR, (4) SAR+EO, (5) SAR+GT, (6) SAR+GT+EO (cmc's ``modalities``: EO = ``optical``, GT =
``mask``). A ``supervised`` SAR segmentation run is placed by what initialised it: nothing is row
(1); a cmc run (the input its ``run.json`` records) is the row of that run's modalities. ImageNet
weights cannot be downloaded here, so row (2) holds the paper's numbers only. Table I's columns
are the segmenters with the paper's ResNet-50 (another encoder gets its own ``arch:encoder``
column); Table II's are DeepLabV3's backbones.
"""

from __future__ import annotations

import re
from typing import Any

from xmodal.methods.summaries import label_share, source_run

_ROWS = [
    ("random", "(1) Random"),
    ("imagenet", "(2) ImageNet"),
    ("sar", "(3) SAR"),
    ("sar+eo", "(4) SAR+EO"),
    ("sar+gt", "(5) SAR+GT"),
    ("sar+gt+eo", "(6) SAR+GT+EO"),
]
# Table I: (accuracy, building IoU) per segmenter with a ResNet-50 encoder.
_TABLE1 = {
    "unet": [(0.9317, 0.0), (0.9594, 0.5126), (0.9678, 0.5996), (0.9724, 0.6517), (0.9742, 0.6708), (0.9745, 0.6738)],
    "bisenet": [(0.9356, 0.1366), (0.9606, 0.5152), (0.9683, 0.6062), (0.9733, 0.6607), (0.9729, 0.6562), (0.9738, 0.6647)],
    "deeplabv3": [(0.9302, 0.2732), (0.9502, 0.4896), (0.9673, 0.6280), (0.9736, 0.6874), (0.9738, 0.6878), (0.9738, 0.6890)],
}
# Table II: DeepLabV3 with three backbones.
_TABLE2 = {
    "resnet50": _TABLE1["deeplabv3"],
    "resnext50": [(0.9340, 0.3039), (0.9561, 0.5311), (0.9649, 0.6061), (0.9746, 0.6945), (0.9752, 0.7006), (0.9756, 0.7054)],
    "resnest50": [(0.9411, 0.3885), (0.9599, 0.5623), (0.9720, 0.6687), (0.9744, 0.6920), (0.9749, 0.6974), (0.9752, 0.7017)],
}
_ARCH_LABELS = {"unet": "U-Net", "bisenet": "BiSeNet", "deeplabv3": "DeepLabV3"}
_BACKBONES = {"resnet50": ("ResNet50", ("resnet50",)), "resnext50": ("ResNext50", ("resnext50_32x4d", "tu-resnext50_32x4d")), "resnest50": ("Resnest50", ("tu-resnest50d",))}
_NOTES = [
    "Paper: SpaceNet 6 (Rotterdam, quad-pol X-band SAR (HH, VV, HV stacked) + WorldView-2 EO), random 8:2 split of the "
    "training set; pretraining 500 epochs at batch 126, finetuning 25 epochs; ours: the data and epochs of each run.",
    "(2) ImageNet weights cannot be downloaded here: that row holds the paper's numbers only. BiSeNet is not built "
    "(neither smp nor timm has one): its column holds the paper's numbers only.",
    "Rows: the pretraining source of the SAR segmenter's encoder (EO = optical, GT = the label mask).",
]


def _table(key: str, title: str, columns: dict[str, list[tuple[float, float]]], labels: dict[str, str], metric: str, index: int) -> dict[str, Any]:
    return {
        "key": key,
        "title": title,
        "metric": metric,
        "scale": 1.0,
        "rows": [{"key": k, "label": label} for k, label in _ROWS],
        "columns": [{"key": c, "label": labels[c]} for c in columns],
        "paper": {row: {c: values[i][index] for c, values in columns.items()} for i, (row, _) in enumerate(_ROWS)},
        "notes": _NOTES,
    }


TABLE1_IOU = _table("cmc-table1-iou", "CMC (paper 001), Table I: test building IoU by pretraining source and segmenter (ResNet-50)", _TABLE1, _ARCH_LABELS, "test/iou", 1)
TABLE1_ACCURACY = _table("cmc-table1-accuracy", "CMC (paper 001), Table I: test pixel accuracy by pretraining source and segmenter (ResNet-50)", _TABLE1, _ARCH_LABELS, "test/accuracy", 0)
TABLE2_IOU = _table("cmc-table2-iou", "CMC (paper 001), Table II: test building IoU by pretraining source and DeepLabV3 backbone", _TABLE2, {k: v[0] for k, v in _BACKBONES.items()}, "test/iou", 1)
PAPER_TABLES = (TABLE1_IOU, TABLE1_ACCURACY, TABLE2_IOU)


def source_row(modalities: list[str]) -> str:
    """The row of a cmc run's modalities (``[sar, mask, optical]`` -> ``sar+gt+eo``)."""
    return "+".join(["sar"] + (["gt"] if "mask" in modalities else []) + (["eo"] if "optical" in modalities else []))


def _arch(model: dict[str, Any]) -> str:
    return re.sub(r"[-_ ]", "", str(model.get("arch") or "").lower().replace("+", "plus"))


def classify_run(table: dict[str, Any], run: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(row, column) of a finetuning run in one of :data:`PAPER_TABLES`, or None.

    Runs on a labelled subset get their own rows (``sar+eo@0.2``).
    """
    settings = run.get("method_settings") or {}
    if run.get("method") != "supervised" or settings.get("task", "segmentation") != "segmentation" or settings.get("input") != "sar":
        return None
    if settings.get("init") is None:
        row = "random"
    else:
        source = source_run(run, settings.get("init"), runs)
        if source is None or source.get("method") != "cmc":
            return None
        row = source_row((source.get("method_settings") or {}).get("modalities") or ["sar"])
    share = label_share(run)
    row = f"{row}@{share}" if share else row
    model = run.get("model") or {}
    arch, encoder = _arch(model), model.get("encoder")
    if table["key"] == TABLE2_IOU["key"]:
        if arch != "deeplabv3":
            return None
        column = next((key for key, (_, names) in _BACKBONES.items() if encoder in names), str(encoder))
        return row, column
    return row, (arch if encoder == "resnet50" else f"{arch}:{encoder}")
