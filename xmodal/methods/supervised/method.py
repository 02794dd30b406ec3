"""Supervised baselines: optical -> mask, SAR -> mask (from scratch), SAR -> land cover, scene classes.

The same method covers every baseline the papers compare against; the input modality, the label
layer and the task are settings. It can also start from weights exported by an earlier phase
(``init``), the whole network or only its encoder (``init_part``), and freeze the encoder
(``freeze_encoder``): that is how a pretext method's "finetune decoder only" / "finetune all"
phases run, and how a pretrained encoder (contrastive, cross-modal) initialises a segmenter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.losses import predict_classes, segmentation_loss
from xmodal.methods.base import DataNeeds, DataSpec, EvalResult, InputSpec, Method, MethodContext, MetricSpec
from xmodal.methods.exports import PARTS, describe_load, load_export_into
from xmodal.methods.inputs import INPUTS, gate_labels, select_input
from xmodal.methods.metrics import ClassificationMeter, MeanMeter, SegmentationMeter
from xmodal.methods.panels import segmentation_rows
from xmodal.methods.registry import register_method
from xmodal.models import FIRST_CONV_MODES, build_network


BINARY_HEADS = ("sigmoid", "softmax")


@dataclass
class SupervisedSettings:
    """Settings of the supervised baselines.

    Attributes:
        input: Modality fed to the model: ``sar``, ``optical`` or ``both`` (channel stack).
        task: ``segmentation`` (per-pixel, uses the mask layer) or ``classification`` (scene label).
        dice_weight: Weight of the Dice term added to BCE / CE (0: cross-entropy alone).
        binary_head: Head of a binary (2-class) segmenter: ``sigmoid`` (one logit channel, BCE)
            or ``softmax`` (two channels, background and foreground, cross-entropy over them: the
            binary cross-entropy on softmax predictions of paper 000, whose per-pixel maps a
            distillation loss can compare over classes). Multi-class heads are always softmax.
        use_noisy_labels: Train on ``noisy_mask`` (evaluation always uses the clean ``mask``).
        init: Name of an input checkpoint (``inputs:`` of the run or an earlier phase) whose
            export initialises this network.
        init_export: Which export of that checkpoint to load.
        init_part: ``all`` (every matching parameter) or ``encoder`` (the encoder only: from an
            encoder export, or from the export's own encoder).
        first_conv: How a first convolution with another input-channel count is adapted.
        freeze_encoder: Train the decoder and head only; encoder weights frozen and its
            BatchNorm statistics kept (eval mode).
    """

    input: str = "sar"
    task: str = "segmentation"
    dice_weight: float = 1.0
    binary_head: str = "sigmoid"
    use_noisy_labels: bool = False
    init: str | None = None
    init_export: str = "model"
    init_part: str = "all"
    first_conv: str = "mean_tile"
    freeze_encoder: bool = False

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ConfigError(f"method_settings.input={self.input!r}; expected one of {INPUTS}")
        if self.task not in ("segmentation", "classification"):
            raise ConfigError(f"method_settings.task={self.task!r}; expected segmentation or classification")
        if self.binary_head not in BINARY_HEADS:
            raise ConfigError(f"method_settings.binary_head={self.binary_head!r}; expected one of {list(BINARY_HEADS)}")
        if self.dice_weight < 0:
            raise ConfigError(f"method_settings.dice_weight={self.dice_weight}; expected >= 0")
        if self.init_part not in PARTS:
            raise ConfigError(f"method_settings.init_part={self.init_part!r}; expected one of {list(PARTS)}")
        if self.first_conv not in FIRST_CONV_MODES:
            raise ConfigError(f"method_settings.first_conv={self.first_conv!r}; expected one of {list(FIRST_CONV_MODES)}")
        if self.freeze_encoder and self.init is None:
            raise ConfigError("method_settings.freeze_encoder needs method_settings.init: a random encoder would stay random")
        if self.use_noisy_labels and self.task != "segmentation":
            raise ConfigError("method_settings.use_noisy_labels applies to segmentation (noisy masks)")


@register_method
class Supervised(Method):
    """Train one network on labelled tiles of one modality (or both)."""

    name = "supervised"
    Settings = SupervisedSettings

    def __init__(self, settings: SupervisedSettings, model, optim, data: DataSpec) -> None:
        super().__init__(settings, model, optim, data)
        self.segmentation = settings.task == "segmentation"
        self.num_classes = data.num_classes if self.segmentation else len(data.scene_classes)
        self.class_names = list(data.class_names) if self.segmentation else list(data.scene_classes)
        self.binary = self.segmentation and self.num_classes == 2

    # -- declarations ------------------------------------------------------------------------------
    @classmethod
    def needs(cls, settings: SupervisedSettings) -> DataNeeds:
        labels = ("label",) if settings.task == "classification" else ("mask", "noisy_mask") if settings.use_noisy_labels else ("mask",)
        return DataNeeds(fields=("sar", "optical", *labels))

    @classmethod
    def metrics(cls, settings: SupervisedSettings, data: DataSpec | None = None) -> MetricSpec:
        """Scene accuracy for classification; building IoU for binary masks, mean IoU otherwise."""
        if settings.task == "classification":
            return MetricSpec("val/accuracy", "max", labelled=True, report=("test/accuracy", "test/average_accuracy", "test/kappa"))
        if data is not None and data.num_classes > 2:
            return MetricSpec("val/miou", "max", labelled=True, report=("test/miou", "test/accuracy", "test/average_accuracy"))
        return MetricSpec("val/iou", "max", labelled=True, report=("test/iou", "test/f1", "test/accuracy"))

    @classmethod
    def check_data(cls, settings: SupervisedSettings, data: DataSpec) -> None:
        classes = data.num_classes if settings.task == "segmentation" else len(data.scene_classes)
        if classes < 2:
            raise ConfigError(f"supervised {settings.task} needs at least 2 classes; the data has {classes}")

    @classmethod
    def required_inputs(cls, settings: SupervisedSettings) -> dict[str, InputSpec]:
        if settings.init is None:
            return {}
        builder = "encoder" if settings.init_part == "encoder" else "segmenter" if settings.task == "segmentation" else "classifier"
        return {settings.init: InputSpec(export=settings.init_export, builder=builder, modality=settings.input, description="initial weights")}

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, context: MethodContext) -> None:
        self.context = context
        torch.manual_seed(self.optim.seed)
        settings, channels = self.settings, self.data.channels(self.settings.input)
        if self.segmentation:
            network = build_network("segmenter", **self.model_settings.segmenter_kwargs(channels, self.head_channels()))
        else:
            network = build_network("classifier", **self.model_settings.classifier_kwargs(channels, self.num_classes, self.data.tile_size))
        if settings.init is not None:
            report = load_export_into(network, context.inputs, settings.init, settings.init_export, part=settings.init_part, first_conv=settings.first_conv)
            context.log(f"initialised {settings.init_part} from {settings.init}/{settings.init_export}: {describe_load(report)}")
        if settings.freeze_encoder:
            for parameter in network.encoder.parameters():
                parameter.requires_grad_(False)
        self.model = self.add_network("model", network, modality=settings.input, description=f"supervised {settings.task} on {settings.input}")
        self.main = self.add_optimizer("main", self.model.parameters())

    def head_channels(self) -> int:
        """Output channels of the segmenter: 1 for a sigmoid binary head, else one per class."""
        return 1 if self.binary and self.settings.binary_head == "sigmoid" else self.num_classes

    # -- steps -------------------------------------------------------------------------------------
    def _train_mode(self) -> None:
        self.model.train()
        if self.settings.freeze_encoder:
            self.network("model").encoder.eval()  # keep the encoder's BatchNorm statistics untouched

    def _targets(self, batch: dict[str, torch.Tensor], valid: torch.Tensor, train: bool) -> torch.Tensor:
        if not self.segmentation:
            return batch["label"].long()
        key = "noisy_mask" if train and self.settings.use_noisy_labels else "mask"
        return gate_labels(batch[key].long(), valid, self.data.ignore_index)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.segmentation:
            return segmentation_loss(logits, target, self.data.ignore_index, self.settings.dice_weight)
        return nn.functional.cross_entropy(logits, target)

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        self._train_mode()
        image, valid = select_input(batch, self.settings.input)
        loss = self._loss(self.model(image), self._targets(batch, valid, train=True))
        self.main.step(loss)
        return {"loss": float(loss.detach()), "lr": self.main.lr}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        model = self.network("model")
        model.eval()
        meter = (
            SegmentationMeter(self.num_classes, self.class_names, self.data.ignore_index)
            if self.segmentation
            else ClassificationMeter(self.num_classes, self.class_names)
        )
        losses = MeanMeter()
        rows = []
        for batch in batches:
            image, valid = select_input(batch, self.settings.input)
            target = self._targets(batch, valid, train=False)
            logits = model(image)
            losses.update({"loss": self._loss(logits, target)}, weight=image.shape[0])
            prediction = predict_classes(logits) if self.segmentation else logits.argmax(dim=1)
            meter.update(prediction, target)
            if self.segmentation and len(rows) < panels:
                rows += segmentation_rows(
                    batch, target.cpu().numpy(), prediction.cpu().numpy(), optical_bands=self.data.optical_bands,
                    sar_mean=self.data.sar_mean[0], sar_std=self.data.sar_std[0], classes=max(self.num_classes, 2), limit=panels - len(rows),
                )
        metrics, per_class = meter.compute(self.context.all_reduce)
        metrics.update(losses.compute(self.context.all_reduce, keys=["loss"]))
        return EvalResult(metrics=metrics, per_class=per_class, panels=rows)
