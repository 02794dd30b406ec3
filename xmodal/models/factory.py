"""Model factory: segmentation architectures by name, a scene classifier, weight loading and transfer.

In the spirit of timm's ``create_model``, architectures live in a registry of builder functions keyed by a
lower-case name; :func:`register_architecture` adds one (SegNet registers itself this way) and
:func:`create_model` builds any of them with the same arguments::

    model = create_model("deeplabv3plus", encoder="resnet50", in_channels=2, classes=9)

Names are matched case-insensitively, ignoring ``-``, ``_`` and spaces, with ``+`` read as ``plus``
(``"DeepLabV3+"``, ``"unet++"`` work). Registered: ``unet``, ``unetplusplus``, ``manet``, ``linknet``,
``fpn``, ``pspnet``, ``deeplabv3``, ``deeplabv3plus``, ``pan`` (segmentation-models-pytorch 0.6) and
``segnet`` (:mod:`xmodal.models.segnet`).

Encoders: every smp encoder name (``resnet18``, ``mobilenet_v2``, ``vgg19_bn``, ``xception``, ...; see
:func:`list_encoders`) or any timm model through smp's ``tu-<timm name>`` convention (``tu-xception65``,
``tu-convnext_tiny``). Extra keyword arguments reach the smp model class; for ``tu-`` encoders the ones
the class does not know reach ``timm.create_model``.

Weights are always randomly initialised: this project has no internet access, so no pretrained weights
can be downloaded. A request for them (``encoder_weights="imagenet"``, ``pretrained=True``) raises
:class:`~xmodal.errors.ConfigError`; load a state dict from disk with :func:`load_weights` instead, or
transfer weights between two models with :func:`copy_matching_weights`.

``decoder_channels`` is mapped to each architecture's own knob:

=================================  =============================================================================
Architecture                       ``decoder_channels``
=================================  =============================================================================
unet, unetplusplus, manet          one width per decoder block, ``encoder_depth`` values (default
                                   ``(256, 128, 64, 32, 16)[:encoder_depth]``)
fpn                                ``(pyramid, segmentation)`` or one value for both; segmentation must be a
                                   multiple of 32 (GroupNorm with 32 groups)
pspnet                             one value: ``psp_out_channels`` (default 512)
deeplabv3, deeplabv3plus, pan      one value: the decoder width (defaults 256, 256, 32)
linknet, segnet                    no such knob: passing one raises ConfigError
=================================  =============================================================================

Input sizes (H and W): every smp architecture needs multiples of the encoder's output stride (``2**depth``,
32 at the default depth 5; DeepLabV3's dilated encoder: 8; DeepLabV3Plus: 16). PAN also needs at least
128 pixels per side (its pyramid attention max-pools the stride-16 map three more times); 64x64 fails.
PSPNet defaults to ``encoder_depth=3`` (output stride 8, as smp and the PSPNet paper do) and its head
upsamples by ``2**encoder_depth``. DeepLabV3/V3Plus have a BatchNorm after global pooling: training
batches need at least 2 samples. SegNet takes any size of at least ``2**depth``.

The paper's architecture/encoder pairs with smp 0.6.0 / timm 1.0.31 (checked by building each with 2 input
bands and 9 classes and running a 1x2x64x64 forward; ``test_paper_architecture_encoder_pairs`` in
``tests/test_models.py`` keeps checking the main ones):

==========================  =========================================  =====================================
Pair                        Encoder name to use                        Status
==========================  =========================================  =====================================
Unet + MobileNetV2          ``mobilenet_v2``                           builds
Unet + VGG19                ``vgg19_bn`` (or ``vgg19``)                builds (smp adds a center block)
Unet + Xception             ``xception`` (also ``tu-xception41``,       builds
                            ``tu-legacy_xception``)
PSPNet + ResNet50           ``resnet50``                               builds (``xception``, ``vgg19_bn``,
                                                                       ``mobilenet_v2`` also build)
DeepLabV3+ + ResNet50       ``resnet50``                               builds (dilated, output stride 16)
DeepLabV3+ + Xception       ``tu-xception65`` (aligned Xception-65, as  builds; ``tu-xception41``/``71`` too
                            in the DeepLabV3+ paper)
DeepLabV3+ + Xception       ``xception`` (smp)                         does NOT build: smp's Xception
                                                                       downsamples by pooling and refuses
                                                                       dilation (``make_dilated`` raises);
                                                                       ``tu-legacy_xception`` also fails
                                                                       (timm model has no output_stride)
SegNet (VGG19-BN)           ``vgg19_bn``                               built by :mod:`xmodal.models.segnet`
==========================  =========================================  =====================================

VGG encoders cannot be dilated either, so DeepLabV3/V3Plus (and PAN) refuse them; the ConfigError says so
and names encoders that work.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from xmodal.errors import ConfigError
from xmodal.models.heads import EncoderClassifier
from xmodal.models.taps import unwrap_model

Builder = Callable[..., nn.Module]

# Keyword arguments that would ask smp/timm to download weights.
_PRETRAINED_KWARGS = ("encoder_weights", "pretrained", "weights", "pretrained_weights")
_DEFAULT_UNET_DECODER = (256, 128, 64, 32, 16)
FIRST_CONV_MODES = ("mean_tile", "cycle", "none")
# Architectures whose encoder runs dilated, and the message when an encoder cannot.
_DILATED_ARCHS = ("deeplabv3", "deeplabv3plus", "pan")
_DILATION_HINT = (
    "; this architecture runs its encoder dilated (encoder_output_stride 8 or 16), which needs an encoder "
    "that supports dilation, e.g. resnet18/resnet50, mobilenet_v2, efficientnet-b0, or tu-xception41 / "
    "tu-xception65 / tu-xception71 for Xception; smp 'xception', VGG encoders and tu-legacy_xception cannot"
)
_SMP_BUILD_ERRORS = (ValueError, KeyError, TypeError, RuntimeError, AssertionError, IndexError, AttributeError)


@dataclass(frozen=True)
class ArchitectureSpec:
    """A registered architecture.

    Attributes:
        name: Registry key (lower case).
        builder: ``builder(*, encoder, in_channels, classes, encoder_depth, decoder_channels, **kwargs)``.
        default_encoder: Encoder used when ``create_model`` gets none.
        default_encoder_depth: Depth used when ``create_model`` gets none.
        decoder_channels: What ``decoder_channels`` means for this architecture; None when it has no
            such knob (then passing one is an error).
    """

    name: str
    builder: Builder
    default_encoder: str
    default_encoder_depth: int
    decoder_channels: str | None


_ARCHITECTURES: dict[str, ArchitectureSpec] = {}


def _normalize_arch(name: str) -> str:
    return name.lower().replace("+", "plus").replace("-", "").replace("_", "").replace(" ", "")


def register_architecture(
    name: str,
    *,
    default_encoder: str = "resnet18",
    default_encoder_depth: int = 5,
    decoder_channels: str | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering a builder function under ``name``.

    Args:
        name: Architecture name (matched case-insensitively, ignoring ``-``/``_``).
        default_encoder: Encoder when the caller gives none.
        default_encoder_depth: Encoder depth when the caller gives none.
        decoder_channels: Description of the ``decoder_channels`` knob, or None if the architecture has
            none (``create_model`` then refuses a ``decoder_channels`` argument).

    Raises:
        ConfigError: The name is already registered.
    """
    key = _normalize_arch(name)

    def decorator(builder: Builder) -> Builder:
        if key in _ARCHITECTURES:
            raise ConfigError(f"architecture {name!r} is already registered")
        _ARCHITECTURES[key] = ArchitectureSpec(key, builder, default_encoder, default_encoder_depth, decoder_channels)
        return builder

    return decorator


def list_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_ARCHITECTURES)


def get_architecture(name: str) -> ArchitectureSpec:
    """The registry entry of ``name``.

    Raises:
        ConfigError: Unknown name (the message lists the known ones).
    """
    if not isinstance(name, str) or _normalize_arch(name) not in _ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; known architectures: {list_architectures()}")
    return _ARCHITECTURES[_normalize_arch(name)]


def list_encoders() -> list[str]:
    """smp encoder names, sorted; any timm model is also usable as ``tu-<timm name>``."""
    import segmentation_models_pytorch as smp

    return sorted(smp.encoders.get_encoder_names())


# -- validation helpers ---------------------------------------------------------------------------------
def _check_positive_int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{field}={value!r}: expected a positive int")
    return value


def _refuse_pretrained(kwargs: Mapping[str, Any]) -> None:
    for key in _PRETRAINED_KWARGS:
        value = kwargs.get(key)
        if value is not None and value is not False:
            raise ConfigError(
                f"{key}={value!r}: pretrained weights cannot be downloaded here (no internet access), and "
                "xmodal always builds randomly initialised models. To start from pretrained weights, save "
                "a state dict to disk and load it with xmodal.models.load_weights(model, path) "
                "(prefix='encoder.' for a bare encoder state dict), or transfer weights from another model "
                "with xmodal.models.copy_matching_weights(src, dst)."
            )


def check_encoder_name(encoder: Any, key: str = "encoder") -> str:
    """``encoder`` if smp or timm (``tu-<name>``) knows it.

    Raises:
        ConfigError: Naming ``key``, the value and the closest known names.
    """
    import segmentation_models_pytorch as smp
    import timm

    if not isinstance(encoder, str) or not encoder:
        raise ConfigError(f"{key}={encoder!r}: expected an smp encoder name or 'tu-<timm model name>'")
    if encoder.startswith("tu-"):
        timm_name = encoder[3:]
        if not timm.is_model(timm_name):
            close = difflib.get_close_matches(timm_name, timm.list_models(), n=5)
            raise ConfigError(f"{key}={encoder!r}: timm has no model {timm_name!r}; close timm names: {close}")
        return encoder
    if encoder not in smp.encoders.encoders:
        close = difflib.get_close_matches(encoder, list(smp.encoders.encoders), n=5)
        raise ConfigError(
            f"{key}={encoder!r} is not an smp encoder; closest: {close} "
            "(xmodal.models.list_encoders() lists all; 'tu-<timm model name>' takes a timm encoder)"
        )
    return encoder


def _channels_tuple(decoder_channels: Any) -> tuple[int, ...] | None:
    if decoder_channels is None:
        return None
    values = (decoder_channels,) if isinstance(decoder_channels, int) else decoder_channels
    try:
        values = tuple(values)
    except TypeError:
        raise ConfigError(f"decoder_channels={decoder_channels!r}: expected an int or a sequence of ints") from None
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"decoder_channels={decoder_channels!r}: expected positive ints")
    return values


# -- smp architectures ------------------------------------------------------------------------------------
def _single_width(knob: str, arch: str) -> Callable[[tuple[int, ...] | None, int], dict[str, Any]]:
    def convert(channels: tuple[int, ...] | None, depth: int) -> dict[str, Any]:
        if channels is None:
            return {}
        if len(channels) != 1:
            raise ConfigError(f"decoder_channels={channels}: {arch} takes one width (its {knob}), got {len(channels)}")
        return {knob: channels[0]}

    return convert


def _per_block_widths(arch: str) -> Callable[[tuple[int, ...] | None, int], dict[str, Any]]:
    def convert(channels: tuple[int, ...] | None, depth: int) -> dict[str, Any]:
        if channels is None:
            return {"decoder_channels": _DEFAULT_UNET_DECODER[:depth]}
        if len(channels) != depth:
            raise ConfigError(
                f"decoder_channels={channels}: {arch} needs one width per decoder block, i.e. "
                f"encoder_depth={depth} values, got {len(channels)}"
            )
        return {"decoder_channels": channels}

    return convert


def _fpn_widths(channels: tuple[int, ...] | None, depth: int) -> dict[str, Any]:
    if channels is None:
        return {}
    if len(channels) not in (1, 2):
        raise ConfigError(f"decoder_channels={channels}: fpn takes (pyramid, segmentation) or one value for both")
    pyramid, segmentation = channels[0], channels[-1]
    if segmentation % 32:
        raise ConfigError(
            f"decoder_channels={channels}: fpn's segmentation width {segmentation} must be a multiple of 32 "
            "(its GroupNorm uses 32 groups)"
        )
    return {"decoder_pyramid_channels": pyramid, "decoder_segmentation_channels": segmentation}


def _pspnet_defaults(depth: int, kwargs: dict[str, Any]) -> None:
    # smp's PSPNet upsamples by 8 whatever the depth; its output stride is 2**depth.
    kwargs.setdefault("upsampling", 2**depth)


def _register_smp(
    name: str,
    class_name: str,
    convert: Callable[[tuple[int, ...] | None, int], dict[str, Any]] | None,
    decoder_help: str | None,
    *,
    default_depth: int = 5,
    adjust: Callable[[int, dict[str, Any]], None] | None = None,
) -> None:
    def build(
        *,
        encoder: str,
        in_channels: int,
        classes: int,
        encoder_depth: int,
        decoder_channels: tuple[int, ...] | None,
        **kwargs: Any,
    ) -> nn.Module:
        import segmentation_models_pytorch as smp

        model_class = getattr(smp, class_name)
        check_encoder_name(encoder)
        arguments = dict(kwargs)
        decoder_kwargs = convert(decoder_channels, encoder_depth) if convert is not None else {}
        clashes = sorted(set(decoder_kwargs) & set(kwargs)) if decoder_channels is not None else []
        if clashes:
            raise ConfigError(f"{name}: give decoder_channels or {clashes}, not both")
        for key, value in decoder_kwargs.items():
            arguments.setdefault(key, value)
        if adjust is not None:
            adjust(encoder_depth, arguments)
        known = set(inspect.signature(model_class.__init__).parameters) - {"self", "kwargs"}
        unknown = sorted(set(arguments) - known)
        # smp forwards unknown keyword arguments to timm for tu- encoders and silently drops them otherwise.
        if unknown and not encoder.startswith("tu-"):
            managed = {"encoder_name", "encoder_weights", "in_channels", "classes", "encoder_depth"}
            raise ConfigError(
                f"{name}: unknown keyword argument(s) {unknown}; {class_name} accepts {sorted(known - managed)}"
            )
        try:
            return model_class(
                encoder_name=encoder,
                encoder_weights=None,
                encoder_depth=encoder_depth,
                in_channels=in_channels,
                classes=classes,
                **arguments,
            )
        except _SMP_BUILD_ERRORS as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            dilation_problem = "dilat" in message or "output_stride" in message
            hint = _DILATION_HINT if name in _DILATED_ARCHS and dilation_problem else ""
            raise ConfigError(
                f"cannot build {name} with encoder={encoder!r}, encoder_depth={encoder_depth}: "
                f"{type(error).__name__}: {message}{hint}"
            ) from error

    register_architecture(
        name, default_encoder="resnet18", default_encoder_depth=default_depth, decoder_channels=decoder_help
    )(build)


_register_smp("unet", "Unet", _per_block_widths("unet"), "one width per decoder block")
_register_smp("unetplusplus", "UnetPlusPlus", _per_block_widths("unetplusplus"), "one width per decoder block")
_register_smp("manet", "MAnet", _per_block_widths("manet"), "one width per decoder block")
_register_smp("linknet", "Linknet", None, None)
_register_smp("fpn", "FPN", _fpn_widths, "(pyramid, segmentation) widths")
_register_smp(
    "pspnet",
    "PSPNet",
    _single_width("psp_out_channels", "pspnet"),
    "psp_out_channels",
    default_depth=3,
    adjust=_pspnet_defaults,
)
_register_smp("deeplabv3", "DeepLabV3", _single_width("decoder_channels", "deeplabv3"), "ASPP width")
_register_smp("deeplabv3plus", "DeepLabV3Plus", _single_width("decoder_channels", "deeplabv3plus"), "ASPP width")
_register_smp("pan", "PAN", _single_width("decoder_channels", "pan"), "decoder width")


# -- public constructors ----------------------------------------------------------------------------------
def create_model(
    arch: str,
    *,
    encoder: str | None = None,
    in_channels: int,
    classes: int,
    encoder_depth: int | None = None,
    decoder_channels: Sequence[int] | int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a randomly initialised segmentation model by architecture name.

    Args:
        arch: Architecture name, see :func:`list_architectures` (case-insensitive).
        encoder: smp encoder name or ``tu-<timm name>``; default ``"resnet18"`` (``"vgg19_bn"`` for
            segnet).
        in_channels: Input bands (any positive count).
        classes: Output channels of the logits.
        encoder_depth: Number of encoder stages (1..5); default 5 (3 for pspnet).
        decoder_channels: Mapped to the architecture's decoder width knob (module docstring table).
        **kwargs: Passed to the architecture (e.g. ``decoder_attention_type="scse"``,
            ``encoder_output_stride=8``; ``width=0.25`` for segnet).

    Returns:
        The model; ``model.xmodal_recipe`` (``{"builder": "segmenter", "kwargs": ...}``) rebuilds it
        through :func:`xmodal.models.build_network`.

    Raises:
        ConfigError: Unknown architecture or encoder, a pretrained-weights request, a decoder_channels
            the architecture cannot take, or any other invalid combination.
    """
    spec = get_architecture(arch)
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("classes", classes)
    _refuse_pretrained(kwargs)
    for key in _PRETRAINED_KWARGS:
        kwargs.pop(key, None)  # only None/False remain here; smp receives encoder_weights=None itself
    encoder = spec.default_encoder if encoder is None else encoder
    if not isinstance(encoder, str):
        raise ConfigError(f"encoder={encoder!r}: expected a name string")
    depth = spec.default_encoder_depth if encoder_depth is None else _check_positive_int("encoder_depth", encoder_depth)
    channels = _channels_tuple(decoder_channels)
    if channels is not None and spec.decoder_channels is None:
        raise ConfigError(
            f"decoder_channels={decoder_channels!r}: architecture {spec.name!r} has no decoder width knob; "
            f"architectures that take one: {[s.name for s in _ARCHITECTURES.values() if s.decoder_channels]}"
        )
    model = spec.builder(
        encoder=encoder,
        in_channels=in_channels,
        classes=classes,
        encoder_depth=depth,
        decoder_channels=channels,
        **kwargs,
    )
    freeze_unused_parameters(model, in_channels, 128 if spec.name == "pan" else max(64, 2 ** (depth + 1)))
    model.xmodal_recipe = {
        "builder": "segmenter",
        "kwargs": {
            "arch": spec.name,
            "encoder": encoder,
            "in_channels": in_channels,
            "classes": classes,
            "encoder_depth": depth,
            "decoder_channels": list(channels) if channels is not None else None,
            **kwargs,
        },
    }
    return model


def freeze_unused_parameters(model: nn.Module, in_channels: int, size: int) -> list[str]:
    """Turn off gradients of parameters the forward pass never reaches; return their names.

    smp keeps every stage of an encoder even when ``encoder_depth`` uses fewer (a depth-3
    ResNet still holds layer3 and layer4). Such parameters never receive a gradient, which
    DistributedDataParallel refuses ("parameters that were not used in producing loss") and which
    would make optimisers carry dead weights. One probe pass in eval mode (BatchNorm statistics
    untouched) finds them.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            output = model(torch.zeros(2, in_channels, size, size))
            outputs = output if isinstance(output, (list, tuple)) else [output]
            sum(o.float().sum() for o in outputs if isinstance(o, torch.Tensor) and o.requires_grad).backward()
    except (RuntimeError, ValueError, AttributeError):
        return []  # a size the probe cannot pass (or nothing trainable): leave every parameter as it is
    finally:
        model.train(was_training)
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, parameter in model.named_parameters():
        parameter.grad = None
        if name in unused:
            parameter.requires_grad_(False)
    return unused


NORMS = ("batch", "instance", "none")


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` (in place) by the normalisation ``norm`` names.

    ``instance``: ``InstanceNorm2d(affine=True)`` (per-sample statistics, learnable scale and shift
    like the BatchNorm it replaces; no running statistics). ``none``: identity. ``batch``: unchanged.

    Raises:
        ConfigError: Unknown ``norm``.
    """
    if norm not in NORMS:
        raise ConfigError(f"norm={norm!r}: expected one of {list(NORMS)}")
    if norm == "batch":
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            replacement: nn.Module = (
                nn.InstanceNorm2d(child.num_features, eps=child.eps, affine=True) if norm == "instance" else nn.Identity()
            )
            setattr(module, name, replacement)
        else:
            convert_norm(child, norm)
    return module


def create_encoder(
    encoder: str = "resnet18",
    in_channels: int = 3,
    *,
    depth: int = 5,
    norm: str = "batch",
    input_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a randomly initialised smp/timm encoder on its own (the ``encoder`` of every segmenter).

    Its forward returns one feature map per stride (``out_channels`` lists their widths); its
    parameter names are those of a segmenter's ``encoder.`` submodule built with the same name and
    depth, so its weights load into one (see :func:`xmodal.methods.exports.load_export_into`).

    Args:
        encoder: smp encoder name or ``tu-<timm name>``.
        in_channels: Input bands.
        depth: Encoder stages (1..5).
        norm: ``batch`` (as built), ``instance`` or ``none`` (see :func:`convert_norm`).
        input_size: Side of the inputs it will see. With ``norm="instance"`` this is checked: an
            instance norm over a 1 x 1 map is undefined (PyTorch raises), so a depth that reaches
            one is refused here with the depths that work.
        **kwargs: For ``tu-`` encoders, passed to ``timm.create_model``.

    Raises:
        ConfigError: Unknown encoder or norm, invalid sizes, a pretrained-weights request, or an
            instance norm that would see a 1 x 1 map.
    """
    import segmentation_models_pytorch as smp

    _check_positive_int("in_channels", in_channels)
    _check_positive_int("depth", depth)
    _refuse_pretrained(kwargs)
    for key in _PRETRAINED_KWARGS:
        kwargs.pop(key, None)
    check_encoder_name(encoder)
    if norm not in NORMS:
        raise ConfigError(f"norm={norm!r}: expected one of {list(NORMS)}")
    if kwargs and not encoder.startswith("tu-"):
        raise ConfigError(
            f"create_encoder: unknown keyword argument(s) {sorted(kwargs)} for smp encoder {encoder!r} "
            "(extra keyword arguments are only passed on to timm, for 'tu-' encoders)"
        )
    try:
        module = smp.encoders.get_encoder(encoder, in_channels=in_channels, depth=depth, weights=None, **kwargs)
    except _SMP_BUILD_ERRORS as error:
        raise ConfigError(f"cannot build encoder={encoder!r} with depth={depth}: {type(error).__name__}: {error}") from error
    convert_norm(module, norm)
    if norm == "instance" and input_size is not None:
        _check_instance_norm_sizes(module, encoder, in_channels, depth, input_size)
    freeze_unused_parameters(module, in_channels, input_size or max(64, 2 ** (depth + 1)))
    module.xmodal_recipe = {
        "builder": "encoder",
        "kwargs": {"encoder": encoder, "in_channels": in_channels, "depth": depth, "norm": norm, **kwargs},
    }
    return module


def _check_instance_norm_sizes(module: nn.Module, encoder: str, in_channels: int, depth: int, size: int) -> None:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            features = module(torch.zeros(1, in_channels, size, size))
    except ValueError as error:
        if "spatial element" not in str(error):
            raise
        sizes, side = [], size
        for _ in range(depth):
            side = -(-side // 2)
            sizes.append(side)
        usable = [d + 1 for d, side in enumerate(sizes) if side > 1]
        raise ConfigError(
            f"encoder {encoder!r} with norm=instance at depth={depth} reaches a 1 x 1 feature map on "
            f"{size} x {size} inputs, where instance normalisation is undefined; use depth <= "
            f"{max(usable) if usable else 1}, larger inputs, or norm=batch"
        ) from error
    finally:
        module.train(was_training)
    del features


def create_classifier(
    encoder: str,
    in_channels: int,
    num_classes: int,
    *,
    encoder_depth: int = 5,
    pooling: str = "avg",
    dropout: float = 0.0,
    norm: str = "batch",
    input_size: int | None = None,
    **kwargs: Any,
) -> EncoderClassifier:
    """Build a randomly initialised scene classifier: encoder, global pooling, linear layer.

    The encoder is the same module the segmentation models use (parameter names start with
    ``encoder.``), so encoder weights transfer between the two with :func:`copy_matching_weights`.
    Works on small patches (So2Sat LCZ42's 32x32: the deepest map is 1x1 at depth 5; use
    ``encoder_depth=4`` to keep 2x2).

    Args:
        encoder: smp encoder name or ``tu-<timm name>``.
        in_channels: Input bands.
        num_classes: Output scores.
        encoder_depth: Encoder stages used (1..5).
        pooling: ``"avg"`` or ``"max"`` global pooling.
        dropout: Dropout before the linear layer.
        norm: Encoder normalisation (see :func:`create_encoder`).
        input_size: Input side, checked against instance normalisation (see :func:`create_encoder`).
        **kwargs: For ``tu-`` encoders, passed to ``timm.create_model``.

    Raises:
        ConfigError: Unknown encoder, invalid sizes, or a pretrained-weights request.
    """
    _check_positive_int("num_classes", num_classes)
    encoder_module = create_encoder(encoder, in_channels, depth=encoder_depth, norm=norm, input_size=input_size, **kwargs)
    model = EncoderClassifier(encoder_module, num_classes, pooling=pooling, dropout=dropout)
    probe = max(32, 2 ** (encoder_depth + 1)) if input_size is None else input_size
    freeze_unused_parameters(model, in_channels, probe)
    model.xmodal_recipe = {
        "builder": "classifier",
        "kwargs": {
            "encoder": encoder, "in_channels": in_channels, "num_classes": num_classes, "encoder_depth": encoder_depth,
            "pooling": pooling, "dropout": dropout, "norm": norm, "input_size": input_size, **kwargs,
        },
    }
    return model


def model_summary(model: Any) -> dict[str, int]:
    """Parameter counts of a model.

    Returns:
        ``total``, ``trainable``, and the split into ``encoder`` (the ``encoder`` child), ``decoder``
        (``decoder``), ``head`` (``segmentation_head``, smp's auxiliary ``classification_head`` and a
        classifier's ``head``) and ``other`` (anything else). Shared parameters are counted once.
    """
    module = unwrap_model(model)
    seen: set[int] = set()

    def count(part: nn.Module | None) -> int:
        if part is None:
            return 0
        total = 0
        for parameter in part.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
        return total

    def child(name: str) -> nn.Module | None:
        value = getattr(module, name, None)
        return value if isinstance(value, nn.Module) else None

    encoder = count(child("encoder"))
    decoder = count(child("decoder"))
    head = sum(count(child(name)) for name in ("segmentation_head", "classification_head", "head"))
    other = count(module)
    unique = {id(p): p for p in module.parameters()}.values()
    return {
        "total": encoder + decoder + head + other,
        "trainable": sum(p.numel() for p in unique if p.requires_grad),
        "encoder": encoder,
        "decoder": decoder,
        "head": head,
        "other": other,
    }


# -- weights ----------------------------------------------------------------------------------------------
def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a saved object (a bare state dict or a training checkpoint)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"{path}: expected a state dict (name -> tensor), or a checkpoint holding one under "
            f"'state_dict' / 'model_state_dict' / 'model'; got {type(obj).__name__}"
        )
    state = dict(obj)
    # Checkpoints saved from DistributedDataParallel or torch.compile carry a wrapper prefix.
    for wrapper_prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(wrapper_prefix) for key in state):
            state = {key[len(wrapper_prefix) :]: value for key, value in state.items()}
    return state


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > limit else ''}]"


def load_weights(
    model: Any,
    path: str | os.PathLike[str],
    *,
    strict: bool = True,
    prefix: str = "",
    map_location: str | torch.device = "cpu",
) -> dict[str, list[str]]:
    """Load a state dict saved on disk into ``model`` (in place).

    Args:
        model: Target model (wrappers are unwrapped).
        path: A file written by ``torch.save`` holding a state dict or a checkpoint dict with one under
            ``state_dict`` / ``model_state_dict`` / ``model``. ``module.`` prefixes (DDP) are stripped.
        strict: Refuse any missing, unexpected or shape-mismatched key (default). With False, load the
            keys that match and report the rest.
        prefix: Prepended to every saved key, e.g. ``"encoder."`` to load a bare encoder's state dict into
            a segmentation model.
        map_location: Where tensors are loaded before being copied into the model.

    Returns:
        ``{"loaded": [...], "missing": [...], "unexpected": [...], "mismatched": [...]}`` (model keys,
        except ``unexpected`` which lists saved keys with ``prefix`` applied).

    Raises:
        ConfigError: Unreadable file, not a state dict, or (strict) any key/shape mismatch.
    """
    module = unwrap_model(model)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"weights file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise ConfigError(f"cannot read weights file {path!r}: {type(error).__name__}: {error}") from error
    saved = {prefix + key: value for key, value in _extract_state_dict(obj, path).items()}
    target = module.state_dict()
    missing = [key for key in target if key not in saved]
    unexpected = [key for key in saved if key not in target]
    mismatched = [key for key in target if key in saved and saved[key].shape != target[key].shape]
    if strict and (missing or unexpected or mismatched):
        shape_changes = [f"{k} {tuple(saved[k].shape)}->{tuple(target[k].shape)}" for k in mismatched]
        details = [
            f"mismatched shapes: {_preview(shape_changes)}" if mismatched else "",
            f"missing in file: {_preview(missing)}" if missing else "",
            f"unexpected in file: {_preview(unexpected)}" if unexpected else "",
        ]
        raise ConfigError(
            f"weights file {path!r} does not match {type(module).__name__}: "
            + "; ".join(d for d in details if d)
            + ". Use strict=False to load only the matching keys, prefix='encoder.' for a bare encoder "
            "state dict, or copy_matching_weights to adapt a different number of input channels."
        )
    loaded = [key for key in target if key in saved and key not in mismatched]
    with torch.no_grad():
        for key in loaded:
            target[key].copy_(saved[key])
    return {"loaded": loaded, "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def _first_conv_name(module: nn.Module) -> str | None:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            return name
    return None


def _adapt_first_conv(weight: torch.Tensor, new_in: int, mode: str) -> torch.Tensor:
    """A first-conv kernel for ``new_in`` input channels that keeps activations at the same scale."""
    old_in = weight.shape[1]
    scale = old_in / new_in
    if mode == "mean_tile":
        return weight.mean(dim=1, keepdim=True).repeat(1, new_in, 1, 1) * scale
    # "cycle": reuse the source channels in order (as smp does for pretrained encoders).
    return weight[:, [i % old_in for i in range(new_in)]] * scale


def copy_matching_weights(src: Any, dst: Any, *, adapt_first_conv: str = "mean_tile") -> dict[str, list[str]]:
    """Copy every parameter and buffer of ``src`` into ``dst`` (in place) whose name and shape match.

    The first convolution of ``dst`` (first ``nn.Conv2d`` in module order, i.e. the encoder stem) may
    differ from ``src``'s only by its number of input channels, e.g. an optical teacher (4 or 13 bands)
    initialising a SAR student (2 bands). It is then adapted:

    * ``"mean_tile"`` (default): average the source kernel over its input channels and tile the mean to
      the new count, rescaled by ``src_in / dst_in``. For an input whose channels are equal, the
      adapted convolution gives exactly the source's output, so activations keep their scale.
    * ``"cycle"``: reuse source channels ``i % src_in`` for new channel ``i``, rescaled the same way.
    * ``"none"``: leave it (it is reported as skipped).

    Args:
        src: Model to copy from (wrappers are unwrapped).
        dst: Model to copy into.
        adapt_first_conv: ``"mean_tile"``, ``"cycle"`` or ``"none"``.

    Returns:
        ``{"copied": [...], "adapted": [...], "skipped": [...], "unused": [...]}``: ``dst`` keys copied,
        adapted and left untouched; ``unused`` lists ``src`` keys that ``dst`` does not have.

    Raises:
        ConfigError: Unknown ``adapt_first_conv``.
    """
    if adapt_first_conv not in FIRST_CONV_MODES:
        raise ConfigError(f"adapt_first_conv={adapt_first_conv!r}: expected one of {list(FIRST_CONV_MODES)}")
    source_module, target_module = unwrap_model(src), unwrap_model(dst)
    source, target = source_module.state_dict(), target_module.state_dict()
    first_conv = _first_conv_name(target_module)
    first_conv_key = f"{first_conv}.weight" if first_conv is not None else None
    report: dict[str, list[str]] = {"copied": [], "adapted": [], "skipped": [], "unused": []}
    with torch.no_grad():
        for key, tensor in target.items():
            value = source.get(key)
            if value is None:
                report["skipped"].append(key)
            elif value.shape == tensor.shape:
                tensor.copy_(value)
                report["copied"].append(key)
            elif (
                key == first_conv_key
                and adapt_first_conv != "none"
                and value.dim() == 4
                and value.shape[0] == tensor.shape[0]
                and value.shape[2:] == tensor.shape[2:]
            ):
                tensor.copy_(_adapt_first_conv(value.to(tensor.dtype), tensor.shape[1], adapt_first_conv))
                report["adapted"].append(key)
            else:
                report["skipped"].append(key)
    report["unused"] = [key for key in source if key not in target]
    return report
