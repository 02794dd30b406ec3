"""cmc: contrastive multiview coding across SAR, optical and label-mask views (paper 001, IEEE GRSL).

Pretraining for SAR segmentation. Every modality (``sar``, ``optical`` and the label ``mask``) has
its own encoder and projection head; each training tile is seen under N augmentations (the data
layer's views: geometry shared by the modalities of one view, photometric jitter drawn per
modality), so a tile gives M x N views ``(modality, augmentation)``. The loss is the full graph of
paper 001's Eq. 2: for every ordered pair of views, the InfoNCE term whose queries are one view's
embeddings and whose keys are the other view's (negatives: the other tiles of that view), with
temperature tau (:func:`xmodal.losses.multiview_info_nce`).

The pretrained SAR encoder is exported as ``sar_encoder`` (every modality's encoder is exported as
``<modality>_encoder``); a ``supervised`` phase loads it into a segmenter's encoder with
``init_export: sar_encoder, init_part: encoder`` and finetunes on SAR building masks.

Choices the paper leaves open (settings, see :class:`CmcSettings`):

* ``same_modality_pairs``: Eq. 2 pairs every two distinct views, two augmentations of one
  modality included (default); ``false`` keeps cross-modal pairs only.
* ``reduction``: Eq. 2 sums the pair terms (``sum``); ``mean`` (default) keeps the loss scale and
  the learning rate independent of the number of views.
* ``negatives``: ``global`` (default) gathers every data-parallel worker's keys with gradient, so
  negatives are the whole global batch as in one process; ``local`` keeps each worker's own. The
  mode is logged with every epoch (``train/negatives``: keys per query).
* ``mask_encoding``: the label view as a one-hot image (unknown pixels all zero).
* Model selection is label-free: ``val/loss`` is the full graph over the label-free modalities
  (SAR, optical) of each validation tile and of its flip along the rows (one deterministic second
  view, since evaluation tiles are not augmented), with each worker's own negatives. With the
  label view in pretraining, ``val/loss_with_mask`` includes it but never selects.

Paper settings (``experiments/cmc/base.yaml``): ResNet-50 encoders, projection Linear(2048, 2048)-
BN-ReLU-Linear(2048, 2048) (here the width follows the encoder), tau 0.1, batch 126, 500 epochs,
SGD lr 0.1, weight decay 5e-4, 10 warm-up epochs then cosine; finetuning 25 epochs, lr 0.0075,
1 warm-up epoch. BiSeNet, the paper's third segmenter, is not built: segmentation-models-pytorch
and timm have none, and a hand-written one could not be checked against a reference here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.errors import ConfigError
from xmodal.losses import multiview_info_nce, view_pairs
from xmodal.methods.base import DataNeeds, DataSpec, EvalResult, Export, Method, MethodContext, MetricSpec
from xmodal.methods.cmc.paper import PAPER_TABLES, classify_run
from xmodal.methods.metrics import MeanMeter
from xmodal.methods.registry import register_method
from xmodal.models import ProjectionHead, create_encoder

MODALITIES = ("sar", "optical", "mask")
LABEL_FREE = ("sar", "optical")


@dataclass
class CmcSettings:
    """Settings of contrastive multiview pretraining.

    Attributes:
        modalities: Views' modalities: ``sar`` always, plus ``optical`` (EO) and/or ``mask`` (the
            label mask). The paper's sources: [sar] (augmentations only), [sar, optical],
            [sar, mask], [sar, mask, optical].
        augmentations: Augmented views of each tile per modality (N; the paper's best run: 2).
        temperature: InfoNCE temperature tau (paper: 0.1).
        projection_dim: Width of the projection head's layers (``None``: the encoder's output width,
            as the paper's 2048 for ResNet-50).
        same_modality_pairs: Count pairs of two augmentations of one modality (Eq. 2 does).
        reduction: ``mean`` or ``sum`` of the pair terms.
        negatives: ``global`` (gathered from every worker) or ``local`` (this worker's batch).
        sync_batchnorm: SyncBatchNorm in encoders and heads (statistics over the global batch).
    """

    modalities: list[str] = field(default_factory=lambda: ["sar", "optical"])
    augmentations: int = 2
    temperature: float = 0.1
    projection_dim: int | None = None
    same_modality_pairs: bool = True
    reduction: str = "mean"
    negatives: str = "global"
    sync_batchnorm: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"method_settings.modalities={self.modalities}; expected distinct entries of {list(MODALITIES)}")
        if "sar" not in self.modalities:
            raise ConfigError(f"method_settings.modalities={self.modalities}: the SAR view is what cmc pretrains; include 'sar'")
        if self.augmentations < 1:
            raise ConfigError(f"method_settings.augmentations={self.augmentations}; expected >= 1")
        if not self.temperature > 0:
            raise ConfigError(f"method_settings.temperature={self.temperature}; expected a number > 0")
        if self.reduction not in ("mean", "sum"):
            raise ConfigError(f"method_settings.reduction={self.reduction!r}; expected mean or sum")
        if self.negatives not in ("global", "local"):
            raise ConfigError(f"method_settings.negatives={self.negatives!r}; expected global or local")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(f"method_settings.projection_dim={self.projection_dim}; expected >= 1")
        if not self.pairs():
            raise ConfigError(
                f"method_settings: modalities={self.modalities} x augmentations={self.augmentations} with "
                f"same_modality_pairs={self.same_modality_pairs} leave no pair of views to contrast"
            )

    def views(self) -> list[tuple[str, int]]:
        """The training views, (modality, augmentation)."""
        return [(m, n) for m in self.modalities for n in range(self.augmentations)]

    def pairs(self) -> list[tuple[int, int]]:
        views = self.views()
        return view_pairs(len(views), [m for m, _ in views], self.same_modality_pairs)


class CmcNetwork(nn.Module):
    """One encoder and projection head per modality, called on a dict of inputs (one DDP module)."""

    def __init__(self, encoder: str, channels: dict[str, int], depth: int, norm: str, projection_dim: int | None, input_size: int) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({m: create_encoder(encoder, c, depth=depth, norm=norm, input_size=input_size) for m, c in channels.items()})
        width = list(next(iter(self.encoders.values())).out_channels)[-1]
        dim = projection_dim or width
        self.heads = nn.ModuleDict({m: ProjectionHead(width, dim, hidden_dim=dim) for m in channels})

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](self.encoders[m](x)[-1]) for m, x in inputs.items()}


def encode_mask(mask: torch.Tensor, classes: int, ignore_index: int) -> torch.Tensor:
    """B x H x W labels -> B x classes x H x W one-hot float image (unknown pixels all zero)."""
    known = mask != ignore_index
    one_hot = F.one_hot(torch.where(known, mask, torch.zeros_like(mask)).long(), classes).permute(0, 3, 1, 2).float()
    return one_hot * known.unsqueeze(1).float()


@register_method
class ContrastiveMultiview(Method):
    """Full-graph contrastive multiview coding over SAR, optical and label-mask views."""

    name = "cmc"
    Settings = CmcSettings
    paper_tables = PAPER_TABLES

    # -- declarations ------------------------------------------------------------------------------
    @classmethod
    def needs(cls, settings: CmcSettings) -> DataNeeds:
        fields = ("sar", "optical", "mask") if "mask" in settings.modalities else ("sar", "optical")
        # Tiles whose labels are withheld have no label view: with it, only labelled tiles pretrain.
        return DataNeeds(fields=fields, views=settings.augmentations, unlabelled="mask" not in settings.modalities)

    @classmethod
    def metrics(cls, settings: CmcSettings, data: DataSpec | None = None) -> MetricSpec:
        return MetricSpec("val/loss", "min", labelled=False, report=("test/loss", "test/retrieval"))

    @classmethod
    def check_data(cls, settings: CmcSettings, data: DataSpec) -> None:
        if "mask" in settings.modalities and data.mask_layer is None:
            raise ConfigError("cmc with a mask view needs data.mask_layer")

    @classmethod
    def report_cell(cls, table: dict[str, Any], run: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
        return classify_run(table, run, runs)

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, context: MethodContext) -> None:
        self.context = context
        torch.manual_seed(self.optim.seed)
        settings, model = self.settings, self.model_settings
        self.mask_classes = max(self.data.num_classes, 2)
        channels = {"sar": self.data.sar_channels, "optical": self.data.optical_channels, "mask": self.mask_classes}
        network = CmcNetwork(
            model.encoder or "resnet18", {m: channels[m] for m in settings.modalities}, model.encoder_depth or 5,
            model.norm, settings.projection_dim, self.data.tile_size,
        )
        self.net = self.add_network("cmc", network, modality="+".join(settings.modalities), export=False, sync_batchnorm=settings.sync_batchnorm)
        self.main = self.add_optimizer("main", self.net.parameters())
        self.views = settings.views()
        self.pairs = settings.pairs()
        context.log(
            f"{len(self.views)} views ({' x '.join(settings.modalities)} x {settings.augmentations} augmentations), "
            f"{len(self.pairs)} directed pair terms, tau {settings.temperature}, {settings.negatives} negatives"
        )

    def exports(self) -> dict[str, Export]:
        """``<modality>_encoder`` for every modality (``sar_encoder`` initialises SAR segmenters)."""
        network = self.network("cmc")
        return {f"{m}_encoder": Export(network.encoders[m], m, f"cmc-pretrained {m} encoder") for m in self.settings.modalities}

    # -- steps -------------------------------------------------------------------------------------
    def _inputs(self, batch: dict[str, torch.Tensor], modalities: Iterable[str]) -> dict[str, torch.Tensor]:
        """Each modality's images with the view axis folded into the batch: (B x N) x C x H x W."""
        inputs = {}
        for m in modalities:
            if m == "mask":
                mask = batch["mask"]
                flat = mask.reshape(-1, *mask.shape[-2:])
                inputs[m] = encode_mask(flat, self.mask_classes, self.data.ignore_index)
            else:
                image = batch[m]
                inputs[m] = image.reshape(-1, *image.shape[-3:])
        return inputs

    def contrastive_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The full-graph loss of a training batch (views on axis 1), negatives as configured."""
        settings = self.settings
        size = batch["sar"].shape[0]
        embeddings = self.net(self._inputs(batch, settings.modalities))
        views = [embeddings[m].reshape(size, settings.augmentations, -1)[:, n] for m, n in self.views]
        global_negatives = settings.negatives == "global"
        loss, _ = multiview_info_nce(
            views, settings.temperature, self.pairs, reduction=settings.reduction,
            gather=self.context.all_gather if global_negatives else None,
            offset=self.context.rank * size if global_negatives else 0,
        )
        return loss

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        self.net.train()
        loss = self.contrastive_loss(batch)
        self.main.step(loss)
        keys = batch["sar"].shape[0] * (self.context.world_size if self.settings.negatives == "global" else 1)
        return {"loss": float(loss.detach()), "lr": self.main.lr, "negatives": float(keys - 1)}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        """``loss``: the full graph over the label-free views of each tile and of its row flip
        (each worker's own negatives); ``retrieval``: the share of SAR queries whose most similar
        key is their own tile, among the optical views (SAR alone: the flipped SAR views);
        ``loss_with_mask`` also pairs the label view, when pretraining has one."""
        network = self.network("cmc")
        network.eval()
        settings = self.settings
        free = [m for m in settings.modalities if m in LABEL_FREE]
        names = ["loss", "retrieval"] + (["loss_with_mask"] if "mask" in settings.modalities else [])
        meter = MeanMeter()
        for batch in batches:
            size = batch["sar"].shape[0]
            both = {m: torch.cat([batch[m], batch[m].flip(-2)]) for m in settings.modalities}  # the tile, then its flip
            embeddings = network(self._inputs(both, settings.modalities))
            values = {"loss": self._graph_loss(embeddings, free, size)}
            nodes = self._nodes(free)
            partner = next((i for i, (m, _) in enumerate(nodes) if m != "sar"), 1)
            query, key = (embeddings[m][h * size : (h + 1) * size] for m, h in (nodes[0], nodes[partner]))
            nearest = (F.normalize(query, dim=1) @ F.normalize(key, dim=1).T).argmax(1)
            values["retrieval"] = (nearest == torch.arange(size, device=nearest.device)).float().mean()
            if "mask" in settings.modalities:
                values["loss_with_mask"] = self._graph_loss(embeddings, list(settings.modalities), size)
            meter.update(values, weight=size)
        return EvalResult(metrics=meter.compute(self.context.all_reduce, keys=names))

    @staticmethod
    def _nodes(modalities: list[str]) -> list[tuple[str, int]]:
        return [(m, half) for m in modalities for half in (0, 1)]

    def _graph_loss(self, embeddings: dict[str, torch.Tensor], modalities: list[str], size: int) -> torch.Tensor:
        """Full graph over (modality, tile | flipped tile) views, local negatives."""
        nodes = self._nodes(modalities)
        views = [embeddings[m][h * size : (h + 1) * size] for m, h in nodes]
        same = self.settings.same_modality_pairs or len(modalities) == 1
        pairs = view_pairs(len(nodes), [m for m, _ in nodes], same)
        return multiview_info_nce(views, self.settings.temperature, pairs, reduction=self.settings.reduction)[0]
