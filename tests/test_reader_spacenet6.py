"""SpaceNet 6 reader on a generated fixture in the real layout (tests/fixtures/spacenet6.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from fixtures.spacenet6 import (
    AOI_DIR,
    BUILDING_BOX,
    NAN_PIXEL,
    NODATA_COLUMNS,
    STRIP_SOUTH,
    TILE_PX,
    TRAIN_TILES,
    make_spacenet6,
    tile_name,
)
from rasterio.transform import Affine

from xmodal.data.manifest import Manifest, record_extra
from xmodal.data.readers import LoadOptions, detect_reader, get_reader
from xmodal.data.readers.spacenet6 import SpaceNet6Reader, restore_orientation
from xmodal.data.sample import IGNORE_INDEX
from xmodal.data.splits import SplitSettings, check_no_leakage
from xmodal.errors import ConfigError, DataError, PairingError

BUILDINGS = LoadOptions(mask_layer="buildings")
BOX_PIXEL = (12, 15)  # inside BUILDING_BOX in north-up pixels
OUTSIDE_PIXEL = (2, 28)


@pytest.fixture(scope="module")
def sn6_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_spacenet6(tmp_path_factory.mktemp("sn6"))


@pytest.fixture(scope="module")
def indexed(sn6_root: Path):
    return SpaceNet6Reader.index(sn6_root)


@pytest.fixture
def fresh_root(tmp_path: Path) -> Path:
    """A fixture copy a test may damage."""
    return make_spacenet6(tmp_path / "sn6")


def _record(manifest: Manifest, tile: int, subset: str = "train") -> dict:
    return next(r for r in manifest.records if record_extra(r)["tile"] == tile and record_extra(r)["subset"] == subset)


def _load(result, record: dict, options: LoadOptions = BUILDINGS):
    return SpaceNet6Reader.load(record, result.manifest.info, result.manifest.data_root, options)


def _raw_sar(root: Path, tile: int) -> np.ndarray:
    spec = next(t for t in TRAIN_TILES if t.number == tile)
    with rasterio.open(root / AOI_DIR / "SAR-Intensity" / tile_name("train", "SAR-Intensity", spec)) as src:
        return src.read()


def test_detect(sn6_root: Path, tmp_path: Path) -> None:
    assert SpaceNet6Reader.detect(sn6_root)
    assert SpaceNet6Reader.detect(sn6_root / AOI_DIR)
    assert not SpaceNet6Reader.detect(tmp_path)
    assert detect_reader(sn6_root) is SpaceNet6Reader


def test_pairs_products_by_strip_and_tile(indexed) -> None:
    manifest = indexed.manifest
    assert indexed.skipped == []
    assert len(manifest) == len(TRAIN_TILES) + 2  # every train tile paired, plus 2 public-test tiles
    for record in manifest.records:
        extra = record_extra(record)
        key = f"{extra['strip']}_tile_{extra['tile']}."
        assert record["sar_path"].endswith(key + "tif") and "SAR-Intensity" in record["sar_path"]
        if extra["subset"] == "train":
            assert record["optical_path"].endswith(key + "tif") and "/PS-RGBNIR/" in record["optical_path"]
            assert json.loads(record["layers"])["buildings"].endswith(key + "geojson")
        assert record["region"] == extra["strip"]
    assert Path(manifest.info.data_root).is_absolute()


def test_shapes_dtypes_units(sn6_root: Path, indexed) -> None:
    info = indexed.manifest.info
    assert info.sar_bands.names == ["HH", "HV", "VH", "VV"]
    assert set(info.sar_bands.units) == {"log_intensity"}
    assert info.optical_bands.names == ["R", "G", "B", "NIR"] and set(info.optical_bands.units) == {"dn"}
    assert info.layers["buildings"].classes == ["background", "building"]
    assert (info.tile_size, info.pixel_size, info.sar_look) == (TILE_PX, 0.5, "south")
    sample = _load(indexed, _record(indexed.manifest, 101))
    assert sample.sar.shape == (4, TILE_PX, TILE_PX) and sample.sar.dtype == np.float32
    assert sample.optical.shape == (4, TILE_PX, TILE_PX) and sample.optical.dtype == np.float32
    assert sample.mask.dtype == np.int64
    np.testing.assert_array_equal(sample.sar, _raw_sar(sn6_root, 101))
    assert sample.optical.max() > 255  # uint16 digital numbers, unscaled


@pytest.mark.parametrize(("product", "bands"), [("PS-RGB", 3), ("RGBNIR", 4)])
def test_other_optical_products(sn6_root: Path, product: str, bands: int) -> None:
    result = SpaceNet6Reader.index(sn6_root, optical_product=product)
    assert result.skipped == []
    record = _record(result.manifest, 106)  # edge tile: no-data must survive resampling
    assert f"/{product}/" in record["optical_path"]
    sample = _load(result, record)
    assert sample.optical.shape == (bands, TILE_PX, TILE_PX)
    assert not sample.optical_valid[:, :NODATA_COLUMNS].any() and sample.optical_valid[:, NODATA_COLUMNS:].all()
    assert np.isfinite(sample.optical[:, sample.optical_valid]).all()
    if product == "RGBNIR":  # 2 m / 8 px onto the 0.5 m / 32 px SAR grid
        assert result.manifest.info.extra["optical_resampling"] == "bilinear"
        assert sample.optical[:, sample.optical_valid].max() <= 1586


def test_building_mask_rasterised_where_the_polygon_is(indexed) -> None:
    sample = _load(indexed, _record(indexed.manifest, 101))
    r0, r1, c0, c1 = BUILDING_BOX
    assert sample.mask[BOX_PIXEL] == 1 and sample.mask[OUTSIDE_PIXEL] == 0
    assert sample.mask[r0:r1, c0:c1].all() and sample.mask[r0 - 1, c0] == 0 and sample.mask[r0, c1] == 0
    # The second polygon crosses the tile's south edge: only its inside rows are burnt.
    assert sample.mask[TILE_PX - 4 :, 2:6].all() and sample.mask[TILE_PX - 5, 2] == 0
    empty = _load(indexed, _record(indexed.manifest, 107))
    assert (empty.mask == 0).all()
    assert _load(indexed, _record(indexed.manifest, 101), LoadOptions()).mask is None


def test_orientation_one_is_rotated_and_restored(sn6_root: Path, indexed) -> None:
    record = _record(indexed.manifest, 103)
    assert record_extra(record)["strip"] == STRIP_SOUTH
    assert record_extra(record)["orientation"] == 1 and record_extra(record)["rotated"]
    assert record_extra(_record(indexed.manifest, 101))["rotated"] is False
    sample = _load(indexed, record)
    np.testing.assert_array_equal(sample.sar, _raw_sar(sn6_root, 103)[:, ::-1, ::-1])
    row, col = BOX_PIXEL
    assert sample.mask[TILE_PX - 1 - row, TILE_PX - 1 - col] == 1 and sample.mask[row, col] == 0
    restored = restore_orientation(sample.mask, record)
    assert restored[row, col] == 1
    assert torch.equal(restore_orientation(torch.from_numpy(sample.mask), record), torch.from_numpy(restored))
    np.testing.assert_array_equal(restore_orientation(sample.sar, sample), _raw_sar(sn6_root, 103))
    unrotated = SpaceNet6Reader.index(sn6_root, rotate=False)
    assert unrotated.manifest.info.sar_look is None
    plain = _load(unrotated, _record(unrotated.manifest, 103))
    assert plain.mask[row, col] == 1


def test_nodata_is_nan_flagged_and_unlabelled(indexed) -> None:
    sample = _load(indexed, _record(indexed.manifest, 106))
    assert not sample.sar_valid[:, :NODATA_COLUMNS].any() and not sample.sar_valid[NAN_PIXEL]
    assert np.isnan(sample.sar[:, ~sample.sar_valid]).all()
    assert (sample.mask[~sample.sar_valid] == IGNORE_INDEX).all()
    assert sample.extra["sar_nodata_fraction"] > 0.25
    for record in indexed.manifest.records:
        loaded = _load(indexed, record)
        assert np.isfinite(loaded.sar[:, loaded.sar_valid]).all()
        assert np.isfinite(loaded.optical[:, loaded.optical_valid]).all()
        assert not (~np.isfinite(loaded.sar).all(axis=0) & loaded.sar_valid).any()


def test_split_is_geographic_without_leakage(indexed) -> None:
    records = indexed.manifest.records
    check_no_leakage(records)
    spans = {}
    for split in ("train", "val", "test"):
        chosen = [r for r in records if r["split"] == split and record_extra(r)["subset"] == "train"]
        assert chosen, split
        spans[split] = (min(r["left"] for r in chosen), max(r["right"] for r in chosen))
    assert spans["train"][1] <= spans["val"][0] and spans["val"][1] <= spans["test"][0]
    straddling = _record(indexed.manifest, 104)  # reaches from band 2 into band 3
    assert straddling["split"] == "unassigned" and record_extra(straddling)["unassigned_reason"] == "straddling"
    assert indexed.manifest.info.extra["split"]["unassigned"] == {"straddling": 1, "test_public": 2}
    kept = SpaceNet6Reader.index(indexed.manifest.data_root, exclude_straddling=False)
    assert _record(kept.manifest, 104)["split"] == "train"
    with pytest.raises(ConfigError, match="both val and test"):
        SpaceNet6Reader.index(indexed.manifest.data_root, val_bands=(4,), test_bands=(4,))


def test_public_test_tiles_are_sar_only_and_never_scored(indexed) -> None:
    public = [r for r in indexed.manifest.records if record_extra(r)["subset"] == "test_public"]
    assert len(public) == 2 and all(r["optical_path"] == "" for r in public)
    # No labels and zero optical: out of train, val and test, flagged apart from straddling tiles.
    assert all(r["split"] == "unassigned" and record_extra(r)["unassigned_reason"] == "test_public" for r in public)
    for split in ("train", "val", "test"):
        assert all(r["optical_path"] and json.loads(r["layers"]) for r in indexed.manifest.split(split)), split
    sample = _load(indexed, public[0])
    assert sample.optical.shape == (4, TILE_PX, TILE_PX) and not sample.optical.any()
    assert not sample.optical_valid.any() and sample.sar_valid.all()
    assert (sample.mask == IGNORE_INDEX).all()
    # `xmodal data split` re-splits the rest and leaves them where they are.
    for by in ({"by": "region"}, {"by": "blocks", "block_size": 200.0}):
        resplit = SplitSettings(val_fraction=0.2, test_fraction=0.3, **by).apply(indexed.manifest.records)
        assert [r["split"] for r in resplit if r["tile_id"] in {p["tile_id"] for p in public}] == ["unassigned"] * 2
        assert [r["tile_id"] for r in resplit] == [r["tile_id"] for r in indexed.manifest.records]


def test_missing_optical_is_skipped_with_reason(fresh_root: Path) -> None:
    tile = next(t for t in TRAIN_TILES if t.number == 102)
    (fresh_root / AOI_DIR / "PS-RGBNIR" / tile_name("train", "PS-RGBNIR", tile)).unlink()
    result = SpaceNet6Reader.index(fresh_root)
    assert [s.item for s in result.skipped] == [tile_name("train", "SAR-Intensity", tile)]
    assert "PS-RGBNIR" in result.skipped[0].reason and "not found" in result.skipped[0].reason
    assert all(record_extra(r)["tile"] != 102 for r in result.manifest.records)


def test_partial_optical_download_uses_a_product_that_exists(tmp_path: Path) -> None:
    root = make_spacenet6(tmp_path / "ps-rgb", optical_products=("PS-RGB",))
    result = SpaceNet6Reader.index(root)  # no options: PS-RGBNIR is absent, PS-RGB stands in
    info = result.manifest.info
    assert result.skipped == [] and info.extra["optical_product"] == "PS-RGB" and info.optical_bands.names == ["R", "G", "B"]
    assert "PS-RGB" in info.extra["notes"][0] and "no PS-RGBNIR tiles" in info.extra["notes"][0]
    assert _load(result, _record(result.manifest, 101)).optical.shape == (3, TILE_PX, TILE_PX)
    assert SpaceNet6Reader.index(make_spacenet6(tmp_path / "full")).manifest.info.extra["notes"] == []
    with pytest.raises(DataError, match=r"PS-RGBNIR.*present: PS-RGB"):  # asked for, absent
        SpaceNet6Reader.index(root, optical_product="PS-RGBNIR")
    shutil.rmtree(root / AOI_DIR / "PS-RGB")
    with pytest.raises(DataError, match=r"no SpaceNet 6 optical tiles in .*PS-RGBNIR, .*PS-RGB, .*RGBNIR"):
        SpaceNet6Reader.index(root)


def test_geojson_without_crs_must_hold_lonlat(fresh_root: Path) -> None:
    result = SpaceNet6Reader.index(fresh_root)
    record = _record(result.manifest, 101)
    path = result.manifest.data_root / json.loads(record["layers"])["buildings"]
    expected = _load(result, record).mask
    collection = json.loads(path.read_text())
    del collection["crs"]  # RFC 7946: lon/lat
    path.write_text(json.dumps(collection))
    np.testing.assert_array_equal(_load(result, record).mask, expected)
    tile = next(t for t in TRAIN_TILES if t.number == 101)
    ring = [[tile.left + x, tile.top - y, 0.0] for x, y in ((5, 4), (11, 4), (11, 8), (5, 8), (5, 4))]  # UTM metres
    collection["features"][0]["geometry"]["coordinates"] = [ring]
    path.write_text(json.dumps(collection))
    with pytest.raises(DataError, match=rf"{path.name}: .*no 'crs' member.*not lon/lat"):
        _load(result, record)


def test_truncated_sar_raises_naming_the_file(fresh_root: Path) -> None:
    result = SpaceNet6Reader.index(fresh_root)
    record = _record(result.manifest, 101)
    path = result.manifest.data_root / record["sar_path"]
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(DataError, match=path.name):
        _load(result, record)


def test_pair_with_other_bounds_is_refused(fresh_root: Path) -> None:
    result = SpaceNet6Reader.index(fresh_root)
    record = _record(result.manifest, 101)
    optical = result.manifest.data_root / record["optical_path"]
    with rasterio.open(optical) as src:
        data, profile = src.read(), src.profile
    tile = next(t for t in TRAIN_TILES if t.number == 101)
    profile["transform"] = Affine(0.5, 0.0, tile.left + 5.0, 0.0, -0.5, tile.top)  # 10 px east
    with rasterio.open(optical, "w", **profile) as dst:
        dst.write(data)
    with pytest.raises(PairingError, match="bounds differ"):
        _load(result, record)
    reindexed = SpaceNet6Reader.index(fresh_root)
    assert any("bounds differ" in s.reason for s in reindexed.skipped)


def test_orientations_file_option_and_errors(sn6_root: Path, tmp_path: Path) -> None:
    listing = tmp_path / "orientations.txt"
    listing.write_text(f"{STRIP_SOUTH} 0\n")
    result = SpaceNet6Reader.index(sn6_root, orientations_file=listing)
    assert record_extra(_record(result.manifest, 103))["rotated"] is False
    assert result.manifest.info.extra["strips_without_orientation"]  # other strips unlisted
    listing.write_text(f"{STRIP_SOUTH} 2\n")
    with pytest.raises(DataError, match="line 1"):
        SpaceNet6Reader.index(sn6_root, orientations_file=listing)
    with pytest.raises(DataError, match="not found"):
        SpaceNet6Reader.index(sn6_root, orientations_file=tmp_path / "absent.txt")
    with pytest.raises(ConfigError, match="unknown index option"):
        SpaceNet6Reader.index(sn6_root, optical="PS-RGB")


def test_saved_manifest_loads_through_the_registry(indexed, tmp_path: Path) -> None:
    indexed.manifest.save(tmp_path / "prepared")
    manifest = Manifest.load(tmp_path / "prepared")
    reader = get_reader(manifest.info.reader)
    sample = reader.load(manifest.records[0], manifest.info, manifest.data_root, BUILDINGS)
    assert sample.mask.shape == (TILE_PX, TILE_PX)


def test_root_can_be_the_aoi_folder(sn6_root: Path, tmp_path: Path) -> None:
    aoi = tmp_path / "AOI_11_Rotterdam"
    shutil.copytree(sn6_root / AOI_DIR, aoi)
    result = SpaceNet6Reader.index(aoi)
    assert len(result.manifest) == len(TRAIN_TILES)
    assert result.manifest.info.extra["orientations_file"].endswith("SummaryData/SAR_orientations.txt")
