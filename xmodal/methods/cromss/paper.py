"""Paper 003's Table 1 (transfer to DFC2020) and where each transfer run goes in it.

The table has one half per downstream input (S1 = SAR, S2 = optical) and, for each, OA / AA / mIoU
with the encoder frozen or finetuned: here six tables, one per (input, metric), with the columns
``frozen`` and ``finetuned``. A transfer run is a ``supervised`` segmentation run on clean labels
(not ``use_noisy_labels``); its row is what initialised its encoder:

* nothing: ``random``;
* a ``cromss`` run: that run's variant (``midf``, ``latef``, ``cromss-midf``, ``cromss-latef``);
* a ``supervised`` run on noisy labels: ``single`` (single-modal pretraining, S1 or S2).

MoCo and DINO weights cannot be downloaded here: those rows hold the paper's numbers only. A run
on a labelled subset gets its own row (``cromss-midf@0.2``).
"""

from __future__ import annotations

from typing import Any

from xmodal.methods.summaries import label_share, source_run

_ROWS = [
    ("random", "Random"),
    ("dino", "DINO"),
    ("moco", "MoCo"),
    ("single", "single-modal"),
    ("midf", "midF"),
    ("latef", "lateF"),
    ("cromss-midf", "CromSS-midF"),
    ("cromss-latef", "CromSS-lateF"),
]
_COLUMNS = [("frozen", "Frozen"), ("finetuned", "Fine-tuned")]
# Paper 003, Table 1, in %: row -> (frozen OA, AA, mIoU, finetuned OA, AA, mIoU).
_PAPER = {
    "s1": {
        "random": (54.41, 40.68, 29.16, 52.65, 42.17, 28.36),
        "moco": (60.88, 47.46, 34.25, 60.31, 44.98, 31.80),
        "single": (61.73, 46.13, 34.77, 61.07, 45.78, 34.13),
        "midf": (62.08, 45.01, 34.64, 61.24, 45.44, 33.86),
        "latef": (61.09, 45.77, 34.15, 62.19, 47.43, 34.58),
        "cromss-midf": (61.66, 45.07, 34.38, 62.32, 47.19, 35.17),
        "cromss-latef": (62.58, 46.37, 34.80, 60.92, 46.13, 33.94),
    },
    "s2": {
        "random": (56.42, 45.12, 31.50, 58.68, 46.03, 33.56),
        "dino": (64.82, 48.83, 37.81, 63.64, 49.92, 36.95),
        "moco": (63.25, 51.00, 37.67, 61.19, 47.29, 34.86),
        "single": (66.66, 53.24, 40.88, 67.11, 53.14, 41.06),
        "midf": (68.36, 53.23, 41.52, 68.07, 52.60, 41.17),
        "latef": (67.61, 54.08, 41.59, 68.43, 53.72, 41.76),
        "cromss-midf": (69.41, 55.97, 42.89, 69.20, 54.86, 42.58),
        "cromss-latef": (66.61, 54.23, 41.12, 69.10, 54.86, 42.55),
    },
}
_METRICS = [("oa", "OA", "test/accuracy"), ("aa", "AA", "test/average_accuracy"), ("miou", "mIoU", "test/miou")]
_INPUTS = {"s1": ("sar", "S1 (SAR)"), "s2": ("optical", "S2 (optical)")}
_NOTES = [
    "Paper: pretraining on SSL4EO-S12 with Dynamic World noisy labels (ResNet-50 U-Nets, 100 epochs); transfer to DFC2020 "
    "(986 training, 5,128 test patches) with PSPNet, 50 epochs, 3 runs; ours: the data, encoder and epochs of each run.",
    "DINO and MoCo weights cannot be downloaded here: those rows hold the paper's numbers only. A random encoder is not "
    "trained frozen here (supervised refuses freeze_encoder without init): that cell holds the paper's number only.",
    "Rows: what initialised the transfer's encoder (single-modal: supervised pretraining on the noisy labels of one modality).",
]


def _table(modality: str, metric: tuple[str, str, str], index: int) -> dict[str, Any]:
    key, label, name = metric
    paper = {row: {"frozen": values[index], "finetuned": values[index + 3]} for row, values in _PAPER[modality].items()}
    return {
        "key": f"cromss-table1-{modality}-{key}",
        "title": f"CromSS (paper 003), Table 1, {_INPUTS[modality][1]} input: test {label} (%) of the transfer by pretraining",
        "metric": name,
        "scale": 100.0,
        "rows": [{"key": k, "label": text} for k, text in _ROWS],
        "columns": [{"key": k, "label": text} for k, text in _COLUMNS],
        "paper": paper,
        "notes": _NOTES,
        "input": _INPUTS[modality][0],
    }


PAPER_TABLES = tuple(_table(modality, metric, i) for modality in _PAPER for i, metric in enumerate(_METRICS))


def pretraining_row(run: dict[str, Any]) -> str | None:
    """The Table 1 row of a pretraining run: a cromss variant, or ``single``; None for others."""
    settings = run.get("method_settings") or {}
    if run.get("method") == "cromss":
        fusion = "midf" if settings.get("fusion", "middle") == "middle" else "latef"
        return f"cromss-{fusion}" if settings.get("selection", True) else fusion
    if run.get("method") == "supervised" and settings.get("use_noisy_labels"):
        return "single"
    return None


def classify_run(table: dict[str, Any], run: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(row, column) of a transfer run in one of :data:`PAPER_TABLES`, or None."""
    settings = run.get("method_settings") or {}
    if run.get("method") != "supervised" or settings.get("task", "segmentation") != "segmentation" or settings.get("use_noisy_labels"):
        return None
    if settings.get("input", "sar") != table["input"]:
        return None
    if settings.get("init") is None:
        row = "random"
    else:
        source = source_run(run, settings.get("init"), runs)
        row = pretraining_row(source) if source is not None else None
        if row is None:
            return None
    share = label_share(run)
    return (f"{row}@{share}" if share else row), ("frozen" if settings.get("freeze_encoder") else "finetuned")
