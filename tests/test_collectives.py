"""Collectives over two real processes (gloo on CPU): gathered-embedding losses and their gradients
equal the single-process loss on the whole batch, meters reduce to the concatenated batch's, and
the engine refuses evaluation metrics that differ between workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo import process_group, spawn
from torch import nn

from xmodal.engine.collectives import DistributedCollectives
from xmodal.losses import info_nce
from xmodal.methods.base import Collectives, MethodContext
from xmodal.methods.metrics import MeanMeter, SegmentationMeter

WORLD = 2
PER_WORKER = 4


def encoders(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Linear(6, 5), nn.Linear(6, 5)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * PER_WORKER, 6, generator=generator), torch.randn(WORLD * PER_WORKER, 6, generator=generator)


def local_negatives_loss(query: nn.Module, key: nn.Module, x: torch.Tensor, y: torch.Tensor, context: MethodContext) -> torch.Tensor:
    """Each worker's queries against the keys of every worker (negatives gathered)."""
    keys = context.all_gather(key(y))
    positives = torch.arange(x.shape[0]) + context.collectives.rank * x.shape[0]
    return info_nce(query(x), keys, 0.2, positives=positives)


def fully_gathered_loss(query: nn.Module, key: nn.Module, x: torch.Tensor, y: torch.Tensor, context: MethodContext) -> torch.Tensor:
    """Every worker the same loss over every worker's embeddings (both directions)."""
    q, k = context.all_gather(query(x)), context.all_gather(key(y))
    return 0.5 * (info_nce(q, k, 0.2) + info_nce(k, q, 0.2))


LOSSES = {"local_negatives": local_negatives_loss, "fully_gathered": fully_gathered_loss}


def worker(rank: int, port: int, pattern: str, folder: str) -> None:
    with process_group(rank, port, WORLD):
        context = MethodContext(torch.device("cpu"), rank=rank, world_size=WORLD, collectives=DistributedCollectives(torch.device("cpu")))
        query, key = encoders()
        model = nn.parallel.DistributedDataParallel(nn.ModuleDict({"query": query, "key": key}))
        x, y = global_batch()
        shard = slice(rank * PER_WORKER, (rank + 1) * PER_WORKER)
        loss = LOSSES[pattern](model.module["query"], model.module["key"], x[shard], y[shard], context)
        # DDP's hooks fire on parameters used inside its forward; here the modules are called
        # directly, so average the gradients as DDP does.
        loss.backward()
        for parameter in model.parameters():
            dist.all_reduce(parameter.grad)
            parameter.grad /= WORLD
        mean_loss = context.all_reduce(loss.detach(), "mean")

        # Meters: each worker its half, reduced.
        generator = torch.Generator().manual_seed(2)
        prediction, target = torch.randint(0, 3, (WORLD, 8, 8), generator=generator), torch.randint(0, 3, (WORLD, 8, 8), generator=generator)
        meter = SegmentationMeter(3, ["a", "b", "c"], 255)
        meter.update(prediction[rank], target[rank])
        means = MeanMeter()
        means.update({"loss": float(rank + 1)}, weight=rank + 1)  # 1 x 1 and 2 x 2
        # Unequal sizes gather in rank order.
        gathered = context.all_gather(torch.full((rank + 1, 2), float(rank)))
        torch.save(
            {
                "loss": float(mean_loss),
                "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()},
                "segmentation": meter.compute(context.all_reduce)[0],
                "mean": means.compute(context.all_reduce, keys=["loss"]),
                "gathered": gathered,
            },
            Path(folder) / f"rank{rank}.pt",
        )


@pytest.mark.parametrize("pattern", sorted(LOSSES))
def test_gathered_losses_and_gradients_equal_the_single_process_loss(pattern: str, tmp_path: Path):
    spawn(worker, pattern, str(tmp_path), world=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    query, key = encoders()
    x, y = global_batch()
    single = LOSSES[pattern](query, key, x, y, MethodContext(torch.device("cpu")))
    single.backward()
    reference = {**{f"query.{n}": p.grad for n, p in query.named_parameters()}, **{f"key.{n}": p.grad for n, p in key.named_parameters()}}
    for result in results:
        assert result["loss"] == pytest.approx(float(single.detach()), rel=1e-5)
        for name, grad in reference.items():
            assert torch.allclose(result["grads"][name], grad, atol=1e-6), name

    generator = torch.Generator().manual_seed(2)
    prediction, target = torch.randint(0, 3, (WORLD, 8, 8), generator=generator), torch.randint(0, 3, (WORLD, 8, 8), generator=generator)
    whole = SegmentationMeter(3, ["a", "b", "c"], 255)
    whole.update(prediction, target)
    expected = whole.compute()[0]
    for result in results:
        assert result["segmentation"] == pytest.approx(expected)
        assert result["mean"]["loss"] == pytest.approx((1 * 1 + 2 * 2) / 3)
        assert result["gathered"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def test_meters_match_torchmetrics_in_one_process():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    generator = torch.Generator().manual_seed(3)
    prediction, target = torch.randint(0, 4, (3, 9, 9), generator=generator), torch.randint(0, 4, (3, 9, 9), generator=generator)
    target[0, 0] = 255
    meter = SegmentationMeter(4, list("abcd"), 255)
    meter.update(prediction, target)
    metrics, per_class = meter.compute()
    reference = MulticlassJaccardIndex(4, average="none", ignore_index=255)(prediction, target)
    assert [per_class[c]["iou"] for c in "abcd"] == pytest.approx(reference.tolist())
    # OA and AA (mean per-class recall: CromSS's Table 1, paper 003)
    assert metrics["accuracy"] == pytest.approx(float(MulticlassAccuracy(4, average="micro", ignore_index=255)(prediction, target)))
    assert metrics["average_accuracy"] == pytest.approx(float(MulticlassAccuracy(4, average="macro", ignore_index=255)(prediction, target)))


def test_single_process_collectives_are_the_identity():
    context = MethodContext(torch.device("cpu"))
    tensor = torch.arange(3.0, requires_grad=True)
    assert context.all_gather(tensor) is tensor and context.all_reduce(tensor, "max") is tensor
    assert isinstance(context.collectives, Collectives) and context.collectives.all_gather_object(5) == [5]


def disagreeing_worker(rank: int, port: int, folder: str) -> None:
    from xmodal.engine.training import MethodContractError, evaluate_split
    from xmodal.methods.base import EvalResult

    class Unreduced:
        name = "unreduced"

        def networks(self) -> dict:
            return {}

        def evaluate(self, batches, panels=0):
            return EvalResult(metrics={"iou": 0.5 + 0.1 * rank})  # each worker its own share: not reduced

    with process_group(rank, port, WORLD):
        try:
            evaluate_split(Unreduced(), [], torch.device("cpu"), DistributedCollectives(torch.device("cpu")))
            message = "no error"
        except MethodContractError as exc:
            message = str(exc)
        (Path(folder) / f"rank{rank}.txt").write_text(message)


def test_engine_refuses_evaluation_metrics_that_differ_between_workers(tmp_path: Path):
    spawn(disagreeing_worker, str(tmp_path), world=WORLD)
    message = (tmp_path / "rank0.txt").read_text()
    assert "'iou' is 0.5 on worker 0 but 0.6 on worker 1" in message and "context.all_reduce" in message
