"""Packed tile store: decoded pairs written as Parquet, for clusters that read from object storage.

One GeoTIFF per tile and modality means one GET plus a header parse per file on S3/GCS; a packed
store holds a few large Parquet files per split instead. Arrays are stored as raw little-endian
bytes with their shapes in ``dataset.json`` (decoding is one ``np.frombuffer``; Arrow's tensor
extension costs as much as the read itself, measured in shared/notes/ray.md), and every label
layer is kept, so the mask layer can still be chosen at training time.

Layout::

    <out>/dataset.json     # reader "packed", original bands/layers, array shapes
    <out>/manifest.parquet # one row per tile, sar_path = the part file, extra.row = row in it
    <out>/stats.json       # copied from the source
    <out>/<split>/part-00000.parquet
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xmodal.data.manifest import SIGNATURE_FILE, STATS_FILE, DatasetInfo, Manifest, declared_reader, record_extra, record_meta
from xmodal.data.readers.base import IndexResult, LoadOptions, Reader, get_reader, register_reader
from xmodal.data.sample import PairedSample
from xmodal.data.storage import check_reachable, is_remote, join, upload
from xmodal.errors import DataError
from xmodal.progress import track

PACKED_READER = "packed"


def _to_bytes(array: np.ndarray, dtype: str) -> bytes:
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def pack(manifest: Manifest, out: str | Path, *, rows_per_file: int = 256, compression: str = "zstd") -> Manifest:
    """Write ``manifest``'s tiles into a packed store at ``out`` and return its manifest.

    ``out`` may be an object-store URI (``s3://bucket/world``): the store is packed in a local
    scratch folder and uploaded there.

    Raises:
        DataError: Tiles differ in size (a packed store needs one tile shape per dataset).
        ConfigError: ``out`` is a URI whose bucket does not exist or cannot be written.
    """
    if is_remote(out):
        check_reachable(str(out), "the pack target")
        with tempfile.TemporaryDirectory(prefix="xmodal-pack-") as scratch:
            pack(manifest, scratch, rows_per_file=rows_per_file, compression=compression)
            upload(scratch, str(out))
        return Manifest.load(str(out))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = manifest.info
    reader = get_reader(info.reader)
    layers = sorted(info.layers)
    shape: tuple[int, int] | None = None
    packed_records: list[dict[str, Any]] = []
    for split in ("train", "val", "test", "unassigned"):
        records = manifest.split(split)
        for start in track(range(0, len(records), rows_per_file), f"packing {split}", unit="part"):
            chunk = records[start : start + rows_per_file]
            part = f"{split}/part-{start // rows_per_file:05d}.parquet"
            rows: dict[str, list[Any]] = {k: [] for k in ("tile_id", "sar", "optical", "sar_valid", "optical_valid", "scene_label")}
            rows.update({f"layer_{name}": [] for name in layers})
            for row, record in enumerate(chunk):
                # Two label layers come with each read (mask + noisy_mask); images with the first.
                pairs = [layers[i : i + 2] for i in range(0, len(layers), 2)] or [[]]
                labels: dict[str, np.ndarray] = {}
                sample = None
                for pair in pairs:
                    options = LoadOptions(mask_layer=pair[0] if pair else None, noisy_layer=pair[1] if len(pair) > 1 else None)
                    loaded = reader.load(record, info, manifest.data_root, options)
                    sample = sample or loaded
                    labels.update({name: getattr(loaded, key) for name, key in zip(pair, ("mask", "noisy_mask"))})
                if shape is None:
                    shape = sample.shape
                elif sample.shape != shape:
                    raise DataError(f"tile {record['tile_id']!r} is {sample.shape}, others {shape}: a packed store needs one tile size")
                rows["tile_id"].append(record["tile_id"])
                rows["sar"].append(_to_bytes(sample.sar, "float32"))
                rows["optical"].append(_to_bytes(sample.optical, "float32"))
                valid = np.ones(sample.shape, bool)
                rows["sar_valid"].append(_to_bytes(valid if sample.sar_valid is None else sample.sar_valid, "uint8"))
                rows["optical_valid"].append(_to_bytes(valid if sample.optical_valid is None else sample.optical_valid, "uint8"))
                rows["scene_label"].append(int(sample.label))
                for name in layers:
                    rows[f"layer_{name}"].append(_to_bytes(labels[name], "uint8"))
                extra = record_extra(record)
                extra.update(row=row, source_reader=info.reader)
                packed_records.append(
                    {**record, "sar_path": part, "optical_path": part, "layers": json.dumps({n: part for n in layers}), "extra": json.dumps(extra)}
                )
            (out / split).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table(rows), out / part, compression=compression)
    if shape is None:
        raise DataError("nothing to pack: the manifest has no records")
    packed_info = DatasetInfo.from_dict(info.to_dict())
    packed_info.reader = PACKED_READER
    packed_info.data_root = "."
    packed_info.tile_size = shape[0]
    packed_info.extra = {**info.extra, "packed_shape": list(shape), "packed_from": info.reader, "layers_in_store": layers}
    packed = Manifest(info=packed_info, records=packed_records)
    packed.save(out)
    if manifest.folder is not None and (manifest.folder / STATS_FILE).is_file():
        shutil.copy(manifest.folder / STATS_FILE, out / STATS_FILE)
        signature = manifest.folder / SIGNATURE_FILE
        if signature.is_file():
            shutil.copy(signature, out / signature.name)
    return Manifest.load(out)


@lru_cache(maxsize=4)
def _read_part(path: str) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot be read as a packed Parquet part ({exc})") from exc


def decode_row(table_row: dict[str, Any], info: DatasetInfo, options: LoadOptions) -> dict[str, np.ndarray]:
    """Arrays of one packed row (bytes -> shaped numpy)."""
    height, width = info.extra["packed_shape"]
    out = {
        "sar": np.frombuffer(table_row["sar"], "<f4").reshape(len(info.sar_bands), height, width).astype(np.float32),
        "optical": np.frombuffer(table_row["optical"], "<f4").reshape(len(info.optical_bands), height, width).astype(np.float32),
        "sar_valid": np.frombuffer(table_row["sar_valid"], np.uint8).reshape(height, width).astype(bool),
        "optical_valid": np.frombuffer(table_row["optical_valid"], np.uint8).reshape(height, width).astype(bool),
    }
    for key, layer in (("mask", options.mask_layer), ("noisy_mask", options.noisy_layer)):
        if layer is not None:
            column = f"layer_{layer}"
            if column not in table_row:
                raise DataError(f"packed store has no label layer {layer!r}; it has {info.extra.get('layers_in_store')}")
            out[key] = np.frombuffer(table_row[column], np.uint8).reshape(height, width).astype(np.int64)
    return out


@register_reader
class PackedReader(Reader):
    """Reads a packed store tile by tile (the Ray Data path reads whole part files instead)."""

    name = PACKED_READER
    description = "xmodal packed store: Parquet parts of decoded tiles (xmodal data pack)"
    layout = "<root>/{dataset.json,manifest.parquet}, <root>/<split>/part-NNNNN.parquet"

    @classmethod
    def detect(cls, root: Path) -> bool:
        return declared_reader(root) == PACKED_READER

    @classmethod
    def index(cls, root: Path, **options: Any) -> IndexResult:
        return IndexResult(manifest=Manifest.load(root))

    @classmethod
    def load(cls, record: dict[str, Any], info: DatasetInfo, data_root: Path, options: LoadOptions) -> PairedSample:
        part = join(data_root, record["sar_path"])
        table = _read_part(part)
        row = record_extra(record)["row"]
        values = {name: table.column(name)[row].as_py() for name in table.column_names}
        if values["tile_id"] != record["tile_id"]:
            raise DataError(f"{part}: row {row} holds {values['tile_id']!r}, not {record['tile_id']!r}")
        arrays = decode_row(values, info, options)
        return PairedSample(
            sar=arrays["sar"],
            optical=arrays["optical"],
            meta=record_meta(record),
            mask=arrays.get("mask"),
            noisy_mask=arrays.get("noisy_mask"),
            label=int(values["scene_label"]),
            sar_valid=arrays["sar_valid"],
            optical_valid=arrays["optical_valid"],
        )
