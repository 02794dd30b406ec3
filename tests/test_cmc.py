"""cmc (paper 001): the full-graph loss against pytorch-metric-learning and a hand sum, its
invariances, gathered negatives over two processes, the encoder hand-off, Table I placement, and
a pretrain -> finetune chain on 2 Ray Train workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gloo import method_context, process_group, spawn
from specs import BUILDINGS_32
from pytorch_metric_learning import losses as pml

from xmodal.errors import ConfigError
from xmodal.losses import multiview_info_nce, view_pairs
from xmodal.methods.base import MethodContext, ModelSettings
from xmodal.methods.cmc import CmcSettings, ContrastiveMultiview, classify_run, encode_mask
from xmodal.methods.cmc.paper import TABLE1_IOU, TABLE2_IOU
from xmodal.methods.exports import load_export_into, save_exports
from xmodal.methods.optim import OptimSettings
from xmodal.models import build_network

torch.set_num_threads(1)
SPEC = BUILDINGS_32
MODEL = ModelSettings(arch="unet", encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 8])
OPTIM = OptimSettings(epochs=1, lr=0.01, optimizer="sgd", schedule="constant")


def embeddings(views: int, n: int = 6, d: int = 5, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=generator)
    return [base + 0.3 * torch.randn(n, d, generator=generator) for _ in range(views)]


def test_each_directed_pair_term_equals_pml_ntxent_with_reference_embeddings():
    z = embeddings(2)
    index = torch.arange(len(z[0]))
    _, terms = multiview_info_nce(z, 0.1, view_pairs(2))
    for (a, b), term in terms.items():
        reference = pml.NTXentLoss(temperature=0.1)(z[a], index, ref_emb=z[b], ref_labels=index.clone())
        assert torch.allclose(term, reference, atol=1e-5)


def test_full_graph_over_three_views_is_the_hand_sum_of_its_pair_terms():
    z = embeddings(3)
    target = torch.arange(len(z[0]))

    def directed(a: int, b: int) -> torch.Tensor:
        return F.cross_entropy(F.normalize(z[a], dim=1) @ F.normalize(z[b], dim=1).T / 0.2, target)

    every = [(a, b) for a in range(3) for b in range(3) if a != b]
    total, _ = multiview_info_nce(z, 0.2, every, reduction="sum")
    assert torch.allclose(total, sum(directed(a, b) for a, b in every), atol=1e-5)
    mean, _ = multiview_info_nce(z, 0.2, every, reduction="mean")
    assert torch.allclose(mean, total / 6, atol=1e-6)
    # Views 0 and 1 are two augmentations of one modality: without same-modality pairs they never meet.
    cross = view_pairs(3, ["sar", "sar", "optical"], same_group=False)
    assert cross == [(0, 2), (1, 2), (2, 0), (2, 1)]
    assert torch.allclose(multiview_info_nce(z, 0.2, cross, reduction="sum")[0], sum(directed(a, b) for a, b in cross), atol=1e-5)


def test_the_loss_ignores_sample_order_and_prefers_aligned_views():
    z = embeddings(3, n=12)
    pairs = view_pairs(3)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(multiview_info_nce(z, 0.1, pairs)[0], multiview_info_nce([v[order] for v in z], 0.1, pairs)[0], atol=1e-6)
    shuffled = [z[0], z[1][order], z[2]]
    assert multiview_info_nce(z, 0.1, pairs)[0] < multiview_info_nce(shuffled, 0.1, pairs)[0]


def test_settings_and_declared_needs():
    assert [len(CmcSettings(modalities=m).views()) for m in (["sar"], ["sar", "optical"], ["sar", "mask", "optical"])] == [2, 4, 6]
    with pytest.raises(ConfigError, match="include 'sar'"):
        CmcSettings(modalities=["optical", "mask"])
    with pytest.raises(ConfigError, match="leave no pair of views"):
        CmcSettings(modalities=["sar"], augmentations=1)
    with pytest.raises(ConfigError, match="temperature=0"):
        CmcSettings(temperature=0.0)
    needs = ContrastiveMultiview.needs(CmcSettings(modalities=["sar", "mask"], augmentations=3))
    assert needs.views == 3 and "mask" in needs.fields and not needs.unlabelled  # the label view needs labelled tiles
    assert ContrastiveMultiview.needs(CmcSettings()).unlabelled
    spec = ContrastiveMultiview.metrics(CmcSettings(modalities=["sar", "mask"]))
    assert spec.select == "val/loss" and spec.labelled is False  # selection never uses downstream labels
    mask = torch.tensor([[[0, 1], [255, 1]]])
    assert encode_mask(mask, 2, 255).tolist() == [[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]]


def make_method(**settings) -> ContrastiveMultiview:
    method = ContrastiveMultiview(CmcSettings(**settings), MODEL, OPTIM, SPEC)
    method.setup(MethodContext(torch.device("cpu"), log=lambda line: None))
    return method


def batch(size: int, views: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sar": torch.randn(size, views, 2, 32, 32, generator=generator),
        "optical": torch.randn(size, views, 4, 32, 32, generator=generator),
        "mask": torch.randint(0, 2, (size, views, 32, 32), generator=generator),
    }


def test_the_sar_encoder_export_loads_into_a_segmenters_encoder_and_nothing_else(tmp_path: Path):
    torch.manual_seed(0)
    method = make_method(modalities=["sar", "optical", "mask"])
    exports = method.exports()
    assert set(exports) == {"sar_encoder", "optical_encoder", "mask_encoder"}
    save_exports(exports, tmp_path)
    segmenter = build_network("segmenter", **MODEL.segmenter_kwargs(2, 1))
    before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    report = load_export_into(segmenter, {"pre": tmp_path}, "pre", "sar_encoder", part="encoder")
    after = segmenter.state_dict()
    sar_encoder = method.network("cmc").encoders["sar"].state_dict()
    assert set(report["copied"]) == {f"encoder.{k}" for k in sar_encoder}
    assert all(torch.equal(after[f"encoder.{k}"], v) for k, v in sar_encoder.items())
    assert all(torch.equal(before[k], after[k]) for k in after if not k.startswith("encoder."))


def gathered_worker(rank: int, port: int, folder: str) -> None:
    with process_group(rank, port):
        torch.manual_seed(0)
        method = ContrastiveMultiview(CmcSettings(), MODEL, OPTIM, SPEC)
        method.setup(method_context(rank))
        method.net.eval()  # BatchNorm on running statistics: each sample's embedding independent of the batch
        shard = {k: v[rank * 3 : (rank + 1) * 3] for k, v in batch(6, 2).items()}
        loss = method.contrastive_loss(shard)
        loss.backward()  # DDP averages the gradients over both workers
        torch.save({"loss": float(loss.detach()), "grads": {n: p.grad.clone() for n, p in method.network("cmc").named_parameters() if p.grad is not None}},
                   Path(folder) / f"rank{rank}.pt")


def test_gathered_negatives_over_two_workers_equal_one_worker_on_the_whole_batch(tmp_path: Path):
    spawn(gathered_worker, str(tmp_path))
    torch.manual_seed(0)
    single = make_method()
    single.net.eval()
    loss = single.contrastive_loss(batch(6, 2))
    loss.backward()
    reference = {n: p.grad for n, p in single.network("cmc").named_parameters() if p.grad is not None}
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        # Each worker's loss covers its own queries: their mean over workers is the whole batch's.
        assert set(result["grads"]) == set(reference)
        for name, grad in reference.items():
            assert torch.allclose(result["grads"][name], grad, atol=1e-5), name
    losses = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["loss"] for r in range(2)]
    assert sum(losses) / 2 == pytest.approx(float(loss.detach()), rel=1e-5)


def test_table_one_places_finetunings_by_their_pretraining_source():
    cmc = lambda name, modalities: {"name": name, "method": "cmc", "method_settings": {"modalities": modalities}}  # noqa: E731

    def finetune(name, source, model, fraction=1.0):
        settings = {"input": "sar", "init": "pre" if source else None}
        return {"name": name, "method": "supervised", "method_settings": settings, "model": model,
                "inputs": {"pre": {"run": source, "checkpoint": "x"}} if source else {}, "data": {"labels": {"fraction": fraction}}}

    unet50, deeplab = {"arch": "unet", "encoder": "resnet50"}, {"arch": "deeplabv3", "encoder": "tu-resnest50d"}
    runs = [cmc("c/pre", ["sar", "optical"]), cmc("c/pre-gt", ["sar", "mask", "optical"]),
            finetune("c/ft", "c/pre", unet50), finetune("c/ft-gt", "c/pre-gt", deeplab), finetune("c/random", None, unet50, 0.2)]
    placed = [classify_run(TABLE1_IOU, run, runs) for run in runs]
    assert placed == [None, None, ("sar+eo", "unet"), ("sar+gt+eo", "deeplabv3:tu-resnest50d"), ("random@0.2", "unet")]
    assert classify_run(TABLE2_IOU, runs[3], runs) == ("sar+gt+eo", "resnest50") and classify_run(TABLE2_IOU, runs[2], runs) is None
    assert TABLE1_IOU["paper"]["sar+eo"]["unet"] == 0.6517 and TABLE2_IOU["paper"]["sar+gt+eo"]["resnext50"] == 0.7054


@pytest.mark.ray
def test_sar_eo_pretraining_then_finetuning_on_two_workers(tiny_world: Path, tmp_path: Path, ray_local):
    """Pretraining through Ray Train on 2 workers (negatives gathered across them); the finetuning
    from its SAR encoder in the plain engine, its input given as the checkpoint folder; Table I
    places the finetuning by the run that checkpoint came from."""
    from xmodal.engine.config import build_config
    from xmodal.engine.plain import run_plain
    from xmodal.engine.runner import run_experiment
    from xmodal.report.runs import render_run_report

    base = {
        "data": {"root": str(tiny_world), "tile_size": 64, "batch_size": 2},
        "model": {"arch": "unet", "encoder": "resnet18", "decoder_channels": [16, 8, 8, 8, 8]},
        "train": {"epochs": 1, "lr": 0.003},
        "run": {"storage": str(tmp_path / "runs"), "panels": 0},
    }
    (pretrain,) = run_experiment(build_config({
        **base, "name": "cmc-chain/pretrain", "method": "cmc", "method_settings": {"modalities": ["sar", "optical"]},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
    }))
    assert pretrain.summary["metric"] == "val/loss" and pretrain.summary["metric_labelled"] is False
    assert {"val/loss", "val/retrieval", "test/loss"} <= set(pretrain.metrics)
    assert pretrain.summary["history"][0]["train/negatives"] == 3.0  # 2 per worker x 2 workers, minus the positive
    assert (Path(pretrain.checkpoint) / "exports" / "sar_encoder.pt").is_file()
    (finetune,) = run_plain(build_config({
        **base, "name": "cmc-chain/finetune", "method": "supervised", "inputs": {"pre": pretrain.checkpoint},
        "method_settings": {"input": "sar", "init": "pre", "init_export": "sar_encoder", "init_part": "encoder"},
    }), log=lambda line: None)
    summary = json.loads((Path(finetune.results_dir) / "run.json").read_text())
    assert summary["inputs"]["pre"]["checkpoint"] == pretrain.checkpoint and "test/iou" in summary["metrics"]
    text = render_run_report(tmp_path / "runs", echo=False).text
    assert "Table I" in text and "(4) SAR+EO" in text and "unet:resnet18" in text
