"""kd: cross-modal knowledge distillation as a pretext task (paper 000, Nair & Hänsch, CVPRW 2024).

The paper's three phases map onto a config's ``phases:`` chain; this module is phase 2:

1. ``teacher``: :mod:`~xmodal.methods.supervised` on optical + building masks.
2. ``reconstruct`` (this method): a student network of the teacher's architecture, on SAR,
   initialised from the teacher's exported weights, learns WITHOUT labels to reproduce the frozen
   teacher's activations on aligned pairs. Loss (paper Eq. 2)::

       L = 1 - mean over the chosen layers l of cos(phi_l(student, SAR), phi_l(teacher, optical))

3. ``ft_d`` / ``ft_a``: :mod:`~xmodal.methods.supervised` on SAR + masks with ``init: student``,
   ``init_export: model`` (this method exports the student as ``model``) and, for Ft-D,
   ``freeze_encoder: true``. The phase-2 student is already a full segmentation network, so its
   own IoU ("none", no finetuning) is what :meth:`KnowledgeDistillation.evaluate` reports.

Choices the paper leaves open (all settings, see :class:`KdSettings`):

* Which axis the cosine runs over. ``pixel``: per spatial position over channels, averaged over
  positions and samples. ``sample``: per sample over the flattened (C x H x W) activation. A
  per-pixel cosine of a 1-channel map (binary logits, the ``fin`` layer) is ``sign(s) * sign(t)``:
  +-1 with zero gradient almost everywhere, so it cannot train anything. The default ``auto``
  therefore uses ``sample`` for 1-channel maps and ``pixel`` otherwise.
* First convolution. The student reads SAR (2 or 4 polarisations), the teacher optical (4 or 13
  bands): every weight whose shape matches is copied; a first convolution that differs only in
  input channels is adapted by :func:`~xmodal.models.factory.copy_matching_weights`
  (``first_conv: mean_tile``: the teacher kernel averaged over its input bands, tiled to the SAR
  channel count and rescaled by ``teacher_in / student_in`` so activations keep their scale; with
  equal channel counts, e.g. SpaceNet 6's 4 polarisations vs RGBN, it is copied as is).
* Dead activations. A tapped map that ends in a ReLU can be all-zero for a sample or pixel: the
  cosine is then 0 with no gradient. ``pre_activation: true`` compares the inputs of those ReLUs
  instead (same layers, negative part kept).
* ``mid+fin`` ("M&F"): sequential, ``mid`` for the first part of the epochs, then ``fin``; any
  ``a+b[+c...]`` of layer sets or tap names works the same way, switching at ``switch_epochs``
  (default: equal shares, the first stage getting the extra epoch of an odd count).
* Layers downstream of every chosen tap (e.g. the decoder for ``mid``) get no gradient: their
  weights stay the teacher's, and their BatchNorm layers are kept in eval mode so SAR statistics
  do not leak into layers the loss does not train (as a Keras model whose outputs are the chosen
  layers would behave). Under DDP they still take part in every step through a zero-weighted term,
  so DDP's reducer sees every parameter, and their (zero) gradients are dropped before the step.
* Pixels where either modality has no data are left out of the cosine (``ignore_invalid``), at
  the resolution of each layer (area share of valid input pixels >= 0.5).

Paper settings: SGD lr 0.1, momentum 0.9, batch 32, 150 reconstruction epochs (300 for the
baselines, 30 for finetuning). ``PAPER_TABLE`` holds the paper's Table 2 for ``xmodal report``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.errors import ConfigError
from xmodal.methods.base import DataSpec, EvalResult, Export, Method, MethodContext, ModelSettings, register_method, unwrap
from xmodal.methods.evaluation import SegmentationMeter
from xmodal.methods.exports import build_network, rebuild_export
from xmodal.methods.losses import predict_classes
from xmodal.methods.optim import build_optimizer, build_scheduler
from xmodal.methods.supervised import INPUTS, gate_labels, select_input
from xmodal.models import FIRST_CONV_MODES, FeatureTaps, copy_matching_weights, layer_set

REDUCTIONS = ("auto", "pixel", "sample")
PAPER_LAYER_SETS = ("mid", "fin", "mid+fin", "int")


@dataclass
class KdSettings:
    """Settings of the reconstruction phase.

    Attributes:
        teacher: Name of the input checkpoint (phase ``inputs:``) holding the trained teacher.
        teacher_export: Which export of that checkpoint is the teacher.
        layers: Layers to match: ``mid`` (encoder output), ``fin`` (logits), ``int`` (six layers
            spread over encoder and decoder), ``mid+fin`` (sequential: ``mid`` then ``fin``; any
            ``a+b`` of sets or tap names works), a single tap name, or a list of tap names
            (matched simultaneously). See :func:`xmodal.models.layer_set`.
        switch_epochs: For sequential layers ``a+b[+c]``: the epoch (count of finished epochs)
            at which each later stage starts, one value per ``+``. ``None``: equal shares,
            stage ``k`` of ``n`` starting at ``ceil(k * epochs / n)``.
        reduction: Cosine axis: ``pixel`` (over channels at each position), ``sample`` (over the
            flattened activation of each sample) or ``auto`` (``sample`` for 1-channel maps,
            whose per-pixel cosine has no gradient, ``pixel`` otherwise).
        pre_activation: Compare the input of the tapped block's final activation (see
            :class:`xmodal.models.FeatureTaps`), keeping negative parts that a ReLU zeroes.
        init_from_teacher: Start the student from the teacher's weights (the paper does: faster
            convergence); ``false`` starts it randomly.
        first_conv: How a first convolution with another input-channel count is adapted:
            ``mean_tile``, ``cycle`` or ``none`` (see :func:`xmodal.models.copy_matching_weights`).
        student_input: Modality the student reads (``sar``).
        teacher_input: Modality the teacher reads (``None``: the one it was trained on).
        ignore_invalid: Leave no-data pixels of either modality out of the cosine.
        eps: Floor of the vector norms in the cosine (zero vectors give a cosine of 0).
    """

    teacher: str = "teacher"
    teacher_export: str = "model"
    layers: str | list[str] = "int"
    switch_epochs: list[int] | None = None
    reduction: str = "auto"
    pre_activation: bool = False
    init_from_teacher: bool = True
    first_conv: str = "mean_tile"
    student_input: str = "sar"
    teacher_input: str | None = None
    ignore_invalid: bool = True
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ConfigError(f"method_settings.reduction={self.reduction!r}; expected one of {list(REDUCTIONS)}")
        if self.first_conv not in FIRST_CONV_MODES:
            raise ConfigError(f"method_settings.first_conv={self.first_conv!r}; expected one of {list(FIRST_CONV_MODES)}")
        for key in ("student_input", "teacher_input"):
            value = getattr(self, key)
            if value is not None and value not in INPUTS:
                raise ConfigError(f"method_settings.{key}={value!r}; expected one of {list(INPUTS)}")
        if isinstance(self.layers, list) and not self.layers:
            raise ConfigError("method_settings.layers=[]: name at least one layer")
        if isinstance(self.layers, str) and not all(part.strip() for part in self.layers.split("+")):
            raise ConfigError(f"method_settings.layers={self.layers!r}: empty stage in a sequential 'a+b' set")
        stages = len(self.stage_specs())
        if self.switch_epochs is not None:
            if len(self.switch_epochs) != stages - 1:
                raise ConfigError(
                    f"method_settings.switch_epochs={self.switch_epochs}: layers={self.layers!r} has {stages} "
                    f"stage(s), so expected {stages - 1} switch epoch(s)"
                )
            if any(b <= a for a, b in zip([0, *self.switch_epochs], self.switch_epochs)):
                raise ConfigError(f"method_settings.switch_epochs={self.switch_epochs}: expected increasing epochs >= 1")
        if self.eps <= 0:
            raise ConfigError(f"method_settings.eps={self.eps}; expected > 0")

    def stage_specs(self) -> list[str | list[str]]:
        """The layer spec of each sequential stage (one stage unless ``layers`` is ``a+b...``)."""
        if isinstance(self.layers, list):
            return [list(self.layers)]
        return [part.strip() for part in self.layers.split("+")] if "+" in self.layers else [self.layers]


# ---------------------------------------------------------------------------------------------- loss


def _masked_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def layer_cosine(
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str = "auto",
    valid: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Mean cosine similarity of two activations of one layer (a scalar in [-1, 1]).

    Args:
        student: B x C x H x W (or B x C) activation that receives the gradient.
        teacher: Activation of the same shape (the target; detach it beforehand).
        reduction: ``pixel``, ``sample`` or ``auto`` (see :class:`KdSettings`).
        valid: Optional B x H0 x W0 bool map of pixels that count, at any resolution (resampled to
            the activation's by area: a position counts when at least half of it is valid).
        eps: Floor of each vector norm; a zero vector gives a cosine of 0 (and no NaN).

    Raises:
        ConfigError: Shapes differ or the reduction is unknown.
    """
    if student.shape != teacher.shape:
        raise ConfigError(f"student activation {tuple(student.shape)} and teacher activation {tuple(teacher.shape)} differ")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction={reduction!r}; expected one of {list(REDUCTIONS)}")
    student, teacher = student.float(), teacher.float()
    spatial = student.dim() == 4
    if reduction == "auto":
        reduction = "sample" if student.shape[1] == 1 else "pixel"
    weight = None
    if valid is not None and spatial:
        share = F.interpolate(valid[:, None].float(), size=student.shape[-2:], mode="area")
        weight = (share >= 0.5).float()  # B x 1 x h x w
    if reduction == "pixel" or not spatial:
        dot = (student * teacher).sum(dim=1)
        norms = student.norm(dim=1).clamp(min=eps) * teacher.norm(dim=1).clamp(min=eps)
        return _masked_mean(dot / norms, weight[:, 0] if weight is not None else None)
    if weight is not None:  # per sample: zero out invalid positions in both maps before flattening
        student, teacher = student * weight, teacher * weight
    flat_s, flat_t = student.flatten(1), teacher.flatten(1)
    cosine = (flat_s * flat_t).sum(1) / (flat_s.norm(dim=1).clamp(min=eps) * flat_t.norm(dim=1).clamp(min=eps))
    if weight is not None:
        has_valid = (weight.flatten(1).sum(1) > 0).float()
        return _masked_mean(cosine, has_valid)
    return cosine.mean()


def reconstruction_loss(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    layers: Sequence[str],
    reduction: str = "auto",
    valid: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The paper's Eq. 2: ``1 - mean_l cos(student_l, teacher_l)``, with the cosine of each layer.

    Returns:
        (loss, {layer: mean cosine}); the cosines keep their graph.
    """
    if not layers:
        raise ConfigError("reconstruction_loss: no layers to match")
    cosines = {name: layer_cosine(student[name], teacher[name], reduction, valid, eps) for name in layers}
    return 1.0 - torch.stack(list(cosines.values())).mean(), cosines


# ---------------------------------------------------------------------------------------------- helpers


def default_switch_epochs(stages: int, epochs: int) -> list[int]:
    """Equal shares: stage ``k`` of ``stages`` starts at ``ceil(k * epochs / stages)``."""
    return [math.ceil(k * epochs / stages) for k in range(1, stages)]


def reachable_parameters(model: nn.Module, taps: Sequence[str], input_shape: Sequence[int], pre_activation: bool = False) -> set[str]:
    """Names of the parameters that the given taps depend on (structurally, through autograd).

    One forward on zeros in eval mode (no statistics updated), then ``autograd.grad`` with
    ``allow_unused``: a parameter outside every tap's graph gets ``None``.
    """
    module = unwrap(model)
    modes = {sub: sub.training for sub in module.modules()}
    reference = next(module.parameters())
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    try:
        module.eval()
        with torch.enable_grad(), FeatureTaps(module, taps, pre_activation=pre_activation) as tapped:
            module(torch.zeros(1, *input_shape, device=reference.device, dtype=reference.dtype))
            total = sum(tapped[name].float().sum() for name in tapped.names)
            grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
    finally:
        for sub, mode in modes.items():
            sub.training = mode
    return {name for (name, _), grad in zip(named, grads) if grad is not None}


def unreachable_norms(model: nn.Module, reachable: set[str]) -> list[nn.Module]:
    """Normalisation layers whose affine parameters lie outside ``reachable`` (kept in eval mode)."""
    module = unwrap(model)
    owner = {id(p): name for name, p in module.named_parameters()}
    return [
        sub
        for sub in module.modules()
        if isinstance(sub, nn.modules.batchnorm._BatchNorm)
        and sub.weight is not None
        and owner.get(id(sub.weight)) not in reachable
    ]


def _zero_tie(output: Any) -> torch.Tensor | float:
    """0 x (sum of every output tensor): lets DDP see every parameter in every step."""
    if isinstance(output, torch.Tensor):
        return output.float().sum() * 0.0
    if isinstance(output, (tuple, list)):
        return sum((_zero_tie(item) for item in output), 0.0)
    if isinstance(output, dict):
        return sum((_zero_tie(item) for item in output.values()), 0.0)
    return 0.0


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


# ---------------------------------------------------------------------------------------------- method


@register_method
class KnowledgeDistillation(Method):
    """Phase 2 of the kd pipeline: a SAR student reconstructs a frozen optical teacher's activations."""

    name = "kd"
    Settings = KdSettings
    metric = "val/iou"
    metric_mode = "max"
    required_fields: ClassVar[tuple[str, ...]] = ("sar", "optical")

    def __init__(self, settings: KdSettings, model: ModelSettings, optim, data: DataSpec) -> None:
        super().__init__(settings, model, optim, data)
        self.stage_specs = settings.stage_specs()
        explicit = settings.switch_epochs is not None
        self.switch_epochs = list(settings.switch_epochs) if explicit else default_switch_epochs(len(self.stage_specs), optim.epochs)
        if explicit and self.switch_epochs and self.switch_epochs[-1] >= optim.epochs:
            raise ConfigError(
                f"method_settings.switch_epochs={self.switch_epochs}: the last stage would never train "
                f"with train.epochs={optim.epochs}"
            )
        self.epochs_done = 0

    # -- set-up ------------------------------------------------------------------------------------------
    def _channels(self, modality: str) -> int:
        return {"sar": self.data.sar_channels, "optical": self.data.optical_channels}.get(
            modality, self.data.sar_channels + self.data.optical_channels
        )

    def setup(self, context: MethodContext) -> None:
        self.context = context
        settings = self.settings
        if settings.teacher not in context.inputs:
            raise ConfigError(
                f"method_settings.teacher={settings.teacher!r}: no such input checkpoint; give the phase "
                f"'inputs: {{{settings.teacher}: <teacher phase or checkpoint folder>}}' (inputs available: {sorted(context.inputs)})"
            )
        teacher, saved = rebuild_export(context.inputs[settings.teacher], settings.teacher_export)
        if saved.get("classification"):
            raise ConfigError(f"input {settings.teacher!r}: its export {settings.teacher_export!r} is a scene classifier, not a segmenter")
        teacher_model = ModelSettings(**saved["model"])
        if teacher_model != self.model_settings:
            # The paper's Siamese set-up: the student has the teacher's architecture.
            raise ConfigError(
                f"model: the reconstruct phase's model {self.model_settings} differs from the teacher's "
                f"{teacher_model}; student and teacher must share the architecture"
            )
        self.teacher_input = settings.teacher_input or saved["modality"]
        if saved["in_channels"] != self._channels(self.teacher_input):
            raise ConfigError(
                f"input {settings.teacher!r}: the teacher expects {saved['in_channels']} channels, the data's "
                f"{self.teacher_input} has {self._channels(self.teacher_input)}"
            )
        self.classes = int(saved["classes"])
        self.teacher = teacher.to(context.device).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)

        torch.manual_seed(self.optim.seed)
        student = build_network(self.model_settings, self._channels(settings.student_input), self.classes)
        if settings.init_from_teacher:
            report = copy_matching_weights(self.teacher, student, adapt_first_conv=settings.first_conv)
            context.log(
                f"student initialised from {settings.teacher}/{settings.teacher_export}: {len(report['copied'])} tensors "
                f"copied, adapted ({settings.first_conv}) {report['adapted'] or 'none'}, left random {report['skipped'] or 'none'}"
            )
        self.stage_layers = [layer_set(student, spec) for spec in self.stage_specs]
        shape = (self._channels(settings.student_input), self.data.tile_size, self.data.tile_size)
        self.stage_reachable = [reachable_parameters(student, layers, shape, settings.pre_activation) for layers in self.stage_layers]
        self.stage_frozen_norms = [unreachable_norms(student, reachable) for reachable in self.stage_reachable]
        # Parameters no output depends on (smp keeps e.g. ResNet layer3/4 at encoder_depth 3) would
        # stall DDP's gradient reduction: take them out of training altogether.
        used = reachable_parameters(student, layer_set(student, "fin"), shape)
        for name, parameter in student.named_parameters():
            if name not in used:
                parameter.requires_grad_(False)
        if len(self.stage_specs) > 1 and self.switch_epochs[-1] >= self.optim.epochs:
            context.log(f"warning: with train.epochs={self.optim.epochs} the stage {self.stage_specs[-1]!r} never trains")
        self.student = context.prepare_module(student)
        self.optimizer = build_optimizer(self.student.parameters(), self.optim)
        self.scheduler = build_scheduler(self.optimizer, self.optim, context.steps_per_epoch)
        context.log(f"matching layers {self.describe_stages()} with reduction {settings.reduction!r}")

    def describe_stages(self) -> str:
        """Human-readable stages, e.g. ``['encoder.out'] until epoch 75, then ['logits']``."""
        parts = []
        for index, layers in enumerate(self.stage_layers):
            until = f" until epoch {self.switch_epochs[index]}" if index < len(self.switch_epochs) else ""
            parts.append(f"{layers}{until}")
        return ", then ".join(parts)

    # -- stages --------------------------------------------------------------------------------------------
    def stage_index(self, epochs_done: int | None = None) -> int:
        """Index of the sequential stage in force after ``epochs_done`` finished epochs."""
        done = self.epochs_done if epochs_done is None else epochs_done
        return sum(done >= switch for switch in self.switch_epochs)

    def active_layers(self) -> list[str]:
        """Tap names matched in the current epoch."""
        return self.stage_layers[self.stage_index()]

    def end_epoch(self, epoch: int) -> dict[str, float]:
        before = self.stage_index()
        self.epochs_done = epoch + 1
        if self.stage_index() != before and hasattr(self, "context"):
            self.context.log(f"epoch {self.epochs_done}: now matching {self.active_layers()}")
        return {"stage": float(self.stage_index())}

    # -- steps -----------------------------------------------------------------------------------------------
    def _valid(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not self.settings.ignore_invalid:
            return None
        _, student_valid = select_input(batch, self.settings.student_input)
        _, teacher_valid = select_input(batch, self.teacher_input)
        return student_valid & teacher_valid

    @torch.no_grad()
    def teacher_features(self, batch: dict[str, torch.Tensor], layers: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The frozen teacher's activations of ``layers`` (and its logits) on the aligned optical input."""
        self.teacher.eval()
        image, _ = select_input(batch, self.teacher_input)
        with FeatureTaps(self.teacher, layers, detach=True, pre_activation=self.settings.pre_activation) as taps:
            logits = _first_output(self.teacher(image))
            return {name: taps[name] for name in layers}, logits

    def _set_train_mode(self, stage: int) -> None:
        self.student.train()  # the DDP wrapper too, not only the module inside
        for module in self.stage_frozen_norms[stage]:
            module.eval()  # BatchNorm the loss cannot reach keeps the teacher's statistics

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        stage = self.stage_index()
        layers, reachable = self.stage_layers[stage], self.stage_reachable[stage]
        self._set_train_mode(stage)
        targets, _ = self.teacher_features(batch, layers)
        image, _ = select_input(batch, self.settings.student_input)
        with FeatureTaps(self.student, layers, pre_activation=self.settings.pre_activation) as taps:
            output = self.student(image)
            features = {name: taps[name] for name in layers}
        loss, cosines = reconstruction_loss(features, targets, layers, self.settings.reduction, self._valid(batch), self.settings.eps)
        self.optimizer.zero_grad(set_to_none=True)
        (loss + _zero_tie(output)).backward()
        for name, parameter in unwrap(self.student).named_parameters():
            if name not in reachable:
                parameter.grad = None  # outside the loss: no update, no weight decay, no momentum
        if self.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.student.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        logs = {"loss": float(loss.detach()), "lr": self.optimizer.param_groups[0]["lr"]}
        logs.update({f"cosine/{name}": float(value.detach()) for name, value in cosines.items()})
        return logs

    # -- evaluation ------------------------------------------------------------------------------------------
    def _meter(self) -> SegmentationMeter:
        num_classes = 2 if self.classes == 1 else self.classes
        names = list(self.data.class_names) if len(self.data.class_names) == num_classes else [f"class{i}" for i in range(num_classes)]
        return SegmentationMeter(num_classes, names, self.data.ignore_index)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        """The student used as is ("none"): its SAR segmentation metrics, plus reconstruction quality.

        Metrics: the SegmentationMeter's (``iou``, ``miou``, ``f1``...) for the student on its own
        input, ``loss`` (Eq. 2 over the current stage's layers), ``cosine/<tap>`` for every layer
        of every stage, and ``teacher/iou`` (the teacher on its aligned input, for reference).
        Segmentation metrics need a mask layer; without one only the reconstruction is reported.
        """
        student = unwrap(self.student)
        student.eval()
        all_layers = list(dict.fromkeys(name for layers in self.stage_layers for name in layers))
        current = self.active_layers()
        meter, teacher_meter = self._meter(), self._meter()
        sums: dict[str, float] = {name: 0.0 for name in all_layers}
        loss_sum, samples, has_mask = 0.0, 0, False
        for batch in batches:
            targets, teacher_logits = self.teacher_features(batch, all_layers)
            image, valid = select_input(batch, self.settings.student_input)
            with FeatureTaps(student, all_layers, detach=True, pre_activation=self.settings.pre_activation) as taps:
                logits = _first_output(student(image))
                features = {name: taps[name] for name in all_layers}
            size = image.shape[0]
            both_valid = self._valid(batch)
            for name in all_layers:
                sums[name] += float(layer_cosine(features[name], targets[name], self.settings.reduction, both_valid, self.settings.eps)) * size
            loss, _ = reconstruction_loss(features, targets, current, self.settings.reduction, both_valid, self.settings.eps)
            loss_sum += float(loss) * size
            samples += size
            if "mask" in batch:
                has_mask = True
                meter.update(predict_classes(logits), gate_labels(batch["mask"].long(), valid, self.data.ignore_index))
                _, teacher_valid = select_input(batch, self.teacher_input)
                teacher_target = gate_labels(batch["mask"].long(), teacher_valid, self.data.ignore_index)
                teacher_meter.update(predict_classes(teacher_logits), teacher_target)
        metrics: dict[str, float] = {}
        per_class: dict[str, dict[str, float]] = {}
        if has_mask:
            metrics, per_class = meter.compute()
            teacher_metrics, _ = teacher_meter.compute()
            metrics["teacher/iou" if "iou" in teacher_metrics else "teacher/miou"] = teacher_metrics.get("iou", teacher_metrics["miou"])
        metrics["loss"] = loss_sum / max(samples, 1)
        metrics.update({f"cosine/{name}": value / max(samples, 1) for name, value in sums.items()})
        return EvalResult(metrics=metrics, per_class=per_class)

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "student": unwrap(self.student).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epochs_done": self.epochs_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.student).load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epochs_done = int(state.get("epochs_done", 0))

    def exports(self) -> dict[str, Export]:
        """``model``: the student (what Ft-D / Ft-A phases start from with ``init_export: model``)."""
        return {
            "model": Export(
                module=unwrap(self.student),
                in_channels=self._channels(self.settings.student_input),
                classes=self.classes,
                model=self.model_settings,
                modality=self.settings.student_input,
            )
        }

    # -- report --------------------------------------------------------------------------------------------------
    @classmethod
    def report_cell(cls, run: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
        """Where a run of a kd chain goes in :data:`PAPER_TABLE` (row key, column key), or None.

        Used by :mod:`xmodal.engine.report`. See :func:`classify_run`.
        """
        return classify_run(run, runs)


# ---------------------------------------------------------------------------------------------- paper table

# Columns of Table 2: architecture + the encoder names that stand for the paper's backbone.
_COLUMNS = [
    ("unet-mobilenetv2", "UNet MobileNetV2", "unet", ("mobilenet_v2",)),
    ("unet-vgg19", "UNet VGG19", "unet", ("vgg19_bn", "vgg19")),
    ("unet-xception", "UNet Xception", "unet", ("xception", "tu-xception41", "tu-xception65", "tu-xception71", "tu-legacy_xception")),
    ("pspnet", "PSPNet (vanilla enc.)", "pspnet", None),  # the paper's 800K-parameter "vanilla encoder": any encoder
    ("segnet-vgg19", "SegNet VGG19", "segnet", ("vgg19_bn", "vgg19")),
    ("deeplabv3plus-xception", "DeepLabV3+ Xception", "deeplabv3plus", ("tu-xception65", "tu-xception41", "tu-xception71")),
    ("deeplabv3plus-resnet50", "DeepLabV3+ ResNet50", "deeplabv3plus", ("resnet50",)),
]
_ROWS = [
    ("optical", "Optical"),
    ("sar", "SAR"),
    ("mid", "Mid"),
    ("mid/ft_d", "Mid+Ft-D"),
    ("mid/ft_a", "Mid+Ft-A"),
    ("fin", "Fin"),
    ("fin/ft_d", "Fin+Ft-D"),
    ("fin/ft_a", "Fin+Ft-A"),
    ("mid+fin", "M&F"),
    ("mid+fin/ft_d", "M&F+Ft-D"),
    ("mid+fin/ft_a", "M&F+Ft-A"),
    ("int", "Int"),
    ("int/ft_d", "Int+Ft-D"),
    ("int/ft_a", "Int+Ft-A"),
]
_N = None  # "-": finetuning not run in the paper (pretrained IoU below 25 %)
_PAPER_IOU = {  # Table 2, test IoU in %, columns in _COLUMNS order
    "optical": (54.2, 66.51, 73.59, 76.39, 62.03, 42.07, 59.69),
    "sar": (32.83, 25.09, 48.61, 35.43, 31.37, 28.92, 34.33),
    "mid": (12.17, 8.67, 11.79, 5.41, 8.88, 12.78, 14.79),
    "mid/ft_d": (36.3, _N, 42.39, 30.26, _N, 26.66, 34.32),
    "mid/ft_a": (36.07, _N, 43.85, 31.86, _N, 32.2, 43.04),
    "fin": (21.06, 27.5, 39.67, 25.88, 17.54, 19.86, 30.38),
    "fin/ft_d": (31.98, 37.69, 48.16, 35.62, _N, 22.96, 38.77),
    "fin/ft_a": (33.96, 40.72, 50.23, 37.76, _N, 28.72, 40.34),
    "mid+fin": (29.14, 22.72, 42.54, 34.46, 24.97, 18.45, 32.39),
    "mid+fin/ft_d": (38.44, 32.99, 48.72, 36.44, _N, 26.3, 32.39),
    "mid+fin/ft_a": (37.72, 42.66, 53.27, 37.56, _N, 31.95, 42.33),
    "int": (30.41, 32.14, 41.14, 26.63, 29.87, 21.05, 35.06),
    "int/ft_d": (34.58, 33.33, 53.45, 32.51, 35.85, 24.74, 40.69),
    "int/ft_a": (37.99, 46.09, 53.45, 29.88, 42.73, 32.96, 42.73),
}

PAPER_TABLE: dict[str, Any] = {
    "key": "kd-table2",
    "title": "Cross-modal KD (paper 000), Table 2: test IoU (%) per architecture",
    "metric": "test/iou",
    "scale": 100.0,
    "rows": [{"key": key, "label": label} for key, label in _ROWS],
    "columns": [
        {"key": key, "label": label, "arch": arch, "encoders": list(encoders) if encoders else None}
        for key, label, arch, encoders in _COLUMNS
    ],
    "paper": {row: {col[0]: value for col, value in zip(_COLUMNS, values)} for row, values in _PAPER_IOU.items()},
    "paper_mean_column": True,
    "notes": [
        "Paper: SpaceNet 6 (Rotterdam, 0.5 m, quad-pol X-band SAR + RGB), random 90/5/5 split; ours: the data of each run.",
        "Rows: Mid = encoder output, Fin = logits, M&F = Mid then Fin, Int = six layers; -D / -A = finetune decoder / all; "
        "'-' = not run in the paper (pretrained IoU < 25 %).",
        "The paper's Table 2 header says DeepLabV3 while its Table 1 and text say DeepLabV3+; its text gives the SAR "
        "baseline range as '25.09 (UNet with MobileNetV2)' while the table puts 25.09 under UNet VGG19 (the table is used).",
        "PSPNet's paper encoder is an 800K-parameter 'vanilla encoder'; any PSPNet encoder is reported in that column.",
    ],
}

_LAYER_TOKENS = {"mid": "mid", "fin": "fin", "int": "int", "mf": "mid+fin", "m&f": "mid+fin", "midfin": "mid+fin", "mid+fin": "mid+fin"}


def column_of(model: dict[str, Any]) -> str:
    """The Table 2 column of a run's model section (``arch:encoder`` when it is not a paper column)."""
    # Architecture names as the factory matches them: "DeepLabV3+" == "deeplabv3plus" == "deeplab_v3_plus".
    arch = re.sub(r"[-_ ]", "", str(model.get("arch") or "").lower().replace("+", "plus"))
    encoder = model.get("encoder")
    for key, _, column_arch, encoders in _COLUMNS:
        if arch == column_arch and (encoders is None or encoder in encoders):
            return key
    return f"{arch}:{encoder}"


def _layer_row(layers: Any) -> str:
    if isinstance(layers, str) and layers in PAPER_LAYER_SETS:
        return layers
    text = "+".join(layers) if isinstance(layers, list) else str(layers)
    return f"layers[{text}]"


def _phase(run: dict[str, Any]) -> tuple[str, str]:
    name = str(run.get("name", ""))
    prefix, _, phase = name.rpartition("/")
    return prefix, phase


def _source_kd_run(run: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The kd run a finetuning run started from: by recorded input path, phase name, or uniqueness."""
    prefix, phase = _phase(run)
    kd_runs = [r for r in runs if r.get("method") == "kd"]
    init = (run.get("method_settings") or {}).get("init")
    recorded = (run.get("inputs") or {}).get(init) if init else None
    if recorded:  # the engine records input checkpoint paths (when it does)
        for candidate in kd_runs:
            checkpoint = candidate.get("checkpoint")
            if checkpoint and (str(recorded).rstrip("/") == str(checkpoint).rstrip("/") or str(recorded).startswith(str(Path(checkpoint).parent))):
                return candidate
    siblings = [r for r in kd_runs if _phase(r)[0] == prefix]
    tokens = [t for t in re.split(r"[^a-z0-9&+]+", phase.lower()) if t]
    wanted = next((_LAYER_TOKENS[t] for t in tokens if t in _LAYER_TOKENS), None)
    column = column_of(run.get("model") or {})
    same_column = [r for r in siblings if column_of(r.get("model") or {}) == column]
    if wanted is not None:
        for candidate in same_column:
            if (candidate.get("method_settings") or {}).get("layers") == wanted:
                return candidate
    return same_column[0] if len(same_column) == 1 else None


def classify_run(run: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(row, column) of a run in Table 2; label fractions below 1 get their own rows (``row@0.05``)."""
    method, settings = run.get("method"), run.get("method_settings") or {}
    column = column_of(run.get("model") or {})
    if method == "kd":
        row = _layer_row(settings.get("layers"))
    elif method == "supervised" and settings.get("task", "segmentation") == "segmentation":
        modality = settings.get("input")
        if settings.get("init") is None:
            if modality not in ("optical", "sar"):
                return None
            row = modality
        else:
            source = _source_kd_run(run, runs)
            if source is None or modality != "sar":
                return None
            stage = "ft_d" if settings.get("freeze_encoder") else "ft_a"
            row = f"{_layer_row((source.get('method_settings') or {}).get('layers'))}/{stage}"
    else:
        return None
    fraction = (run.get("data") or {}).get("label_fraction", 1.0)
    if fraction is not None and fraction < 1.0:
        row = f"{row}@{fraction:g}"
    return row, column
