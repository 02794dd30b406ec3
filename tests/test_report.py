"""The run-directory report renders from run.json files alone (no training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from xmodal.report.runs import build_report, collect_runs, render_run_report
from xmodal.errors import ConfigError

UNET_XCEPTION = {"arch": "unet", "encoder": "xception", "encoder_depth": None, "decoder_channels": None, "kwargs": {}}
SMALL_UNET = {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8], "kwargs": {}}


def write_run(storage: Path, name: str, method: str, settings: dict, test_iou: float | None, model: dict = UNET_XCEPTION, fraction: float = 1.0) -> None:
    """A run.json as the runner writes it at the end of a run."""
    metrics = {"val/iou": test_iou, "test/iou": test_iou, "test/miou": 0.5} if test_iou is not None else {}
    summary = {
        "name": name,
        "method": method,
        "method_settings": settings,
        "model": model,
        "data": {"root": "data/x", "mask_layer": "buildings", "labels": {"fraction": fraction, "count": None, "seed": 0, "stratify": False}},
        "epochs": 1,
        "metric": "val/iou",
        "metrics": metrics,
        "per_class": {},
        "checkpoint": str(storage / name / "checkpoint_000000"),
        "wall_seconds": 12.5,
    }
    folder = storage / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps(summary))
    # A checkpoint's per-epoch metrics.json sits in the same tree and must be ignored.
    (folder / "checkpoint_000000").mkdir(exist_ok=True)
    (folder / "checkpoint_000000" / "metrics.json").write_text(json.dumps({"val/iou": 0.9, "epoch": 1}))


@pytest.fixture
def grid_runs(tmp_path: Path) -> Path:
    storage = tmp_path / "runs"
    grid = "kd-grid"
    write_run(storage, f"{grid}/unet-xception_teacher", "supervised", {"input": "optical"}, 0.70)
    write_run(storage, f"{grid}/unet-xception_sar", "supervised", {"input": "sar"}, 0.45)
    for token, layers, iou in (("mid", "mid", 0.10), ("mf", "mid+fin", 0.40), ("int", "int", 0.42)):
        write_run(storage, f"{grid}/unet-xception_{token}", "kd", {"layers": layers}, iou)
        for stage, freeze, gain in (("ft-d", True, 0.05), ("ft-a", False, 0.10)):
            write_run(
                storage, f"{grid}/unet-xception_{token}_{stage}", "supervised",
                {"input": "sar", "init": "student", "init_export": "model", "freeze_encoder": freeze}, iou + gain,
            )
    # A demo chain on a model that is not a paper column, with phase names that carry no layer set.
    write_run(storage, "kd-demo/teacher", "supervised", {"input": "optical"}, 0.80, SMALL_UNET)
    write_run(storage, "kd-demo/sar_scratch", "supervised", {"input": "sar"}, 0.30, SMALL_UNET)
    write_run(storage, "kd-demo/reconstruct", "kd", {"layers": "int"}, 0.20, SMALL_UNET)
    write_run(storage, "kd-demo/ft_a", "supervised", {"input": "sar", "init": "student", "init_export": "model"}, 0.35, SMALL_UNET)
    # A label-fraction run, a run of an unknown method and a failed run without metrics.
    write_run(storage, "kd-lf/int_ft-a_lf005", "supervised", {"input": "sar", "init": "student"}, 0.30, fraction=0.05)
    write_run(storage, "kd-lf/int", "kd", {"layers": "int"}, 0.40)
    write_run(storage, "other/thing", "no-such-method", {}, 0.5)
    write_run(storage, "kd-grid/unet-xception_fin", "kd", {"layers": "fin"}, None)
    return storage


def test_collect_runs_reads_only_run_summaries(grid_runs: Path):
    runs = collect_runs(grid_runs)
    assert len(runs) == 19
    assert all("checkpoint_" not in run["results_dir"] for run in runs)
    assert {run["phase"] for run in runs} >= {"unet-xception_int_ft-a", "ft_a"}
    with pytest.raises(ConfigError, match="does not exist"):
        collect_runs(grid_runs / "missing")


def test_report_renders_table_2_with_paper_numbers(grid_runs: Path, tmp_path: Path, capsys):
    files = render_run_report(grid_runs, tmp_path / "out")
    assert files.markdown.read_text() == files.text == capsys.readouterr().out
    text = files.text
    assert "Table 2" in text and "UNet Xception" in text and "Int+Ft-A" in text
    # Ours beside the paper's: UNet Xception Int+Ft-A is 53.45 in the paper, 52.00 here.
    assert "52.00 / 53.45" in text and "45.00 / 48.61" in text
    # The demo's small UNet gets its own column with no paper numbers; its ft_a finds its kd run.
    assert "unet:resnet18" in text and "35.00 / -" in text
    assert "other/thing" in text  # unclaimed runs are still listed

    with files.csv.open() as handle:
        rows = list(csv.DictReader(handle))
    cell = {(r["row"], r["column"]): r for r in rows if r["table"] == "kd-table2"}
    assert cell[("int/ft_a", "unet-xception")]["ours"] == "52.00"
    assert cell[("int/ft_a", "unet-xception")]["paper"] == "53.45"
    assert cell[("int/ft_a", "unet-xception")]["delta"] == "-1.45"
    assert cell[("mid+fin/ft_d", "unet-xception")]["ours"] == "45.00"
    assert cell[("int/ft_a", "unet:resnet18")]["runs"] == "kd-demo/ft_a"
    assert cell[("int/ft_a@0.05", "unet-xception")]["ours"] == "30.00"
    assert cell[("fin", "unet-xception")]["ours"] == "" and cell[("fin", "unet-xception")]["paper"] == "39.67"
    assert cell[("sar", "deeplabv3plus-resnet50")]["paper"] == "34.33" and cell[("sar", "deeplabv3plus-resnet50")]["n_runs"] == "0"
    assert any(r["table"] == "other" and r["row"] == "other/thing" for r in rows)


def test_declarative_match_rules_without_a_classifier(grid_runs: Path):
    spec = {
        "key": "toy",
        "metric": "test/iou",
        "scale": 1.0,
        "rows": [{"key": "sar", "label": "SAR", "match": {"method": "supervised", "method_settings.input": "sar", "phase": "*sar*"}}],
        "columns": [{"key": "x", "label": "X", "match": {"model.encoder": ["xception", "tu-xception65"]}}],
        "paper": {"sar": {"x": 0.5}},
    }
    tables, others = build_report(collect_runs(grid_runs), lookup=lambda method: [(spec, None)])
    (table,) = tables
    cell = table.cells[("sar", "x")]
    assert [run["name"] for run in cell.runs] == ["kd-grid/unet-xception_sar"] and cell.ours == pytest.approx(0.45)
    assert len(others) == 18


def test_report_needs_runs(tmp_path: Path):
    with pytest.raises(ConfigError, match="no run summaries"):
        render_run_report(tmp_path, echo=False)


def test_artifacts_a_run_saves_are_drawn_and_listed(tmp_path: Path):
    """A method's artifacts (here a histogram and a map) round-trip through the run folder, get a
    picture each, and the run report links them."""
    import numpy as np

    from xmodal.figures import load_artifacts, render_panels, save_artifacts
    from xmodal.methods.panels import Artifact, PanelImage, PanelRow

    folder = tmp_path / "runs" / "m"
    histogram = Artifact("histogram", {"edges": np.arange(5.0), "counts": np.array([3, 1, 0, 2])}, "matching error", "px", "pairs")
    heat = Artifact("image", {"image": np.random.default_rng(0).random((9, 9))}, "correlation map")
    assert save_artifacts({"errors": histogram, "map": heat}, folder / "artifacts") == ["errors", "map"]
    loaded = load_artifacts(folder / "artifacts")
    assert loaded["errors"].kind == "histogram" and loaded["errors"].data["counts"].tolist() == [3, 1, 0, 2] and loaded["map"].title == "correlation map"
    assert (folder / "artifacts" / "errors.png").stat().st_size > 1000 and (folder / "artifacts" / "map.png").is_file()
    rows = [PanelRow([PanelImage("template", np.zeros((4, 4)), "gray"), PanelImage("map", np.ones((4, 4)), "heat", unit="cos")], title="pair 0")]
    assert render_panels(rows, folder / "panels.png").stat().st_size > 1000
    summary = {"name": "m", "method": "supervised", "metrics": {"test/iou": 0.5}, "metric": "val/iou", "report_metrics": ["test/iou"], "artifacts": ["errors", "map"]}
    (folder / "run.json").write_text(json.dumps(summary))
    text = render_run_report(tmp_path / "runs", echo=False).text
    assert "Artifacts:" in text and str(folder / "artifacts" / "errors.png") in text


# Paper 000, Table 2, typed from the paper's text (rows top to bottom, columns left to right:
# UNet MobileNetV2, UNet VGG19, UNet Xception, PSPNet, SegNet VGG19, DeepLabV3+ Xception,
# DeepLabV3+ ResNet50); None = '-'. Independent of xmodal.methods.kd.paper on purpose.
TYPED_TABLE_2 = {
    "Optical": (54.2, 66.51, 73.59, 76.39, 62.03, 42.07, 59.69),
    "SAR": (32.83, 25.09, 48.61, 35.43, 31.37, 28.92, 34.33),
    "Mid": (12.17, 8.67, 11.79, 5.41, 8.88, 12.78, 14.79),
    "Mid+Ft-D": (36.3, None, 42.39, 30.26, None, 26.66, 34.32),
    "Mid+Ft-A": (36.07, None, 43.85, 31.86, None, 32.2, 43.04),
    "Fin": (21.06, 27.5, 39.67, 25.88, 17.54, 19.86, 30.38),
    "Fin+Ft-D": (31.98, 37.69, 48.16, 35.62, None, 22.96, 38.77),
    "Fin+Ft-A": (33.96, 40.72, 50.23, 37.76, None, 28.72, 40.34),
    "M&F": (29.14, 22.72, 42.54, 34.46, 24.97, 18.45, 32.39),
    "M&F+Ft-D": (38.44, 32.99, 48.72, 36.44, None, 26.3, 32.39),
    "M&F+Ft-A": (37.72, 42.66, 53.27, 37.56, None, 31.95, 42.33),
    "Int": (30.41, 32.14, 41.14, 26.63, 29.87, 21.05, 35.06),
    "Int+Ft-D": (34.58, 33.33, 53.45, 32.51, 35.85, 24.74, 40.69),
    "Int+Ft-A": (37.99, 46.09, 53.45, 29.88, 42.73, 32.96, 42.73),
}


def _markdown_rows(text: str, title: str) -> dict[str, list[str]]:
    section = text[text.index(title):]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) != len(header):
            break
        rows[cells[0]] = cells[1:]
    return {"": header[1:], **rows}


def test_report_shows_every_paper_cell_of_table_2(grid_runs: Path, tmp_path: Path):
    """All 98 paper numbers of Table 2 as the report prints them, against the table typed above;
    the paper-mean column counts only the models with a value and says so."""
    text = render_run_report(grid_runs, tmp_path / "out", echo=False).text
    rows = _markdown_rows(text, "Cross-modal KD (paper 000), Table 2")
    assert rows[""][:7] == ["UNet MobileNetV2", "UNet VGG19", "UNet Xception", "PSPNet (vanilla enc.)", "SegNet VGG19", "DeepLabV3+ Xception", "DeepLabV3+ ResNet50"]
    mean_column = rows[""].index("Paper mean")
    checked = 0
    for label, values in TYPED_TABLE_2.items():
        printed = rows[label]
        for column, value in enumerate(values):
            paper_part = printed[column].rsplit(" / ", 1)[1]
            assert paper_part == ("-" if value is None else f"{value:.2f}"), (label, column, printed[column])
            checked += 1
        present = [v for v in values if v is not None]
        mean_text = printed[mean_column].rsplit(" / ", 1)[1]
        expected = f"{sum(present) / len(present):.2f}" + ("" if len(present) == 7 else f" ({len(present)} of 7)")
        assert mean_text == expected, (label, mean_text)
    assert checked == 98
    # The notes name what the table's '-' cells are and where our runs depart from the paper.
    assert "'-' = not run in the paper" in text and "SegNet VGG19 after Mid, Fin and M&F" in text
    assert "ImageNet" in text and "PS-RGBNIR" in text and "random 90/5/5" in text
    assert "Deviation: " in text and "sigmoid head" in text  # the fixture's runs record no binary_head
