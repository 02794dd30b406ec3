"""Networks by registered name, each carrying the recipe that rebuilds it.

Every network a method trains or exports is built here (or by the factory functions, which record
the same recipe): ``build_network("segmenter", arch="unet", encoder="resnet18", in_channels=2,
classes=1)``. The built module keeps ``xmodal_recipe = {"builder": name, "kwargs": {...}}``, so a
checkpoint can save any network with its recipe and a later phase (or an inference script) can
rebuild it without the config that trained it (:func:`rebuild_network`).

Registered builders:

==============================  ==================================================================
``segmenter``                   :func:`~xmodal.models.factory.create_model` (any smp architecture, SegNet)
``classifier``                  :func:`~xmodal.models.factory.create_classifier` (encoder + pooled linear head)
``encoder``                     :func:`~xmodal.models.factory.create_encoder` (an smp/timm encoder alone)
``dual_encoder_classifier``     :class:`~xmodal.models.composite.DualEncoderClassifier` (two encoders, shared head)
``dual_encoder_segmenter``      :class:`~xmodal.models.composite.DualEncoderSegmenter` (two encoders, shared decoder)
``dual_segmenter``              :class:`~xmodal.models.composite.DualSegmenter` (two full segmenters)
``autoencoder``                 :class:`~xmodal.models.autoencoder.ConvAutoEncoder` (VGG11-like encoder + decoder)
``dual_autoencoder``            :class:`~xmodal.models.autoencoder.DualAutoEncoder` (one autoencoder per modality)
``critic``                      :class:`~xmodal.models.autoencoder.CriticMLP` (fully connected, no BatchNorm)
==============================  ==================================================================

Add one with ``@register_network("name")`` on a function returning an ``nn.Module``.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any, Callable

from torch import nn

from xmodal.errors import ConfigError

NetworkBuilder = Callable[..., nn.Module]
_NETWORKS: dict[str, NetworkBuilder] = {}
RECIPE_ATTRIBUTE = "xmodal_recipe"


def register_network(name: str) -> Callable[[NetworkBuilder], NetworkBuilder]:
    """Decorator registering ``builder(**kwargs) -> nn.Module`` under ``name``.

    Raises:
        ConfigError: ``name`` is already registered.
    """

    def decorator(builder: NetworkBuilder) -> NetworkBuilder:
        if name in _NETWORKS and _NETWORKS[name] is not builder:
            raise ConfigError(f"network builder {name!r} is registered twice")
        _NETWORKS[name] = builder
        return builder

    return decorator


def list_networks() -> list[str]:
    """Registered network builder names, sorted."""
    return sorted(_NETWORKS)


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised network by builder name; it remembers its recipe.

    Raises:
        ConfigError: Unknown builder (with the close names), or the builder's own errors.
    """
    if name not in _NETWORKS:
        close = difflib.get_close_matches(name, list(_NETWORKS), n=3)
        raise ConfigError(f"unknown network builder {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; known: {list_networks()}")
    try:
        module = _NETWORKS[name](**kwargs)
    except TypeError as error:
        raise ConfigError(f"network builder {name!r}: {error}") from error
    if not isinstance(getattr(module, RECIPE_ATTRIBUTE, None), dict):  # the factory functions record their own
        setattr(module, RECIPE_ATTRIBUTE, {"builder": name, "kwargs": copy.deepcopy(kwargs)})
    return module


def recipe_of(module: nn.Module) -> dict[str, Any]:
    """The recipe ``{"builder": ..., "kwargs": ...}`` a network was built with.

    Raises:
        ConfigError: The module was not built through this registry or the factory functions.
    """
    recipe = getattr(module, RECIPE_ATTRIBUTE, None)
    if not isinstance(recipe, dict):
        raise ConfigError(
            f"{type(module).__name__} has no build recipe; build exported networks with xmodal.models.build_network "
            "(or create_model / create_classifier / create_encoder), so later phases can rebuild them"
        )
    return copy.deepcopy(recipe)


def rebuild_network(recipe: dict[str, Any]) -> nn.Module:
    """A new randomly initialised network from a recipe (load its weights afterwards)."""
    if not isinstance(recipe, dict) or "builder" not in recipe:
        raise ConfigError(f"not a network recipe: {recipe!r}; expected {{'builder': name, 'kwargs': {{...}}}}")
    return build_network(recipe["builder"], **dict(recipe.get("kwargs") or {}))


def _register_factory_builders() -> None:
    from xmodal.models.factory import create_classifier, create_encoder, create_model

    register_network("segmenter")(create_model)
    register_network("classifier")(create_classifier)
    register_network("encoder")(create_encoder)


_register_factory_builders()
