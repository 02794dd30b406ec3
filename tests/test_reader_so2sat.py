"""So2Sat LCZ42 reader on generated HDF5 fixtures in the real layout (tests/fixtures/so2sat.py)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from fixtures.so2sat import ROWS, TRAINING_CLASSES, V3_ROWS, make_so2sat

from xmodal.data.manifest import record_extra
from xmodal.data.readers import LoadOptions, detect_reader
from xmodal.data.readers import so2sat as so2sat_module
from xmodal.data.readers.so2sat import So2SatReader, close_handles
from xmodal.data.splits import check_no_leakage
from xmodal.errors import ConfigError, DataError

S1_UNITS = ["complex_real", "complex_imag"] * 2 + ["linear"] * 2 + ["complex_real", "complex_imag"]


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_so2sat(tmp_path_factory.mktemp("so2sat_v2"), "2")


@pytest.fixture(scope="module")
def v3_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_so2sat(tmp_path_factory.mktemp("so2sat_v3"), "3")


@pytest.fixture(autouse=True)
def _close_cached_handles():
    yield
    close_handles()  # tests rewrite files; never leave a handle open on them


def _load(manifest, record, options: LoadOptions = LoadOptions()):
    return So2SatReader.load(record, manifest.info, manifest.data_root, options)


def _raw(root: Path, name: str, key: str, row: int) -> np.ndarray:
    with h5py.File(root / name, "r") as handle:
        return handle[key][row]


def test_detect(v2_root: Path, v3_root: Path, tmp_path: Path) -> None:
    assert So2SatReader.detect(v2_root) and So2SatReader.detect(v3_root) and So2SatReader.detect(v3_root / "block")
    assert not So2SatReader.detect(tmp_path)
    (tmp_path / "training.h5").write_bytes(b"not hdf5")  # a name alone is not enough
    assert not So2SatReader.detect(tmp_path)
    assert detect_reader(v2_root) is So2SatReader


def test_shapes_dtypes_channel_order_and_units(v2_root: Path) -> None:
    manifest = So2SatReader.index(v2_root).manifest
    info = manifest.info
    assert info.sar_bands.names == ["VH_re", "VH_im", "VV_re", "VV_im", "VH_lee", "VV_lee", "C12_re", "C12_im"]
    assert info.sar_bands.units == S1_UNITS
    assert info.optical_bands.names == ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]
    assert set(info.optical_bands.units) == {"reflectance"}
    assert info.layers == {} and len(info.scene_classes) == 17 and info.scene_classes[16] == "LCZ G: water"
    assert Path(info.data_root).is_absolute()
    record = manifest.records[3]
    assert record["sar_path"] == record["optical_path"] == "training.h5" and record_extra(record)["row"] == 3
    sample = _load(manifest, record)
    assert sample.sar.shape == (8, 32, 32) and sample.optical.shape == (10, 32, 32)
    assert sample.sar.dtype == sample.optical.dtype == np.float32 and sample.sar.flags.c_contiguous
    sen1, sen2 = _raw(v2_root, "training.h5", "sen1", 3), _raw(v2_root, "training.h5", "sen2", 3)
    for channel in range(8):
        np.testing.assert_array_equal(sample.sar[channel], sen1[..., channel].astype(np.float32))
    np.testing.assert_array_equal(sample.optical[8], sen2[..., 8].astype(np.float32))
    # Lee-filtered intensities are non-negative powers; complex parts take both signs.
    assert sample.sar[4:6].min() >= 0 and sample.sar[0].min() < 0 < sample.sar[0].max()
    assert sample.mask is None and sample.sar_valid.all() and sample.optical_valid.all()


def test_labels_are_argmax_and_splits_follow_files(v2_root: Path) -> None:
    result = So2SatReader.index(v2_root)
    manifest = result.manifest
    assert result.skipped == [] and manifest.info.extra["version"] == "2"
    for stem, split in (("training", "train"), ("validation", "val"), ("testing", "test")):
        chosen = [r for r in manifest.records if r["sar_path"] == f"{stem}.h5"]
        assert len(chosen) == ROWS[stem] and {r["split"] for r in chosen} == {split}
        with h5py.File(v2_root / f"{stem}.h5", "r") as handle:
            expected = handle["label"][()].argmax(axis=1)
        assert [r["scene_label"] for r in chosen] == expected.tolist()
    assert [r["scene_label"] for r in manifest.split("train")] == list(TRAINING_CLASSES)
    assert _load(manifest, manifest.records[0]).label == TRAINING_CLASSES[0]
    check_no_leakage(manifest.records)  # no CRS without v4 geolocation: nothing to compare


@pytest.mark.parametrize(("subset", "kept"), [("low-rise", (2, 5, 6, 7)), ("urban", (2, 5, 6, 7, 0))])
def test_class_subsets_keep_and_remap(v2_root: Path, subset: str, kept: tuple[int, ...]) -> None:
    manifest = So2SatReader.index(v2_root, classes=subset).manifest
    train = manifest.split("train")
    assert sorted(record_extra(r)["lcz_index"] for r in train) == sorted(kept)
    size = 4 if subset == "low-rise" else 10
    assert len(manifest.info.scene_classes) == size
    assert all(0 <= r["scene_label"] < size for r in manifest.records)
    if subset == "low-rise":
        assert manifest.info.scene_classes == [
            "LCZ 3: compact low-rise",
            "LCZ 6: open low-rise",
            "LCZ 7: lightweight low-rise",
            "LCZ 8: large low-rise",
        ]
        assert {record_extra(r)["lcz_index"]: r["scene_label"] for r in train} == {2: 0, 5: 1, 6: 2, 7: 3}
    with pytest.raises(ConfigError, match="classes"):
        So2SatReader.index(v2_root, classes="rural")


def test_v3_variants_splits_and_val_carve(v3_root: Path) -> None:
    with pytest.raises(ConfigError, match="variant"):
        So2SatReader.index(v3_root)
    manifest = So2SatReader.index(v3_root, variant="culture_10").manifest
    assert manifest.info.extra["version"] == "3" and manifest.records[0]["sar_path"] == "culture_10/training.h5"
    assert len(manifest.split("train")) == V3_ROWS["training"] and len(manifest.split("test")) == V3_ROWS["testing"]
    assert manifest.split("val") == []
    with pytest.raises(ConfigError, match="variant 'v9'"):
        So2SatReader.index(v3_root, variant="v9")
    direct = So2SatReader.index(v3_root / "block").manifest
    assert direct.info.extra["variant"] == "block" and direct.records[0]["sar_path"] == "training.h5"
    carved = [So2SatReader.index(v3_root, variant="random", val_fraction=0.5, seed=3).manifest for _ in range(2)]
    splits = [[r["split"] for r in m.records] for m in carved]
    assert splits[0] == splits[1] and "val" in splits[0] and "train" in splits[0]
    assert all(r["sar_path"] == "random/training.h5" for r in carved[0].split("val"))
    with pytest.raises(ConfigError, match="v3 only"):
        So2SatReader.index(v3_root, version="2", val_fraction=0.1)


def test_v2_files_beside_v3_folders_mean_v2_unless_a_variant_is_named(tmp_path: Path) -> None:
    root = make_so2sat(make_so2sat(tmp_path / "both", "2"), "3")  # TorchGeo keeps both side by side
    assert So2SatReader.index(root).manifest.info.extra["version"] == "2"
    assert So2SatReader.index(root, variant="block").manifest.info.extra["variant"] == "block"


def test_missing_dataset_or_inconsistent_rows_raise(tmp_path: Path) -> None:
    root = make_so2sat(tmp_path / "broken", "2")
    with h5py.File(root / "validation.h5", "r+") as handle:
        del handle["sen1"]
    with pytest.raises(DataError, match=r"validation\.h5.*'sen1'"):
        So2SatReader.index(root)
    with h5py.File(root / "validation.h5", "r+") as handle:
        handle.create_dataset("sen1", data=np.zeros((ROWS["validation"] + 1, 32, 32, 8)))
    with pytest.raises(DataError, match=r"validation\.h5.*number of patches"):
        So2SatReader.index(root)


def test_load_names_missing_key_and_file(tmp_path: Path) -> None:
    root = make_so2sat(tmp_path / "late", "2")
    manifest = So2SatReader.index(root).manifest
    with h5py.File(root / "testing.h5", "r+") as handle:
        del handle["sen2"]
    with pytest.raises(DataError, match=r"testing\.h5.*'sen2'"):
        _load(manifest, manifest.split("test")[0])
    (root / "training.h5").unlink()
    with pytest.raises(DataError, match=r"training\.h5: file not found"):
        _load(manifest, manifest.records[0])
    with pytest.raises(DataError, match="no per-pixel label layer"):
        _load(manifest, manifest.split("val")[0], LoadOptions(mask_layer="lcz"))


def test_non_finite_values_become_flagged_nan(tmp_path: Path) -> None:
    root = make_so2sat(tmp_path / "nan", "2")
    with h5py.File(root / "training.h5", "r+") as handle:
        handle["sen1"][1, 4, 5, 2] = np.nan
        handle["sen2"][1, 6, 7, 0] = np.inf
        handle["label"][2] = np.zeros(17)  # no class: reported, not guessed
    result = So2SatReader.index(root)
    assert [s.item for s in result.skipped] == ["training.h5[2]"] and "not one-hot" in result.skipped[0].reason
    manifest = result.manifest
    sample = _load(manifest, manifest.records[1])
    assert np.isnan(sample.sar[2, 4, 5]) and not sample.sar_valid[4, 5] and sample.sar_valid.sum() == 32 * 32 - 1
    assert np.isnan(sample.optical[0, 6, 7]) and not sample.optical_valid[6, 7]
    assert not sample.valid()[4, 5] and not sample.valid()[6, 7]


_FORKED_MANIFEST = None


def _checksum_in_child(position: int) -> tuple[float, bool]:
    """Load one record in a forked worker; report a checksum and whether the handle is the child's own."""
    record = _FORKED_MANIFEST.records[position]
    sample = _load(_FORKED_MANIFEST, record)
    return float(np.nansum(sample.sar) + np.nansum(sample.optical)), so2sat_module._handles_pid == os.getpid()


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="checks that HDF5 handles are reopened after os.fork; platforms without fork (Windows) never inherit handles")
def test_cached_handles_survive_a_fork(v2_root: Path) -> None:
    global _FORKED_MANIFEST
    manifest = So2SatReader.index(v2_root).manifest
    samples = [_load(manifest, record) for record in manifest.records[:4]]
    expected = [float(np.nansum(s.sar) + np.nansum(s.optical)) for s in samples]
    _FORKED_MANIFEST = manifest  # the parent now holds open handles that the children inherit
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_checksum_in_child, range(4))
    assert [checksum for checksum, _ in results] == pytest.approx(expected)
    assert all(own for _, own in results)
    assert _load(manifest, manifest.records[0]).sar.shape == (8, 32, 32)  # parent handles still usable


@pytest.mark.parametrize(("release", "source"), [("2025-11", "coord"), ("re-release", "tfw (world-file order)")])
def test_v4_geolocation_gives_crs_and_footprints(tmp_path: Path, release: str, source: str) -> None:
    root = make_so2sat(tmp_path / "v4", "4", geo_release=release)
    manifest = So2SatReader.index(root).manifest
    assert manifest.info.extra["version"] == "4"
    first = manifest.records[0]
    assert first["crs"] == "EPSG:32632"
    bounds = (first["left"], first["bottom"], first["right"], first["top"])
    assert bounds == (400_000.0, 5_299_680.0, 400_320.0, 5_300_000.0)  # 32 px of 10 m from the corner
    assert all(r["right"] - r["left"] == r["top"] - r["bottom"] == 320.0 for r in manifest.records)
    assert {r["crs"] for r in manifest.split("test")} == {"EPSG:32633"}
    assert manifest.info.extra["geolocation"] == {f"{stem}_geo.h5": source for stem in ROWS}
    check_no_leakage(manifest.records)
    plain = So2SatReader.index(root, version="2").manifest
    assert plain.records[0]["crs"] == ""


def test_gdal_order_tfw_is_read_without_coord(tmp_path: Path) -> None:
    """Nov-2025 tfw rows are (x0, 10, 0, y0, 0, 10), not a world file: never a 4,000 km patch."""
    root = make_so2sat(tmp_path / "v4", "4", geo_release="2025-11")
    with_coord = So2SatReader.index(root).manifest
    for stem in ROWS:
        with h5py.File(root / f"{stem}_geo.h5", "r+") as handle:
            del handle["coord"]
    from_tfw = So2SatReader.index(root).manifest
    sides = ("left", "bottom", "right", "top")
    assert [from_tfw.records[0][k] for k in sides] == [400_000.0, 5_299_680.0, 400_320.0, 5_300_000.0]
    assert [[r[k] for k in sides] for r in from_tfw.records] == [[r[k] for k in sides] for r in with_coord.records]
    assert from_tfw.info.extra["geolocation"]["training_geo.h5"] == "tfw (GDAL order)"
    # A row of the official notebook's output: coord (the centre) is the tfw origin + 160 m east, - 160 m north.
    row = np.array([[550335.858, 10.0, 0.0, 4183214.43, 0.0, 10.0]])
    left, top, x_size, y_size, orders = so2sat_module.tfw_corners(row, Path("validation_geo.h5"))
    assert orders == ["gdal"] and (x_size[0], y_size[0]) == (10.0, 10.0)
    assert left[0] + 160.0 == pytest.approx(550495.858) and top[0] - 160.0 == pytest.approx(4183054.43)


def test_tfw_rows_fitting_neither_order_are_refused(tmp_path: Path) -> None:
    root = make_so2sat(tmp_path / "v4", "4", geo_release="re-release")
    with h5py.File(root / "training_geo.h5", "r+") as handle:
        handle["tfw"][2] = [10.0, 3.0, 0.0, -10.0, 400_000.0, 5_300_000.0]  # rotation D in a world file
    with pytest.raises(DataError, match=r"training_geo\.h5: 'tfw' row 2 .*neither GDAL geotransform order"):
        So2SatReader.index(root)


def test_the_cached_index_of_a_raw_folder_is_keyed_by_its_reader_options(tmp_path: Path):
    """A swept class subset must never read the index another subset wrote."""
    from xmodal.data.prepared import DataSettings, index_folder, resolve_manifest

    root = make_so2sat(tmp_path / "so2sat", "2")
    every = DataSettings(root=str(root), mask_layer=None)
    urban = DataSettings(root=str(root), mask_layer=None, reader_options={"classes": "urban"})
    assert index_folder(every) != index_folder(urban)
    all_classes, urban_classes = resolve_manifest(every), resolve_manifest(urban)
    assert len(all_classes.info.scene_classes) == 17 and len(urban_classes.info.scene_classes) == 10
    assert resolve_manifest(urban).info.scene_classes == urban_classes.info.scene_classes  # read back, not re-indexed
    clash = DataSettings(root=str(root), mask_layer=None, prepared_dir=str(index_folder(urban)), reader_options={"classes": "low-rise"})
    with pytest.raises(ConfigError, match=r"indexed with reader options \{'classes': 'urban'\}"):
        resolve_manifest(clash)


def test_an_index_kept_from_an_older_reader_version_is_made_again(tmp_path: Path, monkeypatch):
    """A raw folder indexed before a reader fix (So2Sat v4 footprints, say) must not train on the stale index."""
    import json

    from xmodal.data.prepared import INDEXED_BY_FILE, DataSettings, index_folder, prepare_data, resolve_manifest

    root = make_so2sat(tmp_path / "so2sat", "2")
    settings = DataSettings(root=str(root), mask_layer=None, tile_size=32)
    prepared = index_folder(settings)
    prepare_data(settings)  # index + statistics
    assert json.loads((prepared / INDEXED_BY_FILE).read_text()) == {"reader": "so2sat", "version": So2SatReader.version}
    marker = (prepared / "stats.json").stat().st_mtime_ns
    resolve_manifest(settings)
    assert (prepared / "stats.json").stat().st_mtime_ns == marker  # current: read back as it is
    monkeypatch.setattr(So2SatReader, "version", So2SatReader.version + 1)
    resolve_manifest(settings)
    assert json.loads((prepared / INDEXED_BY_FILE).read_text())["version"] == So2SatReader.version
    assert not (prepared / "stats.json").exists()  # the old statistics went with the old index
    prepare_data(settings)
    (prepared / INDEXED_BY_FILE).unlink()  # an index from before versions were recorded counts as version 1
    resolve_manifest(settings)
    assert (prepared / INDEXED_BY_FILE).is_file()
