"""Shared fixtures: a hand-written native pair writer, a tiny synthetic world, one local Ray."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import from_origin

from xmodal.data.bands import BandSet
from xmodal.data.geotiff import write_raster
from xmodal.data.manifest import DatasetInfo, LabelLayer, Manifest, make_record

CRS = "EPSG:32631"

# A world small enough for CI yet with train/val/test regions and real physics.
TINY_WORLD = {"seed": 3, "regions": 4, "scenes_per_region": 10, "tile_size": 64}


def write_native_tile(
    root: Path,
    tile_id: str,
    *,
    origin: tuple[float, float] = (500_000.0, 5_700_000.0),
    size: int = 16,
    pixel: float = 2.0,
    sar_bands: int = 2,
    optical_bands: int = 4,
    sar_crs: str = CRS,
    optical_origin: tuple[float, float] | None = None,
    region: str = "r0",
    split: str = "train",
    seed: int = 0,
) -> dict:
    """Write one native-layout pair by hand (SAR in dB, optical reflectance, a building mask)."""
    rng = np.random.default_rng(seed)
    folder = root / region / tile_id
    sar = rng.normal(-12, 3, size=(sar_bands, size, size)).astype(np.float32)
    optical = rng.uniform(0.02, 0.4, size=(optical_bands, size, size)).astype(np.float32)
    mask = (rng.random((size, size)) < 0.2).astype(np.uint8)
    write_raster(folder / "sar.tif", sar, crs=sar_crs, transform=from_origin(*origin, pixel, pixel), nodata=float("nan"))
    opt_origin = optical_origin or origin
    write_raster(folder / "optical.tif", optical, crs=CRS, transform=from_origin(*opt_origin, pixel, pixel), nodata=float("nan"))
    write_raster(folder / "buildings.tif", mask, crs=CRS, transform=from_origin(*origin, pixel, pixel), nodata=255)
    left, top = origin
    return make_record(
        tile_id=tile_id,
        region=region,
        crs=CRS,
        bounds=(left, top - size * pixel, left + size * pixel, top),
        sar_path=f"{region}/{tile_id}/sar.tif",
        optical_path=f"{region}/{tile_id}/optical.tif",
        layers={"buildings": f"{region}/{tile_id}/buildings.tif"},
        split=split,
    )


def native_info(sar_bands: int = 2, optical_bands: int = 4, size: int = 16) -> DatasetInfo:
    return DatasetInfo(
        name="hand",
        reader="xmodal",
        sar_bands=BandSet.of("sar", ["VV", "VH", "HH", "HV"][:sar_bands], "dB"),
        optical_bands=BandSet.of("optical", ["B02", "B03", "B04", "B08"][:optical_bands], "reflectance"),
        layers={"buildings": LabelLayer(["background", "building"])},
        tile_size=size,
        pixel_size=2.0,
        sar_look="east",
    )


@pytest.fixture
def hand_dataset(tmp_path: Path) -> Manifest:
    """Six hand-written pairs in two regions (train and test), saved as a native dataset."""
    records = []
    for i in range(6):
        region = "r0" if i < 4 else "r1"
        records.append(
            write_native_tile(
                tmp_path, f"t{i}", origin=(500_000.0 + 100 * i, 5_700_000.0), region=region,
                split="train" if region == "r0" else "test", seed=i,
            )
        )
    manifest = Manifest(info=native_info(), records=records)
    manifest.save(tmp_path)
    return Manifest.load(tmp_path)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated synthetic world (4 regions x 10 scenes of 64 px: 2 train, 1 val, 1 test region)."""
    from xmodal.data.synth import synthesize

    root = tmp_path_factory.mktemp("world")
    synthesize(root, TINY_WORLD)
    return root


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds each time)."""
    import ray

    from xmodal.engine.session import connect

    connect(None, max(4, os.cpu_count() or 1), dashboard=False)
    yield ray
    ray.shutdown()
