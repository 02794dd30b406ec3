"""Composite networks of two modality-specific encoders with shared parts, each one ``nn.Module``.

One module per composite, so a method wraps it for data parallelism once (one DDP reducer) and
exports it, or any of its encoders, with a recipe.

* :class:`DualEncoderClassifier`: the Y-shaped network of EO -> SAR few-shot transfer (paper 002):
  an optical and a SAR encoder of the same architecture map into one embedding space (globally
  pooled deepest features), read by one shared linear classifier.
* :class:`DualEncoderSegmenter`: middle fusion of CromSS (paper 003): two encoders, one shared
  smp decoder and segmentation head.
* :class:`DualSegmenter`: late fusion of CromSS: two full segmenters, nothing shared.

All take ``in_channels`` as a mapping modality -> bands (``{"sar": 2, "optical": 4}``) and are called
as ``net(x, modality)``, or as ``net({modality: x, ...})`` for every branch in one forward (one
forward per step is what a data-parallel wrapper expects of a module with shared parts).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.factory import create_encoder, create_model
from xmodal.models.networks import register_network


def _modalities(in_channels: Mapping[str, int]) -> list[str]:
    if not isinstance(in_channels, Mapping) or len(in_channels) != 2:
        raise ConfigError(f"in_channels={in_channels!r}: expected a mapping of two modalities to band counts, e.g. {{'sar': 2, 'optical': 4}}")
    return list(in_channels)


class _TwoEncoders(nn.Module):
    encoders: nn.ModuleDict

    def encoder(self, modality: str) -> nn.Module:
        """The encoder of ``modality`` (an smp-style encoder with ``out_channels``)."""
        if modality not in self.encoders:
            raise ConfigError(f"{type(self).__name__} has encoders for {list(self.encoders)}, not {modality!r}")
        return self.encoders[modality]


class DualEncoderClassifier(_TwoEncoders):
    """Two encoders into one embedding space and one shared classifier.

    Args:
        encoder: smp/timm encoder name used for both modalities.
        in_channels: Modality -> input bands.
        num_classes: Classifier outputs.
        depth: Encoder stages.
        norm: ``batch``, ``instance`` (paper 002 finds it necessary) or ``none``.
        input_size: Input side (checked against instance norm on 1 x 1 maps).
        dropout: Dropout before the classifier.
    """

    def __init__(
        self,
        encoder: str,
        in_channels: Mapping[str, int],
        num_classes: int,
        *,
        depth: int = 5,
        norm: str = "batch",
        input_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict(
            {m: create_encoder(encoder, channels, depth=depth, norm=norm, input_size=input_size) for m, channels in in_channels.items()}
        )
        _modalities(in_channels)
        self.embedding_dim = list(next(iter(self.encoders.values())).out_channels)[-1]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(self.embedding_dim, num_classes)

    def embed(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """B x D embedding: the deepest feature map of ``modality``'s encoder, globally averaged."""
        return self.encoder(modality)(x)[-1].mean(dim=(2, 3))

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Class scores of embeddings from either encoder."""
        return self.classifier(self.dropout(embedding))

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor], modality: str | None = None) -> Any:
        """Class scores of ``x`` through ``modality``'s encoder; or, for a mapping modality -> batch,
        ``{modality: (embedding, scores)}`` from one call (one forward for a data-parallel wrapper)."""
        if isinstance(x, Mapping):
            out = {}
            for name, images in x.items():
                embedding = self.embed(images, name)
                out[name] = (embedding, self.classify(embedding))
            return out
        if modality is None:
            raise ConfigError("DualEncoderClassifier(x, modality): name the modality of a single batch")
        return self.classify(self.embed(x, modality))


def _encoder_with_recipe(segmenter: nn.Module, encoder: str, in_channels: int) -> nn.Module:
    """A segmenter's encoder, given the recipe of a stand-alone encoder so it exports on its own."""
    module = segmenter.encoder
    module.xmodal_recipe = {
        "builder": "encoder",
        "kwargs": {"encoder": encoder, "in_channels": in_channels, "depth": segmenter.xmodal_recipe["kwargs"]["encoder_depth"], "norm": "batch"},
    }
    return module


class _Segmenters(_TwoEncoders):
    def branch(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor], modality: str | None = None) -> Any:
        """B x C x H x W scores of ``x`` through ``modality``'s branch; or, for a mapping
        modality -> batch, ``{modality: scores}`` from one call."""
        if isinstance(x, Mapping):
            return {name: self.branch(images, name) for name, images in x.items()}
        if modality is None:
            raise ConfigError(f"{type(self).__name__}(x, modality): name the modality of a single batch")
        return self.branch(x, modality)


class DualEncoderSegmenter(_Segmenters):
    """Two encoders with one shared smp decoder and segmentation head (CromSS middle fusion).

    Args:
        arch: smp architecture of the decoder (``unet``, ``pspnet``...).
        encoder: Encoder name used for both modalities.
        in_channels: Modality -> input bands.
        classes: Output classes.
        encoder_depth: Encoder stages (default: the architecture's).
        decoder_channels: Decoder widths (as for :func:`~xmodal.models.create_model`).
        **kwargs: Further architecture arguments.
    """

    def __init__(
        self,
        arch: str,
        encoder: str,
        in_channels: Mapping[str, int],
        classes: int,
        *,
        encoder_depth: int | None = None,
        decoder_channels: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        first, second = _modalities(in_channels)
        segmenter = create_model(
            arch, encoder=encoder, in_channels=in_channels[first], classes=classes,
            encoder_depth=encoder_depth, decoder_channels=decoder_channels, **kwargs,
        )
        depth = segmenter.xmodal_recipe["kwargs"]["encoder_depth"]
        first_encoder = _encoder_with_recipe(segmenter, encoder, in_channels[first])
        self.encoders = nn.ModuleDict({first: first_encoder, second: create_encoder(encoder, in_channels[second], depth=depth)})
        self.decoder = segmenter.decoder
        self.segmentation_head = segmenter.segmentation_head

    def branch(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.encoder(modality)(x)))


class DualSegmenter(_Segmenters):
    """Two full smp segmenters of one architecture, one per modality (CromSS late fusion).

    Args: as :class:`DualEncoderSegmenter`.
    """

    def __init__(
        self,
        arch: str,
        encoder: str,
        in_channels: Mapping[str, int],
        classes: int,
        *,
        encoder_depth: int | None = None,
        decoder_channels: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        _modalities(in_channels)
        self.segmenters = nn.ModuleDict({
            m: create_model(arch, encoder=encoder, in_channels=bands, classes=classes, encoder_depth=encoder_depth, decoder_channels=decoder_channels, **kwargs)
            for m, bands in in_channels.items()
        })
        for m, bands in in_channels.items():
            _encoder_with_recipe(self.segmenters[m], encoder, bands)

    def segmenter(self, modality: str) -> nn.Module:
        """The full segmenter of ``modality`` (with its recipe)."""
        if modality not in self.segmenters:
            raise ConfigError(f"DualSegmenter has branches for {list(self.segmenters)}, not {modality!r}")
        return self.segmenters[modality]

    def encoder(self, modality: str) -> nn.Module:
        return self.segmenter(modality).encoder

    def branch(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return self.segmenter(modality)(x)


register_network("dual_encoder_classifier")(DualEncoderClassifier)
register_network("dual_encoder_segmenter")(DualEncoderSegmenter)
register_network("dual_segmenter")(DualSegmenter)
