"""The method platform through the shared training loop and the plain engine (no Ray): hooks get
validation metrics, selection follows the method's declaration, schedules, exports into parts of
networks, chains hand over tested or last checkpoints, views and the labelled stream reach steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from xmodal.engine.config import build_config
from xmodal.engine.setup import BestTracker
from xmodal.engine.training import LoopData, LoopState, run_epochs
from xmodal.errors import ConfigError
from xmodal.methods.base import Collectives, DataNeeds, EvalResult, Export, Method, MethodContext, MetricSpec
from xmodal.methods.exports import load_export_into, save_exports
from xmodal.methods.optim import OptimizerSettings, OptimSettings, Stepper
from xmodal.methods.registry import METHODS, get_method
from xmodal.models import build_network

torch.set_num_threads(1)
SMALL = {"arch": "unet", "encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 8]}


class Scripted(Method):
    """Validation numbers set by the test; records what the engine hands its hooks."""

    name = "scripted"
    Settings = dict  # not registered: never built from a config
    labelled = True

    def __init__(self, losses: list[float], ious: list[float]) -> None:
        super().__init__(None, None, OptimSettings(epochs=len(losses)), None)
        self.script = list(zip(losses, ious))
        self.calls: list[tuple[str, int, dict[str, float]]] = []
        self.weight = nn.Parameter(torch.zeros(1))
        self.epoch = 0

    @classmethod
    def metrics(cls, settings: Any, data: Any = None) -> MetricSpec:
        if cls.labelled:
            return MetricSpec("val/iou", "max", labelled=True, report=("test/iou",))
        return MetricSpec("val/loss", "min", labelled=False, report=("test/iou",))

    def setup(self, context: MethodContext) -> None:
        self.context = context

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        with torch.no_grad():
            self.weight += 1
        return {"loss": 0.0}

    def evaluate(self, batches, panels: int = 0) -> EvalResult:
        list(batches)
        loss, iou = self.script[min(self.epoch, len(self.script) - 1)]
        return EvalResult(metrics={"loss": loss, "iou": iou})

    def begin_epoch(self, epoch: int) -> None:
        self.calls.append(("begin", epoch, {}))
        self.epoch = epoch

    def end_epoch(self, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        self.calls.append(("end", epoch, dict(val_metrics)))
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.weight.copy_(state["weight"])


class LabelFree(Scripted):
    labelled = False


def drive(method: Scripted, select: str = "best", eval_every: int = 1) -> dict[str, Any]:
    config = build_config({"name": "s", "method": "supervised", "train": {"epochs": len(method.script)}, "run": {"select": select, "eval_every": eval_every}})
    method.setup(MethodContext(torch.device("cpu")))
    data = LoopData(train=lambda: [{"x": torch.zeros(1)}], evaluation=lambda split: iter([{"x": torch.zeros(1)}]), splits=("val", "test"), batch_size=1)
    return run_epochs(
        method, config, data, LoopState(tracker=BestTracker(type(method).metrics(None), select)), device=torch.device("cpu"),
        collectives=Collectives(), on_epoch=lambda *args: None, restore_weights=lambda epoch: None, log=lambda line: None,
    )


def test_end_epoch_receives_the_validation_metrics_after_validation():
    method = Scripted([0.5, 0.4, 0.3], [0.1, 0.2, 0.3])
    drive(method, eval_every=2)
    assert [c[:2] for c in method.calls] == [("begin", 0), ("end", 0), ("begin", 1), ("end", 1), ("begin", 2), ("end", 2)]
    assert method.calls[1][2] == {}  # epoch 1 was not validated
    assert method.calls[3][2] == {"val/loss": 0.4, "val/iou": 0.2} and method.calls[5][2] == {"val/loss": 0.3, "val/iou": 0.3}


def test_a_label_free_phase_never_selects_by_a_labelled_metric():
    losses, ious = [0.5, 0.2, 0.4], [0.9, 0.1, 0.2]  # best loss at epoch 2, best IoU at epoch 1
    labelled = drive(Scripted(losses, ious))
    label_free = drive(LabelFree(losses, ious))
    assert labelled["tested_epoch"] == 1 and labelled["metric"] == "val/iou"
    assert label_free["tested_epoch"] == 2 and label_free["metric"] == "val/loss" and label_free["metric_labelled"] is False
    assert drive(LabelFree(losses, ious), select="last")["tested_epoch"] == 3
    # The pretext methods declare label-free selection.
    kd = get_method("kd")
    assert kd.metrics(kd.parse_settings(None)).labelled is False
    supervised = get_method("supervised")
    assert supervised.metrics(supervised.parse_settings(None)).labelled is True


def test_plateau_schedule_steps_on_the_validation_metric_only():
    parameter = nn.Parameter(torch.zeros(1))
    settings = OptimizerSettings(optimizer="sgd", lr=0.1, schedule="plateau", plateau_patience=0, plateau_factor=0.5)
    stepper = Stepper("main", [parameter], settings, steps_per_epoch=4, epochs=10, select_metric=("val/iou", "max"))
    for _ in range(3):  # steps never move a plateau schedule
        parameter.grad = torch.ones(1)
        stepper.update()
    assert stepper.lr == pytest.approx(0.1)
    stepper.end_epoch({"val/iou": 0.5})
    stepper.end_epoch({})  # not validated: no step
    stepper.end_epoch({"val/iou": 0.6})
    assert stepper.lr == pytest.approx(0.1)
    stepper.end_epoch({"val/iou": 0.55})  # worse with patience 0: halved
    assert stepper.lr == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="plateau_metric='val/iou' is not a validation metric"):
        stepper.end_epoch({"val/loss": 1.0})


def test_a_one_cycle_run_resumed_with_more_epochs_goes_on_to_its_new_length():
    parameter = nn.Parameter(torch.zeros(1))
    settings = OptimizerSettings(optimizer="sgd", lr=0.1, schedule="onecycle")
    short = Stepper("main", [parameter], settings, steps_per_epoch=4, epochs=6)
    for _ in range(24):
        parameter.grad = torch.ones(1)
        short.update()
    extended = Stepper("main", [parameter], settings, steps_per_epoch=4, epochs=30)
    extended.load_state_dict(short.state_dict())
    rates = []
    for _ in range(120 - 24):  # the old length stopped at 25 steps ("Tried to step 26 times")
        parameter.grad = torch.ones(1)
        extended.update()
        rates.append(extended.lr)
    assert extended.scheduler.last_epoch == 120 and rates[-1] < 1e-3 and max(rates) == pytest.approx(0.1, rel=0.05)


def test_named_optimiser_sections_inherit_the_main_one():
    optim = OptimSettings(optimizer="adam", lr=5e-4, betas=(0.9, 0.99), min_lr=5e-5, optimizers={"critic": {"optimizer": "sgd", "lr": 4e-3, "schedule": "constant"}})
    critic = optim.section("critic")
    assert (critic.optimizer, critic.lr, critic.betas, critic.schedule) == ("sgd", 4e-3, (0.9, 0.99), "constant")
    with pytest.raises(ConfigError, match="unknown key 'train.optimizers.critic.lrr'; did you mean 'train.optimizers.critic.lr'"):
        OptimSettings(optimizers={"critic": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"train.optimizers \['critic'\]: method 'supervised' has optimisers \['main'\]"):
        build_config({"name": "x", "method": "supervised", "train": {"optimizers": {"critic": {"lr": 0.1}}}})
    # One-cycle between its bounds: starts and ends at min_lr, peaks at lr.
    parameter = nn.Parameter(torch.zeros(1))
    stepper = Stepper("main", [parameter], optim.section(), steps_per_epoch=10, epochs=2)
    rates = []
    for _ in range(20):
        rates.append(stepper.lr)
        parameter.grad = torch.zeros(1)
        stepper.update()
    assert rates[0] == pytest.approx(5e-5) and max(rates) == pytest.approx(5e-4, rel=0.05) and rates[-1] < 1e-4


def test_an_encoder_export_loads_exactly_the_encoder_of_a_segmenter(tmp_path: Path):
    torch.manual_seed(0)
    encoder = build_network("encoder", encoder="resnet18", in_channels=2, depth=3)
    critic = build_network("critic", in_features=8)
    other = build_network("encoder", encoder="mobilenet_v2", in_channels=2, depth=3)
    save_exports({"sar_encoder": Export(encoder, "sar"), "critic": Export(critic, "sar"), "mobilenet": Export(other, "sar")}, tmp_path)
    torch.manual_seed(1)
    segmenter = build_network("segmenter", **SMALL, in_channels=2, classes=1)
    before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    report = load_export_into(segmenter, {"pre": tmp_path}, "pre", "sar_encoder", part="encoder")
    after = segmenter.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    encoder_keys = {f"encoder.{k}" for k in encoder.state_dict()}
    assert set(report["copied"]) == encoder_keys and all(k.startswith("encoder.") for k in changed)
    assert all(torch.equal(after[f"encoder.{k}"], v) for k, v in encoder.state_dict().items())
    with pytest.raises(ConfigError, match="export 'mobilenet' \\(encoder\\) matches nothing of the network's 'encoder'"):
        load_export_into(segmenter, {"pre": tmp_path}, "pre", "mobilenet", part="encoder")
    with pytest.raises(ConfigError, match="CriticMLP has no part 'encoder'"):
        load_export_into(segmenter, {"pre": tmp_path}, "pre", "critic", part="encoder")
    with pytest.raises(ConfigError, match="input checkpoint 'other' was not provided"):
        load_export_into(segmenter, {"pre": tmp_path}, "other")


def test_declared_inputs_are_checked_when_the_config_is_built(tmp_path: Path):
    with pytest.raises(ConfigError, match="reads input checkpoint 'teacher' .* give it in inputs"):
        build_config({"name": "x", "method": "kd"})
    with pytest.raises(ConfigError, match="phase 'a' input 'student': phase 'b' does not run before it"):
        build_config({"name": "x", "method": "supervised", "phases": [
            {"name": "a", "inputs": {"student": "b"}, "overrides": {"method_settings": {"init": "student"}}}, {"name": "b"}]})


# ---------------------------------------------------------------------------------------------- the plain engine


class Probe(Method):
    """Declares two views and the labelled stream; checks what its steps receive."""

    name = "probe"
    Settings = dict
    seen: list[dict[str, Any]] = []

    @classmethod
    def parse_settings(cls, raw):
        return dict(raw or {})

    @classmethod
    def needs(cls, settings) -> DataNeeds:
        return DataNeeds(fields=("sar", "optical", "mask"), views=2, streams=("labelled",), unlabelled=True)

    @classmethod
    def metrics(cls, settings, data=None) -> MetricSpec:
        return MetricSpec("val/loss", "min", labelled=False, report=("test/loss",))

    def setup(self, context: MethodContext) -> None:
        self.context = context
        self.net = self.add_network("net", build_network("encoder", encoder="resnet18", in_channels=2, depth=1), modality="sar")
        self.main = self.add_optimizer("main", self.net.parameters())

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        labelled = batch["streams"]["labelled"]
        Probe.seen.append({"sar": tuple(batch["sar"].shape), "mask": tuple(batch["mask"].shape), "flags": batch["labelled"].tolist(),
                           "stream_flags": labelled["labelled"].tolist(), "stream_sar": tuple(labelled["sar"].shape)})
        loss = self.net(batch["sar"][:, 0])[-1].mean()
        self.main.step(loss)
        return {"loss": float(loss.detach())}

    def evaluate(self, batches, panels: int = 0) -> EvalResult:
        shapes = {tuple(b["sar"].shape[1:]) for b in batches}
        assert shapes == {(2, 64, 64)}, shapes  # evaluation: one view
        return EvalResult(metrics={"loss": 1.0})


@pytest.fixture
def probe_method():
    METHODS["probe"] = Probe
    Probe.seen = []
    yield Probe
    del METHODS["probe"]


def test_plain_engine_gives_views_and_the_labelled_stream(tiny_world: Path, tmp_path: Path, probe_method):
    from xmodal.engine.plain import run_plain

    config = build_config({
        "name": "probe", "method": "probe", "data": {"root": str(tiny_world), "tile_size": 64, "batch_size": 2, "labels": {"count": 2}},
        "train": {"epochs": 1, "schedule": "constant"}, "run": {"storage": str(tmp_path), "panels": 0},
    })
    (result,) = run_plain(config, log=lambda line: None)
    assert Probe.seen and result.summary["data"]["labelled_tiles"] == 2 and result.summary["data"]["train_tiles"] > 2
    for batch in Probe.seen:
        assert batch["sar"] == (2, 2, 2, 64, 64) and batch["mask"] == (2, 2, 64, 64) and batch["stream_sar"] == batch["sar"]
        assert batch["stream_flags"] == [1, 1]
    assert any(0 in batch["flags"] for batch in Probe.seen), "unlabelled tiles stay in the main stream"


def test_plain_chain_hands_over_the_tested_or_the_last_checkpoint(tiny_world: Path, tmp_path: Path):
    from xmodal.engine.plain import run_plain

    base = {
        "name": "chain", "method": "supervised", "method_settings": {"input": "optical"},
        "data": {"root": str(tiny_world), "tile_size": 64, "batch_size": 4}, "model": SMALL,
        "train": {"epochs": 2, "lr": 0.003}, "run": {"storage": str(tmp_path), "panels": 0},
        "phases": [
            {"name": "teacher"},
            {"name": "tested", "inputs": {"start": "teacher"}, "overrides": {"method_settings": {"input": "sar", "init": "start"}, "train": {"epochs": 1}}},
            {"name": "last", "inputs": {"start": {"source": "teacher", "checkpoint": "last"}}, "overrides": {"method_settings": {"input": "sar", "init": "start"}, "train": {"epochs": 1}}},
        ],
    }
    teacher, tested, last = run_plain(build_config(base), log=lambda line: None)
    assert tested.summary["inputs"]["start"] == {"run": "chain/teacher", "checkpoint": teacher.checkpoint, "which": "tested"}
    assert last.summary["inputs"]["start"] == {"run": "chain/teacher", "checkpoint": teacher.last_checkpoint, "which": "last"}
    # --phase: a later phase alone reads the finished teacher back from its run.json.
    again = run_plain(build_config(base), only_phases=["last"], log=lambda line: None)
    assert [r.name for r in again] == ["chain/last"] and again[0].summary["inputs"]["start"]["checkpoint"] == teacher.last_checkpoint
