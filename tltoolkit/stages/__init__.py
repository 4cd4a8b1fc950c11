"""Stages: one training session runs a plan of stages; each sets what trains, compiles its optimizer and fits."""

from tltoolkit.stages.callbacks import StageRun
from tltoolkit.stages.features import CACHE, FeatureCache, FeatureSource
from tltoolkit.stages.hooks import TrainingHooks
from tltoolkit.stages.optimizers import build_optimizer, current_learning_rate, learning_rate_schedule
from tltoolkit.stages.runner import ClassifierOutcome, compile_for_stage, fit_stage
from tltoolkit.stages.session import (
    PlannedStage,
    SessionOptions,
    SessionResult,
    StageOutcome,
    TrainingSession,
    backbone_for,
    plan_stages,
)
from tltoolkit.stages.training import Training, class_weights, prepare_training

__all__ = [
    "CACHE",
    "ClassifierOutcome",
    "FeatureCache",
    "FeatureSource",
    "PlannedStage",
    "SessionOptions",
    "SessionResult",
    "StageOutcome",
    "StageRun",
    "Training",
    "TrainingHooks",
    "TrainingSession",
    "backbone_for",
    "build_optimizer",
    "class_weights",
    "compile_for_stage",
    "current_learning_rate",
    "fit_stage",
    "learning_rate_schedule",
    "plan_stages",
    "prepare_training",
]
