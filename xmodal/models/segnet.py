"""SegNet: a VGG encoder and a mirrored decoder that upsamples with the encoder's max-pooling indices.

SegNet (Badrinarayanan, Kendall & Cipolla, TPAMI 2017) is not buildable with segmentation-models-pytorch
or timm, so xmodal builds it here and registers it in the factory as ``"segnet"``.

Structure, for a VGG configuration of ``depth`` stages (VGG19-BN by default):

* Encoder stage k (``encoder.stages[k]``): ``n_k`` 3x3 conv-BN-ReLU layers, then 2x2 max pooling that also
  returns the argmax indices and the pre-pooling size.
* Decoder stage i (``decoder.stages[i]``, deepest first) mirrors encoder stage ``depth - 1 - i``: a
  ``MaxUnpool2d`` that puts every value back at the position its encoder max came from (zeros elsewhere,
  hence a sparse map), then the stage's convolutions in reverse order; its last convolution maps to the
  width of the previous encoder stage, so decoder stage i's output matches encoder stage
  ``depth - 2 - i``'s width. No skip features are concatenated: only indices travel.
* ``segmentation_head``: a 1x1 convolution to the class logits (the paper's "soft-max classifier" layer,
  without the soft-max).

Any number of input channels works; inputs of any H x W of at least ``2**depth`` pixels work (the
unpooling restores the exact pre-pooling sizes, odd sizes included). ``width`` scales every layer's
channel count (``width=0.125`` makes a tiny model for tests). Weights are always randomly initialised
(Kaiming normal for convolutions, as VGG does).

Taps: ``encoder.stage1`` .. ``encoder.stage<depth>`` (each encoder stage's pooled output, at stride
``2**k``), ``encoder.out`` (the deepest), ``decoder.block0`` .. (decoder stages, coarse to fine),
``decoder.out`` and ``logits``.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.factory import register_architecture
from xmodal.models.taps import TapPoint

# Convolution widths of each VGG stage (Simonyan & Zisserman 2015, configurations A, B, D, E).
VGG_STAGE_WIDTHS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512)),
}

StageConfig = Union[str, Sequence[Sequence[int]]]


def _conv_bn_relu(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SegNetEncoderStage(nn.Module):
    """Convolutions then 2x2 max pooling that keeps the argmax indices for the decoder."""

    def __init__(self, in_channels: int, widths: Sequence[int], batch_norm: bool) -> None:
        super().__init__()
        channels = [in_channels, *widths]
        self.convs = nn.Sequential(
            *[_conv_bn_relu(channels[i], channels[i + 1], batch_norm) for i in range(len(widths))]
        )
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, return_indices=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
        """Returns (pooled map, pooling indices, pre-pooling size)."""
        x = self.convs(x)
        pooled, indices = self.pool(x)
        return pooled, indices, x.shape


class SegNetEncoder(nn.Module):
    """VGG-style encoder whose stages return their pooling indices."""

    def __init__(self, in_channels: int, stage_widths: Sequence[Sequence[int]], batch_norm: bool) -> None:
        super().__init__()
        stages = []
        previous = in_channels
        for widths in stage_widths:
            stages.append(SegNetEncoderStage(previous, widths, batch_norm))
            previous = widths[-1]
        self.stages = nn.ModuleList(stages)
        self.out_channels = [in_channels] + [widths[-1] for widths in stage_widths]

    def forward(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Size]]:
        """Returns ([input, stage1, ..., stageD], pooling indices per stage, pre-pooling sizes per stage)."""
        features, indices, sizes = [x], [], []
        for stage in self.stages:
            x, stage_indices, size = stage(x)
            features.append(x)
            indices.append(stage_indices)
            sizes.append(size)
        return features, indices, sizes


class SegNetDecoderStage(nn.Module):
    """Max-unpooling with the mirrored encoder stage's indices, then the mirrored convolutions."""

    def __init__(self, widths: Sequence[int], out_channels: int, batch_norm: bool) -> None:
        super().__init__()
        channels = [*reversed(widths), out_channels]
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        self.convs = nn.Sequential(
            *[_conv_bn_relu(channels[i], channels[i + 1], batch_norm) for i in range(len(widths))]
        )

    def forward(self, x: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
        x = self.unpool(x, indices, output_size=size[-2:])
        return self.convs(x)


class SegNetDecoder(nn.Module):
    """Decoder stages, deepest first, each mirroring one encoder stage."""

    def __init__(self, stage_widths: Sequence[Sequence[int]], batch_norm: bool) -> None:
        super().__init__()
        stages = []
        for k in reversed(range(len(stage_widths))):
            # Map back to the width of the previous encoder stage; the first stage keeps its own width.
            target = stage_widths[k - 1][-1] if k > 0 else stage_widths[0][-1]
            stages.append(SegNetDecoderStage(stage_widths[k], target, batch_norm))
        self.stages = nn.ModuleList(stages)
        self.out_channels = stage_widths[0][-1]

    def forward(
        self, features: list[torch.Tensor], indices: list[torch.Tensor], sizes: list[torch.Size]
    ) -> torch.Tensor:
        x = features[-1]
        for stage, stage_indices, size in zip(self.stages, reversed(indices), reversed(sizes)):
            x = stage(x, stage_indices, size)
        return x


def resolve_stage_widths(cfg: StageConfig, depth: int, width: float) -> list[tuple[int, ...]]:
    """Per-stage conv widths from a VGG name or explicit widths, cut to ``depth`` and scaled by ``width``.

    Raises:
        ConfigError: Unknown VGG name, malformed widths, or a depth the configuration cannot provide.
    """
    if isinstance(cfg, str):
        key = cfg.lower().removesuffix("_bn")
        if key not in VGG_STAGE_WIDTHS:
            raise ConfigError(
                f"SegNet cfg {cfg!r} is unknown; expected one of {sorted(VGG_STAGE_WIDTHS)} or explicit widths"
            )
        stages = VGG_STAGE_WIDTHS[key]
    else:
        try:
            stages = tuple(tuple(int(w) for w in stage) for stage in cfg)
        except (TypeError, ValueError):
            raise ConfigError(f"SegNet cfg {cfg!r}: expected a sequence of stages, each a sequence of ints") from None
        if not stages or any(not stage or min(stage) < 1 for stage in stages):
            raise ConfigError(f"SegNet cfg {cfg!r}: every stage needs at least one positive width")
    if not isinstance(depth, int) or not 1 <= depth <= len(stages):
        raise ConfigError(f"SegNet encoder_depth={depth!r}: expected an int in [1, {len(stages)}] for this cfg")
    if not width > 0:
        raise ConfigError(f"SegNet width={width!r}: expected a positive multiplier")
    return [tuple(max(1, int(round(w * width))) for w in stage) for stage in stages[:depth]]


class SegNet(nn.Module):
    """SegNet with a VGG encoder; see the module docstring.

    Args:
        in_channels: Input bands (any count).
        classes: Output channels (logits).
        cfg: ``"vgg11" | "vgg13" | "vgg16" | "vgg19"`` (``_bn`` suffix accepted) or explicit per-stage
            conv widths, e.g. ``((64, 64), (128, 128), (256, 256, 256))``.
        depth: Number of encoder (and decoder) stages used, from the first.
        width: Multiplier applied to every width (``0.125`` for a tiny test model).
        batch_norm: Conv-BN-ReLU (True, SegNet's choice) or conv-ReLU layers.
    """

    def __init__(
        self,
        in_channels: int,
        classes: int,
        *,
        cfg: StageConfig = "vgg19",
        depth: int = 5,
        width: float = 1.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(f"SegNet in_channels={in_channels!r}: expected a positive int")
        if not isinstance(classes, int) or classes < 1:
            raise ConfigError(f"SegNet classes={classes!r}: expected a positive int")
        stage_widths = resolve_stage_widths(cfg, depth, width)
        self.depth = depth
        self.encoder = SegNetEncoder(in_channels, stage_widths, batch_norm)
        self.decoder = SegNetDecoder(stage_widths, batch_norm)
        self.segmentation_head = nn.Conv2d(self.decoder.out_channels, classes, kernel_size=1)
        self._initialize()

    def _initialize(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # The head feeds a softmax/sigmoid, not a ReLU: use a fan-in-preserving init.
        nn.init.xavier_uniform_(self.segmentation_head.weight)
        nn.init.zeros_(self.segmentation_head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if min(height, width) < 2**self.depth:
            raise ConfigError(
                f"SegNet input {height}x{width} is too small for {self.depth} pooling stages; "
                f"expected at least {2**self.depth} pixels per side"
            )
        features, indices, sizes = self.encoder(x)
        return self.segmentation_head(self.decoder(features, indices, sizes))

    def tap_points(self) -> dict[str, TapPoint]:
        """Named taps (see :mod:`xmodal.models.taps`)."""
        taps = {f"encoder.stage{k + 1}": TapPoint(f"encoder.stages.{k}", (0,)) for k in range(self.depth)}
        taps["encoder.out"] = TapPoint(f"encoder.stages.{self.depth - 1}", (0,))
        for i in range(self.depth):
            taps[f"decoder.block{i}"] = TapPoint(f"decoder.stages.{i}")
        taps["decoder.out"] = TapPoint("decoder")
        taps["logits"] = TapPoint("segmentation_head")
        return taps


@register_architecture("segnet", default_encoder="vgg19_bn", default_encoder_depth=5, decoder_channels=None)
def build_segnet(
    *,
    encoder: str,
    in_channels: int,
    classes: int,
    encoder_depth: int,
    decoder_channels: tuple[int, ...] | None,
    width: float = 1.0,
    cfg: Sequence[Sequence[int]] | None = None,
    **kwargs: object,
) -> SegNet:
    """Factory builder: ``encoder`` is ``vgg11|vgg13|vgg16|vgg19``, ``_bn`` for batch norm.

    ``cfg`` (explicit per-stage widths) overrides the VGG widths; the encoder name then only decides
    batch norm. ``width`` scales all widths.
    """
    if kwargs:
        raise ConfigError(f"segnet: unknown keyword argument(s) {sorted(kwargs)}; segnet accepts ['cfg', 'width']")
    name = encoder.lower()
    if name.removesuffix("_bn") not in VGG_STAGE_WIDTHS:
        choices = [f"{key}{suffix}" for key in sorted(VGG_STAGE_WIDTHS) for suffix in ("", "_bn")]
        raise ConfigError(f"segnet encoder={encoder!r}: expected one of {choices}")
    return SegNet(
        in_channels,
        classes,
        cfg=name if cfg is None else cfg,
        depth=encoder_depth,
        width=width,
        batch_norm=name.endswith("_bn"),
    )
