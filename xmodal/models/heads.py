"""Heads: scene classification on top of a segmentation encoder, and a projection head for contrastive
learning on tapped features.

:class:`EncoderClassifier` is what :func:`xmodal.models.create_classifier` builds for scene-level labels
(e.g. So2Sat LCZ42, 32x32 patches): the same smp/timm encoder as the segmentation models (so weights
transfer between the two with :func:`xmodal.models.copy_matching_weights`), global pooling of the deepest
feature map and a linear layer. It exposes the same encoder taps (``encoder.stage<k>``, ``encoder.out``)
plus ``pooled`` (the feature vector) and ``logits``.
"""

from __future__ import annotations

import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.taps import TapPoint, encoder_stage_taps

POOLINGS = ("avg", "max")


class ClassifierHead(nn.Module):
    """Global pooling, flatten, optional dropout, linear layer.

    Args:
        in_channels: Channels of the pooled feature map.
        num_classes: Output scores.
        pooling: ``"avg"`` or ``"max"``.
        dropout: Dropout probability before the linear layer (0 disables it).
    """

    def __init__(self, in_channels: int, num_classes: int, *, pooling: str = "avg", dropout: float = 0.0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"classifier pooling={pooling!r}: expected one of {list(POOLINGS)}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"classifier dropout={dropout!r}: expected a probability in [0, 1)")
        self.pool = nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.linear = nn.Linear(in_channels, num_classes)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(self.flatten(self.pool(x))))


class EncoderClassifier(nn.Module):
    """An smp-style encoder (returns one feature map per stride) followed by a :class:`ClassifierHead`.

    Args:
        encoder: Encoder module whose forward returns a list of feature maps and which has
            ``out_channels``.
        num_classes: Output scores.
        pooling: ``"avg"`` or ``"max"``.
        dropout: Dropout before the linear layer.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, *, pooling: str = "avg", dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ClassifierHead(list(encoder.out_channels)[-1], num_classes, pooling=pooling, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)[-1])

    def tap_points(self) -> dict[str, TapPoint]:
        """Named taps: encoder stages, ``encoder.out``, ``pooled`` and ``logits``."""
        taps = encoder_stage_taps(self.encoder, "encoder")
        taps["pooled"] = TapPoint("head.flatten")
        taps["logits"] = TapPoint("head")
        return taps


class ProjectionHead(nn.Module):
    """Projection MLP for contrastive learning on a tapped feature map or vector.

    A 4-D input ``(B, C, H, W)`` is either globally average-pooled (``dense=False``, one embedding per
    image, as in SimCLR) or projected per pixel with 1x1 convolutions (``dense=True``, one embedding per
    location, for pixel-level contrast between aligned SAR and optical tiles). A 2-D input ``(B, C)`` is
    projected directly.

    Args:
        in_channels: Channels of the tapped feature (see :func:`xmodal.models.tap_shapes`).
        out_dim: Embedding size.
        hidden_dim: Hidden layer size (default: ``max(in_channels, out_dim)``).
        dense: Per-pixel projection instead of per-image.
    """

    def __init__(
        self, in_channels: int, out_dim: int = 128, *, hidden_dim: int | None = None, dense: bool = False
    ) -> None:
        super().__init__()
        for field, value in (("in_channels", in_channels), ("out_dim", out_dim), ("hidden_dim", hidden_dim)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"ProjectionHead {field}={value!r}: expected a positive int")
        hidden = hidden_dim or max(in_channels, out_dim)
        self.dense = dense
        if dense:
            self.mlp: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, out_dim, 1),
            )
        else:
            self.mlp = nn.Sequential(
                nn.Linear(in_channels, hidden, bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, out_dim),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not self.dense:
            x = x.mean(dim=(2, 3))
        elif self.dense and x.dim() != 4:
            raise ConfigError(f"dense ProjectionHead expects a (B, C, H, W) map, got shape {tuple(x.shape)}")
        return self.mlp(x)

