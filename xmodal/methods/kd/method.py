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

Model selection is label-free: the reconstruction phase keeps the epoch with the lowest
validation loss (Eq. 2 over the last stage's layers, so epochs of a sequential M&F run are compared
on the objective they end with), or the last epoch with ``run.select: last``. The student's IoU on
validation is reported but never selects.

Choices the paper leaves open (all settings, see :class:`KdSettings`):

* Which axis the cosine runs over. ``pixel``: per spatial position over channels, averaged over
  positions and samples. ``sample``: per sample over the flattened (C x H x W) activation. A
  per-pixel cosine of a 1-channel map (binary logits, the ``fin`` layer) is ``sign(s) * sign(t)``:
  +-1 with zero gradient almost everywhere, so it cannot train anything. The default ``auto``
  therefore uses ``sample`` for 1-channel maps and ``pixel`` otherwise. A teacher trained with the
  paper's two-channel softmax head (``binary_head: softmax`` of the supervised method, the kd
  configs' default) has 2-channel logits, so ``fin`` is a per-pixel cosine over the classes.
* First convolution. The student reads SAR (2 or 4 polarisations), the teacher optical (4 or 13
  bands): every weight whose shape matches is copied; a first convolution that differs only in
  input channels is adapted by :func:`~xmodal.models.factory.copy_matching_weights`
  (``first_conv: mean_tile``: the teacher kernel averaged over its input bands, tiled to the SAR
  channel count and rescaled by ``teacher_in / student_in`` so activations keep their scale; with
  equal channel counts, e.g. SpaceNet 6's 4 polarisations vs RGBN, it is copied as is).
* Dead activations. A tapped map that ends in a ReLU can be all-zero for a sample or pixel: the
  cosine is then 0 with no gradient. ``pre_activation: true`` compares the inputs of those ReLUs
  instead (same layers, negative part kept).
* ``mid+fin`` ("M&F"): sequential, ``mid`` for the first part of the epochs, then ``fin`` with the
  encoder frozen (the paper: like Mid + Ft-D, with the teacher's logits as pseudo-labels); any
  ``a+b[+c...]`` of layer sets or tap names works the same way, switching at ``switch_epochs``
  (default: equal shares, the first stage getting the extra epoch of an odd count: the paper gives
  no split), freezing the encoder per stage as ``stage_freeze_encoder`` says.
* Layers downstream of every chosen tap (e.g. the decoder for ``mid``) get no gradient: their
  weights stay the teacher's, and their BatchNorm layers are kept in eval mode so SAR statistics
  do not leak into layers the loss does not train (as a Keras model whose outputs are the chosen
  layers would behave). Under DDP they still take part in every step through a zero-weighted term,
  so DDP's reducer sees every parameter, and their (zero) gradients are dropped before the step.
* Pixels where either modality has no data are left out of the cosine (``ignore_invalid``), at
  the resolution of each layer (area share of valid input pixels >= 0.5).

Paper settings: SGD lr 0.1, momentum 0.9, batch 32 (``data.batch_scope: global`` in the kd
configs), 150 reconstruction epochs (300 for the baselines, 30 for finetuning); the supervised
phases use binary cross-entropy on softmax predictions (``dice_weight: 0``). :mod:`xmodal.methods.kd.paper` holds the paper's Table 2 for ``xmodal report``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.losses import REDUCTIONS, layer_cosine, predict_classes, reconstruction_loss
from xmodal.methods.base import DataNeeds, DataSpec, EvalResult, InputSpec, Method, MethodContext, MetricSpec, ModelSettings
from xmodal.methods.exports import rebuild_export
from xmodal.methods.inputs import INPUTS, gate_labels, select_input
from xmodal.methods.kd.paper import PAPER_TABLE, classify_run, report_notes
from xmodal.methods.metrics import MeanMeter, SegmentationMeter
from xmodal.methods.registry import register_method
from xmodal.models import FIRST_CONV_MODES, FeatureTaps, build_network, copy_matching_weights, layer_set, recipe_of, unwrap_model


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
            stage ``k`` of ``n`` starting at ``ceil(k * epochs / n)`` (the paper gives no split).
        stage_freeze_encoder: Per sequential stage, whether the student's encoder (weights and
            BatchNorm statistics) is frozen in it. ``None``: the paper's M&F for ``mid+fin`` (the
            encoder learns in ``mid``, then only the decoder and head learn the teacher's logits,
            like Mid + Ft-D on pseudo-labels), nothing frozen otherwise.
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
    stage_freeze_encoder: list[bool] | None = None
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
        if self.stage_freeze_encoder is not None and len(self.stage_freeze_encoder) != stages:
            raise ConfigError(
                f"method_settings.stage_freeze_encoder={self.stage_freeze_encoder}: layers={self.layers!r} has "
                f"{stages} stage(s), so expected {stages} value(s)"
            )
        if self.eps <= 0:
            raise ConfigError(f"method_settings.eps={self.eps}; expected > 0")

    def stage_specs(self) -> list[str | list[str]]:
        """The layer spec of each sequential stage (one stage unless ``layers`` is ``a+b...``)."""
        if isinstance(self.layers, list):
            return [list(self.layers)]
        return [part.strip() for part in self.layers.split("+")] if "+" in self.layers else [self.layers]

    def frozen_encoder_stages(self) -> list[bool]:
        """Whether each stage freezes the encoder (``stage_freeze_encoder`` or the M&F default)."""
        if self.stage_freeze_encoder is not None:
            return list(self.stage_freeze_encoder)
        specs = self.stage_specs()
        return [False, True] if specs == ["mid", "fin"] else [False] * len(specs)


# ---------------------------------------------------------------------------------------------- helpers


def default_switch_epochs(stages: int, epochs: int) -> list[int]:
    """Equal shares: stage ``k`` of ``stages`` starts at ``ceil(k * epochs / stages)``."""
    return [math.ceil(k * epochs / stages) for k in range(1, stages)]


def reachable_parameters(model: nn.Module, taps: Sequence[str], input_shape: Sequence[int], pre_activation: bool = False) -> set[str]:
    """Names of the parameters that the given taps depend on (structurally, through autograd).

    One forward on zeros in eval mode (no statistics updated), then ``autograd.grad`` with
    ``allow_unused``: a parameter outside every tap's graph gets ``None``.
    """
    module = unwrap_model(model)
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
    module = unwrap_model(model)
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


def _architecture(recipe: dict[str, Any]) -> dict[str, Any]:
    """A segmenter recipe without what may differ between teacher and student (input channels)."""
    return {k: v for k, v in recipe["kwargs"].items() if k != "in_channels"} | {"builder": recipe["builder"]}


# ---------------------------------------------------------------------------------------------- method


@register_method
class KnowledgeDistillation(Method):
    """Phase 2 of the kd pipeline: a SAR student reconstructs a frozen optical teacher's activations."""

    name = "kd"
    Settings = KdSettings
    paper_tables = (PAPER_TABLE,)

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

    # -- declarations ------------------------------------------------------------------------------
    @classmethod
    def needs(cls, settings: KdSettings) -> DataNeeds:
        # Reconstruction needs no labels; the mask (when the data has one) only reports the student's IoU.
        return DataNeeds(fields=("sar", "optical"), unlabelled=True)

    @classmethod
    def metrics(cls, settings: KdSettings, data: DataSpec | None = None) -> MetricSpec:
        return MetricSpec("val/loss", "min", labelled=False, report=("test/iou", "test/f1", "test/loss"))

    @classmethod
    def required_inputs(cls, settings: KdSettings) -> dict[str, InputSpec]:
        return {settings.teacher: InputSpec(export=settings.teacher_export, builder="segmenter", modality=settings.teacher_input or "optical", description="the trained teacher")}

    @classmethod
    def report_cell(cls, table: dict[str, Any], run: dict[str, Any], runs: list[dict[str, Any]]) -> tuple[str, str] | None:
        return classify_run(run, runs)

    @classmethod
    def report_notes(cls, table: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
        return report_notes(runs)

    # -- set-up ------------------------------------------------------------------------------------
    def setup(self, context: MethodContext) -> None:
        self.context = context
        settings = self.settings
        if settings.teacher not in context.inputs:
            raise ConfigError(
                f"method_settings.teacher={settings.teacher!r}: no such input checkpoint; give the phase "
                f"'inputs: {{{settings.teacher}: <teacher phase or checkpoint folder>}}' (inputs available: {sorted(context.inputs)})"
            )
        teacher, saved = rebuild_export(context.inputs[settings.teacher], settings.teacher_export)
        if saved["recipe"]["builder"] != "segmenter":
            raise ConfigError(f"input {settings.teacher!r}: its export {settings.teacher_export!r} is a {saved['recipe']['builder']}, not a segmenter")
        self.teacher_input = settings.teacher_input or saved["modality"]
        teacher_channels = saved["recipe"]["kwargs"]["in_channels"]
        if teacher_channels != self.data.channels(self.teacher_input):
            raise ConfigError(
                f"input {settings.teacher!r}: the teacher expects {teacher_channels} channels, the data's "
                f"{self.teacher_input} has {self.data.channels(self.teacher_input)}"
            )
        self.classes = int(saved["recipe"]["kwargs"]["classes"])
        self.teacher = teacher.to(context.device).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)

        torch.manual_seed(self.optim.seed)
        student_channels = self.data.channels(settings.student_input)
        student = build_network("segmenter", **self.model_settings.segmenter_kwargs(student_channels, self.classes))
        if _architecture(recipe_of(student)) != _architecture(saved["recipe"]):
            # The paper's Siamese set-up: the student has the teacher's architecture.
            raise ConfigError(
                f"model: the reconstruct phase's model {_architecture(recipe_of(student))} differs from the teacher's "
                f"{_architecture(saved['recipe'])}; student and teacher must share the architecture"
            )
        if settings.init_from_teacher:
            report = copy_matching_weights(self.teacher, student, adapt_first_conv=settings.first_conv)
            context.log(
                f"student initialised from {settings.teacher}/{settings.teacher_export}: {len(report['copied'])} tensors "
                f"copied, adapted ({settings.first_conv}) {report['adapted'] or 'none'}, left random {report['skipped'] or 'none'}"
            )
        self.stage_layers = [layer_set(student, spec) for spec in self.stage_specs]
        shape = (student_channels, self.data.tile_size, self.data.tile_size)
        self.stage_reachable = [reachable_parameters(student, layers, shape, settings.pre_activation) for layers in self.stage_layers]
        encoder_names = {f"encoder.{name}" for name, _ in student.encoder.named_parameters()}
        self.stage_frozen_encoder = settings.frozen_encoder_stages()
        for index, frozen in enumerate(self.stage_frozen_encoder):
            if frozen:
                self.stage_reachable[index] -= encoder_names
                if not self.stage_reachable[index]:
                    raise ConfigError(
                        f"method_settings.stage_freeze_encoder: stage {index} ({self.stage_specs[index]!r}) only reaches "
                        "encoder parameters; with the encoder frozen nothing would train"
                    )
        self.stage_frozen_norms = [unreachable_norms(student, reachable) for reachable in self.stage_reachable]
        # Parameters no output depends on (smp keeps e.g. ResNet layer3/4 at encoder_depth 3) would
        # stall DDP's gradient reduction: take them out of training altogether.
        used = reachable_parameters(student, layer_set(student, "fin"), shape)
        for name, parameter in student.named_parameters():
            if name not in used:
                parameter.requires_grad_(False)
        if len(self.stage_specs) > 1 and self.switch_epochs[-1] >= self.optim.epochs:
            context.log(f"warning: with train.epochs={self.optim.epochs} the stage {self.stage_specs[-1]!r} never trains")
        self.student = self.add_network("model", student, modality=settings.student_input, description="kd student")
        self.main = self.add_optimizer("main", self.student.parameters())
        context.log(f"matching layers {self.describe_stages()} with reduction {settings.reduction!r}")

    def describe_stages(self) -> str:
        """Human-readable stages, e.g. ``['encoder.out'] until epoch 75, then ['logits']``."""
        parts = []
        for index, layers in enumerate(self.stage_layers):
            until = f" until epoch {self.switch_epochs[index]}" if index < len(self.switch_epochs) else ""
            frozen = " (encoder frozen)" if self.stage_frozen_encoder[index] else ""
            parts.append(f"{layers}{frozen}{until}")
        return ", then ".join(parts)

    # -- stages ------------------------------------------------------------------------------------
    def stage_index(self, epochs_done: int | None = None) -> int:
        """Index of the sequential stage in force after ``epochs_done`` finished epochs."""
        done = self.epochs_done if epochs_done is None else epochs_done
        return sum(done >= switch for switch in self.switch_epochs)

    def active_layers(self) -> list[str]:
        """Tap names matched in the current epoch."""
        return self.stage_layers[self.stage_index()]

    def end_epoch(self, epoch: int, val_metrics: dict[str, float]) -> dict[str, float]:
        before = self.stage_index()
        self.epochs_done = epoch + 1
        if self.stage_index() != before:
            self.context.log(f"epoch {self.epochs_done}: now matching {self.active_layers()}")
        return {"stage": float(self.stage_index())}

    def extra_state(self) -> dict[str, Any]:
        return {"epochs_done": self.epochs_done}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.epochs_done = int(state.get("epochs_done", 0))

    # -- steps -------------------------------------------------------------------------------------
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

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        stage = self.stage_index()
        layers, reachable = self.stage_layers[stage], self.stage_reachable[stage]
        self._set_train_mode(stage)
        targets, _ = self.teacher_features(batch, layers)
        image, _ = select_input(batch, self.settings.student_input)
        with FeatureTaps(self.student, layers, pre_activation=self.settings.pre_activation) as taps:
            output = self.student(image)
            features = {name: taps[name] for name in layers}
        loss, cosines = reconstruction_loss(features, targets, layers, self.settings.reduction, self._valid(batch), self.settings.eps)
        self.main.backward(loss + _zero_tie(output))
        for name, parameter in self.network("model").named_parameters():
            if name not in reachable:
                parameter.grad = None  # outside the loss: no update, no weight decay, no momentum
        self.main.update()
        logs = {"loss": float(loss.detach()), "lr": self.main.lr}
        logs.update({f"cosine/{name}": float(value.detach()) for name, value in cosines.items()})
        return logs

    # -- evaluation --------------------------------------------------------------------------------
    def _meter(self) -> SegmentationMeter:
        num_classes = 2 if self.classes == 1 else self.classes
        names = list(self.data.class_names) if len(self.data.class_names) == num_classes else [f"class{i}" for i in range(num_classes)]
        return SegmentationMeter(num_classes, names, self.data.ignore_index)

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict[str, torch.Tensor]], panels: int = 0) -> EvalResult:
        """The student used as is ("none"): reconstruction quality, plus its SAR segmentation metrics.

        Metrics: ``loss`` (Eq. 2 over the last stage's layers: what selects checkpoints),
        ``loss/stage`` (over the current stage's layers), ``cosine/<tap>`` for every layer of every
        stage; with a mask layer, the SegmentationMeter's (``iou``, ``miou``, ``f1``...) for the
        student on its own input and ``teacher/iou`` (the teacher on its aligned input, for reference).
        """
        student = self.network("model")
        student.eval()
        all_layers = list(dict.fromkeys(name for layers in self.stage_layers for name in layers))
        meter, teacher_meter, cosines = self._meter(), self._meter(), MeanMeter()
        has_mask = self.data.mask_layer is not None
        for batch in batches:
            targets, teacher_logits = self.teacher_features(batch, all_layers)
            image, valid = select_input(batch, self.settings.student_input)
            with FeatureTaps(student, all_layers, detach=True, pre_activation=self.settings.pre_activation) as taps:
                logits = _first_output(student(image))
                features = {name: taps[name] for name in all_layers}
            both_valid = self._valid(batch)
            values = {name: layer_cosine(features[name], targets[name], self.settings.reduction, both_valid, self.settings.eps) for name in all_layers}
            cosines.update(values, weight=image.shape[0])
            if has_mask and "mask" in batch:
                meter.update(predict_classes(logits), gate_labels(batch["mask"].long(), valid, self.data.ignore_index))
                _, teacher_valid = select_input(batch, self.teacher_input)
                teacher_meter.update(predict_classes(teacher_logits), gate_labels(batch["mask"].long(), teacher_valid, self.data.ignore_index))
        mean_cosine = cosines.compute(self.context.all_reduce, keys=all_layers)
        metrics: dict[str, float] = {f"cosine/{name}": value for name, value in mean_cosine.items()}
        metrics["loss"] = 1.0 - sum(mean_cosine[n] for n in self.stage_layers[-1]) / len(self.stage_layers[-1])
        current = self.active_layers()
        metrics["loss/stage"] = 1.0 - sum(mean_cosine[n] for n in current) / len(current)
        per_class: dict[str, dict[str, float]] = {}
        if has_mask:
            segmentation, per_class = meter.compute(self.context.all_reduce)
            teacher_metrics, _ = teacher_meter.compute(self.context.all_reduce)
            metrics.update(segmentation)
            metrics["teacher/iou" if "iou" in teacher_metrics else "teacher/miou"] = teacher_metrics.get("iou", teacher_metrics["miou"])
        return EvalResult(metrics=metrics, per_class=per_class)
