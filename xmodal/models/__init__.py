"""Models layer: segmentation architectures by name, scene classifiers, SegNet, named feature taps.

Imports only :mod:`xmodal.errors` (and torch, timm, segmentation-models-pytorch); never Ray.

* :func:`create_model` / :func:`list_architectures` / :func:`register_architecture`: the factory
  (:mod:`xmodal.models.factory`, which also documents which of the paper's architecture/encoder pairs build).
* :func:`create_classifier`: encoder + global pooling + linear layer, for scene classification.
* :func:`create_encoder`: an smp/timm encoder alone (batch, instance or no normalisation).
* :func:`build_network` / :func:`register_network` / :func:`rebuild_network`: every network by a
  registered name (segmenter, classifier, encoder, composites of :mod:`xmodal.models.composite`,
  :mod:`xmodal.models.autoencoder`), remembering the recipe that rebuilds it.
* :func:`list_taps`, :class:`FeatureTaps`, :func:`layer_set`, :func:`tap_shapes`: read activations by name
  (:mod:`xmodal.models.taps`).
* :func:`load_weights`, :func:`copy_matching_weights`, :func:`model_summary`.
"""

from xmodal.models.factory import (
    FIRST_CONV_MODES,
    NORMS,
    ArchitectureSpec,
    check_encoder_name,
    convert_norm,
    copy_matching_weights,
    create_classifier,
    create_encoder,
    create_model,
    freeze_unused_parameters,
    get_architecture,
    list_architectures,
    list_encoders,
    load_weights,
    model_summary,
    register_architecture,
)
from xmodal.models.heads import ClassifierHead, EncoderClassifier, ProjectionHead
from xmodal.models.networks import build_network, list_networks, rebuild_network, recipe_of, register_network
from xmodal.models.composite import DualEncoderClassifier, DualEncoderSegmenter, DualSegmenter  # registers its builders
from xmodal.models.autoencoder import ConvAutoEncoder, CriticMLP, DualAutoEncoder  # registers its builders
from xmodal.models.segnet import SegNet  # registers "segnet" in the factory
from xmodal.models.taps import (
    LAYER_SETS,
    FeatureTaps,
    TapPoint,
    layer_set,
    list_taps,
    tap_points,
    tap_shapes,
    unwrap_model,
)

__all__ = [
    "FIRST_CONV_MODES",
    "NORMS",
    "ConvAutoEncoder",
    "CriticMLP",
    "DualAutoEncoder",
    "DualEncoderClassifier",
    "DualEncoderSegmenter",
    "DualSegmenter",
    "build_network",
    "convert_norm",
    "create_encoder",
    "freeze_unused_parameters",
    "list_networks",
    "rebuild_network",
    "recipe_of",
    "register_network",
    "LAYER_SETS",
    "ArchitectureSpec",
    "ClassifierHead",
    "EncoderClassifier",
    "FeatureTaps",
    "ProjectionHead",
    "SegNet",
    "TapPoint",
    "copy_matching_weights",
    "create_classifier",
    "create_model",
    "get_architecture",
    "layer_set",
    "list_architectures",
    "check_encoder_name",
    "list_encoders",
    "list_taps",
    "load_weights",
    "model_summary",
    "register_architecture",
    "tap_points",
    "tap_shapes",
    "unwrap_model",
]
