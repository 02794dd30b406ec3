"""The xmodal native layout: one GeoTIFF per modality and per label layer for each tile.

Written by the synthetic world and by ``xmodal data pack --to geotiff``-style exports::

    <root>/dataset.json
    <root>/manifest.parquet
    <root>/<region>/<tile_id>/sar.tif         # SAR bands (units in dataset.json and band tags)
    <root>/<region>/<tile_id>/optical.tif     # optical bands
    <root>/<region>/<tile_id>/<layer>.tif     # one uint8 file per label layer (255 = unknown)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xmodal.data.geotiff import check_same_grid, read_raster
from xmodal.data.manifest import DATASET_FILE, MANIFEST_FILE, DatasetInfo, Manifest, declared_reader, record_layers, record_meta
from xmodal.data.readers.base import IndexResult, LoadOptions, Reader, register_reader
from xmodal.data.sample import PairedSample
from xmodal.data.storage import join
from xmodal.errors import DataError


def load_layer(path: Path, name: str, grid_of: Any, ref_path: str) -> np.ndarray:
    """Read one label layer as int64, checked against the image grid."""
    raster = read_raster(path, expected_bands=1, dtype=np.int64)
    check_same_grid(grid_of, raster.grid, ref_path, str(path))
    return raster.data[0]


@register_reader
class NativeReader(Reader):
    """Prepared xmodal folders (synthetic world, exports)."""

    name = "xmodal"
    description = "xmodal native layout: per-tile sar.tif / optical.tif / <layer>.tif plus manifest.parquet"
    layout = "<root>/{dataset.json,manifest.parquet}, <root>/<region>/<tile>/{sar,optical,<layer>}.tif"

    @classmethod
    def detect(cls, root: Path) -> bool:
        info = root / DATASET_FILE
        if not (info.is_file() and (root / MANIFEST_FILE).is_file()):
            return False
        return declared_reader(root) == cls.name

    @classmethod
    def index(cls, root: Path, **options: Any) -> IndexResult:
        return IndexResult(manifest=Manifest.load(root))

    @classmethod
    def load(cls, record: dict[str, Any], info: DatasetInfo, data_root: Path, options: LoadOptions) -> PairedSample:
        sar = read_raster(join(data_root, record["sar_path"]), expected_bands=len(info.sar_bands))
        optical = read_raster(join(data_root, record["optical_path"]), expected_bands=len(info.optical_bands))
        check_same_grid(sar.grid, optical.grid, sar.path, optical.path)
        layers = record_layers(record)
        arrays: dict[str, np.ndarray | None] = {"mask": None, "noisy_mask": None}
        for key, layer in (("mask", options.mask_layer), ("noisy_mask", options.noisy_layer)):
            if layer is None:
                continue
            if layer not in layers:
                raise DataError(f"tile {record['tile_id']!r}: no label layer {layer!r}; it has {sorted(layers)}")
            arrays[key] = load_layer(join(data_root, layers[layer]), layer, sar.grid, sar.path)
        return PairedSample(
            sar=sar.data,
            optical=optical.data,
            meta=record_meta(record),
            mask=arrays["mask"],
            noisy_mask=arrays["noisy_mask"],
            label=int(record["scene_label"]),
        )
