"""Named feature taps: read a model's intermediate activations by a stable name.

Knowledge distillation (match a student's chosen activations to a frozen teacher's) and contrastive heads
on encoder features need to address layers by name, independently of how each architecture lays out
its modules. Every model built by :mod:`xmodal.models` exposes the same vocabulary:

==========================  ================================================================================
Tap name                    What it is
==========================  ================================================================================
``encoder.stage<k>``        The encoder's k-th feature map, at stride ``2**k`` (less in dilated encoders,
                            see below). ``stage0`` is listed only where it is a learned feature map:
                            smp's and timm's VGG-style encoders. For every other encoder, smp's
                            stage 0 is the raw input itself (no parameters, nothing to distil), so it is
                            not exposed. Transformer-style timm encoders have no stride-2 stage (smp
                            fills it with a 0-channel placeholder): that stage is not exposed either.
``encoder.out``             Alias of the deepest encoder stage: the encoder output, the paper's ``mid``.
``decoder.center``          Bottleneck block applied to ``encoder.out`` before the decoder blocks, when
                            the architecture has one (Unet/Unet++ with VGG encoders, MAnet's PAB).
``decoder.block<i>``        Decoder blocks in execution order (deep/coarse first), per architecture:

                            * Unet, Linknet, MAnet: ``decoder.blocks[i]`` (one upsampling stage each;
                              the last one is at input resolution).
                            * UnetPlusPlus: the top row of the nested decoder, ``decoder.blocks.x_0_<i>``
                              (the path that feeds the head); the inner nodes are reachable with
                              ``module:`` taps.
                            * FPN: block0..3 = pyramid levels P5, P4, P3, P2 (``decoder.p5`` ...
                              ``decoder.p2``); block4..7 = their segmentation branches
                              ``decoder.seg_blocks[0..3]`` (all at stride 4).
                            * PSPNet: block0 = pyramid pooling module (``decoder.psp``, input concatenated
                              with the four pooled branches); block1 = the fusing ``decoder.conv``.
                            * DeepLabV3: block0 = ASPP (``decoder.aspp``); block1 = the final
                              conv-BN-ReLU (``decoder.relu``, equal to ``decoder.out``).
                            * DeepLabV3Plus: block0 = ASPP + separable conv (``decoder.aspp``); block1 =
                              the 48-channel projection of the stride-4 encoder feature
                              (``decoder.block1``); block2 = the fused output (``decoder.block2``).
                            * PAN: block0 = feature pyramid attention (``decoder.fpa``), then the global
                              attention upsample blocks ``gau3``, ``gau2``, ``gau1`` that exist.
                            * SegNet: ``decoder.stages[i]``, each a max-unpooling followed by convolutions.
``decoder.out``             The decoder's output (what the segmentation head reads).
``logits``                  The segmentation head's output, the paper's ``fin`` (for a classifier, the
                            class scores).
``aux_logits``              smp's auxiliary classification head, when the model was built with one.
``pooled``                  Classifiers only: the globally pooled encoder feature vector.
``module:<path>``           Escape hatch: the output of any submodule by its dotted path (e.g.
                            ``module:encoder.layer2.0.conv1``). Not listed by :func:`list_taps`.
==========================  ================================================================================

Dilated encoders (DeepLabV3 at output stride 8, DeepLabV3Plus and PAN at 16) keep the resolution of
their last stages: there, ``encoder.stage4`` and ``encoder.stage5`` do not halve the resolution.

A tap captures the OUTPUT of its module. Most blocks end in a ReLU, so a tapped map is non-negative and
some of its channels can be all-zero (dead units); losses that compare such maps (e.g. cosine
similarity) must tolerate zero vectors. ``FeatureTaps(..., pre_activation=True)`` returns the tensor
that entered the block's final activation instead, where there is one (see :class:`FeatureTaps`).

Named layer sets (:func:`layer_set`), as used by the paper:

* ``mid`` = ``[encoder.out]``; ``fin`` = ``[logits]``.
* ``int`` = up to six intermediate layers: encoder stages other than ``encoder.out`` and decoder taps
  (``decoder.center`` and ``decoder.block*``), three of each; when one side has fewer candidates the
  other side makes up the difference; within a side, layers are spread evenly from the first to the
  last candidate (positions ``round(j * (n - 1) / (k - 1))``, halves rounded up). When stages and
  decoder taps give fewer than six (PSPNet at depth 3: two stages below ``encoder.out``, two decoder
  blocks), the residual blocks inside smp ResNet-style encoder stages join the encoder candidates
  (``module:encoder.layer<i>.<j>``, every block but a stage's last): PSPNet + ResNet-18 at depth 3
  then gets the paper's six (``stage1``, ``layer1.0``, ``stage2``, ``layer2.0``, both decoder
  blocks). Models still short of six get every candidate.
* ``all_encoder`` = every ``encoder.stage*``; ``all_decoder`` = ``decoder.center`` (if any) and every
  ``decoder.block*``.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from xmodal.errors import ConfigError

LAYER_SETS = ("mid", "fin", "int", "all_encoder", "all_decoder")
MODULE_TAP_PREFIX = "module:"
# How many layers the paper's "int" set holds, and how many of them it prefers on each side.
INT_SET_SIZE = 6
INT_SET_PER_SIDE = 3

# Activations whose input is the "pre-activation" of the block they close.
_ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
)


@dataclass(frozen=True)
class TapPoint:
    """Where a named tap reads its tensor.

    Attributes:
        module: Dotted path of the submodule whose output is captured, relative to the unwrapped model
            (``""`` is the model itself).
        index: Path into the module's output when it is a tuple/list (e.g. ``(3,)`` for the fourth
            feature map an encoder returns); empty when the output is the tensor itself.
    """

    module: str
    index: tuple[int, ...] = ()


def unwrap_model(model: Any) -> nn.Module:
    """Return the user model inside DistributedDataParallel / DataParallel / torch.compile wrappers.

    Any object exposing the wrapped network as ``.module`` (DDP, DataParallel, Ray Train's wrappers) or
    ``._orig_mod`` (``torch.compile``) is unwrapped, repeatedly.
    """
    seen = 0
    while seen < 16:  # wrappers never nest this deep; the bound guards against cycles
        seen += 1
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        # A real model could own a child called "module"; only unwrap things that look like wrappers.
        if isinstance(inner, nn.Module) and not hasattr(model, "encoder"):
            model = inner
            continue
        break
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module (or a wrapper with .module), got {type(model).__name__}")
    return model


def encoder_stage_taps(encoder: nn.Module, prefix: str = "encoder") -> dict[str, TapPoint]:
    """Tap points of an smp-style encoder that returns a list of feature maps, one per stride.

    Args:
        encoder: An smp encoder (``EncoderMixin`` or ``TimmUniversalEncoder``).
        prefix: Dotted path of the encoder inside the model.

    Returns:
        ``{prefix}.stage<k>`` for each exposed stage, then ``{prefix}.out`` for the deepest one.
    """
    out_channels = list(getattr(encoder, "out_channels"))
    stage0_is_learned = _is_vgg_style(encoder)
    taps: dict[str, TapPoint] = {}
    for stage, channels in enumerate(out_channels):
        if stage == 0 and not stage0_is_learned:
            continue  # smp's stage 0 is the input tensor itself
        if channels == 0:
            continue  # placeholder for a stride that a transformer-style encoder does not have
        taps[f"{prefix}.stage{stage}"] = TapPoint(prefix, (stage,))
    taps[f"{prefix}.out"] = TapPoint(prefix, (len(out_channels) - 1,))
    return taps


def _is_vgg_style(encoder: nn.Module) -> bool:
    """Whether the encoder's first feature map is a learned full-resolution map (not the input)."""
    from segmentation_models_pytorch.encoders.vgg import VGGEncoder

    return isinstance(encoder, VGGEncoder) or bool(getattr(encoder, "_is_vgg_style", False))


def _smp_decoder_taps(decoder: nn.Module) -> list[tuple[str, str]]:
    """(tap name, module path inside the decoder) of an smp decoder, in execution order."""
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import DeepLabV3Decoder, DeepLabV3PlusDecoder
    from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
    from segmentation_models_pytorch.decoders.linknet.decoder import LinknetDecoder
    from segmentation_models_pytorch.decoders.manet.decoder import MAnetDecoder
    from segmentation_models_pytorch.decoders.pan.decoder import PANDecoder
    from segmentation_models_pytorch.decoders.pspnet.decoder import PSPDecoder
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
    from segmentation_models_pytorch.decoders.unetplusplus.decoder import UnetPlusPlusDecoder

    taps: list[tuple[str, str]] = []
    center = getattr(decoder, "center", None)
    if isinstance(center, nn.Module) and not isinstance(center, nn.Identity):
        taps.append(("decoder.center", "center"))

    if isinstance(decoder, (UnetDecoder, LinknetDecoder, MAnetDecoder)):
        paths = [f"blocks.{i}" for i in range(len(decoder.blocks))]
    elif isinstance(decoder, UnetPlusPlusDecoder):
        paths = [f"blocks.x_0_{i}" for i in range(decoder.depth + 1)]
    elif isinstance(decoder, FPNDecoder):
        paths = ["p5", "p4", "p3", "p2"] + [f"seg_blocks.{i}" for i in range(len(decoder.seg_blocks))]
    elif isinstance(decoder, PSPDecoder):
        paths = ["psp", "conv"]
    elif isinstance(decoder, DeepLabV3PlusDecoder):
        paths = ["aspp", "block1", "block2"]
    elif isinstance(decoder, DeepLabV3Decoder):
        paths = ["aspp", "relu"]
    elif isinstance(decoder, PANDecoder):
        paths = ["fpa"] + [name for name in ("gau3", "gau2", "gau1") if hasattr(decoder, name)]
    else:
        paths = []  # other smp decoders (UPerNet, Segformer, DPT): decoder.out and module: taps only
    taps.extend((f"decoder.block{i}", path) for i, path in enumerate(paths))
    return taps


def _smp_tap_points(model: nn.Module) -> dict[str, TapPoint]:
    taps = encoder_stage_taps(model.encoder, "encoder")
    for name, path in _smp_decoder_taps(model.decoder):
        taps[name] = TapPoint(f"decoder.{path}")
    taps["decoder.out"] = TapPoint("decoder")
    taps["logits"] = TapPoint("segmentation_head")
    if getattr(model, "classification_head", None) is not None:
        taps["aux_logits"] = TapPoint("classification_head")
    return taps


def tap_points(model: Any) -> dict[str, TapPoint]:
    """All named taps of a model and where they read, in forward order.

    Models built by xmodal (and any module defining ``tap_points() -> dict[str, TapPoint]``) are
    supported, as are smp ``SegmentationModel`` instances built directly.

    Raises:
        ConfigError: The model type has no tap vocabulary.
    """
    from segmentation_models_pytorch.base import SegmentationModel

    model = unwrap_model(model)
    custom = getattr(model, "tap_points", None)
    if callable(custom):
        return dict(custom())
    if isinstance(model, SegmentationModel):
        return _smp_tap_points(model)
    raise ConfigError(
        f"model type {type(model).__name__} has no named feature taps; expected a model from "
        "xmodal.models.create_model / create_classifier, an smp SegmentationModel, or a module defining "
        "tap_points(). Raw submodules can still be tapped as 'module:<dotted path>'."
    )


def list_taps(model: Any) -> list[str]:
    """Names of the model's feature taps, in forward order (``module:`` taps are not listed)."""
    return list(tap_points(model))


def _resolve(model: nn.Module, name: str, points: dict[str, TapPoint]) -> TapPoint:
    """Validate one tap name and return its tap point."""
    if not isinstance(name, str):
        raise ConfigError(f"tap names must be strings, got {name!r} ({type(name).__name__})")
    if name.startswith(MODULE_TAP_PREFIX):
        path = name[len(MODULE_TAP_PREFIX) :]
        try:
            model.get_submodule(path)
        except AttributeError as error:
            raise ConfigError(f"tap {name!r}: the model has no submodule {path!r} ({error})") from None
        return TapPoint(path)
    if name not in points:
        raise ConfigError(
            f"unknown tap {name!r} for {type(model).__name__}; available taps: {list(points)} "
            f"(or 'module:<dotted submodule path>')"
        )
    return points[name]


def _spread(candidates: Sequence[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``candidates``, first and last included."""
    n = len(candidates)
    if count <= 0:
        return []
    if count >= n:
        return list(candidates)
    if count == 1:
        return [candidates[-1]]
    positions = [int(j * (n - 1) / (count - 1) + 0.5) for j in range(count)]
    return [candidates[p] for p in positions]


def layer_set(model: Any, name: str | Sequence[str]) -> list[str]:
    """Tap names of one of the paper's named layer sets, or a validated list of tap names.

    Args:
        model: A tappable model (DDP wrappers are unwrapped).
        name: ``"mid"``, ``"fin"``, ``"int"``, ``"all_encoder"``, ``"all_decoder"`` (see the module
            docstring for the rules), a single tap name, or a sequence of tap names.

    Returns:
        Tap names in forward order for named sets, in the given order for explicit lists.

    Raises:
        ConfigError: Unknown set or tap name.
    """
    module = unwrap_model(model)
    points = tap_points(module)
    if not isinstance(name, str):
        names = list(name)
        if not names:
            raise ConfigError("layer set: an explicit list of tap names must not be empty")
        for tap in names:
            _resolve(module, tap, points)
        return list(dict.fromkeys(names))

    encoder_stages = [tap for tap in points if tap.startswith("encoder.stage")]
    decoder_taps = [tap for tap in points if tap == "decoder.center" or tap.startswith("decoder.block")]
    if name == "mid":
        return ["encoder.out"]
    if name == "fin":
        return ["logits"]
    if name == "all_encoder":
        return encoder_stages
    if name == "all_decoder":
        return decoder_taps
    if name == "int":
        # The deepest stage is "mid"; the intermediate set is what lies between the input and the logits.
        deepest = points["encoder.out"]
        encoder_candidates = [tap for tap in encoder_stages if points[tap] != deepest]
        if len(encoder_candidates) + len(decoder_taps) < INT_SET_SIZE:
            encoder_candidates = _with_stage_blocks(module, encoder_stages, points)
        n_decoder = min(INT_SET_PER_SIDE, len(decoder_taps))
        n_encoder = min(INT_SET_SIZE - n_decoder, len(encoder_candidates))
        n_decoder = min(INT_SET_SIZE - n_encoder, len(decoder_taps))
        return _spread(encoder_candidates, n_encoder) + _spread(decoder_taps, n_decoder)
    if name in points or name.startswith(MODULE_TAP_PREFIX):
        _resolve(module, name, points)
        return [name]
    hint = " ('a+b' combinations are sequences of sets, handled by the method, not here)" if "+" in name else ""
    raise ConfigError(
        f"unknown layer set {name!r}{hint}; expected one of {list(LAYER_SETS)}, a tap name from "
        f"{list(points)}, or a list of tap names"
    )


def _with_stage_blocks(module: nn.Module, encoder_stages: Sequence[str], points: dict[str, TapPoint]) -> list[str]:
    """Encoder ``int`` candidates of a shallow encoder: its stages refined into their residual blocks.

    In smp's ResNet-style encoders stage ``k >= 2`` ends with ``layer<k-1>``; every block of it but
    the last (whose output is the stage's) becomes a ``module:encoder.layer<k-1>.<j>`` candidate,
    in forward order, the deepest stage's inner blocks included (its last block is ``encoder.out``).
    Other encoders keep their stages.
    """
    encoder = getattr(module, "encoder", None)
    deepest = points["encoder.out"]
    candidates: list[str] = []
    for tap in encoder_stages:
        stage = int(tap.removeprefix("encoder.stage"))
        blocks = getattr(encoder, f"layer{stage - 1}", None) if stage >= 2 else None
        if isinstance(blocks, nn.Sequential):
            candidates += [f"{MODULE_TAP_PREFIX}encoder.layer{stage - 1}.{j}" for j in range(len(blocks) - 1)]
        if points[tap] != deepest:
            candidates.append(tap)
    return candidates


def _select(output: Any, index: tuple[int, ...], name: str) -> torch.Tensor:
    value = output
    for position in index:
        value = value[position]
    if not isinstance(value, torch.Tensor):
        raise ConfigError(f"tap {name!r} reads a {type(value).__name__}, not a tensor; tap a submodule instead")
    return value


class FeatureTaps:
    """Capture named activations during a forward pass, through forward hooks.

    Example::

        with FeatureTaps(student, layer_set(student, "int")) as taps:
            logits = student(x)
            loss = sum(mse(taps[name], teacher_features[name]) for name in taps.names)

    The captured tensors keep their autograd graph (gradients flow into the layers that produced them)
    unless ``detach=True``. ``features`` is emptied at the start of every forward of the model, so it
    always holds the last forward's tensors; it survives the ``with`` block (call :meth:`clear` to free
    them). If a module runs several times in one forward, its last output wins.

    Hooks are installed on the unwrapped model (DistributedDataParallel's ``.module``), so the wrapper's
    forward fires them, and all of them are removed on exit, or on :meth:`remove`, even after an error.
    ``nn.DataParallel`` (replicas in threads writing one dict) is not supported; use DDP. With
    ``torch.compile``, attach the taps before compiling (hooks added later force a recompile).

    Args:
        model: The model, possibly wrapped (DDP, DataParallel, ``torch.compile``).
        names: Tap names (see :func:`list_taps`), ``module:<path>`` taps, or a single name.
        detach: Store detached tensors (for a frozen teacher, or for logging).
        pre_activation: For taps whose tensor is the output of an activation module (ReLU, GELU, ...),
            store the activation's input instead (cloned first when the activation is in-place), so the
            negative part is kept. Taps produced by no activation (e.g. MobileNetV2's linear bottlenecks,
            ``logits``) are returned unchanged; :attr:`pre_activation_applied` records which were
            changed. This keeps every activation input inside the tapped modules alive until the end of
            the forward: extra memory, so use it only when needed.

    Raises:
        ConfigError: An unknown tap name (the message lists the available ones).
    """

    def __init__(
        self,
        model: Any,
        names: str | Iterable[str],
        *,
        detach: bool = False,
        pre_activation: bool = False,
    ) -> None:
        self.model = unwrap_model(model)
        requested = [names] if isinstance(names, str) else list(names)
        if not requested:
            raise ConfigError("FeatureTaps: no tap names given; available taps: " + str(list_taps(self.model)))
        points = tap_points(self.model) if any(not n.startswith(MODULE_TAP_PREFIX) for n in requested) else {}
        self.names: list[str] = list(dict.fromkeys(requested))
        self._points = {name: _resolve(self.model, name, points) for name in self.names}
        self.detach = detach
        self.pre_activation = pre_activation
        self.features: dict[str, torch.Tensor] = {}
        self.pre_activation_applied: dict[str, bool] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # id(activation output) -> (weak reference to that output, the activation's input)
        self._pre_cache: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._pending_inputs: dict[int, torch.Tensor] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------
    def attach(self) -> FeatureTaps:
        """Install the hooks (done by ``with``); returns ``self``."""
        if self._handles:
            return self
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_start))
            self._handles.append(self.model.register_forward_hook(self._on_model_end))
            by_module: dict[str, list[tuple[str, tuple[int, ...]]]] = defaultdict(list)
            for name, point in self._points.items():
                by_module[point.module].append((name, point.index))
            for path, entries in by_module.items():
                module = self.model.get_submodule(path)
                self._handles.append(module.register_forward_hook(self._make_tap_hook(entries)))
            if self.pre_activation:
                self._attach_activation_hooks(by_module)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Remove every hook this object installed (idempotent); captured features are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pre_cache.clear()
        self._pending_inputs.clear()

    def clear(self) -> None:
        """Drop the captured tensors (and the graph they hold)."""
        self.features = {}
        self.pre_activation_applied = {}

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently installed."""
        return bool(self._handles)

    def __enter__(self) -> FeatureTaps:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.features[name]
        except KeyError:
            if name not in self._points:
                raise ConfigError(f"tap {name!r} was not requested; requested taps: {self.names}") from None
            raise ConfigError(
                f"tap {name!r} has not fired: run the model's forward while the taps are attached "
                f"(inside the 'with' block); captured so far: {list(self.features)}"
            ) from None

    # -- hooks -------------------------------------------------------------------------------------------
    def _on_model_start(self, module: nn.Module, args: Any) -> None:
        self.features = {}
        self.pre_activation_applied = {}
        self._pre_cache.clear()
        self._pending_inputs.clear()

    def _on_model_end(self, module: nn.Module, args: Any, output: Any) -> None:
        # Pre-activation tensors are only needed while the forward runs.
        self._pre_cache.clear()
        self._pending_inputs.clear()

    def _make_tap_hook(self, entries: list[tuple[str, tuple[int, ...]]]):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for name, index in entries:
                value = _select(output, index, name)
                if self.pre_activation:
                    value = self._pre_activation_of(name, value)
                self.features[name] = value.detach() if self.detach else value

        return hook

    def _attach_activation_hooks(self, by_module: dict[str, Any]) -> None:
        activations: dict[int, nn.Module] = {}
        for path in by_module:
            for sub in self.model.get_submodule(path).modules():
                if isinstance(sub, _ACTIVATION_TYPES):
                    activations[id(sub)] = sub
        for activation in activations.values():
            self._handles.append(activation.register_forward_pre_hook(self._on_activation_input))
            self._handles.append(activation.register_forward_hook(self._on_activation_output))

    def _on_activation_input(self, module: nn.Module, args: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        value = args[0]
        # An in-place activation overwrites its input: keep a copy (clone keeps the autograd link).
        self._pending_inputs[id(module)] = value.clone() if getattr(module, "inplace", False) else value

    def _on_activation_output(self, module: nn.Module, args: Any, output: Any) -> None:
        pre = self._pending_inputs.pop(id(module), None)
        if pre is not None and isinstance(output, torch.Tensor):
            self._pre_cache[id(output)] = (weakref.ref(output), pre)

    def _pre_activation_of(self, name: str, value: torch.Tensor) -> torch.Tensor:
        entry = self._pre_cache.get(id(value))
        # The weak reference guards against a recycled id() of a tensor that has since been freed.
        if entry is not None and entry[0]() is value:
            self.pre_activation_applied[name] = True
            return entry[1]
        self.pre_activation_applied[name] = False
        return value


def tap_shapes(
    model: Any, names: str | Iterable[str], input_shape: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """Shapes (without the batch dimension) of the named taps for one input shape.

    Runs one forward pass on zeros, in eval mode and without gradients, then restores every module's
    train/eval flag. Use it to size distillation adapters or projection heads.

    Args:
        model: A tappable model.
        names: Tap names.
        input_shape: ``(C, H, W)`` of one sample.
    """
    module = unwrap_model(model)
    if len(input_shape) != 3:
        raise ConfigError(f"tap_shapes: input_shape must be (C, H, W), got {tuple(input_shape)}")
    reference = next(module.parameters(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    modes = {sub: sub.training for sub in module.modules()}
    try:
        module.eval()
        with torch.no_grad(), FeatureTaps(module, names, detach=True) as taps:
            module(torch.zeros(1, *input_shape, device=device, dtype=dtype))
            return {name: tuple(taps[name].shape[1:]) for name in taps.names}
    finally:
        for sub, mode in modes.items():
            sub.training = mode
