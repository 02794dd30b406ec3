"""cromss (paper 003): settings, the consistency direction, weights without gradient, thresholds over
two real processes against the concatenated batch, exports, Table 1 placement, SSL4EO-S12 ->
DFC2020 through their readers, and a pretraining -> PSPNet transfer chain through Ray Train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gloo import method_context, process_group, spawn

from xmodal.errors import ConfigError
from xmodal.losses import consistency_loss
from xmodal.methods.base import DataSpec, MethodContext, ModelSettings
from xmodal.methods.cromss import PAPER_TABLES, CromssSettings, CrossModalSampleSelection, classify_run
from xmodal.methods.exports import load_export_into, save_exports
from xmodal.methods.optim import OptimSettings
from xmodal.models import build_network

torch.set_num_threads(1)
CLASSES = ("water", "trees", "grass", "flooded_vegetation", "crops", "shrub_and_scrub", "built", "bare", "snow_and_ice")
SPEC = DataSpec(
    sar_channels=2, optical_channels=4, sar_bands=("VV", "VH"), optical_bands=("B02", "B03", "B04", "B08"),
    num_classes=9, class_names=CLASSES, mask_layer="landcover", ignore_index=255,
    sar_mean=(0.0, 0.0), sar_std=(1.0, 1.0), tile_size=32, noisy_layer="landcover_noisy",
)
MODEL = ModelSettings(arch="unet", encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 8])
OPTIM = OptimSettings(epochs=1, lr=0.01, optimizer="sgd", schedule="constant")


def make_method(context: MethodContext | None = None, **settings) -> CrossModalSampleSelection:
    method = CrossModalSampleSelection(CromssSettings(**settings), MODEL, OPTIM, SPEC)
    method.setup(context or MethodContext(torch.device("cpu"), log=lambda line: None))
    return method


def logits(size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {m: 3 * torch.randn(size, 9, 8, 8, generator=generator) for m in ("sar", "optical")}


def noisy_target(size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 100)
    target = torch.randint(0, 9, (size, 8, 8), generator=generator)
    target[target == 8] = 7  # snow never occurs: a class absent from the batch
    target[0, 0, :3] = 255
    return target


def test_settings_variants_and_declarations():
    assert [CromssSettings(fusion=f, selection=s).variant for f in ("middle", "late") for s in (True, False)] == ["CromSS-midF", "midF", "CromSS-lateF", "lateF"]
    for bad, message in (({"fusion": "early"}, "fusion='early'"), ({"selection_ratio": 1.5}, "selection_ratio=1.5"),
                         ({"consistency": "js"}, "consistency='js'"), ({"balance": "pixel"}, "balance='pixel'")):
        with pytest.raises(ConfigError, match=message):
            CromssSettings(**bad)
    spec = CrossModalSampleSelection.metrics(CromssSettings())
    assert spec.select == "val/loss" and spec.mode == "min" and spec.labelled is False  # pretraining never reads clean labels
    assert {"noisy_mask", "sar", "optical"} <= set(CrossModalSampleSelection.needs(CromssSettings()).fields)
    binary = DataSpec(**{**SPEC.__dict__, "num_classes": 2, "class_names": ("background", "building")})
    with pytest.raises(ConfigError, match="9 classes"):
        CrossModalSampleSelection.check_data(CromssSettings(), binary)


def test_each_consistency_direction_is_weighted_by_the_target_modalitys_entity_confidence():
    method = make_method(ramp="none")  # gamma = 1 from the start: W_e = F'_e
    scores = logits(2)
    scores["optical"] = torch.zeros_like(scores["optical"])  # uniform: entity confidence 0 ...
    scores["optical"][0, 0, 4, 4] = 40.0  # ... except one confident pixel
    target, valid = noisy_target(2), torch.ones(2, 8, 8)
    _, logs = method.loss(scores, target, valid, select=True)
    # SAR learns from optical only where optical is confident: that one pixel.
    one_pixel = consistency_loss(scores["sar"][:1, :, 4:5, 4:5], scores["optical"][:1, :, 4:5, 4:5], None, "ce")
    assert logs["sar_consistency"] == pytest.approx(float(one_pixel), rel=1e-4)
    # Optical learns from the (confident) SAR branch over many pixels: not that single-pixel value.
    assert logs["optical_consistency"] != pytest.approx(float(consistency_loss(scores["optical"][:1, :, 4:5, 4:5], scores["sar"][:1, :, 4:5, 4:5], None, "ce")), rel=1e-2)
    # Without selection every pixel counts once.
    _, plain = method.loss(scores, target, valid, select=False)
    assert plain["sar_consistency"] == pytest.approx(float(consistency_loss(scores["sar"], scores["optical"], None, "ce")), rel=1e-5)


def test_selection_weights_carry_no_gradient_and_pixels_below_threshold_count_less():
    method = make_method()
    method.begin_epoch(200)  # alpha 0.5, gamma 1
    scores = {m: v.requires_grad_(True) for m, v in logits(2).items()}
    target = noisy_target(2)
    seg, con = method.selection(scores, target)
    for weights in (*seg.values(), *con.values()):
        assert not weights.requires_grad and weights.grad_fn is None
    counted = target != 255
    for m in ("sar", "optical"):
        kept = (seg[m][counted] >= 1).float().mean()
        assert 0.3 < kept < 0.6 and seg[m][~counted].eq(0).all()  # about half of each class at weight 1
    loss, _ = method.loss(scores, target, torch.ones(2, 8, 8), select=True)
    loss.backward()
    assert scores["sar"].grad is not None and torch.isfinite(scores["sar"].grad).all()


def threshold_worker(rank: int, port: int, folder: str) -> None:
    with process_group(rank, port):
        method = make_method(method_context(rank))
        method.begin_epoch(200)
        scores, target = logits(4), noisy_target(4)
        shard = slice(rank * 2, rank * 2 + 2)
        seg, _ = method.selection({m: v[shard] for m, v in scores.items()}, target[shard])
        torch.save(seg, Path(folder) / f"rank{rank}.pt")


def test_class_balanced_thresholds_over_two_workers_equal_those_over_the_concatenated_batch(tmp_path: Path):
    spawn(threshold_worker, str(tmp_path))
    method = make_method()
    method.begin_epoch(200)
    whole, _ = method.selection(logits(4), noisy_target(4))
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for m in ("sar", "optical"):
        assert torch.allclose(torch.cat([s[m] for s in shards]), whole[m])
    # Per-worker thresholds would differ: the test can fail.
    alone, _ = method.selection({m: v[:2] for m, v in logits(4).items()}, noisy_target(4)[:2])
    assert not torch.allclose(alone["sar"], whole["sar"][:2])


@pytest.mark.parametrize("fusion", ["middle", "late"])
def test_encoder_exports_are_the_branches_and_initialise_a_pspnet(tmp_path: Path, fusion: str):
    torch.manual_seed(0)
    method = make_method(fusion=fusion)
    exports = method.exports()
    assert set(exports) == {"model", "sar_encoder", "optical_encoder", "sar_segmenter", "optical_segmenter"}
    image = torch.randn(1, 2, 32, 32)
    network = method.network("model").eval()
    assert torch.allclose(exports["sar_segmenter"].module.eval()(image), network(image, "sar"), atol=1e-5)
    save_exports(exports, tmp_path)
    pspnet = build_network("segmenter", arch="pspnet", encoder="resnet18", in_channels=2, classes=9)
    report = load_export_into(pspnet, {"pre": tmp_path}, "pre", "sar_encoder", part="encoder")
    assert report["copied"] and all(key.startswith("encoder.") for key in report["copied"])
    sar = network.encoder("sar").state_dict()
    assert all(torch.equal(pspnet.state_dict()[k], sar[k.removeprefix("encoder.")]) for k in report["copied"])


def test_table_one_places_transfers_by_their_pretraining():
    def transfer(name, source, frozen, modality="sar"):
        settings = {"input": modality, "init": "pre" if source else None, "init_export": f"{modality}_encoder", "freeze_encoder": frozen}
        return {"name": name, "method": "supervised", "method_settings": settings, "inputs": {"pre": {"run": source, "checkpoint": "x"}} if source else {}}

    runs = [
        {"name": "c/cromss", "method": "cromss", "method_settings": {"fusion": "middle"}},
        {"name": "c/latef", "method": "cromss", "method_settings": {"fusion": "late", "selection": False}},
        {"name": "c/s1", "method": "supervised", "method_settings": {"input": "sar", "use_noisy_labels": True}},
        transfer("c/t1", "c/cromss", True), transfer("c/t2", "c/latef", False), transfer("c/t3", "c/s1", True),
        transfer("c/t4", None, False), transfer("c/t5", "c/cromss", False, "optical"),
    ]
    s1_miou = next(t for t in PAPER_TABLES if t["key"] == "cromss-table1-s1-miou")
    s2_oa = next(t for t in PAPER_TABLES if t["key"] == "cromss-table1-s2-oa")
    assert [classify_run(s1_miou, r, runs) for r in runs] == [
        None, None, None, ("cromss-midf", "frozen"), ("latef", "finetuned"), ("single", "frozen"), ("random", "finetuned"), None]
    assert classify_run(s2_oa, runs[-1], runs) == ("cromss-midf", "finetuned")
    assert s1_miou["paper"]["cromss-midf"] == {"frozen": 34.38, "finetuned": 35.17} and s2_oa["paper"]["single"]["frozen"] == 66.66


def prepared(raw: Path, reader: str, layer: str, out: Path) -> str:
    """A reader fixture indexed with the reader's own splits, its tiles without ``layer`` left out, prepared."""
    from xmodal.data.prepared import write_stats
    from xmodal.data.readers import get_reader

    manifest = get_reader(reader).index(raw).manifest
    manifest = manifest.with_records([r for r in manifest.records if layer in json.loads(r["layers"])])
    manifest.save(out)
    write_stats(manifest)
    return str(out)


def test_ssl4eo_pretraining_then_dfc2020_transfer_through_their_readers(tmp_path: Path):
    """Paper 003's data path: CromSS on SSL4EO-S12 with Dynamic World labels (fixture in the real
    layout), its S1 encoder into a frozen PSPNet on DFC2020 (fixture in the real layout)."""
    from fixtures.dfc2020 import make_dfc2020
    from fixtures.ssl4eo import make_ssl4eo

    from xmodal.engine.config import build_config
    from xmodal.engine.plain import run_plain

    common = {"tile_size": 32, "batch_size": 2, "allow_padding": True}  # the fixture's 24 px tiles
    base = {"model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
            "train": {"epochs": 1, "optimizer": "adam", "lr": 0.005}, "run": {"storage": str(tmp_path / "runs"), "panels": 0}}
    # SSL4EO's only labels are Dynamic World's: the noisy layer is also the evaluation reference.
    (pretrain,) = run_plain(build_config({
        **base, "name": "cromss-real/pretrain", "method": "cromss",
        "data": {"root": prepared(make_ssl4eo(tmp_path / "ssl4eo"), "ssl4eo_s12", "dynamic_world", tmp_path / "ssl4eo-prepared"),
                 "mask_layer": "dynamic_world", "noisy_layer": "dynamic_world", **common},
    }), log=lambda line: None)
    assert {"val/loss", "test/sar_miou", "test/optical_noisy_miou"} <= set(pretrain.metrics)
    (transfer,) = run_plain(build_config({
        **base, "name": "cromss-real/transfer", "method": "supervised", "inputs": {"pre": pretrain.checkpoint},
        "method_settings": {"input": "sar", "init": "pre", "init_export": "sar_encoder", "init_part": "encoder", "freeze_encoder": True},
        "model": {"arch": "pspnet", "encoder": "resnet18"},
        "data": {"root": prepared(make_dfc2020(tmp_path / "dfc2020"), "dfc2020", "dfc", tmp_path / "dfc-prepared"), "mask_layer": "dfc", **common},
    }), log=lambda line: None)
    assert {"test/miou", "test/accuracy", "test/average_accuracy"} <= set(transfer.metrics)


@pytest.mark.ray
def test_cromss_midf_pretraining_then_pspnet_transfer_on_two_workers(tiny_world: Path, tmp_path: Path, ray_local):
    """CromSS-midF through Ray Train on 2 workers (thresholds over both), then its SAR encoder in a
    frozen PSPNet on the clean land cover in the plain engine; Table 1 places the transfer."""
    from xmodal.engine.config import build_config
    from xmodal.engine.plain import run_plain
    from xmodal.engine.runner import run_experiment
    from xmodal.report.runs import render_run_report

    data = {"root": str(tiny_world), "mask_layer": "landcover", "noisy_layer": "landcover_noisy", "tile_size": 32, "batch_size": 2}
    base = {"train": {"epochs": 1, "optimizer": "adam", "lr": 0.005}, "run": {"storage": str(tmp_path / "runs"), "panels": 0}}
    (pretrain,) = run_experiment(build_config({
        **base, "name": "cromss-chain/pretrain", "method": "cromss", "method_settings": {"ramp_epochs": 1}, "data": data,
        "model": {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }))
    history = pretrain.summary["history"][0]
    assert pretrain.summary["metric"] == "val/loss" and history["train/alpha"] == pytest.approx(0.99663, abs=1e-4)
    assert 0 < history["train/sar_selected"] <= 1 and history["train/sar_consistency"] > 0
    assert {"val/sar_miou", "val/optical_miou", "val/sar_noisy_miou", "test/sar_miou"} <= set(pretrain.metrics)
    (transfer,) = run_plain(build_config({
        **base, "name": "cromss-chain/s1-frozen", "method": "supervised", "inputs": {"pre": pretrain.checkpoint}, "data": data,
        "method_settings": {"input": "sar", "init": "pre", "init_export": "sar_encoder", "init_part": "encoder", "freeze_encoder": True},
        "model": {"arch": "pspnet", "encoder": "resnet18"},
    }), log=lambda line: None)
    summary = json.loads((Path(transfer.results_dir) / "run.json").read_text())
    assert "test/average_accuracy" in summary["metrics"]
    text = render_run_report(tmp_path / "runs", echo=False).text
    assert "CromSS (paper 003), Table 1, S1 (SAR) input: test mIoU" in text and "CromSS-midF" in text
