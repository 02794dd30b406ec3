"""Supervised baselines: optical -> mask, SAR -> mask (from scratch), SAR -> land cover, scene classes.

The same module covers every baseline the papers compare against; the input modality, the label
layer and the task are settings. It can also start from weights exported by an earlier phase
(``init``) and freeze the encoder (``freeze_encoder``), which is how a pretext method's
"finetune decoder only" / "finetune all" phases run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.methods.base import DataSpec, EvalResult, Export, Method, MethodContext, PanelItem, register_method, unwrap
from xmodal.methods.evaluation import ClassificationMeter, SegmentationMeter, optical_to_rgb
from xmodal.methods.exports import build_network, load_export_into
from xmodal.methods.losses import predict_classes, segmentation_loss
from xmodal.methods.optim import build_optimizer, build_scheduler

INPUTS = ("sar", "optical", "both")


@dataclass
class SupervisedSettings:
    """Settings of the supervised baselines.

    Attributes:
        input: Modality fed to the model: ``sar``, ``optical`` or ``both`` (channel stack).
        task: ``segmentation`` (per-pixel, uses the mask layer) or ``classification`` (scene label).
        dice_weight: Weight of the Dice term added to BCE / CE.
        use_noisy_labels: Train on ``noisy_mask`` (evaluation always uses the clean ``mask``).
        init: Name of an input checkpoint (``inputs:`` of the run or an earlier phase) whose
            exported ``model`` initialises this one.
        init_export: Which export of that checkpoint to load.
        freeze_encoder: Train the decoder and head only; encoder weights frozen and its
            BatchNorm statistics kept (eval mode).
    """

    input: str = "sar"
    task: str = "segmentation"
    dice_weight: float = 1.0
    use_noisy_labels: bool = False
    init: str | None = None
    init_export: str = "model"
    freeze_encoder: bool = False

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ConfigError(f"method_settings.input={self.input!r}; expected one of {INPUTS}")
        if self.task not in ("segmentation", "classification"):
            raise ConfigError(f"method_settings.task={self.task!r}; expected segmentation or classification")
        if self.freeze_encoder and self.init is None:
            raise ConfigError("method_settings.freeze_encoder needs method_settings.init: a random encoder would stay random")


def select_input(batch: dict[str, torch.Tensor], modality: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model input and its validity mask (B x H x W bool) for ``modality``."""
    if modality == "both":
        image = torch.cat([batch["sar"], batch["optical"]], dim=1)
        valid = batch["sar_valid"].bool() & batch["optical_valid"].bool()
        return image, valid
    return batch[modality], batch[f"{modality}_valid"].bool()


def gate_labels(labels: torch.Tensor, valid: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels with pixels of invalid input turned to ``ignore_index``."""
    return torch.where(valid, labels, torch.full_like(labels, ignore_index))


@register_method
class Supervised(Method):
    """Train one network on labelled tiles of one modality (or both)."""

    name = "supervised"
    Settings = SupervisedSettings
    metric = "val/iou"
    metric_mode = "max"

    def __init__(self, settings: SupervisedSettings, model, optim, data: DataSpec) -> None:
        super().__init__(settings, model, optim, data)
        self.segmentation = settings.task == "segmentation"
        self.binary = self.segmentation and data.num_classes == 2

    @classmethod
    def metric_for(cls, settings: SupervisedSettings, data: DataSpec | None = None) -> str:
        """Scene accuracy for classification; building IoU for binary masks, mean IoU otherwise."""
        if settings.task == "classification":
            return "val/accuracy"
        return "val/miou" if data is not None and data.num_classes > 2 else "val/iou"

    @classmethod
    def check_data(cls, data: DataSpec) -> None:
        if data.num_classes < 2:
            raise ConfigError(f"supervised training needs at least 2 classes; the data has {data.num_classes}")

    def in_channels(self) -> int:
        return {"sar": self.data.sar_channels, "optical": self.data.optical_channels}.get(
            self.settings.input, self.data.sar_channels + self.data.optical_channels
        )

    def setup(self, context: MethodContext) -> None:
        self.context = context
        torch.manual_seed(self.optim.seed)
        out_classes = 1 if self.binary else self.data.num_classes
        network = build_network(self.model_settings, self.in_channels(), out_classes, classification=not self.segmentation)
        if self.settings.init is not None:
            report = load_export_into(network, context.inputs, self.settings.init, self.settings.init_export)
            context.log(f"initialised from {self.settings.init}/{self.settings.init_export}: {report}")
        if self.settings.freeze_encoder:
            for parameter in network.encoder.parameters():
                parameter.requires_grad_(False)
        self.model = context.prepare_module(network)
        self.optimizer = build_optimizer(self.model.parameters(), self.optim)
        self.scheduler = build_scheduler(self.optimizer, self.optim, context.steps_per_epoch)

    def _train_mode(self) -> None:
        self.model.train()
        if self.settings.freeze_encoder:
            unwrap(self.model).encoder.eval()  # keep the encoder's BatchNorm statistics untouched

    def _targets(self, batch: dict[str, torch.Tensor], valid: torch.Tensor, train: bool) -> torch.Tensor:
        if not self.segmentation:
            return batch["label"].long()
        key = "noisy_mask" if train and self.settings.use_noisy_labels else "mask"
        return gate_labels(batch[key].long(), valid, self.data.ignore_index)

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        self._train_mode()
        image, valid = select_input(batch, self.settings.input)
        target = self._targets(batch, valid, train=True)
        logits = self.model(image)
        if self.segmentation:
            loss = segmentation_loss(logits, target, self.data.ignore_index, self.settings.dice_weight)
        else:
            loss = nn.functional.cross_entropy(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": float(loss.detach()), "lr": self.optimizer.param_groups[0]["lr"]}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        model = unwrap(self.model)
        model.eval()
        names = list(self.data.class_names)
        meter = (
            SegmentationMeter(self.data.num_classes, names, self.data.ignore_index)
            if self.segmentation
            else ClassificationMeter(self.data.num_classes, names)
        )
        items: list[PanelItem] = []
        total_loss, count = 0.0, 0
        for batch in batches:
            image, valid = select_input(batch, self.settings.input)
            target = self._targets(batch, valid, train=False)
            logits = model(image)
            if self.segmentation:
                total_loss += float(segmentation_loss(logits, target, self.data.ignore_index, self.settings.dice_weight))
            else:
                total_loss += float(nn.functional.cross_entropy(logits, target))
            count += 1
            prediction = predict_classes(logits) if self.segmentation else logits.argmax(dim=1)
            meter.update(prediction, target)
            if self.segmentation and len(items) < panels:
                items.extend(self._panel_items(batch, target, prediction, panels - len(items)))
        metrics, per_class = meter.compute()
        metrics["loss"] = total_loss / max(count, 1)
        return EvalResult(metrics=metrics, panels=items, per_class=per_class)

    def _panel_items(self, batch, target, prediction, limit: int) -> list[PanelItem]:
        items = []
        mean = np.asarray(self.data.sar_mean)[0]
        std = np.asarray(self.data.sar_std)[0]
        for i in range(min(limit, target.shape[0])):
            items.append(
                PanelItem(
                    optical_rgb=optical_to_rgb(batch["optical"][i].cpu().numpy(), list(self.data.optical_bands)),
                    sar_db=batch["sar"][i, 0].cpu().numpy() * std + mean,
                    truth=target[i].cpu().numpy(),
                    prediction=prediction[i].cpu().numpy(),
                    title=f"tile {int(batch['index'][i])}",
                )
            )
        return items

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def exports(self) -> dict[str, Export]:
        out_classes = 1 if self.binary else self.data.num_classes
        return {
            "model": Export(
                module=unwrap(self.model),
                in_channels=self.in_channels(),
                classes=out_classes,
                model=self.model_settings,
                modality=self.settings.input,
                classification=not self.segmentation,
            )
        }
