"""The manifest of pairs: what every reader produces and what the pipeline streams.

A dataset folder prepared for xmodal holds::

    dataset.json       # DatasetInfo: reader, bands and units, label layers, classes, tile size
    manifest.parquet   # one row per pair (see RECORD_FIELDS)
    stats.json         # per-band normalisation statistics (``xmodal data stats``)

Paths inside records are relative to ``DatasetInfo.data_root`` (itself relative to the folder that
holds ``dataset.json`` unless absolute), so a prepared dataset can be moved or mounted elsewhere, or
uploaded to a bucket: a folder given as an ``s3://`` / ``gs://`` URI is read from there (its small
files copied to a local cache, its tiles read where they lie; see :meth:`Manifest.load`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from xmodal.data.bands import BandSet
from xmodal.data.sample import IGNORE_INDEX, TileMeta
from xmodal.data.storage import cache_folder, check_reachable, download, is_remote, join, read_text
from xmodal.errors import DataError

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
STATS_FILE = "stats.json"
SIGNATURE_FILE = "stats.split.json"  # which training split the statistics were computed on
# What a prepared folder on object storage has copied to the local cache when it is loaded.
SMALL_FILES = (DATASET_FILE, MANIFEST_FILE, STATS_FILE, SIGNATURE_FILE)

# Columns of manifest.parquet. ``layers`` maps a label-layer name to its file; ``extra`` holds
# reader-specific fields (an HDF5 row index, a strip orientation, ...). Both are JSON strings so
# the table keeps one flat schema across readers.
RECORD_FIELDS: dict[str, pa.DataType] = {
    "index": pa.int64(),
    "tile_id": pa.string(),
    "region": pa.string(),
    "split": pa.string(),
    "crs": pa.string(),
    "left": pa.float64(),
    "bottom": pa.float64(),
    "right": pa.float64(),
    "top": pa.float64(),
    "sar_path": pa.string(),
    "optical_path": pa.string(),
    "scene_label": pa.int64(),
    "layers": pa.string(),
    "extra": pa.string(),
}
SPLITS = ("train", "val", "test", "unassigned")


@dataclass
class LabelLayer:
    """A per-pixel label layer (building footprints, land cover, noisy land cover, ...).

    Attributes:
        classes: Class names, index = stored value.
        noise_rate: Measured share of pixels whose label differs from the truth (noisy layers).
        description: How the layer was made.
    """

    classes: list[str]
    noise_rate: float | None = None
    description: str = ""


@dataclass
class DatasetInfo:
    """What a dataset is: reader, modalities, labels, geometry.

    Attributes:
        name: Dataset name (``"synthetic"``, ``"spacenet6"``...).
        reader: Key of the reader in :mod:`xmodal.data.readers` that loads its records.
        sar_bands: SAR bands and units as stored.
        optical_bands: Optical bands and units as stored.
        layers: Label layers by name.
        scene_classes: Names of scene classes (``scene_label`` values), possibly empty.
        tile_size: Native tile height/width in pixels.
        pixel_size: Ground sampling distance in metres.
        data_root: Folder the record paths are relative to.
        ignore_index: Mask value meaning "unknown".
        sar_look: Direction the radar looks towards, in image coordinates (``"east"``: the sensor
            is west of the scene and layover falls towards the west). ``None`` when unknown.
        extra: Reader-specific settings.
    """

    name: str
    reader: str
    sar_bands: BandSet
    optical_bands: BandSet
    layers: dict[str, LabelLayer] = field(default_factory=dict)
    scene_classes: list[str] = field(default_factory=list)
    tile_size: int = 0
    pixel_size: float = 0.0
    data_root: str = "."
    ignore_index: int = IGNORE_INDEX
    sar_look: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "reader": self.reader,
            "sar_bands": self.sar_bands.to_dict(),
            "optical_bands": self.optical_bands.to_dict(),
            "layers": {k: vars(v) for k, v in self.layers.items()},
            "scene_classes": list(self.scene_classes),
            "tile_size": self.tile_size,
            "pixel_size": self.pixel_size,
            "data_root": self.data_root,
            "ignore_index": self.ignore_index,
            "sar_look": self.sar_look,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "dataset.json") -> DatasetInfo:
        required = ("name", "reader", "sar_bands", "optical_bands")
        missing = [key for key in required if key not in data]
        if missing:
            raise DataError(f"{source}: missing field(s) {missing}")
        return cls(
            name=data["name"],
            reader=data["reader"],
            sar_bands=BandSet.from_dict(data["sar_bands"]),
            optical_bands=BandSet.from_dict(data["optical_bands"]),
            layers={k: LabelLayer(**v) for k, v in data.get("layers", {}).items()},
            scene_classes=list(data.get("scene_classes", [])),
            tile_size=int(data.get("tile_size", 0)),
            pixel_size=float(data.get("pixel_size", 0.0)),
            data_root=data.get("data_root", "."),
            ignore_index=int(data.get("ignore_index", IGNORE_INDEX)),
            sar_look=data.get("sar_look"),
            extra=data.get("extra", {}),
        )


def make_record(
    *,
    tile_id: str,
    region: str,
    crs: str,
    bounds: tuple[float, float, float, float],
    sar_path: str,
    optical_path: str,
    scene_label: int = -1,
    layers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    split: str = "unassigned",
) -> dict[str, Any]:
    """One manifest row, with JSON-encoded ``layers`` and ``extra``; ``index`` is set on save."""
    left, bottom, right, top = (float(v) for v in bounds)
    return {
        "index": -1,
        "tile_id": tile_id,
        "region": region,
        "split": split,
        "crs": crs,
        "left": left,
        "bottom": bottom,
        "right": right,
        "top": top,
        "sar_path": sar_path,
        "optical_path": optical_path,
        "scene_label": int(scene_label),
        "layers": json.dumps(layers or {}, sort_keys=True),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }


def record_meta(record: dict[str, Any]) -> TileMeta:
    """The ground footprint of a record."""
    return TileMeta(
        tile_id=record["tile_id"],
        region=record["region"],
        crs=record["crs"],
        bounds=(record["left"], record["bottom"], record["right"], record["top"]),
    )


def record_layers(record: dict[str, Any]) -> dict[str, str]:
    return json.loads(record["layers"]) if record.get("layers") else {}


def record_extra(record: dict[str, Any]) -> dict[str, Any]:
    return json.loads(record["extra"]) if record.get("extra") else {}


@dataclass
class Manifest:
    """A dataset's description plus its list of pair records.

    Attributes:
        info: The dataset description.
        records: One dict per pair, with the keys of :data:`RECORD_FIELDS`.
        folder: Folder holding ``dataset.json`` / ``manifest.parquet`` (``None`` before saving);
            for a dataset on object storage, the local cache of its small files.
        location: The URI of a dataset on object storage (``None`` for a local one): its tiles
            are read from there, and statistics computed here are written back there.
    """

    info: DatasetInfo
    records: list[dict[str, Any]]
    folder: Path | None = None
    location: str | None = None

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for position, record in enumerate(self.records):
            missing = [key for key in RECORD_FIELDS if key not in record]
            if missing:
                raise DataError(f"manifest record {position} lacks field(s) {missing}")
            if record["tile_id"] in seen:
                raise DataError(f"manifest: tile id {record['tile_id']!r} appears twice")
            if record["split"] not in SPLITS:
                raise DataError(f"manifest: tile {record['tile_id']!r} has split {record['split']!r}; expected one of {SPLITS}")
            seen.add(record["tile_id"])
            record["index"] = position

    def __len__(self) -> int:
        return len(self.records)

    @property
    def data_root(self) -> Path | str:
        """Absolute folder the record paths are relative to: a URI for a dataset on object storage
        (join record paths to it with :func:`xmodal.data.storage.join`)."""
        if is_remote(self.info.data_root):
            return self.info.data_root
        if self.location is not None and not Path(self.info.data_root).is_absolute():
            return join(self.location, self.info.data_root)
        root = Path(self.info.data_root)
        if not root.is_absolute():
            if self.folder is None:
                raise DataError("manifest has a relative data_root but no folder; save it first or give an absolute root")
            root = self.folder / root
        return root.resolve()

    def split(self, name: str) -> list[dict[str, Any]]:
        """Records of one split."""
        return [r for r in self.records if r["split"] == name]

    def save(self, folder: str | Path) -> Path:
        """Write ``dataset.json`` and ``manifest.parquet`` into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / DATASET_FILE).write_text(json.dumps(self.info.to_dict(), indent=2))
        table = pa.Table.from_pylist(self.records, schema=pa.schema(RECORD_FIELDS))
        pq.write_table(table, folder / MANIFEST_FILE)
        self.folder = folder.resolve()
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        """Read a prepared dataset folder, with errors naming the missing or broken file.

        A URI (``s3://bucket/world``) is a folder on object storage: its small files
        (:data:`SMALL_FILES`) are copied to a local cache first (again at every load, so a
        re-uploaded dataset is never read stale), and its tiles stay where they are.
        """
        if is_remote(folder):
            return cls._load_remote(str(folder))
        folder = Path(folder)
        info_path, table_path = folder / DATASET_FILE, folder / MANIFEST_FILE
        for path in (info_path, table_path):
            if not path.is_file():
                raise DataError(
                    f"{path}: not found; a prepared dataset folder needs {DATASET_FILE} and {MANIFEST_FILE} "
                    "(make one with `xmodal data synth` or a reader)"
                )
        info = DatasetInfo.from_dict(read_json(info_path), source=str(info_path))
        try:
            table = pq.read_table(table_path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{table_path}: cannot be read as Parquet ({exc})") from exc
        missing = [name for name in RECORD_FIELDS if name not in table.column_names]
        if missing:
            raise DataError(f"{table_path}: missing column(s) {missing}")
        return cls(info=info, records=table.to_pylist(), folder=folder.resolve())

    @classmethod
    def _load_remote(cls, uri: str) -> Manifest:
        check_reachable(uri, "data.root")
        cache = cache_folder(uri)
        cache.mkdir(parents=True, exist_ok=True)
        # The cache folder is shared by every process of this machine (trials of a sweep load the
        # same dataset at once): each downloads into a folder of its own and swaps whole files in,
        # so no process ever finds a file another one has just removed or half written.
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as staging:
            for name in SMALL_FILES:
                if download(join(uri, name), Path(staging) / name):
                    os.replace(Path(staging) / name, cache / name)
                elif name in (DATASET_FILE, MANIFEST_FILE):
                    raise DataError(
                        f"{join(uri, name)}: not found; a dataset on object storage must be a prepared folder "
                        f"({DATASET_FILE} and {MANIFEST_FILE}): pack one with `xmodal data pack <folder> {uri}`, "
                        "or upload a prepared folder there"
                    )
                else:
                    (cache / name).unlink(missing_ok=True)  # a file deleted from the bucket is gone here too
        manifest = cls.load(cache)
        manifest.location = uri
        return manifest

    def with_records(self, records: list[dict[str, Any]]) -> Manifest:
        """A manifest of the same dataset holding other records (a split, a subset)."""
        return Manifest(info=self.info, records=[dict(r) for r in records], folder=self.folder, location=self.location)


def read_json(path: Path) -> Any:
    """A JSON file's contents.

    Raises:
        DataError: Naming the file, when it is not UTF-8 text (a binary file) or not valid JSON.
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a text file (byte {exc.start} is not UTF-8); expected JSON") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None


def declared_reader(root: Path) -> str | None:
    """The reader a prepared folder's ``dataset.json`` names (``None`` when the folder has none)."""
    if is_remote(root):
        text = read_text(join(str(root), DATASET_FILE))
        data = json.loads(text) if text else None
        return data.get("reader") if isinstance(data, dict) else None
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    return data.get("reader") if isinstance(data, dict) else None


def spread(items: list[Any], count: int) -> list[Any]:
    """At most ``count`` of ``items``, evenly spread over the list (deterministic; all when they fit)."""
    if count <= 0:
        return []
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]
