"""Losses layer: pure functions on tensors, one loss family per module, each checked against a reference.

Imports only torch and :mod:`xmodal.errors`; methods compose these. See each module for its paper,
its defaults and the library it is tested against.
"""

from xmodal.losses.contrastive import info_nce, multiview_info_nce, nt_xent, supervised_contrastive, view_pairs
from xmodal.losses.cosine import REDUCTIONS, layer_cosine, reconstruction_loss
from xmodal.losses.margin import margin_contrastive
from xmodal.losses.segmentation import pixel_cross_entropy, predict_classes, segmentation_loss, soft_dice_loss
from xmodal.losses.selection import (
    consistency_loss,
    consistency_weights,
    cross_modal_confidence,
    entity_confidence,
    label_confidence,
    ramp,
    selection_thresholds,
    selection_weights,
)
from xmodal.losses.sliced_wasserstein import class_sliced_wasserstein, random_projections, sliced_wasserstein

__all__ = [
    "REDUCTIONS",
    "class_sliced_wasserstein",
    "consistency_loss",
    "consistency_weights",
    "cross_modal_confidence",
    "entity_confidence",
    "info_nce",
    "label_confidence",
    "layer_cosine",
    "margin_contrastive",
    "multiview_info_nce",
    "nt_xent",
    "pixel_cross_entropy",
    "predict_classes",
    "ramp",
    "random_projections",
    "reconstruction_loss",
    "segmentation_loss",
    "selection_thresholds",
    "selection_weights",
    "sliced_wasserstein",
    "soft_dice_loss",
    "supervised_contrastive",
    "view_pairs",
]
