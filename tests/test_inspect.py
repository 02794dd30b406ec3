"""`inspect_dataset` / `format_inspection` on every reader's fixture."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures.dfc2020 import make_dfc2020
from fixtures.sen12ms import file_path as sen12ms_file, make_sen12ms
from fixtures.so2sat import make_so2sat
from fixtures.spacenet6 import make_spacenet6
from fixtures.ssl4eo import make_ssl4eo

from xmodal.data.inspect import format_inspection, inspect_dataset
from xmodal.errors import DataError

MAKERS = {
    "ssl4eo_s12": make_ssl4eo,
    "sen12ms": make_sen12ms,
    "dfc2020": make_dfc2020,
    "spacenet6": make_spacenet6,
    "so2sat": make_so2sat,
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("inspect")
    return {name: make(base / name) for name, make in MAKERS.items()}


def _check_report(report: dict, reader: str) -> None:
    assert report["reader"] == reader and not report["load_errors"]
    assert sum(report["splits"].values()) == report["num_pairs"] > 0
    assert report["tiles_loaded"] == min(50, report["num_pairs"]) - len(report["load_errors"])
    for modality in ("sar", "optical"):
        bands = report["modalities"][modality]["bands"]
        assert bands and all(band["unit"] and band["min"] is not None and band["min"] <= band["max"] for band in bands)
        assert all(0 <= band["nodata_fraction"] <= 1 for band in bands)
    json.dumps(report)  # the CLI may print it as JSON
    text = format_inspection(report)
    assert reader in text and "Pairs not made" in text and report["layout"] in text


@pytest.mark.parametrize("reader", sorted(MAKERS))
def test_inspect_names_the_layout(roots: dict[str, Path], reader: str) -> None:
    _check_report(inspect_dataset(roots[reader]), reader)


def test_inspect_details_of_sentinel_readers(roots: dict[str, Path]) -> None:
    ssl4eo = inspect_dataset(roots["ssl4eo_s12"])
    assert ssl4eo["skipped"]["count"] == 1 and "no S2 season" in ssl4eo["skipped"]["items"][0]["reason"]
    layer = ssl4eo["layers"]["dynamic_world"]
    assert len(layer["histogram"]) == 9 and sum(layer["histogram"].values()) > 0 and layer["unknown_pixels"] > 0
    assert [b["unit"] for b in ssl4eo["modalities"]["sar"]["bands"]] == ["dB", "dB"]
    assert ssl4eo["modalities"]["optical"]["invalid_fraction"] > 0  # the no-data strip is counted

    sen12ms = inspect_dataset(roots["sen12ms"], max_tiles=3)
    assert sen12ms["tiles_loaded"] == 3 and set(sen12ms["layers"]) == {"igbp", "dfc"}
    dfc2020 = inspect_dataset(roots["dfc2020"], protocol="original")
    assert set(dfc2020["splits"]) == {"val", "test"} and dfc2020["extra"]["protocol"] == "original"
    l2a = inspect_dataset(roots["ssl4eo_s12"], max_tiles=1, optical_product="s2a")
    assert len(l2a["modalities"]["optical"]["bands"]) == 12


def test_inspect_shows_spacenet6_public_test_tiles_apart(roots: dict[str, Path]) -> None:
    report = inspect_dataset(roots["spacenet6"])
    # The SAR-only public test tiles (no labels, no optical) are never scored as test.
    assert report["splits"] == {"train": 3, "val": 1, "test": 2, "unassigned": 3}
    assert report["unassigned"] == {"straddling": 1, "test_public": 2}
    assert "unassigned 3 [straddling 1, test_public 2]" in format_inspection(report)
    assert inspect_dataset(roots["so2sat"], max_tiles=1)["unassigned"] == {}


def test_inspect_a_partial_spacenet6_download_without_options(tmp_path: Path) -> None:
    report = inspect_dataset(make_spacenet6(tmp_path / "sn6", optical_products=("PS-RGB",)), max_tiles=3)
    assert report["extra"]["optical_product"] == "PS-RGB" and not report["load_errors"]
    assert [b["name"] for b in report["modalities"]["optical"]["bands"]] == ["R", "G", "B"]
    assert "Note:     optical product PS-RGB: no PS-RGBNIR tiles" in format_inspection(report)


def test_inspect_native_layout(hand_dataset) -> None:
    report = inspect_dataset(hand_dataset.folder)
    _check_report(report, "xmodal")
    assert report["splits"] == {"train": 4, "test": 2} and "buildings" in report["layers"]


def test_inspect_reports_load_errors_and_refuses_unknown_folders(roots: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(roots["sen12ms"], tmp_path / "sen12ms"))
    damaged = sen12ms_file(copy, "ROIs1158_spring", "s2", 1, 1)
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    report = inspect_dataset(copy)
    assert [e["tile_id"] for e in report["load_errors"]] == ["ROIs1158_spring_1_p1"]
    assert damaged.name in report["load_errors"][0]["error"] and damaged.name in format_inspection(report)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no known dataset layout"):
        inspect_dataset(empty)
