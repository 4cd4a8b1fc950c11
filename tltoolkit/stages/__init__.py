"""Stages: each sets what trains, compiles its own optimizer and schedule, and fits."""

from tltoolkit.stages.features import CACHE, FeatureCache, FeatureSource
from tltoolkit.stages.optimizers import build_optimizer, current_learning_rate, learning_rate_schedule
from tltoolkit.stages.runner import (
    StageOutcome,
    Training,
    class_weights,
    compile_for_stage,
    fit_stage,
    prepare_training,
)

__all__ = [
    "CACHE",
    "FeatureCache",
    "FeatureSource",
    "StageOutcome",
    "Training",
    "build_optimizer",
    "class_weights",
    "compile_for_stage",
    "current_learning_rate",
    "fit_stage",
    "learning_rate_schedule",
    "prepare_training",
]
