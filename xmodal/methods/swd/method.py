"""swd: EO -> SAR few-shot transfer with sliced Wasserstein alignment (paper 002, after Rostami et al. 2019).

Scene classification of small patches. A Y-shaped network (:class:`~xmodal.models.DualEncoderClassifier`):
an EO (optical) and a SAR encoder of identical architecture map into one embedding space (the
globally pooled deepest features), read by one shared linear classifier. Two stages, run as the
phases of a chain (``experiments/swd/``):

* ``stage: eo``: the EO encoder and the classifier learn the scene classes from the optical side
  of every training tile (cross-entropy), optionally with SupCon on the EO embeddings of two
  augmented views (paper 002's Eq. 3, ``supcon_weight`` > 0; temperature ``supcon_temperature``).
* ``stage: transfer`` (initialised from the ``eo`` phase with ``init``): paper 002's Eq. 2,

  ``CE(EO) + CE(labelled SAR) + lambda * SW^2(EO, SAR) + eta * sum_c SW^2(EO | c, SAR | c)``

  where the first alignment term pairs the EO and SAR embeddings of the whole batch, labelled or
  not, and the class term each class present on both sides (EO tiles by their label, SAR tiles by
  theirs where it is known), subsampled to equal counts (:mod:`xmodal.losses.sliced_wasserstein`).
  ``projections`` (L) random directions are drawn again at every step.

Labels: the labelled subset (``data.labels.count``: paper 002's 32 / 128 / 1024 SAR samples) counts
SAR labels; the optical side of every tile stays labelled (batch field ``optical_label``), since
labelled optical imagery is the plentiful kind, and the unlabelled SAR tiles stay in training for
the alignment terms. The SAR cross-entropy sees labelled tiles only.

Data parallelism: the alignment terms are computed on the embeddings gathered from every worker
(every worker draws the same directions and the same class subsamples, seeded by the step), and
the SAR cross-entropy is normalised by the global labelled count, so two workers train as one
process on the global batch.

Choices the paper leaves open (settings): the CE terms are means over their samples (Eq. 2 sums
the SAR term over the O labelled samples); the SAR encoder starts random; model selection by SAR
accuracy on the validation split (labelled, as the baselines); SupCon's views come from the data
layer's augmentation (the paper does not name its augmentations).

Exports: ``model`` (the Y-net), ``sar_classifier`` / ``optical_classifier`` (one encoder with the
shared classifier as a plain scene classifier: the finetuning baseline starts from
``optical_classifier``), ``sar_encoder``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from xmodal.errors import ConfigError
from xmodal.losses import class_sliced_wasserstein, random_projections, sliced_wasserstein, supervised_contrastive
from xmodal.methods.base import DataNeeds, DataSpec, EvalResult, Export, InputSpec, Method, MethodContext, MetricSpec
from xmodal.methods.exports import describe_load, load_export_into
from xmodal.methods.metrics import ClassificationMeter, MeanMeter
from xmodal.methods.registry import register_method
from xmodal.models import build_network

STAGES = ("eo", "transfer")


@dataclass
class SwdSettings:
    """Settings of EO -> SAR transfer with sliced Wasserstein alignment.

    Attributes:
        stage: ``eo`` (EO classifier pretraining) or ``transfer`` (Eq. 2 on EO and SAR).
        sw_weight: lambda, the weight of SW^2 between the EO and SAR embeddings.
        class_sw_weight: eta, the weight of the class-conditional SW^2 sum.
        projections: L, random directions per step.
        eo_weight: Weight of the EO cross-entropy in the transfer stage (Eq. 2: 1).
        supcon_weight: Weight of SupCon on the EO embeddings in the ``eo`` stage (0: off; paper 002's
            "with contrastive loss" runs add it).
        supcon_temperature: SupCon temperature (a sweep knob; > 0).
        dropout: Dropout before the shared classifier.
        init: Input checkpoint (an ``eo`` phase) whose ``model`` export initialises the transfer stage.
    """

    stage: str = "transfer"
    sw_weight: float = 1.0
    class_sw_weight: float = 1.0
    projections: int = 64
    eo_weight: float = 1.0
    supcon_weight: float = 0.0
    supcon_temperature: float = 0.1
    dropout: float = 0.0
    init: str | None = None

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"method_settings.stage={self.stage!r}; expected one of {list(STAGES)}")
        for name in ("sw_weight", "class_sw_weight", "eo_weight", "supcon_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"method_settings.{name}={getattr(self, name)}; expected a weight >= 0")
        if self.projections < 1:
            raise ConfigError(f"method_settings.projections={self.projections}; expected >= 1")
        if not self.supcon_temperature > 0:
            raise ConfigError(f"method_settings.supcon_temperature={self.supcon_temperature}; expected a number > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"method_settings.dropout={self.dropout}; expected a probability in [0, 1)")
        if self.supcon_weight > 0 and self.stage != "eo":
            raise ConfigError("method_settings.supcon_weight shapes the EO embedding in stage 'eo' (paper 002); set it there")
        if self.init is not None and self.stage == "eo":
            raise ConfigError("method_settings.init: stage 'eo' trains the EO branch from scratch; init belongs to stage 'transfer'")


@register_method
class SlicedWassersteinTransfer(Method):
    """Y-shaped EO/SAR classifier: EO pretraining, then CE + sliced Wasserstein alignment on SAR."""

    name = "swd"
    Settings = SwdSettings

    # -- declarations ------------------------------------------------------------------------------
    @classmethod
    def needs(cls, settings: SwdSettings) -> DataNeeds:
        views = 2 if settings.supcon_weight > 0 else 1
        # Every tile's optical label is known: both stages keep the tiles whose SAR labels are withheld.
        return DataNeeds(fields=("sar", "optical", "label", "optical_label"), views=views, unlabelled=True)

    @classmethod
    def metrics(cls, settings: SwdSettings, data: DataSpec | None = None) -> MetricSpec:
        if settings.stage == "eo":
            return MetricSpec("val/optical_accuracy", "max", labelled=True, report=("test/optical_accuracy", "test/optical_average_accuracy"))
        return MetricSpec("val/accuracy", "max", labelled=True, report=("test/accuracy", "test/average_accuracy", "test/kappa", "test/optical_accuracy"))

    @classmethod
    def check_data(cls, settings: SwdSettings, data: DataSpec) -> None:
        if len(data.scene_classes) < 2:
            raise ConfigError(f"swd classifies scenes and needs at least 2 scene classes; the data has {len(data.scene_classes)}")

    @classmethod
    def required_inputs(cls, settings: SwdSettings) -> dict[str, InputSpec]:
        if settings.init is None:
            return {}
        return {settings.init: InputSpec(export="model", builder="dual_encoder_classifier", modality="sar+optical", description="the EO-pretrained Y-net")}

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, context: MethodContext) -> None:
        self.context = context
        torch.manual_seed(self.optim.seed)
        settings, model = self.settings, self.model_settings
        self.classes = list(self.data.scene_classes)
        self.channels = {"sar": self.data.sar_channels, "optical": self.data.optical_channels}
        network = build_network(
            "dual_encoder_classifier", encoder=model.encoder or "resnet18", in_channels=self.channels, num_classes=len(self.classes),
            depth=model.encoder_depth or 5, norm=model.norm, input_size=self.data.tile_size, dropout=settings.dropout,
        )
        if settings.init is not None:
            report = load_export_into(network, context.inputs, settings.init, "model")
            context.log(f"initialised the Y-net from {settings.init}/model: {describe_load(report)}")
        if settings.stage == "eo":
            for parameter in network.encoder("sar").parameters():
                parameter.requires_grad_(False)  # the EO stage never reads SAR
        self.net = self.add_network("model", network, modality="sar+optical", description=f"swd Y-net ({settings.stage} stage)")
        self.main = self.add_optimizer("main", [p for p in self.net.parameters() if p.requires_grad])
        self.draws = 0
        context.log(
            f"swd {settings.stage}: {model.encoder} depth {model.encoder_depth or 5}, {model.norm} norm, {len(self.classes)} classes"
            + (f", lambda {settings.sw_weight}, eta {settings.class_sw_weight}, L {settings.projections}" if settings.stage == "transfer" else "")
            + (f", SupCon weight {settings.supcon_weight} tau {settings.supcon_temperature}" if settings.supcon_weight > 0 else "")
        )

    def exports(self) -> dict[str, Export]:
        network = self.network("model")
        out = {"model": Export(network, "sar+optical", "swd Y-net: EO and SAR encoders, shared classifier")}
        for modality in ("sar", "optical"):
            classifier = build_network("classifier", **self.model_settings.classifier_kwargs(
                self.channels[modality], len(self.classes), self.data.tile_size, dropout=self.settings.dropout))
            classifier.encoder.load_state_dict(network.encoder(modality).state_dict())
            classifier.head.linear.load_state_dict(network.classifier.state_dict())
            out[f"{modality}_classifier"] = Export(classifier, modality, f"swd {modality} encoder with the shared classifier")
        out["sar_encoder"] = Export(network.encoder("sar"), "sar", "swd SAR encoder")
        return out

    # -- steps -------------------------------------------------------------------------------------
    def _generator(self) -> torch.Generator:
        """Seeded by the step, so every worker draws the same directions and subsamples."""
        self.draws += 1
        return torch.Generator().manual_seed(self.optim.seed * 1_000_003 + self.draws)

    def eo_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """CE on the optical views (+ SupCon over the views when weighted)."""
        optical, labels = batch["optical"], batch["optical_label"].long()
        views = optical.shape[1] if optical.dim() == 5 else 1
        flat = optical.reshape(-1, *optical.shape[-3:])
        embedding, logits = self.net({"optical": flat})["optical"]
        ce = F.cross_entropy(logits, labels.repeat_interleave(views))
        logs = {"optical_ce": float(ce.detach())}
        loss = ce
        if self.settings.supcon_weight > 0:
            features = embedding.reshape(labels.shape[0], views, -1)
            supcon = supervised_contrastive(features, labels, self.settings.supcon_temperature)
            loss = loss + self.settings.supcon_weight * supcon
            logs["supcon"] = float(supcon.detach())
        return loss, logs

    def transfer_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 2 of paper 002 on one batch (alignment on the gathered global batch)."""
        settings, context = self.settings, self.context
        out = self.net({"optical": batch["optical"], "sar": batch["sar"]})
        (z_eo, logits_eo), (z_sar, logits_sar) = out["optical"], out["sar"]
        eo_labels, sar_labels = batch["optical_label"].long(), batch["label"].long()
        labelled = (batch["labelled"] > 0) & (sar_labels >= 0)
        eo_ce = F.cross_entropy(logits_eo, eo_labels)
        count = context.all_reduce(labelled.sum().float().detach())
        sar_ce_sum = F.cross_entropy(logits_sar[labelled], sar_labels[labelled], reduction="sum") if labelled.any() else logits_sar.sum() * 0.0
        # DDP averages gradients over workers: scale so the result is the global labelled mean.
        sar_ce = sar_ce_sum * context.world_size / count.clamp(min=1)
        generator = self._generator()
        all_eo, all_sar = context.all_gather(z_eo), context.all_gather(z_sar)
        all_eo_labels = context.all_gather(eo_labels)
        all_sar_labels = context.all_gather(torch.where(labelled, sar_labels, torch.full_like(sar_labels, -1)))
        theta = random_projections(z_eo.shape[1], settings.projections, generator=generator).to(z_eo.device)
        sw = sliced_wasserstein(all_eo, all_sar, theta)
        class_sw, counted = class_sliced_wasserstein(all_eo, all_eo_labels, all_sar, all_sar_labels, theta, generator=generator)
        loss = settings.eo_weight * eo_ce + sar_ce + settings.sw_weight * sw + settings.class_sw_weight * class_sw
        logs = {"optical_ce": float(eo_ce.detach()), "sar_ce": float(sar_ce.detach()) / context.world_size, "sw": float(sw.detach()),
                "class_sw": float(class_sw.detach()), "class_sw_classes": float(counted), "labelled_sar": float(count)}
        return loss, logs

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        self.net.train()
        if self.settings.stage == "eo":
            self.network("model").encoder("sar").eval()
            loss, logs = self.eo_loss(batch)
        else:
            loss, logs = self.transfer_loss(batch)
        self.main.step(loss)
        return {"loss": float(loss.detach()), "lr": self.main.lr, **logs}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        """SAR scene accuracy (``accuracy``, ``average_accuracy``, ``kappa``), the same for the
        optical side (``optical_*``), and ``sw``: SW^2 between the EO and SAR embeddings of each
        batch (fixed directions), how far apart the two domains still are."""
        network = self.network("model")
        network.eval()
        meters = {m: ClassificationMeter(len(self.classes), self.classes) for m in ("sar", "optical")}
        alignment = MeanMeter()
        theta = None
        for batch in batches:
            labels = batch["label"].long()
            out = network({"optical": batch["optical"], "sar": batch["sar"]})
            for modality, (_, logits) in out.items():
                meters[modality].update(logits.argmax(1), labels)
            z_eo, z_sar = out["optical"][0], out["sar"][0]
            if theta is None:
                theta = random_projections(z_eo.shape[1], self.settings.projections, generator=torch.Generator().manual_seed(0)).to(z_eo.device)
            alignment.update({"sw": sliced_wasserstein(z_eo, z_sar, theta)}, weight=labels.shape[0])
        metrics, per_class = meters["sar"].compute(self.context.all_reduce)
        optical, _ = meters["optical"].compute(self.context.all_reduce)
        metrics.update({f"optical_{k}": v for k, v in optical.items()})
        metrics.update(alignment.compute(self.context.all_reduce, keys=["sw"]))
        return EvalResult(metrics=metrics, per_class=per_class)
