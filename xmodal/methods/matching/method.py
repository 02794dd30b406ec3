"""matching: semi-supervised SAR-optical patch matching with adversarial autoencoders (paper 004).

Two autoencoders (VGG11-like encoders, transposed-convolution decoders, no weights shared:
:class:`~xmodal.models.DualAutoEncoder`) learn descriptors ``z`` of SAR and optical patches; one
shared critic (:class:`~xmodal.models.CriticMLP`, no BatchNorm) pulls both latent distributions
towards one prior; a margin contrastive loss aligns the two latent spaces on labelled pairs.

Patches, from each training tile of side S (the SAR search region; S = 256 in the paper) and the
template side t (``template_size``, default S / 2 = 128): the SAR and optical crops at one corner
are a corresponding pair; the SAR crop at another corner at least ``negative_min_shift`` pixels
away, with the same optical crop, is the hard negative of the same tile. Paper 004 takes the
positive at the centre (``positive_crop: centre``); that lets a network tell positives from
negatives by where a crop sits in its tile (off-centre crops touch the tile's edges) instead of
by what it shows: measured here, it drives the training matching loss down while the error of
every window search stays at chance, on training tiles as well. The default draws the corner at
random (``positive_crop: random``), every other step of the paper unchanged.

One step (paper 004, Eqs. 5, 7, 8):

* ``critic_steps`` critic updates (paper: 5) on the detached latents of the main batch against
  fresh prior samples ``z_p ~ N(0, prior_std^2)``: ``L_dis = mean D(z) - mean D(z_p)`` (Eq. 7 as a
  mean), critic weights clipped to ``[-clip, clip]`` right after each update; the encoders get no
  gradient here;
* one autoencoder update with the critic frozen: ``recon_weight * (MSE(SAR) + MSE(optical))`` on
  every crop of the main batch and of the labelled batch, ``- adversarial_weight * mean
  D(z)`` on the main batch (Eq. 8), and ``matching_weight * L_match`` (Eq. 4, on L2-normalised
  latents, margin ``margin``, squared distances or not) on the positive and negative pairs of the
  labelled batch.

Supervision: ``data.labels.fraction`` (100 / 75 / 50 / 25 / 5 % in the paper) splits the training
pairs; the unlabelled ones stay in the main stream (reconstruction and adversarial terms only), and
the labelled subset comes as the lockstep ``labelled`` stream, oversampled to the main stream's
length: every step sees one batch of each, the paper's alternating batches with their gradients
summed into one update.

Evaluation (on every worker, over its share of the split; errors gathered): each tile's optical
template (side t, cut at a known corner: the centre, or, with ``eval_shift: random``, a corner
drawn per tile from its index) against every window of the tile's SAR search region, a cosine
map of ``((S - t) / search_stride + 1)^2`` values (129 x 129 in the paper); the error is the pixel
distance of its peak to the truth. Metrics: ``mean_error`` (selection), ``median_error``,
``p1_error`` (1st percentile), ``within_1px`` / ``2px`` / ``3px``; the test split also saves the
error histogram (Fig. 4) and a few correspondence maps (Fig. 5) as artifacts.

Choices the paper leaves open (settings): the prior's 5 is a standard deviation (``prior_std``;
set 2.236 for the variance reading); Eq. 1's norm is a mean squared error per pixel; the critic's
updates reuse the step's batch with new prior samples; the margin (not given) defaults to 1 on
squared distances of unit vectors (range 0-4); the critic's schedule advances per critic update
(a onecycle schedule is refused: give ``train.optimizers.critic`` its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.losses import margin_contrastive
from xmodal.methods.base import DataNeeds, DataSpec, EvalResult, Export, Method, MethodContext, MetricSpec
from xmodal.methods.matching.search import correspondence_map, crop, error_statistics, peak, window_count
from xmodal.methods.optim import MAIN
from xmodal.methods.panels import Artifact
from xmodal.methods.registry import register_method
from xmodal.models import build_network
from xmodal.models.autoencoder import VGG11_STAGES

MODALITIES = ("sar", "optical")
CRITIC = "critic"
EVAL_SHIFTS = ("centre", "random")
BACKBONES = ("vgg11", "model")


@dataclass
class MatchingSettings:
    """Settings of semi-supervised SAR-optical matching (defaults: paper 004 where it says).

    Attributes:
        template_size: Template (and descriptor window) side t; ``None``: half the tile.
        latent_dim: Descriptor size.
        backbone: ``vgg11`` (the paper's VGG11-like encoder stages) or ``model``: the config's
            ``model.encoder`` (e.g. ``resnet18``, as the pretext zoo trains every method's SAR
            encoder in one architecture), its first ``model.encoder_depth`` stages (``None``: as
            many as keep a 4 x 4 bottleneck). Its ``<modality>_autoencoder`` exports then load into
            a segmenter's encoder (``init_part: encoder``).
        width: Multiplier of the VGG11 widths (1: the paper's; smaller for CPU demos).
        stages: Encoder widths per stage (``None``: VGG11's, as many stages as keep the paper's
            4 x 4 bottleneck: five for its 128 px templates, three for 32 px ones).
        output_activation: Last decoder activation (``none``; the paper's ``relu`` suits [0, 1] inputs).
        critic_hidden: Widths of the critic's hidden layers (three layers in all, as the paper's).
        prior_std: Standard deviation of the prior N(0, prior_std^2) on the latents (paper: "N(0, 5)").
        critic_steps: Critic updates per autoencoder update (paper: 5).
        clip: Critic weights are clipped to [-clip, clip] after each update.
        margin: Margin m of the matching loss.
        squared: Eq. 4's squared distances (``false``: plain distances).
        recon_weight / adversarial_weight / matching_weight: Weights of the three autoencoder terms.
        positive_crop: ``random`` (a corner drawn per pair and step) or ``centre`` (paper 004's).
        negative_min_shift: Least shift (pixels, Chebyshev) of a negative crop from its positive
            (``None``: t / 8).
        eval_shift: ``centre`` (the paper's centred pairs, truth at the map's centre) or
            ``random`` (a known corner per tile, so a matcher that always answers the centre
            cannot score).
        search_stride: Step between window positions of the correspondence map (1: every pixel).
        search_chunk: Windows encoded per call at evaluation.
        maps: Correspondence maps saved from the test split (Fig. 5).
    """

    template_size: int | None = None
    latent_dim: int = 512
    backbone: str = "vgg11"
    width: float = 1.0
    stages: list[list[int]] | None = None
    output_activation: str = "none"
    critic_hidden: list[int] = field(default_factory=lambda: [256, 128])
    prior_std: float = 5.0
    critic_steps: int = 5
    clip: float = 0.01
    margin: float = 1.0
    squared: bool = True
    recon_weight: float = 1.0
    adversarial_weight: float = 1.0
    matching_weight: float = 1.0
    positive_crop: str = "random"
    negative_min_shift: int | None = None
    eval_shift: str = "random"
    search_stride: int = 1
    search_chunk: int = 256
    maps: int = 4

    def __post_init__(self) -> None:
        positive = {"latent_dim": self.latent_dim, "prior_std": self.prior_std, "critic_steps": self.critic_steps, "clip": self.clip,
                    "margin": self.margin, "search_stride": self.search_stride, "search_chunk": self.search_chunk, "width": self.width}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"method_settings.{name}={value}; expected > 0")
        for name in ("recon_weight", "adversarial_weight", "matching_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"method_settings.{name}={getattr(self, name)}; expected a weight >= 0")
        for name in ("eval_shift", "positive_crop"):
            if getattr(self, name) not in EVAL_SHIFTS:
                raise ConfigError(f"method_settings.{name}={getattr(self, name)!r}; expected one of {list(EVAL_SHIFTS)}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"method_settings.backbone={self.backbone!r}; expected one of {list(BACKBONES)}")
        if self.maps < 0:
            raise ConfigError(f"method_settings.maps={self.maps}; expected >= 0")

    def template(self, tile: int) -> int:
        """Template side for tiles of side ``tile``."""
        return self.template_size or tile // 2

    def encoder_stages(self, template: int) -> list[list[int]]:
        """The encoder's stage widths for templates of side ``template``."""
        if self.stages is not None:
            return [list(stage) for stage in self.stages]
        return [list(stage) for stage in VGG11_STAGES[: _stages_keeping_layout(template, len(VGG11_STAGES))]]

    @staticmethod
    def encoder_depth(template: int, depth: int | None) -> int:
        """Stages of a ``model`` backbone: ``depth``, or as many (up to 5) as keep a 4 x 4 bottleneck."""
        return depth if depth is not None else _stages_keeping_layout(template, 5)


def _stages_keeping_layout(template: int, most: int) -> int:
    """How many halving stages (at most ``most``) take a template to no less than 4 x 4.

    Five VGG11 stages take the paper's 128 px templates to 4 x 4; on smaller templates they would
    pool to 1 x 1, and a descriptor without layout measured no better than chance here.
    """
    count = most
    while count > 1 and (template % 2**count or template // 2**count < 4):
        count -= 1
    return count


@register_method
class AdversarialMatching(Method):
    """Two adversarial autoencoders with a shared critic, aligned by a matching loss on labelled pairs."""

    name = "matching"
    Settings = MatchingSettings

    # -- declarations ------------------------------------------------------------------------------
    @classmethod
    def needs(cls, settings: MatchingSettings) -> DataNeeds:
        return DataNeeds(fields=("sar", "optical"), streams=("labelled",), unlabelled=True)

    @classmethod
    def metrics(cls, settings: MatchingSettings, data: DataSpec | None = None) -> MetricSpec:
        # The truth of every pair is its geometry: selecting by matching error uses correspondences.
        return MetricSpec("val/mean_error", "min", labelled=True,
                          report=("test/mean_error", "test/median_error", "test/p1_error", "test/within_1px", "test/within_3px"))

    @classmethod
    def optimizer_names(cls, settings: MatchingSettings) -> tuple[str, ...]:
        return (MAIN, CRITIC)

    @classmethod
    def check_data(cls, settings: MatchingSettings, data: DataSpec) -> None:
        tile, template = data.tile_size, settings.template(data.tile_size)
        if not 0 < template < tile:
            raise ConfigError(f"method_settings.template_size={template}: expected a template smaller than the tile (data.tile_size={tile})")
        try:
            window_count(tile, template, settings.search_stride)
        except ValueError as error:
            raise ConfigError(f"method_settings.search_stride={settings.search_stride}: {error}") from None
        shift = settings.negative_min_shift or max(1, template // 8)
        if shift > (tile - template) // 2:
            raise ConfigError(
                f"method_settings.negative_min_shift={shift}: a {template} px crop of a {tile} px tile has no corner that far from "
                f"every other (at most {(tile - template) // 2} px)"
            )

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, context: MethodContext) -> None:
        self.context = context
        torch.manual_seed(self.optim.seed)
        settings = self.settings
        if self.optim.section(CRITIC).schedule == "onecycle":
            raise ConfigError(
                "train.optimizers.critic.schedule=onecycle: the critic steps critic_steps times per step; give it its own "
                "section (paper 004: optimizer sgd, lr 0.004, momentum 0.9, weight_decay 3.0e-4, schedule constant)"
            )
        self.tile, self.template = self.data.tile_size, settings.template(self.data.tile_size)
        channels = {"sar": self.data.sar_channels, "optical": self.data.optical_channels}
        backbone: dict[str, Any] = {}
        if settings.backbone == "model":
            encoder = self.model_settings.encoder or "resnet18"
            backbone = {"encoder": encoder, "encoder_depth": settings.encoder_depth(self.template, self.model_settings.encoder_depth)}
        autoencoders = build_network(
            "dual_autoencoder", in_channels=channels, input_size=self.template, latent_dim=settings.latent_dim,
            stages=settings.encoder_stages(self.template), width=settings.width, output_activation=settings.output_activation, **backbone,
        )
        critic = build_network("critic", in_features=settings.latent_dim, hidden=list(settings.critic_hidden))
        self.autoencoders = self.add_network("model", autoencoders, modality="sar+optical", description="matching autoencoders (SAR, optical)")
        self.critic = self.add_network(CRITIC, critic, modality="latent", export=False, description="shared Wasserstein critic")
        self.main = self.add_optimizer(MAIN, self.autoencoders.parameters())
        self.critic_optimizer = self.add_optimizer(CRITIC, self.critic.parameters())
        self.min_shift = settings.negative_min_shift or max(1, self.template // 8)
        context.log(
            f"matching: {self.tile} px search regions, {self.template} px templates, latent {settings.latent_dim}, "
            + (f"{backbone['encoder']} encoder (depth {backbone['encoder_depth']}); " if backbone else f"VGG11 width {settings.width}; ")
            + f"critic x{settings.critic_steps} clip {settings.clip}, prior N(0, {settings.prior_std}^2), margin {settings.margin}"
            f"{' (squared)' if settings.squared else ''}"
        )

    def exports(self) -> dict[str, Export]:
        network = self.network("model")
        out = {"model": Export(network, "sar+optical", "matching autoencoders (SAR, optical)")}
        for modality in MODALITIES:
            out[f"{modality}_autoencoder"] = Export(network.autoencoder(modality), modality, f"matching {modality} autoencoder (descriptor: encode)")
        return out

    # -- steps -------------------------------------------------------------------------------------
    def _centre(self) -> int:
        return (self.tile - self.template) // 2

    def centre_crops(self, images: torch.Tensor) -> torch.Tensor:
        corner = self._centre()
        return images[..., corner : corner + self.template, corner : corner + self.template]

    def positive_corners(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` crop corners of corresponding pairs: the centre, or drawn at random."""
        if self.settings.positive_crop == "centre":
            return torch.full((count, 2), self._centre(), dtype=torch.long)
        return torch.randint(0, self.tile - self.template + 1, (count, 2), generator=generator)

    def negative_corners(self, anchors: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random crop corner for each anchor corner, at least ``negative_min_shift`` px (Chebyshev) from it."""
        span = self.tile - self.template
        corners = torch.randint(0, span + 1, anchors.shape, generator=generator)
        near = (corners - anchors).abs().max(dim=1).values < self.min_shift
        while near.any():  # redraw the ones too close to their positive
            corners[near] = torch.randint(0, span + 1, (int(near.sum()), 2), generator=generator)
            near = (corners - anchors).abs().max(dim=1).values < self.min_shift
        return corners

    def pair_crops(self, tiles: dict[str, torch.Tensor], corners: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both modalities cropped at the same corners (corresponding crops)."""
        return {m: crop(tiles[m], corners, self.template) for m in MODALITIES}

    def critic_step(self, latents: torch.Tensor) -> float:
        """One critic update on detached latents against prior samples; weights clipped after it."""
        prior = torch.randn_like(latents) * self.settings.prior_std
        scores = self.critic(torch.cat([latents.detach(), prior]))
        loss = scores[: len(latents)].mean() - scores[len(latents) :].mean()
        self.critic_optimizer.step(loss)
        with torch.no_grad():
            for parameter in self.network(CRITIC).parameters():
                parameter.clamp_(-self.settings.clip, self.settings.clip)
        return float(loss.detach())

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        settings = self.settings
        self.autoencoders.train()
        self.critic.train()
        main = self.pair_crops(batch, self.positive_corners(len(batch["sar"])))
        count = len(main["sar"])
        # Critic updates: the encoders give detached latents and receive no gradient.
        with torch.no_grad():
            latents = torch.cat([z for z, _ in self.autoencoders(main).values()])
        critic_losses = [self.critic_step(latents) for _ in range(settings.critic_steps)]
        # Autoencoder update: positives and hard negatives of the labelled batch ride in the same forward.
        inputs = dict(main)
        labelled = (batch.get("streams") or {}).get("labelled")
        if labelled is not None:
            anchors = self.positive_corners(len(labelled["sar"]))
            positives = self.pair_crops(labelled, anchors)
            negatives = crop(labelled["sar"], self.negative_corners(anchors), self.template)
            inputs = {"sar": torch.cat([main["sar"], positives["sar"], negatives]), "optical": torch.cat([main["optical"], positives["optical"]])}
        out = self.autoencoders(inputs)
        reconstruction = sum(F.mse_loss(out[m][1], inputs[m]) for m in MODALITIES)
        critic = self.network(CRITIC)  # unwrapped and frozen: its data-parallel reducer stays out of this update
        critic.requires_grad_(False)
        try:
            adversarial = -critic(torch.cat([out["sar"][0][:count], out["optical"][0][:count]])).mean()
        finally:
            critic.requires_grad_(True)
        loss = settings.recon_weight * reconstruction + settings.adversarial_weight * adversarial
        logs = {"reconstruction": float(reconstruction.detach()), "adversarial": float(adversarial.detach()),
                "critic": float(np.mean(critic_losses))}
        if labelled is not None:
            pairs = len(labelled["sar"])
            z_sar, z_optical = out["sar"][0][count:], out["optical"][0][count:]
            first = torch.cat([z_sar[:pairs], z_sar[pairs:]])
            second = torch.cat([z_optical, z_optical])
            target = torch.cat([torch.ones(pairs), torch.zeros(pairs)]).to(first.device)
            matching = margin_contrastive(first, second, target, settings.margin, squared=settings.squared)
            loss = loss + settings.matching_weight * matching
            logs["matching"] = float(matching.detach())
        self.main.step(loss)
        return {"loss": float(loss.detach()), "lr": self.main.lr, **logs}

    # -- evaluation --------------------------------------------------------------------------------
    def truth_corner(self, index: int) -> tuple[int, int]:
        """The known corner of tile ``index``'s template: the centre, or a corner drawn from the index."""
        stride, span = self.settings.search_stride, self.tile - self.template
        if self.settings.eval_shift == "centre":
            centre = self._centre() // stride * stride
            return centre, centre
        generator = torch.Generator().manual_seed(int(index))
        row, col = torch.randint(0, span // stride + 1, (2,), generator=generator).tolist()
        return row * stride, col * stride

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        """Matching error statistics over the split (every worker scores its tiles; errors gathered),
        the reconstruction error, and on request the error histogram and correspondence maps."""
        network = self.network("model").eval()
        sar_encoder, optical_encoder = network.autoencoder("sar").encode, network.autoencoder("optical").encode
        stride = self.settings.search_stride
        errors: list[float] = []
        reconstruction, seen = 0.0, 0
        maps: dict[str, Artifact] = {}
        for batch in batches:
            centre = {m: self.centre_crops(batch[m]) for m in MODALITIES}
            out = network(centre)
            reconstruction += float(sum(F.mse_loss(out[m][1], centre[m], reduction="sum") / centre[m][0].numel() for m in MODALITIES))
            seen += len(centre["sar"])
            for b in range(len(batch["sar"])):
                row, col = self.truth_corner(int(batch["index"][b]))
                template = batch["optical"][b : b + 1, :, row : row + self.template, col : col + self.template]
                similarity = correspondence_map(sar_encoder, batch["sar"][b], optical_encoder(template)[0], self.template, stride, self.settings.search_chunk)
                found = peak(similarity)
                errors.append(float(stride * np.hypot(found[0] - row / stride, found[1] - col / stride)))
                if len(maps) < self.settings.maps and panels:
                    maps[f"correspondence_{len(maps)}"] = Artifact(
                        "image", {"image": similarity.cpu().numpy()}, title=f"cosine map, truth ({row // stride}, {col // stride}), peak {found}",
                        xlabel="window column", ylabel="window row", meta={"truth": [row // stride, col // stride], "peak": list(found)},
                    )
        gathered = self.context.all_gather(torch.tensor(errors, dtype=torch.float64, device=self.context.device)).cpu().numpy()
        totals = self.context.all_reduce(torch.tensor([reconstruction, float(seen)], dtype=torch.float64, device=self.context.device))
        metrics = error_statistics(gathered)
        metrics["reconstruction"] = float(totals[0] / max(float(totals[1]), 1.0))
        artifacts: dict[str, Artifact] = {}
        if panels:
            top = float(np.ceil(np.hypot(self.tile - self.template, self.tile - self.template))) + 1
            counts, edges = np.histogram(gathered, bins=np.arange(0.0, top + 1.0))
            artifacts["matching_errors"] = Artifact(
                "histogram", {"counts": counts.tolist(), "edges": edges.tolist()}, title="matching error (paper 004, Fig. 4)",
                xlabel="peak distance to the truth (px)", ylabel="pairs", meta={k: metrics[k] for k in ("mean_error", "p1_error") if k in metrics},
            )
            artifacts.update(maps)
        return EvalResult(metrics=metrics, artifacts=artifacts)
