"""The method contract, for every registered method: a method is tested the moment it registers.

Parametrised over the registry (as timm's tests are over its models): defaults parse, the method
sets up on a tiny data description with the inputs it declares (random exports of the declared
builders), takes a step on a batch built from its declared needs (fields, views, streams),
evaluates to finite metrics that include its selection metric, survives a state round trip, and
its exports rebuild into the same weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from xmodal.methods.base import DataNeeds, DataSpec, Export, MethodContext, MetricSpec, ModelSettings
from xmodal.methods.exports import read_export, rebuild_export, save_exports
from xmodal.methods.optim import OptimSettings
from xmodal.methods.registry import load_methods
from xmodal.models import build_network

torch.set_num_threads(1)
METHOD_NAMES = sorted(load_methods())
SIZE = 32
SPEC = DataSpec(
    sar_channels=2, optical_channels=4, sar_bands=("VV", "VH"), optical_bands=("B02", "B03", "B04", "B08"),
    num_classes=2, class_names=("background", "building"), mask_layer="buildings", ignore_index=255,
    sar_mean=(-12.0, -18.0), sar_std=(3.0, 3.0), tile_size=SIZE, noisy_layer="noisy", scene_classes=("a", "b", "c"),
    train_tiles=8, labelled_tiles=4,
)
MODEL = ModelSettings(arch="unet", encoder="resnet18", encoder_depth=3, decoder_channels=[16, 8, 8])
OPTIM = OptimSettings(epochs=2, lr=0.01, optimizer="sgd", schedule="constant")


def make_batch(needs: DataNeeds, seed: int, batch: int = 2, views: int | None = None, labelled_stream: bool = True) -> dict:
    """A batch with every field of the contract, shaped for ``views``, plus the declared streams."""
    generator = torch.Generator().manual_seed(seed)
    views = needs.views if views is None else views
    lead = (batch, views) if views > 1 else (batch,)
    out = {
        "sar": torch.randn(*lead, 2, SIZE, SIZE, generator=generator),
        "optical": torch.randn(*lead, 4, SIZE, SIZE, generator=generator),
        "sar_valid": torch.ones(*lead, SIZE, SIZE, dtype=torch.uint8),
        "optical_valid": torch.ones(*lead, SIZE, SIZE, dtype=torch.uint8),
        "mask": torch.randint(0, 2, (*lead, SIZE, SIZE), generator=generator),
        "noisy_mask": torch.randint(0, 2, (*lead, SIZE, SIZE), generator=generator),
        "label": torch.randint(0, 3, (batch,), generator=generator),
        "index": torch.arange(batch),
        "labelled": torch.ones(batch, dtype=torch.uint8),
    }
    if "optical_label" in needs.fields:
        out["optical_label"] = out["label"].clone()
    if labelled_stream and "labelled" in needs.streams:
        out["streams"] = {"labelled": make_batch(needs, seed + 100, batch, views, labelled_stream=False)}
    return out


def random_inputs(method_cls, settings, folder: Path) -> dict[str, Path]:
    """Checkpoint folders holding random exports of what the method declares it reads."""
    inputs = {}
    for name, spec in method_cls.required_inputs(settings).items():
        channels = SPEC.channels(spec.modality) if spec.modality in ("sar", "optical", "both") else 0
        if spec.builder == "segmenter":
            network = build_network("segmenter", **MODEL.segmenter_kwargs(channels, 1))
        elif spec.builder == "encoder":
            network = build_network("encoder", encoder=MODEL.encoder, in_channels=channels, depth=MODEL.encoder_depth)
        elif spec.builder == "classifier":
            network = build_network("classifier", encoder=MODEL.encoder, in_channels=channels, num_classes=3, encoder_depth=MODEL.encoder_depth)
        elif spec.builder == "dual_encoder_classifier":
            network = build_network("dual_encoder_classifier", encoder=MODEL.encoder, in_channels={"sar": 2, "optical": 4}, num_classes=3, depth=MODEL.encoder_depth)
        else:
            pytest.fail(f"the contract test cannot make a random {spec.builder!r} export; extend random_inputs")
        save_exports({spec.export: Export(network, spec.modality)}, folder / name)
        inputs[name] = folder / name
    return inputs


def set_up(name: str, folder: Path):
    """The method with default settings, set up on :data:`SPEC` with the inputs in ``folder``
    (random exports made on first use)."""
    method_cls = load_methods()[name]
    settings = method_cls.parse_settings(None)
    inputs = {n: folder / n for n in method_cls.required_inputs(settings)}
    if not all(path.is_dir() for path in inputs.values()):
        inputs = random_inputs(method_cls, settings, folder)
    method = method_cls(settings, MODEL, OPTIM, SPEC)
    method.setup(MethodContext(torch.device("cpu"), steps_per_epoch=2, epochs=OPTIM.epochs, inputs=inputs, log=lambda _: None))
    return method_cls, settings, method


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_declarations_are_consistent(name: str):
    method_cls = load_methods()[name]
    settings = method_cls.parse_settings(None)
    assert method_cls.name == name and method_cls.__module__.startswith(f"xmodal.methods.{name}."), "one package per method"
    needs = method_cls.needs(settings)
    assert isinstance(needs, DataNeeds)
    spec = method_cls.metrics(settings, SPEC)
    assert isinstance(spec, MetricSpec) and spec.select.startswith("val/") and all(m.startswith("test/") for m in spec.report)
    assert "main" in method_cls.optimizer_names(settings)
    for table in method_cls.paper_tables:
        assert {"key", "rows", "columns", "paper"} <= set(table)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_step_evaluate_state_and_exports(name: str, tmp_path: Path):
    method_cls, settings, method = set_up(name, tmp_path / "inputs")
    needs = method_cls.needs(settings)
    logs = method.train_step(make_batch(needs, 0), 0)
    assert logs and all(math.isfinite(v) for v in logs.values()), logs
    evaluation = [make_batch(needs, 1, views=1, labelled_stream=False)]
    result = method.evaluate(evaluation, panels=1)
    select = method_cls.metrics(settings, SPEC).select.split("/", 1)[1]
    assert select in result.metrics and math.isfinite(result.metrics[select]), result.metrics
    method.finish_epoch(0, {f"val/{k}": v for k, v in result.metrics.items()})

    # State round trip: a fresh instance restored from the state evaluates identically.
    _, _, fresh = set_up(name, tmp_path / "inputs")
    fresh.load_state_dict(method.state_dict())
    assert fresh.evaluate(evaluation).metrics == pytest.approx(method.evaluate(evaluation).metrics, nan_ok=True)

    # Exports rebuild from their recipe into the same weights.
    exports = method.exports()
    save_exports(exports, tmp_path / "checkpoint")
    for export_name, export in exports.items():
        rebuilt, saved = rebuild_export(tmp_path / "checkpoint", export_name)
        assert saved["modality"] == export.modality and read_export(tmp_path / "checkpoint", export_name)["recipe"] == export.recipe()
        original = export.module.state_dict()
        assert rebuilt.state_dict().keys() == original.keys()
        assert all(torch.equal(rebuilt.state_dict()[k], original[k]) for k in original), export_name
