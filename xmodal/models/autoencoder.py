"""An autoencoder with a VGG11-like encoder and a critic MLP on its latent codes (paper 004).

:class:`ConvAutoEncoder`: stages of 3 x 3 convolutions + BatchNorm + LeakyReLU(0.2), each stage
followed by 2 x 2 max pooling (VGG11's 1, 1, 2, 2, 2 convolutions per stage), then a linear layer
to the latent code ``z``; the decoder mirrors it with a linear layer, stride-2 3 x 3 transposed
convolutions + ReLU, and a final 3 x 3 convolution back to the input bands. Paper 004 closes its
decoder with a ReLU; xmodal's inputs are standardised (negative values), so the last activation is
a setting (``output_activation``: ``none`` by default, or ``relu``). With ``encoder`` (an smp/timm
encoder name, e.g. ``resnet18``) the VGG stages are replaced by that encoder's first
``encoder_depth`` stages: the pretext zoo compares every method's SAR encoder in one architecture,
and that encoder's weights load into a segmenter's ``encoder`` (same parameter names).

:class:`CriticMLP`: fully connected layers of decreasing width with LeakyReLU(0.2) and no
normalisation (a Wasserstein critic must not couple samples of a batch, so no BatchNorm), ending
in one unbounded score.

:class:`DualAutoEncoder`: one :class:`ConvAutoEncoder` per modality, no weights shared, as one
module (one data-parallel wrapper; ``net({modality: x})`` runs every branch in one forward).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.networks import register_network

VGG11_STAGES: tuple[tuple[int, ...], ...] = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def _check_stages(stages: Sequence[Sequence[int]]) -> list[list[int]]:
    out = [list(stage) for stage in stages]
    if not out or any(not stage or any(not isinstance(w, int) or w < 1 for w in stage) for stage in out):
        raise ConfigError(f"stages={stages!r}: expected a non-empty list of non-empty lists of positive widths")
    return out


class ConvAutoEncoder(nn.Module):
    """VGG11-like convolutional autoencoder with a vector latent code.

    Args:
        in_channels: Input bands.
        input_size: Input side (a multiple of ``2 ** len(stages)``).
        latent_dim: Size of the latent code.
        stages: Convolution widths per encoder stage (default: VGG11's).
        width: Multiplier of every width (e.g. 0.25 for a small demo network).
        output_activation: ``none`` or ``relu`` after the last decoder convolution.
        encoder: An smp/timm encoder name to use instead of the VGG stages (``stages`` and
            ``width`` are then unused); the decoder mirrors its stage widths.
        encoder_depth: Stages of that encoder (each halves the side).
    """

    def __init__(
        self,
        in_channels: int,
        input_size: int,
        latent_dim: int = 512,
        *,
        stages: Sequence[Sequence[int]] = VGG11_STAGES,
        width: float = 1.0,
        output_activation: str = "none",
        encoder: str | None = None,
        encoder_depth: int = 3,
    ) -> None:
        super().__init__()
        if encoder is not None:
            from xmodal.models.factory import create_encoder

            self.encoder = create_encoder(encoder, in_channels, depth=encoder_depth, input_size=input_size)
            stage_widths = [[w] for w in self.encoder.out_channels[1 : encoder_depth + 1]]
        else:
            stage_widths = [[max(1, int(round(w * width))) for w in stage] for stage in _check_stages(stages)]
        factor = 2 ** len(stage_widths)
        if input_size < factor or input_size % factor:
            raise ConfigError(f"ConvAutoEncoder: input_size={input_size} must be a positive multiple of 2**{len(stage_widths)} = {factor}")
        if output_activation not in ("none", "relu"):
            raise ConfigError(f"ConvAutoEncoder: output_activation={output_activation!r}; expected none or relu")
        channels = in_channels
        if encoder is None:
            layers: list[nn.Module] = []
            for stage in stage_widths:
                for out in stage:
                    layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
                    channels = out
                layers.append(nn.MaxPool2d(2))
            self.features = nn.Sequential(*layers)
        else:
            channels = stage_widths[-1][0]
        self.bottleneck_shape = (channels, input_size // factor, input_size // factor)
        flat = channels * (input_size // factor) ** 2
        self.to_latent = nn.Linear(flat, latent_dim)
        self.from_latent = nn.Linear(latent_dim, flat)
        up: list[nn.Module] = []
        for stage in reversed(stage_widths):
            out = stage[0]
            up += [nn.ConvTranspose2d(channels, out, 3, stride=2, padding=1, output_padding=1), nn.ReLU(inplace=True)]
            channels = out
        up.append(nn.Conv2d(channels, in_channels, 3, padding=1))
        if output_activation == "relu":
            up.append(nn.ReLU())
        self.reconstruct = nn.Sequential(*up)
        self.latent_dim = latent_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """B x latent_dim codes."""
        features = self.encoder(x)[-1] if hasattr(self, "encoder") else self.features(x)
        return self.to_latent(features.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions (B x in_channels x input_size x input_size) of codes."""
        return self.reconstruct(self.from_latent(z).view(z.shape[0], *self.bottleneck_shape))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return z, self.decode(z)


class CriticMLP(nn.Module):
    """Fully connected critic: ``in_features -> hidden[0] -> ... -> 1``, LeakyReLU(0.2), no normalisation.

    Args:
        in_features: Size of its input vectors (a latent code).
        hidden: Widths of the hidden layers (paper 004: three layers of decreasing size in all).
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        if any(not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(f"CriticMLP: in_features={in_features!r}, hidden={hidden!r}; expected positive ints")
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Linear(widths[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z).squeeze(-1)


class DualAutoEncoder(nn.Module):
    """Two autoencoders of one architecture, one per modality (paper 004's SAR and optical branches).

    Args:
        in_channels: Modality -> input bands (``{"sar": 2, "optical": 4}``).
        input_size, latent_dim, stages, width, output_activation, encoder, encoder_depth: as
            :class:`ConvAutoEncoder`.
    """

    def __init__(
        self,
        in_channels: Mapping[str, int],
        input_size: int,
        latent_dim: int = 512,
        *,
        stages: Sequence[Sequence[int]] = VGG11_STAGES,
        width: float = 1.0,
        output_activation: str = "none",
        encoder: str | None = None,
        encoder_depth: int = 3,
    ) -> None:
        super().__init__()
        if not isinstance(in_channels, Mapping) or len(in_channels) != 2:
            raise ConfigError(f"DualAutoEncoder: in_channels={in_channels!r}; expected a mapping of two modalities to band counts")
        self.autoencoders = nn.ModuleDict({
            m: ConvAutoEncoder(bands, input_size, latent_dim, stages=stages, width=width, output_activation=output_activation,
                               encoder=encoder, encoder_depth=encoder_depth)
            for m, bands in in_channels.items()
        })
        for m, bands in in_channels.items():  # each branch exports on its own
            self.autoencoders[m].xmodal_recipe = {
                "builder": "autoencoder",
                "kwargs": {"in_channels": bands, "input_size": input_size, "latent_dim": latent_dim, "stages": [list(s) for s in stages],
                           "width": width, "output_activation": output_activation, "encoder": encoder, "encoder_depth": encoder_depth},
            }

    def autoencoder(self, modality: str) -> ConvAutoEncoder:
        """The autoencoder of ``modality``."""
        if modality not in self.autoencoders:
            raise ConfigError(f"DualAutoEncoder has branches for {list(self.autoencoders)}, not {modality!r}")
        return self.autoencoders[modality]

    def forward(self, x: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """``{modality: (z, reconstruction)}`` for a mapping modality -> batch."""
        return {name: self.autoencoder(name)(images) for name, images in x.items()}


register_network("autoencoder")(ConvAutoEncoder)
register_network("dual_autoencoder")(DualAutoEncoder)
register_network("critic")(CriticMLP)
