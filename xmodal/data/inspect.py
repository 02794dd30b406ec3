"""What a dataset folder holds: layout, pairs, splits, bands, value ranges, labels, problems.

:func:`inspect_dataset` recognises the layout with :func:`~xmodal.data.readers.base.detect_reader`,
indexes it and loads up to ``max_tiles`` samples through the reader, so it works for every
registered reader without knowing any format. :func:`format_inspection` renders the report for
``xmodal data inspect PATH``. The report is plain JSON-able data::

    {
      "path", "reader", "description", "layout", "dataset", "data_root",
      "num_pairs", "splits": {split: count}, "unassigned": {reason: count},
      "num_regions", "tile_size", "pixel_size",
      "modalities": {"sar" | "optical": {"bands": [{"name", "unit", "min", "max", "mean", "std",
                                                     "nodata_fraction"}], "invalid_fraction"}},
      "layers": {name: {"classes", "histogram": {class: pixels}, "unknown_pixels", "tiles_with_layer",
                        "noise_rate", "description"}},
      "scene_classes": {class: tiles},
      "tiles_loaded", "load_errors": [{"tile_id", "error"}],
      "skipped": {"count", "items": [{"item", "reason"}]},
      "extra": DatasetInfo.extra,
    }

``unassigned`` counts the unassigned pairs by the reason their reader gives in the record's
``extra["unassigned_reason"]`` (SpaceNet 6: ``straddling`` tiles, SAR-only ``test_public`` tiles);
empty when no reader says. ``DatasetInfo.extra["notes"]`` (a reader's remarks on how it read the
folder, such as a stand-in optical product) are printed by :func:`format_inspection`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.manifest import SPLITS, DatasetInfo, record_extra, record_layers, spread
from xmodal.data.readers.base import LoadOptions, Reader, detect_reader, get_reader
from xmodal.data.sample import PairedSample
from xmodal.errors import XmodalError

# Skipped pairs listed in full in the report (the count is always exact).
MAX_SKIPPED_LISTED = 50


class _BandStats:
    """Streaming min / max / mean / std and no-data share of each band of one modality."""

    def __init__(self, count: int) -> None:
        self.pixels = 0
        self.valid = np.zeros(count, dtype=np.int64)
        self.total = np.zeros(count, dtype=np.float64)
        self.squares = np.zeros(count, dtype=np.float64)
        self.low = np.full(count, np.inf)
        self.high = np.full(count, -np.inf)
        self.invalid_pixels = 0

    def add(self, image: np.ndarray, valid: np.ndarray | None) -> None:
        finite = np.isfinite(image)
        self.pixels += image.shape[1] * image.shape[2]
        for band in range(image.shape[0]):
            values = image[band][finite[band]].astype(np.float64)
            if values.size == 0:
                continue
            self.valid[band] += values.size
            self.total[band] += values.sum()
            self.squares[band] += np.square(values).sum()
            self.low[band] = min(self.low[band], values.min())
            self.high[band] = max(self.high[band], values.max())
        usable = finite.all(axis=0) if valid is None else (valid & finite.all(axis=0))
        self.invalid_pixels += int((~usable).sum())

    def report(self, info_bands: list[dict[str, str]]) -> dict[str, Any]:
        bands = []
        for band, description in enumerate(info_bands):
            entry: dict[str, Any] = dict(description)
            if self.valid[band]:
                mean = self.total[band] / self.valid[band]
                entry.update(
                    min=float(self.low[band]),
                    max=float(self.high[band]),
                    mean=float(mean),
                    std=float(np.sqrt(max(self.squares[band] / self.valid[band] - mean**2, 0.0))),
                )
            else:
                entry.update(min=None, max=None, mean=None, std=None)
            entry["nodata_fraction"] = float(1 - self.valid[band] / self.pixels) if self.pixels else None
            bands.append(entry)
        return {"bands": bands, "invalid_fraction": float(self.invalid_pixels / self.pixels) if self.pixels else None}


def _layer_batches(names: list[str]) -> list[tuple[str | None, str | None]]:
    """Label layers two at a time (a load fills ``mask`` and ``noisy_mask``); one empty batch if none."""
    if not names:
        return [(None, None)]
    return [(names[i], names[i + 1] if i + 1 < len(names) else None) for i in range(0, len(names), 2)]


def _count_labels(values: np.ndarray, classes: int, ignore_index: int) -> tuple[np.ndarray, int]:
    inside = (values >= 0) & (values < classes) & (values != ignore_index)
    return np.bincount(values[inside].ravel(), minlength=classes)[:classes], int((~inside).sum())


def _load_all_layers(
    reader: type[Reader], record: dict[str, Any], info: DatasetInfo, data_root: Path
) -> tuple[PairedSample, dict[str, np.ndarray]]:
    """The sample of ``record`` plus every label layer it has."""
    present = [name for name in info.layers if name in record_layers(record)]
    sample: PairedSample | None = None
    labels: dict[str, np.ndarray] = {}
    for mask_layer, noisy_layer in _layer_batches(present):
        loaded = reader.load(record, info, data_root, LoadOptions(mask_layer=mask_layer, noisy_layer=noisy_layer))
        sample = sample or loaded
        for name, array in ((mask_layer, loaded.mask), (noisy_layer, loaded.noisy_mask)):
            if name is not None and array is not None:
                labels[name] = array
    assert sample is not None
    return sample, labels


def inspect_dataset(
    path: str | Path, max_tiles: int = 50, reader_name: str | None = None, **index_options: Any
) -> dict[str, Any]:
    """Recognise, index and summarise the dataset in ``path``.

    Args:
        path: A dataset folder in any layout a registered reader knows.
        max_tiles: Samples loaded for value ranges, no-data shares and class histograms.
        reader_name: The registered reader to use (as ``xmodal data index --reader``); default: detect.
        **index_options: Passed to the reader's ``index`` (``optical_product``, ``protocol``, ...).

    Returns:
        The report described in the module docstring.

    Raises:
        DataError: An unknown reader, no reader (or several) recognises the folder, or indexing fails.
        ConfigError: An index option the reader does not know.
    """
    root = Path(path)
    reader = get_reader(reader_name) if reader_name else detect_reader(root)
    result = reader.index(root, **index_options)
    manifest = result.manifest
    info = manifest.info
    data_root = manifest.data_root
    records = manifest.records

    stats = {"sar": _BandStats(len(info.sar_bands)), "optical": _BandStats(len(info.optical_bands))}
    histograms = {name: np.zeros(len(layer.classes), dtype=np.int64) for name, layer in info.layers.items()}
    unknown = Counter[str]()
    load_errors = []
    loaded = 0
    for record in spread(records, max_tiles):
        try:
            sample, labels = _load_all_layers(reader, record, info, data_root)
        except XmodalError as exc:
            load_errors.append({"tile_id": record["tile_id"], "error": str(exc)})
            continue
        except Exception as exc:  # noqa: BLE001 - a report beats a crash; the type shows it is a reader bug
            load_errors.append({"tile_id": record["tile_id"], "error": f"{type(exc).__name__} (unexpected): {exc}"})
            continue
        loaded += 1
        stats["sar"].add(sample.sar, sample.sar_valid)
        stats["optical"].add(sample.optical, sample.optical_valid)
        for name, values in labels.items():
            if name not in histograms:
                continue
            counts, outside = _count_labels(values, len(histograms[name]), info.ignore_index)
            histograms[name] += counts
            unknown[name] += outside

    split_counts = Counter(r["split"] for r in records)
    reasons = (record_extra(r).get("unassigned_reason") for r in records if r["split"] == "unassigned")
    unassigned = Counter(str(reason) for reason in reasons if reason)
    layers_report = {}
    for name, layer in info.layers.items():
        layers_report[name] = {
            "classes": list(layer.classes),
            "histogram": {cls: int(n) for cls, n in zip(layer.classes, histograms[name])},
            "unknown_pixels": int(unknown[name]),
            "tiles_with_layer": sum(1 for r in records if name in record_layers(r)),
            "noise_rate": layer.noise_rate,
            "description": layer.description,
        }
    scene_counts = Counter(int(r["scene_label"]) for r in records if int(r["scene_label"]) >= 0)
    return {
        "path": str(root),
        "reader": reader.name,
        "description": reader.description,
        "layout": reader.layout,
        "dataset": info.name,
        "data_root": str(data_root),
        "num_pairs": len(records),
        "splits": {split: split_counts[split] for split in SPLITS if split_counts[split]},
        "unassigned": dict(sorted(unassigned.items())),
        "num_regions": len({r["region"] for r in records}),
        "tile_size": info.tile_size,
        "pixel_size": info.pixel_size,
        "modalities": {
            "sar": stats["sar"].report([{"name": b.name, "unit": b.unit} for b in info.sar_bands.bands]),
            "optical": stats["optical"].report([{"name": b.name, "unit": b.unit} for b in info.optical_bands.bands]),
        },
        "layers": layers_report,
        "scene_classes": {
            (info.scene_classes[k] if 0 <= k < len(info.scene_classes) else str(k)): n for k, n in sorted(scene_counts.items())
        },
        "tiles_loaded": loaded,
        "load_errors": load_errors,
        "skipped": {
            "count": len(result.skipped),
            "items": [{"item": s.item, "reason": s.reason} for s in result.skipped[:MAX_SKIPPED_LISTED]],
        },
        "extra": info.extra,
    }


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}"


def format_inspection(report: dict[str, Any]) -> str:
    """A human-readable rendering of :func:`inspect_dataset`'s report."""
    splits = ", ".join(f"{split} {count}" for split, count in report["splits"].items()) or "none"
    if report["unassigned"]:
        splits += " [" + ", ".join(f"{reason} {n}" for reason, n in report["unassigned"].items()) + "]"
    lines = [
        f"Layout:   {report['reader']} - {report['description']}",
        f"Folder:   {report['path']}",
        f"Expects:  {report['layout']}",
        f"Pairs:    {report['num_pairs']} ({splits}); {report['num_regions']} region(s)",
        f"Tiles:    {report['tile_size']} px at {report['pixel_size']} m",
    ]
    lines += [f"Note:     {note}" for note in (report["extra"] or {}).get("notes", [])]
    for modality, title in (("sar", "SAR"), ("optical", "Optical")):
        block = report["modalities"][modality]
        invalid = block["invalid_fraction"]
        lines.append(
            f"{title} bands (from {report['tiles_loaded']} loaded tile(s); "
            f"{_number(None if invalid is None else 100 * invalid)} % of pixels invalid):"
        )
        lines.append(f"  {'band':<8} {'unit':<17} {'min':>10} {'max':>10} {'mean':>10} {'std':>10} {'no-data':>8}")
        for band in block["bands"]:
            nodata = "-" if band["nodata_fraction"] is None else f"{100 * band['nodata_fraction']:.1f} %"
            lines.append(
                f"  {band['name']:<8} {band['unit']:<17} {_number(band['min']):>10} {_number(band['max']):>10} "
                f"{_number(band['mean']):>10} {_number(band['std']):>10} {nodata:>8}"
            )
    if report["layers"]:
        lines.append("Label layers (pixel counts in loaded tiles):")
        for name, layer in report["layers"].items():
            total = sum(layer["histogram"].values())
            lines.append(
                f"  {name}: {len(layer['classes'])} classes, on {layer['tiles_with_layer']} of {report['num_pairs']} pairs, "
                f"{layer['unknown_pixels']} unknown pixel(s)"
            )
            for cls, count in layer["histogram"].items():
                share = f"{100 * count / total:.1f} %" if total else "-"
                lines.append(f"    {cls:<40} {count:>10} {share:>8}")
    else:
        lines.append("Label layers: none")
    if report["scene_classes"]:
        lines.append("Scene classes: " + ", ".join(f"{k} {v}" for k, v in report["scene_classes"].items()))
    skipped = report["skipped"]
    lines.append(f"Pairs not made: {skipped['count']}")
    for item in skipped["items"]:
        lines.append(f"  - {item['item']}: {item['reason']}")
    if skipped["count"] > len(skipped["items"]):
        lines.append(f"  ... and {skipped['count'] - len(skipped['items'])} more")
    lines.append(f"Load errors: {len(report['load_errors'])}")
    for error in report["load_errors"]:
        lines.append(f"  - {error['tile_id']}: {error['error']}")
    return "\n".join(lines)
