"""cromss: cross-modal sample selection for pretraining on noisy labels (paper 003, CromSS).

Two branches, SAR (S1) and optical (S2), each segment the noisy label layer (``data.noisy_layer``:
Dynamic World's 9 classes, or the synthetic world's ``landcover_noisy``) from its own modality:

* ``fusion: middle`` (midF): two encoders, one shared decoder and head
  (:class:`~xmodal.models.DualEncoderSegmenter`);
* ``fusion: late`` (lateF): two full segmenters (:class:`~xmodal.models.DualSegmenter`).

Loss per step, summed over the two branches d (:mod:`xmodal.losses.selection`)::

    sum_d [ CE(d; W_l^d) + dice_weight * Dice(d; W_l^d) ]
      + consistency_weight * [ C(SAR <- optical; W_e^optical) + C(optical <- SAR; W_e^SAR) ]

where, with ``selection: true`` (CromSS), ``W_l`` are the soft selection weights of the
cross-modal label confidences at the current selection ratio alpha (thresholds over the whole
data-parallel batch) and ``W_e`` the consistency weights at the current gamma; with
``selection: false`` (the paper's midF / lateF baselines) every weight is 1. Confidences come
from detached softmax outputs, so no weight carries gradient; the consistency targets are detached.

Schedules (official code, epoch-level; epoch t 0-based, r = :func:`~xmodal.losses.ramp`
over ``ramp_epochs``): ``alpha(t) = 1 - r(t) (1 - selection_ratio)`` and ``gamma(t) = r(t) *
consistency_gamma``: alpha starts at 0.9966 and reaches ``selection_ratio`` at epoch 80.

Where the official code (zhu-xlab/CromSS) differs from the paper text, the official behaviour is
the default and the paper's is a setting: class-balanced thresholds (``balance: class``; the text
describes one global threshold), soft-target cross-entropy consistency (``consistency: ce``; the
text says KL, which has the same gradient), entropy confidence (``confidence: gini`` is the
code's other option).

Model selection and the plateau schedule follow the official monitor: the unweighted loss on the
noisy labels of the validation split (``val/loss``), so pretraining never reads clean labels.
Evaluation also scores each branch against ``mask`` (``data.mask_layer``: the synthetic world's
clean ``landcover``; for SSL4EO-S12, whose only labels are Dynamic World's, set it to the noisy
layer too) and against the noisy labels (``*_noisy_miou``).

Exports: ``model`` (both branches), ``sar_encoder`` / ``optical_encoder`` (what the transfer to a
PSPNet loads, ``experiments/cromss/``), ``sar_segmenter`` / ``optical_segmenter`` (one branch as
a plain segmenter). Not built: the official code's label smoothing and three-branch variant
(concatenated features), which the paper does not use, and its seasonal augmentation (one
season per tile here: the readers give one acquisition per tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from xmodal.errors import ConfigError
from xmodal.losses import (
    consistency_loss,
    consistency_weights,
    cross_modal_confidence,
    entity_confidence,
    label_confidence,
    pixel_cross_entropy,
    predict_classes,
    ramp,
    selection_thresholds,
    selection_weights,
    soft_dice_loss,
)
from xmodal.losses.selection import BALANCES, CONFIDENCES, CONSISTENCIES, RAMPS
from xmodal.methods.base import DataNeeds, DataSpec, EvalResult, Export, Method, MethodContext, MetricSpec
from xmodal.methods.cromss.paper import PAPER_TABLES, classify_run
from xmodal.methods.inputs import gate_labels
from xmodal.methods.metrics import MeanMeter, SegmentationMeter
from xmodal.methods.panels import segmentation_rows
from xmodal.methods.registry import register_method
from xmodal.models import build_network

MODALITIES = ("sar", "optical")
OTHER = {"sar": "optical", "optical": "sar"}
FUSIONS = {"middle": "dual_encoder_segmenter", "late": "dual_segmenter"}


@dataclass
class CromssSettings:
    """Settings of CromSS pretraining (defaults: the official code).

    Attributes:
        fusion: ``middle`` (shared decoder and head) or ``late`` (two full segmenters).
        selection: Cross-modal sample selection (CromSS); ``false``: the midF / lateF baselines
            (every pixel weighted 1 in both losses).
        selection_ratio: alpha at the end of its ramp (the share of each class kept at weight 1; a
            sweep knob: the mission's "selection ratio").
        balance: ``class`` (thresholds per noisy class, official) or ``global`` (paper text).
        confidence: Entity confidence: ``entropy`` (Eq. 1) or ``gini``.
        ramp: Ramp shape of alpha and gamma: ``exp`` (official), ``linear`` or ``none`` (final values from epoch 0).
        ramp_epochs: Epochs of the ramp (official: 80 of 100).
        consistency: ``ce`` (soft-target cross-entropy, official), ``kl`` (the paper), ``mse`` or ``none``.
        consistency_weight: Weight of the consistency term.
        consistency_gamma: gamma at the end of its ramp (official: 1).
        dice_weight: Weight of the soft Dice term of each branch.
    """

    fusion: str = "middle"
    selection: bool = True
    selection_ratio: float = 0.5
    balance: str = "class"
    confidence: str = "entropy"
    ramp: str = "exp"
    ramp_epochs: int = 80
    consistency: str = "ce"
    consistency_weight: float = 1.0
    consistency_gamma: float = 1.0
    dice_weight: float = 1.0

    def __post_init__(self) -> None:
        choices = {"fusion": tuple(FUSIONS), "balance": BALANCES, "confidence": CONFIDENCES, "ramp": RAMPS, "consistency": CONSISTENCIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"method_settings.{name}={getattr(self, name)!r}; expected one of {list(allowed)}")
        for name in ("selection_ratio", "consistency_gamma"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"method_settings.{name}={getattr(self, name)}; expected a number in [0, 1]")
        if self.ramp_epochs < 0:
            raise ConfigError(f"method_settings.ramp_epochs={self.ramp_epochs}; expected >= 0")
        for name in ("consistency_weight", "dice_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"method_settings.{name}={getattr(self, name)}; expected a weight >= 0")

    @property
    def variant(self) -> str:
        """The paper's name of this configuration: ``CromSS-midF``, ``lateF``..."""
        fusion = "midF" if self.fusion == "middle" else "lateF"
        return f"CromSS-{fusion}" if self.selection else fusion

    def schedule(self, epoch: int) -> tuple[float, float]:
        """(alpha, gamma) at ``epoch`` (0-based)."""
        r = ramp(epoch, self.ramp_epochs, self.ramp)
        return 1.0 - r * (1.0 - self.selection_ratio), r * self.consistency_gamma


@register_method
class CrossModalSampleSelection(Method):
    """Two-branch S1/S2 segmentation pretraining on noisy labels, with cross-modal sample selection."""

    name = "cromss"
    Settings = CromssSettings
    paper_tables = PAPER_TABLES

    # -- declarations ------------------------------------------------------------------------------
    @classmethod
    def needs(cls, settings: CromssSettings) -> DataNeeds:
        return DataNeeds(fields=("sar", "optical", "noisy_mask", "mask"))

    @classmethod
    def metrics(cls, settings: CromssSettings, data: DataSpec | None = None) -> MetricSpec:
        return MetricSpec("val/loss", "min", labelled=False, report=("test/sar_miou", "test/optical_miou", "test/sar_noisy_miou", "test/loss"))

    @classmethod
    def check_data(cls, settings: CromssSettings, data: DataSpec) -> None:
        if data.num_classes < 3:
            raise ConfigError(
                f"cromss segments land cover (Dynamic World: 9 classes); data.mask_layer {data.mask_layer!r} has {data.num_classes} classes"
            )

    @classmethod
    def report_cell(cls, table: dict[str, Any], run: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
        return classify_run(table, run, runs)

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, context: MethodContext) -> None:
        self.context = context
        torch.manual_seed(self.optim.seed)
        settings, model = self.settings, self.model_settings
        self.channels = {"sar": self.data.sar_channels, "optical": self.data.optical_channels}
        self.classes = self.data.num_classes
        kwargs = model.segmenter_kwargs(self.channels["sar"], self.classes)
        kwargs["in_channels"] = self.channels
        network = build_network(FUSIONS[settings.fusion], **kwargs)
        self.net = self.add_network("model", network, modality="sar+optical", description=f"cromss {settings.variant} (two branches)")
        self.main = self.add_optimizer("main", self.net.parameters())
        self.alpha, self.gamma = settings.schedule(0)
        context.log(
            f"cromss {settings.variant}: {model.arch} {model.encoder}, {self.classes} classes"
            + (f", alpha -> {settings.selection_ratio} ({settings.balance}), {settings.ramp} ramp over {settings.ramp_epochs} epochs" if settings.selection else "")
            + (f", consistency {settings.consistency} x {settings.consistency_weight}" if settings.consistency != "none" else ", no consistency")
        )

    def exports(self) -> dict[str, Export]:
        network = self.network("model")
        out = {"model": Export(network, "sar+optical", f"cromss {self.settings.variant}: both branches")}
        for modality in MODALITIES:
            out[f"{modality}_encoder"] = Export(network.encoder(modality), modality, f"cromss {self.settings.variant} {modality} encoder")
            segmenter = build_network("segmenter", **self.model_settings.segmenter_kwargs(self.channels[modality], self.classes))
            if self.settings.fusion == "late":
                segmenter.load_state_dict(network.segmenter(modality).state_dict())
            else:
                segmenter.encoder.load_state_dict(network.encoder(modality).state_dict())
                segmenter.decoder.load_state_dict(network.decoder.state_dict())
                segmenter.segmentation_head.load_state_dict(network.segmentation_head.state_dict())
            out[f"{modality}_segmenter"] = Export(segmenter, modality, f"cromss {self.settings.variant} {modality} branch as a segmenter")
        return out

    def begin_epoch(self, epoch: int) -> None:
        self.alpha, self.gamma = self.settings.schedule(epoch)

    # -- steps -------------------------------------------------------------------------------------
    def _targets(self, batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        """Labels of ``key`` gated by both inputs' validity: a branch never learns a pixel the other cannot see."""
        valid = batch["sar_valid"].bool() & batch["optical_valid"].bool()
        return gate_labels(batch[key].long(), valid, self.data.ignore_index)

    def _segmentation(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        loss = pixel_cross_entropy(logits, target, self.data.ignore_index, weight)
        if self.settings.dice_weight:
            loss = loss + self.settings.dice_weight * soft_dice_loss(logits, target, self.data.ignore_index, weight)
        return loss

    def selection(self, logits: dict[str, torch.Tensor], target: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Segmentation weights ``W_l`` and consistency weights ``W_e`` of each branch (no gradient),
        thresholds over the whole data-parallel batch."""
        settings, ignore = self.settings, self.data.ignore_index
        with torch.no_grad():
            probabilities = {m: logits[m].detach().float().softmax(dim=1) for m in MODALITIES}
            label = {m: label_confidence(probabilities[m], target, ignore) for m in MODALITIES}
            entity = {m: entity_confidence(probabilities[m], settings.confidence) for m in MODALITIES}
            label_x = {m: cross_modal_confidence(label[m], label[OTHER[m]]) for m in MODALITIES}
            entity_x = {m: cross_modal_confidence(entity[m], entity[OTHER[m]]) for m in MODALITIES}
            all_target = self.context.all_gather(target)
            seg_weights = {}
            for m in MODALITIES:
                thresholds = selection_thresholds(self.context.all_gather(label_x[m]), all_target, self.alpha, self.classes, ignore, settings.balance)
                seg_weights[m] = selection_weights(label_x[m], target, thresholds, ignore, self.alpha)
            con_weights = {m: consistency_weights(entity_x[m], self.gamma) for m in MODALITIES}
        return seg_weights, con_weights

    def loss(self, logits: dict[str, torch.Tensor], target: torch.Tensor, valid: torch.Tensor, select: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """The CromSS loss of both branches (unweighted when ``select`` is false); ``valid``: pixels
        both inputs see (the consistency term's pixels)."""
        settings = self.settings
        if select:
            seg_weights, con_weights = self.selection(logits, target)
        else:
            seg_weights = {m: None for m in MODALITIES}
            con_weights = {m: torch.ones_like(target, dtype=torch.float32) for m in MODALITIES}
        logs: dict[str, float] = {}
        total = logits["sar"].sum() * 0.0
        for m in MODALITIES:
            term = self._segmentation(logits[m], target, seg_weights[m])
            total = total + term
            logs[f"{m}_seg"] = float(term.detach())
            if seg_weights[m] is not None:
                counted = target != self.data.ignore_index
                logs[f"{m}_selected"] = float((seg_weights[m][counted] >= 1).float().mean()) if counted.any() else 0.0
        if settings.consistency != "none" and settings.consistency_weight > 0:
            for m in MODALITIES:
                # m learns the other branch's distribution, weighted by the target (other) modality's W_e.
                term = consistency_loss(logits[m], logits[OTHER[m]], con_weights[OTHER[m]] * valid, settings.consistency)
                total = total + settings.consistency_weight * term
                logs[f"{m}_consistency"] = float(term.detach())
        return total, logs

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        self.net.train()
        target = self._targets(batch, "noisy_mask")
        valid = (batch["sar_valid"].bool() & batch["optical_valid"].bool()).float()
        logits = self.net({m: batch[m] for m in MODALITIES})
        loss, logs = self.loss(logits, target, valid, select=self.settings.selection)
        self.main.step(loss)
        return {"loss": float(loss.detach()), "lr": self.main.lr, "alpha": self.alpha, "gamma": self.gamma, **logs}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        """``loss``: the unweighted two-branch loss on the noisy labels (the official monitor);
        per branch, ``{m}_miou`` / ``{m}_accuracy`` / ``{m}_average_accuracy`` against ``mask``
        and ``{m}_noisy_miou`` against the noisy labels. Per-class IoU is the SAR branch's."""
        network = self.network("model")
        network.eval()
        names = list(self.data.class_names)
        meters = {(m, kind): SegmentationMeter(self.classes, names, self.data.ignore_index) for m in MODALITIES for kind in ("clean", "noisy")}
        losses = MeanMeter()
        rows = []
        for batch in batches:
            noisy, clean = self._targets(batch, "noisy_mask"), self._targets(batch, "mask")
            valid = (batch["sar_valid"].bool() & batch["optical_valid"].bool()).float()
            logits = network({m: batch[m] for m in MODALITIES})
            loss, _ = self.loss(logits, noisy, valid, select=False)
            losses.update({"loss": loss}, weight=noisy.shape[0])
            for m in MODALITIES:
                prediction = predict_classes(logits[m])
                meters[(m, "clean")].update(prediction, clean)
                meters[(m, "noisy")].update(prediction, noisy)
            if len(rows) < panels:
                rows += segmentation_rows(
                    batch, clean.cpu().numpy(), predict_classes(logits["sar"]).cpu().numpy(), optical_bands=self.data.optical_bands,
                    sar_mean=self.data.sar_mean[0], sar_std=self.data.sar_std[0], classes=self.classes, limit=panels - len(rows),
                )
        metrics: dict[str, float] = losses.compute(self.context.all_reduce, keys=["loss"])
        per_class: dict[str, dict[str, float]] = {}
        for m in MODALITIES:
            clean_metrics, clean_classes = meters[(m, "clean")].compute(self.context.all_reduce)
            noisy_metrics, _ = meters[(m, "noisy")].compute(self.context.all_reduce)
            metrics.update({f"{m}_{k}": v for k, v in clean_metrics.items()})
            metrics[f"{m}_noisy_miou"] = noisy_metrics["miou"]
            if m == "sar":
                per_class = clean_classes
        return EvalResult(metrics=metrics, per_class=per_class, panels=rows)
