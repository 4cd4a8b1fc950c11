"""Model: backbone (inference mode) + new head, freeze policies, and scoring."""

from tltoolkit.model.build import (
    apply_head,
    auxiliary_heads,
    backbone_of,
    build_classifier,
    layer_output,
    run_subgraph,
    supervised_model,
)
from tltoolkit.model.freeze import TrainableSummary, check_points, frozen_prefix, set_trainable, unfrozen_prefix
from tltoolkit.model.layers import Classifier, InferenceMode, class_names_of

__all__ = [
    "Classifier",
    "InferenceMode",
    "TrainableSummary",
    "apply_head",
    "auxiliary_heads",
    "backbone_of",
    "build_classifier",
    "check_points",
    "class_names_of",
    "frozen_prefix",
    "layer_output",
    "run_subgraph",
    "set_trainable",
    "supervised_model",
    "unfrozen_prefix",
]
