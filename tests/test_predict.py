"""`xmodal predict`: windows and blending without seams, georeferenced outputs, refusals by name,
scores equal to training's metrics, and one run end to end (plain training, Ray Data prediction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import CRS, native_info
from rasterio.transform import from_origin
from specs import small_segmentation_run
from torch import nn

from xmodal.cli.main import main
from xmodal.data.geotiff import RasterGrid, write_raster
from xmodal.data.stats import BandStats, DatasetStats
from xmodal.engine.results import INFERENCE_FILE
from xmodal.errors import ConfigError, DataError
from xmodal.losses import predict_classes
from xmodal.methods.base import Export
from xmodal.methods.exports import save_exports
from xmodal.methods.metrics import SegmentationMeter
from xmodal.models import build_network
from xmodal.predict import PredictSettings, predict
from xmodal.predict.model import class_probabilities
from xmodal.predict.run import _refusal_in, check_scene, describe_scores
from xmodal.predict.windows import blend_weights, scene_windows, window_starts

VV_MEAN, VV_STD = -12.0, 3.0
ORIGIN, PIXEL = (500_000.0, 5_700_000.0), 2.0


class ThresholdOfBand0(nn.Module):
    """A model that predicts its own input: building where normalised band 0 > 0 (VV above its mean)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.where(image[:, :1] > 0, 10.0, -10.0)


def record_dict() -> dict:
    band = lambda name, unit, mean, std: BandStats(name, unit, mean, std, mean - 2 * std, mean + 2 * std, 1.0)  # noqa: E731
    stats = DatasetStats(
        sar=[band("VV", "dB", VV_MEAN, VV_STD), band("VH", "dB", -19.0, 3.0)],
        optical=[band(b, "reflectance", 0.1, 0.05) for b in ("B02", "B03", "B04", "B08")], sar_db=True, tiles=4,
    )
    return {
        "format": 1, "dataset": native_info(size=64).to_dict(), "stats": stats.to_dict(), "sar_db": True, "clip_sigma": 6.0,
        "tile_size": 64, "mask_layer": "buildings", "class_names": ["background", "building"], "ignore_index": 255,
    }


def stub_checkpoint(folder: Path) -> Path:
    """A checkpoint folder with a one-logit SAR segmenter export, an encoder export and the inference record."""
    segmenter = build_network("segmenter", arch="unet", encoder="resnet18", in_channels=2, classes=1, encoder_depth=3, decoder_channels=[16, 8, 8])
    encoder = build_network("encoder", encoder="resnet18", in_channels=2, depth=3)
    save_exports({"model": Export(segmenter, "sar", "stub"), "sar_encoder": Export(encoder, "sar", "an encoder")}, folder)
    (folder / INFERENCE_FILE).write_text(json.dumps(record_dict()))
    return folder


def write_scene(path: Path, vv: np.ndarray, *, names=("VV", "VH"), unit="dB", crs: str = CRS) -> RasterGrid:
    sar = np.stack([vv, np.full_like(vv, -19.0)])[: len(names)].astype(np.float32)
    transform = from_origin(*ORIGIN, PIXEL, PIXEL)
    write_raster(path, sar, crs=crs, transform=transform, nodata=float("nan"), descriptions=list(names), band_tags=[{"unit": unit}] * len(names))
    return RasterGrid(crs, tuple(transform)[:6], vv.shape[0], vv.shape[1])


def read_band(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(1), {"crs": src.crs.to_string(), "transform": tuple(src.transform)[:6], "shape": (src.height, src.width), "nodata": src.nodata, "dtype": src.dtypes[0], "count": src.count}


def test_windows_end_at_the_scene_edge_and_weights_keep_a_floor():
    assert window_starts(170, 64, 48) == [0, 48, 96, 106]
    assert window_starts(40, 64, 48) == [0]  # a scene smaller than one window: one window, padded
    grid = RasterGrid(CRS, (2.0, 0.0, 0.0, 0.0, -2.0, 0.0), 150, 170)
    windows = scene_windows(grid, 64, 16)
    assert max(r for r, _ in windows) + 64 == 150 and max(c for _, c in windows) + 64 == 170
    weights = blend_weights(64, 16)
    assert weights.min() == pytest.approx(1 / 17 ** 2) and weights[16:48, 16:48].min() == 1.0


def test_probabilities_give_the_class_map_training_scored():
    logits = torch.randn(3, 1, 8, 8)
    assert torch.equal(class_probabilities(logits).argmax(1), predict_classes(logits))
    logits = torch.randn(3, 4, 8, 8)
    assert torch.equal(class_probabilities(logits).argmax(1), predict_classes(logits))


def test_a_model_of_its_own_input_is_reproduced_across_seams_georeferenced(tmp_path: Path):
    """A 150 x 170 scene (no multiple of the 64 px window) with a no-data corner: the blended class
    map equals the threshold of the input exactly, on the scene's grid, with 255 where no input."""
    checkpoint = stub_checkpoint(tmp_path / "checkpoint")
    rng = np.random.default_rng(0)
    vv = rng.normal(VV_MEAN, VV_STD, size=(150, 170)).astype(np.float32)
    vv[:20, :30] = np.nan
    grid = write_scene(tmp_path / "scene.tif", vv)
    summary = predict(
        PredictSettings(str(checkpoint), [str(tmp_path / "scene.tif")], str(tmp_path / "out"), overlap=16, probabilities=True, plain=True),
        model=ThresholdOfBand0(), log=lambda line: None,
    )
    expected = np.where(np.isnan(vv), 255, (vv - VV_MEAN) / VV_STD > 0).astype(np.uint8)
    classes, meta = read_band(tmp_path / "out" / "scene.tif")
    assert np.array_equal(classes, expected)
    assert meta == {"crs": CRS, "transform": grid.transform, "shape": (150, 170), "nodata": 255, "dtype": "uint8", "count": 1}
    probabilities, meta = read_band(tmp_path / "out" / "scene_probabilities.tif")
    assert meta["count"] == 2 and meta["dtype"] == "float32" and np.isnan(probabilities[:20, :30]).all()
    assert (tmp_path / "out" / "scene.png").is_file()
    written = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert written["windows"] == summary["windows"] == 3 * 4 and written["export"] == "model" and written["tiles_per_s"] > 0
    assert written["scenes"][0]["valid_fraction"] == pytest.approx(1 - 600 / (150 * 170))
    assert written["scenes"][0]["bounds"] == [ORIGIN[0], ORIGIN[1] - 150 * PIXEL, ORIGIN[0] + 170 * PIXEL, ORIGIN[1]]


def test_a_scene_smaller_than_the_window_is_padded_as_no_data(tmp_path: Path):
    checkpoint = stub_checkpoint(tmp_path / "checkpoint")
    vv = np.random.default_rng(1).normal(VV_MEAN, VV_STD, size=(40, 50)).astype(np.float32)
    write_scene(tmp_path / "small.tif", vv)
    predict(PredictSettings(str(checkpoint), [str(tmp_path / "small.tif")], str(tmp_path / "out"), plain=True), model=ThresholdOfBand0(), log=lambda line: None)
    classes, meta = read_band(tmp_path / "out" / "small.tif")
    assert meta["shape"] == (40, 50) and np.array_equal(classes, ((vv - VV_MEAN) / VV_STD > 0).astype(np.uint8))


def test_an_optical_segmenter_reads_optical_scenes(tmp_path: Path):
    """The same path for the other modality: an optical export, a 4-band reflectance scene
    (optical values are normalised as stored, never converted)."""
    checkpoint = stub_checkpoint(tmp_path / "checkpoint")
    optical = build_network("segmenter", arch="unet", encoder="resnet18", in_channels=4, classes=1, encoder_depth=3, decoder_channels=[16, 8, 8])
    save_exports({"optical_model": Export(optical, "optical", "optical stub")}, checkpoint)
    rng = np.random.default_rng(2)
    reflectance = rng.uniform(0.0, 0.2, size=(4, 70, 90)).astype(np.float32)
    write_raster(tmp_path / "s2.tif", reflectance, crs=CRS, transform=from_origin(*ORIGIN, PIXEL, PIXEL), nodata=float("nan"),
                 descriptions=["B02", "B03", "B04", "B08"], band_tags=[{"unit": "reflectance"}] * 4)
    summary = predict(
        PredictSettings(str(checkpoint), [str(tmp_path / "s2.tif")], str(tmp_path / "out"), export="optical_model", plain=True),
        model=ThresholdOfBand0(), log=lambda line: None,
    )
    classes, _ = read_band(tmp_path / "out" / "s2.tif")
    assert summary["modality"] == "optical" and np.array_equal(classes, (reflectance[0] > 0.1).astype(np.uint8))


def test_mismatched_bands_units_exports_and_inputs_are_refused_by_name(tmp_path: Path):
    checkpoint = stub_checkpoint(tmp_path / "checkpoint")
    from xmodal.predict.model import InferenceRecord

    record = InferenceRecord.from_dict(record_dict(), "inference.json")
    vv = np.full((32, 32), VV_MEAN, dtype=np.float32)
    write_scene(tmp_path / "hh.tif", vv, names=("HH", "HV"))
    with pytest.raises(DataError, match=r"hh.tif: sar bands \['HH', 'HV'\], the model was trained on \['VV', 'VH'\]"):
        check_scene(str(tmp_path / "hh.tif"), "sar", record)
    assert check_scene(str(tmp_path / "hh.tif"), "sar", record, names=["VV", "VH"]).bands.names == ["VV", "VH"]  # stated by the user
    write_scene(tmp_path / "linear.tif", np.full((32, 32), 0.05, dtype=np.float32), unit="linear")
    with pytest.raises(DataError, match="linear.tif: sar units differ .*VV is linear, trained on dB; VH is linear, trained on dB"):
        check_scene(str(tmp_path / "linear.tif"), "sar", record)
    write_scene(tmp_path / "ok.tif", vv)

    def run(**options):
        settings = {"source": str(checkpoint), "scenes": [str(tmp_path / "ok.tif")], "out": str(tmp_path / "out"), "plain": True, **options}
        return predict(PredictSettings(**settings), log=lambda line: None)

    with pytest.raises(DataError, match="export 'sar_encoder' is a 'encoder' network .*not a segmenter; segmenter exports here: \\['model'\\]"):
        run(export="sar_encoder")
    class NeedsMultiplesOf32(nn.Module):
        def forward(self, image: torch.Tensor) -> torch.Tensor:
            if image.shape[-1] % 32:
                raise RuntimeError(f"input size {image.shape[-1]} is not divisible by 32")
            return image[:, :1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("xmodal.predict.run.load_segmenter", lambda *args: NeedsMultiplesOf32())
        with pytest.raises(ConfigError, match="--window 100: export 'model' cannot take 100 x 100 windows .*not divisible by 32.*training tiles were 64 px"):
            run(window=100)
    (tmp_path / "labels.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(DataError, match="labels.geojson: cannot be read as a raster"):
        run(scenes=[str(tmp_path / "labels.geojson")])
    # A file whose header reads but whose pixels do not: the window is named, in one line (through Ray's wrappers too).
    damaged = tmp_path / "damaged.tif"
    write_raster(damaged, np.random.default_rng(0).normal(-12, 3, (2, 256, 256)).astype(np.float32), crs=CRS,
                 transform=from_origin(*ORIGIN, PIXEL, PIXEL), descriptions=["VV", "VH"], band_tags=[{"unit": "dB"}] * 2, compress="deflate")
    with open(damaged, "r+b") as handle:
        handle.seek(damaged.stat().st_size // 3)
        handle.write(b"\x00garbage" * 20_000)
    with pytest.raises(DataError, match=r"damaged.tif: the window at row \d+, column \d+ cannot be read"):
        run(scenes=[str(damaged)])
    ray_text = "ray.exceptions.RayTaskError(UserCodeException): ...\nxmodal.errors.DataError: a.tif: the window at row 0, column 0 cannot be read\n\nThe above"
    assert _refusal_in(ray_text) == "a.tif: the window at row 0, column 0 cannot be read" and _refusal_in("ValueError: x") is None
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(DataError, match="unfinished: a folder without a checkpoint"):
        run(source=str(tmp_path / "unfinished"))


def test_scores_are_the_training_metrics_on_known_cases(tmp_path: Path):
    """Labels equal to the prediction score IoU 1 (raster and vector); labels shifted by 10 px
    score the hand-computed IoU 1200 / 2000 and F1 2 x 1200 / 3200."""
    checkpoint = stub_checkpoint(tmp_path / "checkpoint")
    vv = np.full((80, 100), VV_MEAN - 5, dtype=np.float32)
    vv[10:50, 20:60] = VV_MEAN + 5  # a 40 x 40 building
    write_scene(tmp_path / "scene.tif", vv)
    same = np.zeros((80, 100), dtype=np.uint8)
    same[10:50, 20:60] = 1
    shifted = np.roll(same, 10, axis=1)
    transform = from_origin(*ORIGIN, PIXEL, PIXEL)
    for name, mask in (("same", same), ("shifted", shifted)):
        write_raster(tmp_path / f"{name}.tif", mask, crs=CRS, transform=transform, nodata=255)
    left, top = ORIGIN[0] + 20 * PIXEL, ORIGIN[1] - 10 * PIXEL
    square = [[left, top], [left + 80, top], [left + 80, top - 80], [left, top - 80], [left, top]]
    (tmp_path / "same.geojson").write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32631"}},
        "features": [{"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [square]}}],
    }))
    scores = {}
    for labels in ("same.tif", "shifted.tif", "same.geojson"):
        summary = predict(
            PredictSettings(str(checkpoint), [str(tmp_path / "scene.tif")], str(tmp_path / f"out-{labels}"), labels=[str(tmp_path / labels)], plain=True),
            model=ThresholdOfBand0(), log=lambda line: None,
        )
        scores[labels] = summary["scenes"][0]["scores"]["metrics"]
    assert scores["same.tif"]["iou"] == 1.0 and scores["same.geojson"]["iou"] == 1.0 and scores["same.tif"]["f1"] == 1.0
    assert scores["shifted.tif"]["iou"] == pytest.approx(1200 / 2000) and scores["shifted.tif"]["f1"] == pytest.approx(2400 / 3200)


def test_multi_class_scores_read_as_mean_and_per_class_iou():
    meter = SegmentationMeter(3, ["water", "trees", "built"], 255)
    meter.update(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 1, 2, 2, 255]))
    metrics, per_class = meter.compute()
    line = describe_scores({"labels": "lc.tif", "labelled_pixels": 5, "metrics": metrics, "per_class": per_class})
    assert line == "miou 0.667, accuracy 0.800, average accuracy 0.833; IoU water 1.000, trees 0.500, built 0.500 (5 labelled pixels of lc.tif)"


@pytest.mark.ray
def test_predict_a_trained_run_end_to_end(tiny_world: Path, tmp_path: Path, capsys, ray_local):
    """Train a tiny SAR U-Net one epoch (plain engine), mosaic two neighbouring tiles into a scene,
    and `xmodal predict RUN SCENE --labels` through Ray Data: a georeferenced class map and the
    scores of that map against the labels."""
    import yaml

    from xmodal.data.manifest import Manifest

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_segmentation_run("predict-me", str(tiny_world), str(tmp_path / "runs"), input="sar")))
    assert main(["run", str(config), "--plain"]) == 0
    run_dir = tmp_path / "runs" / "predict-me"
    checkpoint = Path(json.loads((run_dir / "run.json").read_text())["checkpoint"])
    assert json.loads((checkpoint / INFERENCE_FILE).read_text())["dataset"]["sar_bands"]["bands"][0] == {"name": "VV", "unit": "dB"}

    manifest = Manifest.load(tiny_world)
    by_id = {r["tile_id"]: r for r in manifest.records}
    left, right = by_id["r00_t0000"], by_id["r00_t0001"]
    assert right["left"] == left["right"] and right["top"] == left["top"]

    def mosaic(key: str) -> np.ndarray:
        paths = [json.loads(r["layers"])["buildings"] if key == "buildings" else r["sar_path"] for r in (left, right)]
        return np.concatenate([rasterio.open(tiny_world / p).read() for p in paths], axis=2)

    transform = from_origin(left["left"], left["top"], 2.0, 2.0)
    write_raster(tmp_path / "scene.tif", mosaic("sar"), crs=left["crs"], transform=transform, nodata=float("nan"),
                 descriptions=["VV", "VH"], band_tags=[{"unit": "dB"}] * 2)
    truth = mosaic("buildings")[0]
    write_raster(tmp_path / "labels.tif", truth, crs=left["crs"], transform=transform, nodata=255)
    capsys.readouterr()
    code = main(["predict", str(run_dir), str(tmp_path / "scene.tif"), "--out", str(tmp_path / "pred"), "--labels", str(tmp_path / "labels.tif")])
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert code == 0, err
    assert "scene.tif:" in out and "scores: iou" in out and "tiles/s" in out
    classes, meta = read_band(tmp_path / "pred" / "scene.tif")
    assert meta["shape"] == (64, 128) and meta["crs"] == left["crs"] and meta["transform"] == tuple(transform)[:6]
    assert set(np.unique(classes)) <= {0, 1}
    summary = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert summary["engine"] == "ray" and summary["windows"] == 3 and summary["run"] == str(run_dir)
    known = truth != 255
    tp = int(((classes == 1) & (truth == 1) & known).sum())
    union = int((((classes == 1) | (truth == 1)) & known).sum())
    assert summary["scenes"][0]["scores"]["metrics"]["iou"] == pytest.approx(tp / union if union else 0.0)

    # A checkpoint folder alone is enough; one from before inference.json falls back to the
    # statistics of its run's data.root, and says so.
    (checkpoint / INFERENCE_FILE).unlink()
    code = main(["predict", str(checkpoint), str(tmp_path / "scene.tif"), "--out", str(tmp_path / "again"), "--plain"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"no {INFERENCE_FILE} (a run from before it was recorded); normalising with {tiny_world / 'stats.json'}" in captured.out
    again, _ = read_band(tmp_path / "again" / "scene.tif")
    assert (again != classes).mean() < 1e-3  # the same normalisation (threads may move a borderline pixel)
