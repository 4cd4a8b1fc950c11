"""Model: backbone (inference mode) + new head, freeze policies, and scoring."""

from tltoolkit.model.build import backbone_of, build_classifier
from tltoolkit.model.freeze import TrainableSummary, check_points, frozen_prefix, set_trainable, unfrozen_prefix
from tltoolkit.model.layers import Classifier, InferenceMode, class_names_of

__all__ = [
    "Classifier",
    "InferenceMode",
    "TrainableSummary",
    "backbone_of",
    "build_classifier",
    "check_points",
    "class_names_of",
    "frozen_prefix",
    "set_trainable",
    "unfrozen_prefix",
]
