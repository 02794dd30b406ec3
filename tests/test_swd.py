"""swd (paper 002): optical labels that a SAR label budget never withholds, the SAR cross-entropy
blind to unlabelled SAR, alignment over the gathered batch equal to one process, the classifier
exports, and an EO -> transfer chain on 2 Ray Train workers. (The SW^2 and SupCon losses are
checked against POT and pytorch-metric-learning in tests/losses.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gloo import method_context, process_group, spawn

from xmodal.data.labels import LabelSettings, choose_labelled
from xmodal.data.prepared import DataSettings, prepare_data
from xmodal.data.torch_data import TileDataset
from xmodal.errors import ConfigError
from xmodal.methods.base import DataSpec, MethodContext, ModelSettings
from xmodal.methods.exports import load_export_into, rebuild_export, save_exports
from xmodal.methods.optim import OptimSettings
from xmodal.methods.swd import SlicedWassersteinTransfer, SwdSettings
from xmodal.models import build_network

torch.set_num_threads(1)
CLASSES = ("a", "b", "c")
SPEC = DataSpec(
    sar_channels=2, optical_channels=4, sar_bands=("VV", "VH"), optical_bands=("B02", "B03", "B04", "B08"),
    num_classes=3, class_names=CLASSES, mask_layer=None, ignore_index=255, sar_mean=(0.0, 0.0), sar_std=(1.0, 1.0),
    tile_size=32, scene_classes=CLASSES,
)
OPTIM = OptimSettings(epochs=1, lr=0.01, optimizer="sgd", schedule="constant")


def make_method(norm: str = "instance", **settings) -> SlicedWassersteinTransfer:
    model = ModelSettings(encoder="resnet18", encoder_depth=3, norm=norm)
    method = SlicedWassersteinTransfer(SwdSettings(**settings), model, OPTIM, SPEC)
    method.setup(MethodContext(torch.device("cpu"), log=lambda line: None))
    return method


def batch(size: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (size,), generator=generator)
    labelled = (torch.arange(size) % 2 == 0).to(torch.uint8)
    return {
        "sar": torch.randn(size, 2, 32, 32, generator=generator),
        "optical": torch.randn(size, 4, 32, 32, generator=generator),
        "optical_label": labels,
        "label": torch.where(labelled > 0, labels, torch.full_like(labels, -1)),
        "labelled": labelled,
    }


def test_settings_and_declared_needs():
    with pytest.raises(ConfigError, match="stage='x'"):
        SwdSettings(stage="x")
    with pytest.raises(ConfigError, match="supcon_temperature=0"):
        SwdSettings(stage="eo", supcon_temperature=0)
    with pytest.raises(ConfigError, match="supcon_weight shapes the EO embedding"):
        SwdSettings(supcon_weight=1.0)
    transfer = SlicedWassersteinTransfer.needs(SwdSettings())
    assert "optical_label" in transfer.fields and transfer.unlabelled and transfer.views == 1
    eo = SlicedWassersteinTransfer.needs(SwdSettings(stage="eo", supcon_weight=0.5))
    assert eo.views == 2 and eo.unlabelled  # the EO stage reads every optical label
    assert SlicedWassersteinTransfer.metrics(SwdSettings()).select == "val/accuracy"
    assert SlicedWassersteinTransfer.metrics(SwdSettings(stage="eo")).select == "val/optical_accuracy"
    # Instance norm at a depth whose maps reach 1 x 1 is refused, naming the depth.
    with pytest.raises(ConfigError, match="1 ?x ?1|depth"):
        SlicedWassersteinTransfer(SwdSettings(), ModelSettings(encoder="resnet18", encoder_depth=5, norm="instance"), OPTIM, SPEC).setup(
            MethodContext(torch.device("cpu"), log=lambda line: None))


def test_a_sar_label_budget_is_exact_per_seed_and_never_withholds_optical_labels(tiny_world: Path):
    settings = DataSettings(root=str(tiny_world), tile_size=64, batch_size=2, mask_layer=None, labels=LabelSettings(count=5, stratify=True))
    full = prepare_data(DataSettings(root=str(tiny_world), tile_size=64, batch_size=2, mask_layer=None))
    train = full.records("train")
    draws = [set(choose_labelled(train, LabelSettings(count=5, stratify=True, seed=s)).tolist()) for s in (0, 1)]
    assert [len(d) for d in draws] == [5, 5] and draws[0] != draws[1]
    prepared = prepare_data(settings).for_method(keep_unlabelled=True, views=1, optical_labels=True)
    flags = [r["labelled"] for r in prepared.records("train")]
    assert sum(flags) == 5 and len(flags) == len(train)
    dataset, truth = TileDataset(prepared, "train", train=False), TileDataset(full, "train", train=False)
    hidden = flags.index(False)
    assert int(dataset[hidden]["label"]) == -1 and int(dataset[hidden]["optical_label"]) == int(truth[hidden]["label"]) >= 0
    # Other methods never see the optical label of a withheld tile.
    assert "optical_label" not in TileDataset(prepare_data(settings).for_method(keep_unlabelled=True, views=1), "train", train=False)[hidden]


def test_unlabelled_sar_never_reaches_the_sar_cross_entropy_but_does_reach_the_alignment():
    torch.manual_seed(0)
    data = batch()
    moved = {**data, "sar": data["sar"].clone()}
    moved["sar"][data["labelled"] == 0] += 3.0  # instance norm: samples do not see each other
    ce_only = make_method(sw_weight=0.0, class_sw_weight=0.0, eo_weight=0.0)
    first, logs = ce_only.transfer_loss(data)
    assert logs["labelled_sar"] == 4.0
    assert torch.allclose(first, ce_only.transfer_loss(moved)[0])
    labelled_moved = {**data, "sar": data["sar"] + 3.0 * (data["labelled"] > 0).float()[:, None, None, None]}
    assert not torch.allclose(first, ce_only.transfer_loss(labelled_moved)[0])
    torch.manual_seed(0)
    aligned = make_method(sw_weight=1.0, class_sw_weight=0.0, eo_weight=0.0)
    aligned.draws = 0
    before = aligned.transfer_loss(data)[0]
    aligned.draws = 0  # the same directions
    assert not torch.allclose(before, aligned.transfer_loss(moved)[0])


def gathered_worker(rank: int, port: int, folder: str) -> None:
    with process_group(rank, port):
        torch.manual_seed(0)
        method = SlicedWassersteinTransfer(SwdSettings(), ModelSettings(encoder="resnet18", encoder_depth=3, norm="instance"), OPTIM, SPEC)
        method.setup(method_context(rank))
        shard = {k: v[rank * 4 : (rank + 1) * 4] for k, v in batch().items()}
        loss, _ = method.transfer_loss(shard)
        loss.backward()
        torch.save({n: p.grad.clone() for n, p in method.network("model").named_parameters() if p.grad is not None}, Path(folder) / f"rank{rank}.pt")


def test_two_workers_train_as_one_process_on_the_global_batch(tmp_path: Path):
    spawn(gathered_worker, str(tmp_path))
    torch.manual_seed(0)
    single = make_method()
    loss, logs = single.transfer_loss(batch())
    assert logs["class_sw_classes"] >= 1 and logs["sw"] > 0
    loss.backward()
    reference = {n: p.grad for n, p in single.network("model").named_parameters() if p.grad is not None}
    for rank in range(2):
        grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(grads) == set(reference)
        for name, grad in reference.items():
            assert torch.allclose(grads[name], grad, atol=1e-5), name


def test_classifier_exports_are_the_y_net_branches_and_initialise_a_sar_classifier(tmp_path: Path):
    torch.manual_seed(0)
    method = make_method(norm="batch")
    network = method.network("model").eval()
    save_exports(method.exports(), tmp_path)
    images = batch()
    for modality in ("sar", "optical"):
        classifier, saved = rebuild_export(tmp_path, f"{modality}_classifier")
        assert saved["modality"] == modality
        assert torch.allclose(classifier.eval()(images[modality]), network(images[modality], modality), atol=1e-5)
    # The finetuning baseline: the EO classifier into a SAR classifier (first convolution adapted).
    target = build_network("classifier", encoder="resnet18", in_channels=2, num_classes=3, encoder_depth=3, input_size=32)
    report = load_export_into(target, {"eo": tmp_path}, "eo", "optical_classifier")
    assert report["adapted"] == ["encoder.conv1.weight"] and "head.linear.weight" in report["copied"]


@pytest.mark.ray
def test_eo_pretraining_then_transfer_on_two_workers(tiny_world: Path, tmp_path: Path, ray_local):
    """The EO stage (with SupCon over two views) in the plain engine, the transfer stage from its
    tested checkpoint through Ray Train on 2 workers, every tile kept, 6 with SAR labels."""
    from xmodal.engine.config import build_config
    from xmodal.engine.plain import run_plain
    from xmodal.engine.runner import run_experiment

    base = {
        "method": "swd",
        "data": {"root": str(tiny_world), "mask_layer": None, "tile_size": 32, "batch_size": 4, "labels": {"count": 6, "stratify": True}},
        "model": {"encoder": "resnet18", "encoder_depth": 3, "norm": "instance"},
        "train": {"epochs": 1, "lr": 0.003},
        "run": {"storage": str(tmp_path / "runs"), "panels": 0},
    }
    (eo,) = run_plain(build_config({**base, "name": "swd-chain/eo", "method_settings": {"stage": "eo", "supcon_weight": 0.5}}), log=lambda line: None)
    assert eo.summary["metric"] == "val/optical_accuracy" and eo.summary["history"][0]["train/supcon"] > 0
    (transfer,) = run_experiment(build_config({
        **base, "name": "swd-chain/transfer", "method_settings": {"stage": "transfer", "init": "eo"},
        "inputs": {"eo": eo.checkpoint}, "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }))
    summary = json.loads((Path(transfer.results_dir) / "run.json").read_text())
    assert summary["metric"] == "val/accuracy" and summary["engine"] != eo.summary["engine"]
    # Every tile trains (the unlabelled SAR for the alignment terms); 6 of the 20 keep SAR labels.
    assert summary["data"]["train_tiles"] == 20 and summary["data"]["labelled_tiles"] == 6
    assert {"val/accuracy", "val/optical_accuracy", "val/sw", "test/accuracy"} <= set(transfer.metrics)
    history = summary["history"][0]
    assert history["train/sw"] > 0 and 0 < history["train/labelled_sar"] < 8  # labelled SAR tiles in a global batch of 8
    for name in ("model", "sar_classifier", "optical_classifier", "sar_encoder"):
        assert (Path(transfer.checkpoint) / "exports" / f"{name}.pt").is_file()


def test_so2sat_low_rise_classes_train_the_transfer_stage(tmp_path: Path):
    """Paper 002's data: So2Sat LCZ42 (fixture in the real HDF5 layout) read with the low-rise class
    subset, complex SAR parts kept linear, one transfer epoch in the plain engine."""
    from fixtures.so2sat import make_so2sat

    from xmodal.engine.config import build_config
    from xmodal.engine.plain import run_plain

    root = make_so2sat(tmp_path / "so2sat")
    config = build_config({
        "name": "swd-so2sat", "method": "swd", "method_settings": {"stage": "transfer"},
        "data": {"root": str(root), "mask_layer": None, "sar_db": False, "tile_size": 32, "batch_size": 2,
                 "reader_options": {"classes": "low-rise"}, "labels": {"count": 2}},
        "model": {"encoder": "resnet18", "encoder_depth": 3, "norm": "instance"},
        "train": {"epochs": 1},
        "run": {"storage": str(tmp_path / "runs"), "panels": 0},
    })
    (result,) = run_plain(config, log=lambda line: None)
    summary = json.loads((Path(result.results_dir) / "run.json").read_text())
    assert summary["data"]["labelled_tiles"] == 2 and summary["data"]["train_tiles"] > 2
    assert list(summary["per_class"]["test"]) == ["LCZ 3: compact low-rise", "LCZ 6: open low-rise", "LCZ 7: lightweight low-rise", "LCZ 8: large low-rise"]
    assert 0.0 <= result.metrics["test/accuracy"] <= 1.0
