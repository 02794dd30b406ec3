"""Tests of xmodal.models: factory, named feature taps, layer sets, SegNet, heads, weight transfer.

Models are small (resnet18 encoder, narrow decoders, SegNet at width 1/8) and inputs 2 x C x 64 x 64
(PAN: 128 x 128, the smallest size its pyramid attention accepts), to keep the whole file well under a
minute on two shared CPU cores. The paper's heavy encoders (vgg19_bn, xception, resnet50) are only built
and run once on a tiny input, in ``test_paper_architecture_encoder_pairs``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models import (
    FeatureTaps,
    ProjectionHead,
    SegNet,
    copy_matching_weights,
    create_classifier,
    create_model,
    layer_set,
    list_architectures,
    list_taps,
    load_weights,
    model_summary,
    register_architecture,
    tap_shapes,
)
from xmodal.models import factory as factory_module
from xmodal.models.segnet import SegNetEncoderStage

torch.set_num_threads(1)

SMP_ARCHS = ["unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "pan"]
ALL_ARCHS = SMP_ARCHS + ["segnet"]
# Narrow decoders so that building and running every architecture stays cheap.
SMALL_DECODERS: dict[str, object] = {
    "unet": (32, 16, 16, 8, 8),
    "unetplusplus": (32, 16, 16, 8, 8),
    "manet": (32, 16, 16, 8, 8),
    "fpn": (32, 32),
    "pspnet": 32,
    "deeplabv3": 32,
    "deeplabv3plus": 32,
    "pan": 16,
}
# How far each architecture's encoder downsamples at most (dilated encoders stop early).
MAX_ENCODER_STRIDE = {"deeplabv3": 8, "deeplabv3plus": 16, "pan": 16}


def input_size(arch: str) -> int:
    return 128 if arch == "pan" else 64


def small_model(arch: str, in_channels: int = 2, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    if arch == "segnet":
        return create_model("segnet", in_channels=in_channels, classes=classes, width=0.125)
    return create_model(
        arch, encoder="resnet18", in_channels=in_channels, classes=classes, decoder_channels=SMALL_DECODERS.get(arch)
    )


def batch(arch: str, in_channels: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    size = input_size(arch)
    return torch.randn(2, in_channels, size, size)


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class Wrapper(nn.Module):
    """Stands in for DistributedDataParallel: the real model lives in ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


# -- factory ----------------------------------------------------------------------------------------------
def test_registry_lists_every_architecture() -> None:
    assert set(ALL_ARCHS) <= set(list_architectures())


@pytest.mark.parametrize(("arch", "in_channels"), list(itertools.product(ALL_ARCHS, [2, 4, 13])))
def test_any_channels_and_classes_give_input_sized_logits(arch: str, in_channels: int) -> None:
    size = input_size(arch)
    for classes in (1, 9):
        model = small_model(arch, in_channels, classes)
        out = model(torch.randn(2, in_channels, size, size))
        assert out.shape == (2, classes, size, size)


def test_names_are_case_and_punctuation_insensitive() -> None:
    model = create_model("DeepLabV3+", in_channels=2, classes=1, decoder_channels=16)
    assert model.xmodal_recipe["kwargs"]["arch"] == "deeplabv3plus"
    assert create_model("UNet++", in_channels=2, classes=1).xmodal_recipe["kwargs"]["arch"] == "unetplusplus"


def test_unknown_architecture_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="known architectures: .*'unet'.*"):
        create_model("unetx", in_channels=2, classes=1)


@pytest.mark.parametrize(
    "kwargs",
    [{"encoder_weights": "imagenet"}, {"pretrained": True}, {"encoder_weights": "ssl"}],
)
def test_pretrained_weights_request_is_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="cannot be downloaded.*load_weights"):
        create_model("unet", in_channels=2, classes=1, **kwargs)
    with pytest.raises(ConfigError, match="cannot be downloaded"):
        create_classifier("resnet18", 2, 5, **kwargs)


def test_explicit_random_init_is_accepted() -> None:
    model = create_model("linknet", in_channels=2, classes=1, encoder_weights=None)
    assert model.xmodal_recipe["kwargs"]["encoder"] == "resnet18"


@pytest.mark.parametrize(
    ("arch", "encoder", "message"),
    [
        ("unet", "resnet19", "not an smp encoder.*resnet18"),
        ("unet", "tu-not_a_timm_model", "timm has no model"),
        ("deeplabv3plus", "xception", "dilat.*tu-xception65"),
        ("segnet", "resnet18", "vgg19_bn"),
    ],
)
def test_bad_encoders_raise_config_error(arch: str, encoder: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model(arch, encoder=encoder, in_channels=2, classes=1)


def test_invalid_sizes_and_kwargs_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="in_channels"):
        create_model("unet", in_channels=0, classes=1)
    with pytest.raises(ConfigError, match="classes"):
        create_model("unet", in_channels=2, classes=-1)
    with pytest.raises(ConfigError, match="unknown keyword.*bogus"):
        create_model("unet", in_channels=2, classes=1, bogus=1)
    with pytest.raises(ConfigError, match="encoder_depth"):
        create_model("fpn", in_channels=2, classes=1, encoder_depth=2)


def test_decoder_channels_map_to_each_architectures_knob() -> None:
    x = torch.randn(2, 2, 64, 64)
    cases = {
        "unet": ((24, 16, 16, 8, 12), "decoder.out", 12),
        "manet": ((24, 16, 16, 8, 12), "decoder.out", 12),
        "pspnet": (40, "decoder.block1", 40),
        "deeplabv3": (24, "decoder.out", 24),
        "deeplabv3plus": (24, "decoder.out", 24),
        "fpn": ((48, 64), "decoder.block0", 48),
    }
    for arch, (channels, tap, expected) in cases.items():
        model = create_model(arch, in_channels=2, classes=1, decoder_channels=channels)
        with FeatureTaps(model, tap) as taps:
            model(x)
        assert taps[tap].shape[1] == expected, arch


@pytest.mark.parametrize(
    ("arch", "channels", "message"),
    [
        ("linknet", (8,), "no decoder width knob"),
        ("segnet", (8,), "no decoder width knob"),
        ("unet", (8, 8), "one width per decoder block"),
        ("pspnet", (8, 8), "takes one width"),
        ("fpn", (64, 48), "multiple of 32"),
        ("unet", (8, 0, 8, 8, 8), "positive ints"),
    ],
)
def test_bad_decoder_channels_raise_config_error(arch: str, channels: tuple, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create_model(arch, in_channels=2, classes=1, decoder_channels=channels)


def test_shallower_encoders_get_matching_default_decoders() -> None:
    model = create_model("unet", in_channels=2, classes=4, encoder_depth=3)
    assert model(torch.randn(2, 2, 32, 32)).shape == (2, 4, 32, 32)
    assert [t for t in list_taps(model) if t.startswith("encoder.stage")] == [f"encoder.stage{k}" for k in (1, 2, 3)]


def test_register_architecture_plugs_into_create_model() -> None:
    @register_architecture("tiny_test_net", default_encoder="none", decoder_channels=None)
    def build(*, encoder, in_channels, classes, encoder_depth, decoder_channels, **kwargs):
        return nn.Conv2d(in_channels, classes, 1)

    try:
        assert "tinytestnet" in list_architectures()
        model = create_model("Tiny-Test-Net", in_channels=3, classes=2)
        assert isinstance(model, nn.Conv2d) and model.xmodal_recipe["kwargs"]["arch"] == "tinytestnet"
        with pytest.raises(ConfigError, match="already registered"):
            register_architecture("tiny_test_net")(build)
    finally:
        factory_module._ARCHITECTURES.pop("tinytestnet", None)


def test_model_summary_splits_parameters() -> None:
    model = small_model("unet")
    summary = model_summary(Wrapper(model))
    assert summary["total"] == sum(p.numel() for p in model.parameters())
    assert summary["encoder"] == sum(p.numel() for p in model.encoder.parameters())
    assert summary["decoder"] == sum(p.numel() for p in model.decoder.parameters())
    assert summary["head"] == sum(p.numel() for p in model.segmentation_head.parameters()) > 0
    assert summary["encoder"] + summary["decoder"] + summary["head"] + summary["other"] == summary["total"]
    model.encoder.requires_grad_(False)
    assert model_summary(model)["trainable"] == summary["total"] - summary["encoder"]


# The paper's pairs. Heavy encoders: built once each, one 1x64x64 forward in eval mode.
@pytest.mark.parametrize(
    ("arch", "encoder"),
    [
        ("unet", "mobilenet_v2"),
        ("unet", "vgg19_bn"),
        ("unet", "xception"),
        ("pspnet", "resnet50"),
        ("deeplabv3plus", "resnet50"),
        ("deeplabv3plus", "tu-xception65"),
        ("segnet", "vgg19_bn"),
    ],
)
def test_paper_architecture_encoder_pairs(arch: str, encoder: str) -> None:
    model = create_model(arch, encoder=encoder, in_channels=2, classes=9).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 2, 64, 64)).shape == (1, 9, 64, 64)
    names = list_taps(model)
    assert "encoder.out" in names
    if encoder == "vgg19_bn" and arch == "unet":
        # VGG encoders' first feature map is a learned full-resolution map, so stage0 is exposed.
        assert names[:2] == ["encoder.stage0", "encoder.stage1"] and "decoder.center" in names
        shapes = tap_shapes(model, ["encoder.stage0", "encoder.out"], (2, 64, 64))
        assert shapes == {"encoder.stage0": (64, 64, 64), "encoder.out": (512, 2, 2)}


# -- taps -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_tap_is_captured_with_expected_shapes(arch: str) -> None:
    model = small_model(arch)
    x = batch(arch)
    names = list_taps(model)
    assert names[-1] == "logits" and "encoder.out" in names and "decoder.out" in names
    with FeatureTaps(model, names) as taps:
        out = model(x)
    assert set(taps.features) == set(names)
    assert taps["logits"] is out
    size = input_size(arch)
    stages = sorted(int(n.removeprefix("encoder.stage")) for n in names if n.startswith("encoder.stage"))
    assert stages and stages[0] >= 1  # stage0 (the raw input) is not exposed for these encoders
    for k in stages:
        stride = min(2**k, MAX_ENCODER_STRIDE.get(arch, 2**k))
        assert taps[f"encoder.stage{k}"].shape[-2:] == (size // stride, size // stride), f"stage{k}"
    assert taps["encoder.out"] is taps[f"encoder.stage{stages[-1]}"]
    for name in names:
        assert taps[name].shape[0] == 2 and taps[name].dim() == 4, name
    # Decoder blocks never get coarser than the encoder output and end no finer than the input.
    blocks = [n for n in names if n.startswith("decoder.block")]
    assert blocks
    assert all(taps[b].shape[-1] >= taps["encoder.out"].shape[-1] for b in blocks)
    assert all(taps[b].shape[-1] <= size for b in blocks)


def test_unet_decoder_blocks_double_resolution() -> None:
    model = small_model("unet")
    with FeatureTaps(model, layer_set(model, "all_decoder")) as taps:
        model(batch("unet"))
    sizes = [taps[f"decoder.block{i}"].shape[-1] for i in range(5)]
    assert sizes == [4, 8, 16, 32, 64]
    assert [taps[f"decoder.block{i}"].shape[1] for i in range(5)] == list(SMALL_DECODERS["unet"])


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_tap_losses_backpropagate_into_the_encoder(arch: str) -> None:
    model = small_model(arch)
    # A loss on "mid" alone reaches the encoder but not the decoder: the tap is the live graph node.
    with FeatureTaps(model, layer_set(model, "mid")) as taps:
        model(batch(arch))
    taps["encoder.out"].pow(2).mean().backward()
    first_conv = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())

    model.zero_grad(set_to_none=True)
    with FeatureTaps(model, layer_set(model, "int")) as taps:
        model(batch(arch))
    sum(f.pow(2).mean() for f in taps.features.values()).backward()
    assert first_conv.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters())


def test_detach_option_cuts_the_graph() -> None:
    model = small_model("linknet")
    with FeatureTaps(model, ["encoder.out", "logits"], detach=True) as taps:
        out = model(batch("linknet"))
    assert out.requires_grad
    assert not taps["encoder.out"].requires_grad and not taps["logits"].requires_grad


def test_hooks_are_removed_on_exit_and_on_error() -> None:
    model = small_model("unet")
    before = hook_count(model)
    with FeatureTaps(model, list_taps(model), pre_activation=True) as taps:
        assert hook_count(model) > before and taps.attached
        model(batch("unet"))
    assert hook_count(model) == before and not taps.attached
    assert taps["logits"].shape[1] == 3  # features survive the with block
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureTaps(model, ["encoder.out"]):
            raise RuntimeError("boom")
    assert hook_count(model) == before


def test_features_hold_only_the_last_forward() -> None:
    model = small_model("fpn").eval()
    with torch.no_grad(), FeatureTaps(model, ["encoder.out", "logits"]) as taps:
        model(batch("fpn"))
        first = taps["logits"]
        second_out = model(batch("fpn") * 2)
    assert taps["logits"] is second_out and taps["logits"] is not first


def test_taps_work_through_a_ddp_style_wrapper() -> None:
    model = small_model("unet")
    wrapped = Wrapper(model)
    assert list_taps(wrapped) == list_taps(model)
    assert layer_set(wrapped, "int") == layer_set(model, "int")
    before = hook_count(model)
    with FeatureTaps(wrapped, ["encoder.out", "decoder.block2"]) as taps:
        out = wrapped(batch("unet"))
    assert out.shape == (2, 3, 64, 64) and taps["decoder.block2"].shape == (2, 16, 16, 16)
    assert hook_count(model) == before

    class PlainWrapper:  # not even an nn.Module, as long as it exposes .module
        def __init__(self, module: nn.Module) -> None:
            self.module = module

    assert list_taps(PlainWrapper(model)) == list_taps(model)


def test_unknown_tap_names_list_the_available_ones() -> None:
    model = small_model("pspnet")
    with pytest.raises(ConfigError, match=r"unknown tap 'encoder.stage9'.*'encoder.out'.*'logits'"):
        FeatureTaps(model, ["encoder.stage9"])
    with pytest.raises(ConfigError, match="no submodule"):
        FeatureTaps(model, ["module:encoder.not_there"])


def test_module_taps_reach_any_submodule() -> None:
    model = small_model("unet")
    with FeatureTaps(model, ["module:encoder.layer2.0.conv1"]) as taps:
        model(batch("unet"))
    assert taps["module:encoder.layer2.0.conv1"].shape == (2, 128, 8, 8)
    plain = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU())
    with pytest.raises(ConfigError, match="no named feature taps"):
        list_taps(plain)
    with FeatureTaps(plain, ["module:0"]) as taps:
        plain(torch.randn(1, 2, 8, 8))
    assert taps["module:0"].shape == (1, 4, 6, 6)


def test_unfired_tap_has_a_clear_error() -> None:
    model = small_model("unet")
    with FeatureTaps(model, ["logits"]) as taps:
        with pytest.raises(ConfigError, match="has not fired"):
            taps["logits"]
        with pytest.raises(ConfigError, match="was not requested"):
            taps["encoder.out"]


def test_pre_activation_keeps_the_negative_part() -> None:
    model = small_model("unet")
    names = ["encoder.stage1", "decoder.block1", "logits"]
    with FeatureTaps(model, names) as post:
        model(batch("unet"))
    with FeatureTaps(model, names, pre_activation=True) as pre:
        model(batch("unet"))
    assert post["encoder.stage1"].min() >= 0 and post["decoder.block1"].min() >= 0  # ReLU outputs
    assert pre["encoder.stage1"].min() < 0 and pre["decoder.block1"].min() < 0
    assert torch.equal(pre["encoder.stage1"].clamp(min=0), post["encoder.stage1"])
    assert pre.pre_activation_applied == {"encoder.stage1": True, "decoder.block1": True, "logits": False}
    assert torch.equal(pre["logits"], post["logits"])
    pre["encoder.stage1"].mean().backward()
    assert model.encoder.conv1.weight.grad.abs().sum() > 0


# -- layer sets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_layer_sets(arch: str) -> None:
    model = small_model(arch)
    taps = list_taps(model)
    assert layer_set(model, "mid") == ["encoder.out"]
    assert layer_set(model, "fin") == ["logits"]
    intermediate = layer_set(model, "int")
    encoder_part = [n for n in intermediate if n.startswith(("encoder.", "module:encoder."))]
    decoder_part = [n for n in intermediate if n.startswith("decoder.")]
    assert len(set(intermediate)) == len(intermediate) and set(intermediate) <= set(taps) | {n for n in intermediate if n.startswith("module:")}
    assert encoder_part and decoder_part and len(encoder_part) + len(decoder_part) == len(intermediate)
    assert "encoder.out" not in intermediate and "logits" not in intermediate
    assert len(intermediate) == 6  # the paper's six, on every architecture (PSPNet through its stage blocks)
    assert layer_set(model, "all_encoder") == [n for n in taps if n.startswith("encoder.stage")]
    assert layer_set(model, ["logits", "encoder.out"]) == ["logits", "encoder.out"]


def test_int_set_rule_on_unet_and_pspnet() -> None:
    unet = small_model("unet")
    assert layer_set(unet, "int") == [
        "encoder.stage1", "encoder.stage3", "encoder.stage4",
        "decoder.block0", "decoder.block2", "decoder.block4",
    ]  # fmt: skip
    # DeepLabV3 has two decoder blocks: the encoder side makes up the sixth layer.
    assert layer_set(small_model("deeplabv3"), "int") == [
        "encoder.stage1", "encoder.stage2", "encoder.stage3", "encoder.stage4",
        "decoder.block0", "decoder.block1",
    ]  # fmt: skip
    # PSPNet (depth 3) has four stage / decoder candidates: the ResNet blocks inside the encoder
    # stages make up the paper's six, and each of the six is a distinct tensor of the forward.
    pspnet = small_model("pspnet")
    six = layer_set(pspnet, "int")
    assert six == [
        "encoder.stage1", "module:encoder.layer1.0", "encoder.stage2", "module:encoder.layer2.0",
        "decoder.block0", "decoder.block1",
    ]  # fmt: skip
    with FeatureTaps(pspnet.eval(), six) as taps:
        pspnet(torch.randn(1, 2, 64, 64))
        shapes = {name: tuple(taps[name].shape) for name in six}
    assert shapes["module:encoder.layer1.0"] == shapes["encoder.stage2"] and len({id(taps[n]) for n in six}) == 6
    assert shapes["module:encoder.layer2.0"][2] == 8  # inside the deepest stage, at its stride


def test_unknown_layer_sets_raise_config_error() -> None:
    model = small_model("linknet")
    with pytest.raises(ConfigError, match="unknown layer set 'mid\\+fin'.*sequences of sets"):
        layer_set(model, "mid+fin")
    with pytest.raises(ConfigError, match="unknown tap"):
        layer_set(model, ["encoder.out", "decoder.block99"])
    with pytest.raises(ConfigError, match="must not be empty"):
        layer_set(model, [])


def test_tap_shapes_restores_train_mode() -> None:
    model = small_model("deeplabv3plus").train()
    shapes = tap_shapes(model, ["encoder.out", "decoder.block1", "logits"], (2, 64, 64))
    assert shapes == {"encoder.out": (512, 4, 4), "decoder.block1": (48, 16, 16), "logits": (3, 64, 64)}
    assert all(m.training for m in model.modules())


# -- SegNet -----------------------------------------------------------------------------------------------
def test_segnet_forward_backward_and_odd_sizes() -> None:
    model = SegNet(3, 5, width=0.125)
    x = torch.randn(2, 3, 50, 38)  # not multiples of 32: unpooling restores exact sizes
    out = model(x)
    assert out.shape == (2, 5, 50, 38)
    out.mean().backward()
    assert model.encoder.stages[0].convs[0][0].weight.grad.abs().sum() > 0
    assert model_summary(model)["decoder"] > 0
    with pytest.raises(ConfigError, match="too small"):
        model(torch.randn(1, 3, 16, 16))


def test_segnet_decoder_unpools_at_the_encoders_argmax_positions() -> None:
    model = SegNet(2, 3, width=0.125, depth=3).eval()
    x = torch.randn(2, 2, 32, 32)
    unpooled: dict[str, torch.Tensor] = {}
    handle = model.decoder.stages[0].unpool.register_forward_hook(lambda m, a, o: unpooled.setdefault("out", o))
    with torch.no_grad(), FeatureTaps(model, ["encoder.out", "module:encoder.stages.2.convs"]) as taps:
        model(x)
    handle.remove()
    pre_pool = taps["module:encoder.stages.2.convs"]
    pooled, indices = nn.functional.max_pool2d(pre_pool, 2, 2, return_indices=True)
    assert torch.equal(pooled, taps["encoder.out"])
    # Exactly the argmax positions are filled, with the pooled values; all else is zero.
    expected = torch.zeros_like(pre_pool).flatten(2).scatter(2, indices.flatten(2), pooled.flatten(2))
    assert torch.equal(unpooled["out"], expected.view_as(pre_pool))
    assert (unpooled["out"] != 0).sum() <= pooled.numel()


def test_segnet_stage_returns_indices_and_size() -> None:
    stage = SegNetEncoderStage(2, (4,), batch_norm=False)
    pooled, indices, size = stage(torch.randn(1, 2, 9, 7))
    assert pooled.shape == (1, 4, 4, 3) and indices.shape == pooled.shape and tuple(size) == (1, 4, 9, 7)


def test_segnet_config_validation() -> None:
    model = create_model("segnet", encoder="vgg11", in_channels=2, classes=2, encoder_depth=2, width=0.25)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # "vgg11" without _bn
    assert layer_set(model, "all_decoder") == ["decoder.block0", "decoder.block1"]
    custom = create_model("segnet", in_channels=2, classes=2, encoder_depth=2, cfg=((4,), (8, 8)))
    assert tap_shapes(custom, ["encoder.out"], (2, 16, 16)) == {"encoder.out": (8, 4, 4)}
    with pytest.raises(ConfigError, match="encoder_depth"):
        create_model("segnet", in_channels=2, classes=2, encoder_depth=6)
    with pytest.raises(ConfigError, match="width"):
        SegNet(2, 2, width=0)
    with pytest.raises(ConfigError, match="unknown keyword"):
        create_model("segnet", in_channels=2, classes=2, bogus=1)


# -- classifier and heads ---------------------------------------------------------------------------------
def test_classifier_on_so2sat_sized_patches() -> None:
    model = create_classifier("resnet18", 10, 17)
    x = torch.randn(2, 10, 32, 32)
    names = list_taps(model)
    assert names[-2:] == ["pooled", "logits"] and "encoder.out" in names
    with FeatureTaps(model, names) as taps:
        out = model(x)
    assert out.shape == (2, 17)
    assert taps["pooled"].shape == (2, 512) and taps["encoder.stage5"].shape == (2, 512, 1, 1)
    out.sum().backward()
    assert model.encoder.conv1.weight.grad.abs().sum() > 0
    summary = model_summary(model)
    assert summary["decoder"] == 0 and summary["head"] == 512 * 17 + 17
    assert create_classifier("mobilenet_v2", 2, 3, encoder_depth=4)(torch.randn(2, 2, 32, 32)).shape == (2, 3)


def test_projection_head_pooled_and_dense() -> None:
    features = torch.randn(4, 16, 8, 8)
    assert ProjectionHead(16, 8)(features).shape == (4, 8)
    assert ProjectionHead(16, 8, dense=True)(features).shape == (4, 8, 8, 8)
    with pytest.raises(ConfigError, match="out_dim"):
        ProjectionHead(16, 0)


# -- weights ----------------------------------------------------------------------------------------------
def test_copy_matching_weights_adapts_the_first_conv() -> None:
    teacher = small_model("unet", in_channels=4)  # e.g. optical
    torch.manual_seed(5)
    student = create_model("unet", in_channels=2, classes=3, decoder_channels=SMALL_DECODERS["unet"])
    report = copy_matching_weights(Wrapper(teacher), student)
    assert report["adapted"] == ["encoder.conv1.weight"]
    assert report["skipped"] == [] and report["unused"] == []
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    assert set(report["copied"]) == set(student_state) - {"encoder.conv1.weight"}
    for key in report["copied"]:
        assert torch.equal(teacher_state[key], student_state[key]), key
    source = teacher.encoder.conv1.weight
    expected = source.mean(dim=1, keepdim=True).repeat(1, 2, 1, 1) * (4 / 2)
    assert torch.allclose(student.encoder.conv1.weight, expected)
    # Activation scale is kept: equal-channel inputs give the same first-conv response.
    plane = torch.randn(1, 1, 16, 16)
    assert torch.allclose(
        teacher.encoder.conv1(plane.repeat(1, 4, 1, 1)), student.encoder.conv1(plane.repeat(1, 2, 1, 1)), atol=1e-5
    )


def test_copy_matching_weights_other_modes_and_partial_overlap() -> None:
    teacher = small_model("unet", in_channels=3)
    student = create_model("unet", in_channels=5, classes=3, decoder_channels=SMALL_DECODERS["unet"])
    copy_matching_weights(teacher, student, adapt_first_conv="cycle")
    expected = teacher.encoder.conv1.weight[:, [0, 1, 2, 0, 1]] * (3 / 5)
    assert torch.allclose(student.encoder.conv1.weight, expected)
    before = student.encoder.conv1.weight.clone()
    report = copy_matching_weights(teacher, student, adapt_first_conv="none")
    assert "encoder.conv1.weight" in report["skipped"] and torch.equal(student.encoder.conv1.weight, before)
    with pytest.raises(ConfigError, match="adapt_first_conv"):
        copy_matching_weights(teacher, student, adapt_first_conv="average")
    # A classifier's encoder initialises a segmentation model's encoder; the decoder stays as is.
    classifier = create_classifier("resnet18", 2, 17)
    segmenter = small_model("fpn", in_channels=2)
    report = copy_matching_weights(classifier, segmenter)
    assert all(k.startswith("encoder.") for k in report["copied"]) and len(report["copied"]) > 50
    assert all(k.startswith(("decoder.", "segmentation_head.")) for k in report["skipped"])
    assert torch.equal(segmenter.encoder.layer4[1].conv2.weight, classifier.encoder.layer4[1].conv2.weight)


def test_load_weights_round_trip_and_errors(tmp_path) -> None:
    source = small_model("linknet")
    path = tmp_path / "linknet.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    torch.manual_seed(9)
    target = create_model("linknet", in_channels=2, classes=3)
    report = load_weights(target, path)
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())

    other = create_model("linknet", in_channels=4, classes=3)
    with pytest.raises(ConfigError, match=r"mismatched shapes: 1 \[encoder.conv1.weight"):
        load_weights(other, path)
    partial = load_weights(other, path, strict=False)
    assert partial["mismatched"] == ["encoder.conv1.weight"] and len(partial["loaded"]) > 0

    encoder_path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), encoder_path)
    fresh = create_model("unet", in_channels=2, classes=1)
    loaded = load_weights(fresh, encoder_path, prefix="encoder.", strict=False)
    assert loaded["unexpected"] == []
    assert all(k.startswith(("decoder.", "segmentation_head.")) for k in loaded["missing"])
    assert torch.equal(fresh.encoder.layer1[0].conv1.weight, source.encoder.layer1[0].conv1.weight)

    with pytest.raises(ConfigError, match="does not exist"):
        load_weights(fresh, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        load_weights(fresh, tmp_path / "junk.pt")


# -- standalone encoders, composites and recipes ------------------------------------------------------------
def test_standalone_encoder_matches_a_segmenters_encoder_keys() -> None:
    from xmodal.models import create_encoder

    encoder = create_encoder("resnet18", 2, depth=3)
    segmenter = create_model("unet", encoder="resnet18", in_channels=2, classes=1, encoder_depth=3, decoder_channels=[16, 8, 8])
    assert {f"encoder.{k}" for k in encoder.state_dict()} == {k for k in segmenter.state_dict() if k.startswith("encoder.")}
    assert [f.shape[1] for f in encoder(torch.zeros(1, 2, 32, 32))] == list(encoder.out_channels)


@pytest.mark.parametrize("norm, kind", [("batch", nn.BatchNorm2d), ("instance", nn.InstanceNorm2d), ("none", nn.Identity)])
def test_encoder_normalisation(norm: str, kind: type) -> None:
    from xmodal.models import create_encoder

    encoder = create_encoder("resnet18", 3, depth=4, norm=norm, input_size=32)
    modules = list(encoder.modules())
    assert any(isinstance(m, kind) for m in modules)
    if norm != "batch":
        assert not any(isinstance(m, nn.BatchNorm2d) for m in modules)
    if norm == "instance":  # per-sample statistics: one sample's output does not depend on the others
        x = torch.randn(2, 3, 32, 32)
        encoder.train()
        alone = encoder(x[:1])[-1]
        together = encoder(x)[-1][:1]
        assert torch.allclose(alone, together, atol=1e-3, rtol=1e-3)


def test_instance_norm_refuses_a_depth_that_reaches_one_pixel() -> None:
    from xmodal.models import create_encoder

    with pytest.raises(ConfigError, match=r"norm=instance at depth=5 reaches a 1 x 1 feature map on 32 x 32 inputs.*depth <= 4"):
        create_encoder("resnet18", 2, depth=5, norm="instance", input_size=32)
    with pytest.raises(ConfigError, match="norm='group'"):
        create_encoder("resnet18", 2, norm="group")


def test_composites_and_autoencoder_rebuild_from_their_recipes() -> None:
    from xmodal.models import build_network, rebuild_network, recipe_of

    cases = [
        ("dual_encoder_classifier", {"encoder": "resnet18", "in_channels": {"sar": 2, "optical": 4}, "num_classes": 17, "depth": 4, "norm": "instance", "input_size": 32}),
        ("dual_encoder_segmenter", {"arch": "unet", "encoder": "resnet18", "in_channels": {"sar": 2, "optical": 4}, "classes": 9, "encoder_depth": 3, "decoder_channels": [16, 8, 8]}),
        ("autoencoder", {"in_channels": 2, "input_size": 64, "latent_dim": 16, "width": 0.125}),
        ("critic", {"in_features": 16, "hidden": [8, 4]}),
        ("dual_segmenter", {"arch": "unet", "encoder": "resnet18", "in_channels": {"sar": 2, "optical": 4}, "classes": 9, "encoder_depth": 3, "decoder_channels": [16, 8, 8]}),
    ]
    for name, kwargs in cases:
        torch.manual_seed(0)
        network = build_network(name, **kwargs)
        twin = rebuild_network(recipe_of(network))
        twin.load_state_dict(network.state_dict())
        assert type(twin) is type(network) and recipe_of(twin) == recipe_of(network)
    classifier = build_network(*cases[0][:1], **cases[0][1])
    sar, optical = torch.randn(2, 2, 32, 32), torch.randn(2, 4, 32, 32)
    assert classifier(sar, "sar").shape == (2, 17) and classifier.embed(optical, "optical").shape == (2, classifier.embedding_dim)
    # Shared head: the same embedding gives the same scores whichever encoder made it.
    embedding = classifier.embed(sar, "sar")
    assert torch.allclose(classifier.classify(embedding), classifier(sar, "sar"))
    segmenter = build_network(*cases[1][:1], **cases[1][1])
    assert segmenter(sar, "sar").shape == segmenter(optical, "optical").shape == (2, 9, 32, 32)
    assert recipe_of(segmenter.encoder("sar"))["builder"] == "encoder"  # each encoder exports on its own
    both = segmenter({"sar": sar, "optical": optical})  # every branch in one forward
    assert torch.equal(both["sar"], segmenter(sar, "sar")) and torch.equal(both["optical"], segmenter(optical, "optical"))
    late = build_network(*cases[4][:1], **cases[4][1])
    # Late fusion shares nothing: each branch is a full segmenter, and each encoder still exports alone.
    assert not set(map(id, late.segmenter("sar").parameters())) & set(map(id, late.segmenter("optical").parameters()))
    assert late({"sar": sar})["sar"].shape == (2, 9, 32, 32) and recipe_of(late.encoder("optical"))["builder"] == "encoder"
    assert rebuild_network(recipe_of(late.encoder("sar"))).state_dict().keys() == late.encoder("sar").state_dict().keys()
    autoencoder = build_network(*cases[2][:1], **cases[2][1])
    z, reconstruction = autoencoder(torch.randn(2, 2, 64, 64))
    assert z.shape == (2, 16) and reconstruction.shape == (2, 2, 64, 64)
    critic = build_network(*cases[3][:1], **cases[3][1])
    assert critic(z).shape == (2,) and not any(isinstance(m, nn.BatchNorm1d) for m in critic.modules())
    with pytest.raises(ConfigError, match="unknown network builder 'segmentor'.*did you mean 'segmenter'"):
        build_network("segmentor")
