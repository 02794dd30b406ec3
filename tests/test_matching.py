"""matching (paper 004): the correspondence map against explicit crops, the peak at a known shift,
critic clipping, which networks each update reaches, hard negatives, the exact labelled share, and
a demo-size run on 2 Ray Train workers with its error histogram."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from specs import BUILDINGS_32

from xmodal.errors import ConfigError
from xmodal.methods.base import DataSpec, MethodContext, ModelSettings
from xmodal.methods.matching import AdversarialMatching, MatchingSettings, correspondence_map, crop, error_statistics, peak
from xmodal.methods.optim import OptimSettings

torch.set_num_threads(1)
SPEC = DataSpec(**{**BUILDINGS_32.__dict__, "tile_size": 64})
OPTIM = OptimSettings(epochs=1, lr=0.001, optimizer="adam", schedule="constant",
                      optimizers={"critic": {"optimizer": "sgd", "lr": 0.004, "momentum": 0.9, "schedule": "constant"}})
SMALL = {"width": 0.125, "latent_dim": 16, "critic_hidden": [8, 4], "search_stride": 4}


def make_method(**settings) -> AdversarialMatching:
    method = AdversarialMatching(MatchingSettings(**{**SMALL, **settings}), ModelSettings(), OPTIM, SPEC)
    method.setup(MethodContext(torch.device("cpu"), log=lambda line: None))
    return method


def batch(size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    sar = torch.randn(size, 2, 64, 64, generator=generator)
    out = {"sar": sar, "optical": torch.randn(size, 4, 64, 64, generator=generator), "index": torch.arange(size)}
    out["streams"] = {"labelled": {"sar": sar[:2].clone(), "optical": out["optical"][:2].clone()}}
    return out


def test_cosine_map_equals_explicit_crops_and_peaks_at_a_known_shift():
    generator = torch.Generator().manual_seed(1)
    search = torch.randn(3, 24, 24, generator=generator)
    encode = lambda x: x.flatten(1)  # noqa: E731  identical descriptors: the window itself
    template = crop(search.unsqueeze(0), torch.tensor([[6, 10]]), 8)[0]
    similarity = correspondence_map(encode, search, template.flatten(), 8, stride=2, chunk=7)
    assert similarity.shape == (9, 9)
    for i, j in ((0, 0), (3, 5), (8, 8), (2, 7)):
        window = search[:, 2 * i : 2 * i + 8, 2 * j : 2 * j + 8]
        assert float(similarity[i, j]) == pytest.approx(float(F.cosine_similarity(window.flatten(), template.flatten(), dim=0)), abs=1e-5)
    assert peak(similarity) == (3, 5) and float(similarity[3, 5]) == pytest.approx(1.0)
    stats = error_statistics(np.array([0.0, 1.0, 2.0, 5.0]))
    assert stats["mean_error"] == 2.0 and stats["within_1px"] == 0.5 and stats["within_3px"] == 0.75 and stats["median_error"] == 1.5


def test_settings_and_the_critic_section_are_checked():
    for bad, message in (({"eval_shift": "left"}, "eval_shift='left'"), ({"clip": 0}, "clip=0"), ({"matching_weight": -1}, "matching_weight=-1")):
        with pytest.raises(ConfigError, match=message):
            MatchingSettings(**bad)
    with pytest.raises(ConfigError, match="search_stride=3"):
        AdversarialMatching.check_data(MatchingSettings(search_stride=3), SPEC)  # (64 - 32) is no multiple of 3
    onecycle = OptimSettings(epochs=1, optimizer="adam", schedule="onecycle")
    with pytest.raises(ConfigError, match="train.optimizers.critic.schedule=onecycle"):
        AdversarialMatching(MatchingSettings(**SMALL), ModelSettings(), onecycle, SPEC).setup(MethodContext(torch.device("cpu"), log=lambda line: None))
    needs = AdversarialMatching.needs(MatchingSettings())
    assert needs.streams == ("labelled",) and needs.unlabelled


def test_critic_updates_reach_only_the_critic_and_stay_clipped():
    torch.manual_seed(0)
    method = make_method(clip=0.005)
    latents = torch.randn(6, 16)
    method.critic_step(latents)
    assert all(p.grad is None for p in method.network("model").parameters())  # encoders get nothing
    assert all(p.grad is not None for p in method.network("critic").parameters())
    assert max(float(p.detach().abs().max()) for p in method.network("critic").parameters()) <= 0.005


def test_the_autoencoder_update_leaves_the_critic_without_gradient():
    torch.manual_seed(0)
    method = make_method(critic_steps=2)
    critic_step = method.critic_step
    calls = []

    def step_then_forget(latents):
        calls.append(len(latents))
        loss = critic_step(latents)
        for parameter in method.network("critic").parameters():
            parameter.grad = None
        return loss

    method.critic_step = step_then_forget
    logs = method.train_step(batch(3), 0)
    assert calls == [6, 6]  # two critic updates on both modalities' latents of the main batch
    assert all(p.grad is None for p in method.network("critic").parameters())  # frozen in the autoencoder update
    assert all(p.grad is not None for p in method.network("model").parameters())
    assert all(p.requires_grad for p in method.network("critic").parameters())  # unfrozen again after it
    assert {"reconstruction", "adversarial", "critic", "matching"} <= set(logs) and logs["matching"] >= 0


def test_pairs_negatives_stages_and_truth_corners():
    method = make_method(negative_min_shift=5)
    generator = torch.Generator().manual_seed(0)
    anchors = method.positive_corners(500, generator)
    assert len({tuple(c) for c in anchors.tolist()}) > 100  # positives anywhere in the tile, not only at its centre
    corners = method.negative_corners(anchors, generator)
    assert ((corners - anchors).abs().max(dim=1).values >= 5).all() and corners.min() >= 0 and corners.max() <= 32
    assert make_method(positive_crop="centre").positive_corners(3).tolist() == [[16, 16]] * 3
    tiles = batch(2)
    pair = method.pair_crops(tiles, torch.tensor([[3, 7], [30, 0]]))
    assert torch.equal(pair["sar"][1], tiles["sar"][1, :, 30:62, 0:32]) and torch.equal(pair["optical"][0], tiles["optical"][0, :, 3:35, 7:39])
    # The paper's 4 x 4 bottleneck: five VGG11 stages for 128 px templates, three for 32 px ones.
    assert len(MatchingSettings().encoder_stages(128)) == 5 and MatchingSettings().encoder_stages(32) == [[64], [128], [256, 256]]
    assert make_method(eval_shift="centre").truth_corner(7) == (16, 16)
    drawn = {method.truth_corner(i) for i in range(20)}
    assert len(drawn) > 5 and all(r % 4 == 0 and c % 4 == 0 and 0 <= r <= 32 for r, c in drawn)
    assert method.truth_corner(3) == method.truth_corner(3)  # the same tile gets the same truth every time


def test_an_oracle_descriptor_matches_every_tile_exactly():
    """The evaluation itself: with encoders replaced by the identity on one channel shared by both
    modalities, every peak lands on its known corner."""
    method = make_method()
    data = batch(3)
    data["optical"][:, :2] = data["sar"]
    network = method.network("model")
    for modality in ("sar", "optical"):
        network.autoencoder(modality).encode = lambda x: x[:, :2].flatten(1)
        network.autoencoder(modality).forward = lambda x: (x[:, :2].flatten(1), x)  # a perfect reconstruction
    result = method.evaluate([data], panels=1)
    assert result.metrics["mean_error"] == 0.0 and result.metrics["within_1px"] == 1.0 and result.metrics["reconstruction"] == 0.0
    assert result.artifacts["matching_errors"].data["counts"][0] == 3 and "correspondence_0" in result.artifacts


@pytest.mark.ray
def test_semi_supervised_matching_on_two_workers(tiny_world: Path, tmp_path: Path, ray_local):
    """A quarter of the pairs labelled (exactly), one epoch through Ray Train on 2 workers, the test
    errors of both workers' tiles in one histogram artifact."""
    from xmodal.engine.config import build_config
    from xmodal.engine.runner import run_experiment
    from xmodal.figures import ARTIFACTS_DIR, load_artifacts

    (run,) = run_experiment(build_config({
        "name": "matching-e2e", "method": "matching", "method_settings": {**SMALL, "critic_steps": 2},
        "data": {"root": str(tiny_world), "mask_layer": None, "tile_size": 64, "batch_size": 4, "labels": {"fraction": 0.25}},
        "train": {"epochs": 1, "optimizer": "adam", "lr": 0.0005, "betas": [0.9, 0.99], "schedule": "constant",
                  "optimizers": {"critic": {"optimizer": "sgd", "lr": 0.004, "momentum": 0.9, "weight_decay": 3.0e-4}}},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "run": {"storage": str(tmp_path / "runs"), "panels": 1},
    }))
    summary = json.loads((Path(run.results_dir) / "run.json").read_text())
    assert summary["data"]["train_tiles"] == 20 and summary["data"]["labelled_tiles"] == 5  # 25 % of 20, unlabelled kept
    assert summary["metric"] == "val/mean_error" and {"test/mean_error", "test/p1_error", "test/within_3px"} <= set(run.metrics)
    history = summary["history"][0]
    assert history["train/matching"] >= 0 and np.isfinite(history["train/critic"])
    artifacts = load_artifacts(Path(run.results_dir) / ARTIFACTS_DIR)
    assert int(artifacts["matching_errors"].data["counts"].sum()) == 10  # the 10 test tiles, scored on both workers
    assert artifacts["correspondence_0"].data["image"].shape == (9, 9) and (Path(run.results_dir) / ARTIFACTS_DIR / "matching_errors.png").is_file()


def test_a_model_backbone_trains_and_its_sar_encoder_loads_into_a_segmenter(tmp_path: Path):
    from xmodal.methods.exports import load_export_into, save_exports
    from xmodal.models import build_network

    with pytest.raises(ConfigError, match="backbone='vit'"):
        MatchingSettings(backbone="vit")
    torch.manual_seed(0)
    method = AdversarialMatching(MatchingSettings(**SMALL, backbone="model"), ModelSettings(encoder="resnet18"), OPTIM, SPEC)
    method.setup(MethodContext(torch.device("cpu"), log=lambda line: None))
    sar = method.network("model").autoencoder("sar")
    # 32 px templates: three ResNet stages keep the 4 x 4 bottleneck the VGG default keeps.
    assert sar.bottleneck_shape == (128, 4, 4) and sar.encoder.xmodal_recipe["kwargs"]["depth"] == 3
    before = {k: v.clone() for k, v in sar.encoder.state_dict().items()}
    method.train_step(batch(4), 0)
    assert any(not torch.equal(before[k], v) for k, v in sar.encoder.state_dict().items())
    save_exports(method.exports(), tmp_path)
    segmenter = build_network("segmenter", arch="unet", encoder="resnet18", in_channels=2, classes=1)
    report = load_export_into(segmenter, {"pretrained": tmp_path}, "pretrained", "sar_autoencoder", part="encoder")
    assert not report["skipped"]
    for key, value in sar.encoder.state_dict().items():
        assert torch.equal(segmenter.encoder.state_dict()[key], value)
    with pytest.raises(ConfigError, match="has no part 'encoder'"):  # the VGG backbone is no segmenter encoder
        vgg = make_method()
        save_exports(vgg.exports(), tmp_path / "vgg")
        load_export_into(segmenter, {"pretrained": tmp_path / "vgg"}, "pretrained", "sar_autoencoder", part="encoder")
