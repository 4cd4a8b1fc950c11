"""Recipes: YAML in, a validated, frozen `Recipe` out."""

from tltoolkit.recipe.loader import as_recipe, dump_recipe, load_recipe, locate, parse_override, with_data
from tltoolkit.recipe.schema import (
    AugmentConfig,
    BackboneConfig,
    DataConfig,
    EarlyStoppingConfig,
    EvaluationConfig,
    HeadConfig,
    OptimizerConfig,
    Recipe,
    RuntimeConfig,
    ScheduleConfig,
    StageConfig,
    TrackingConfig,
    flatten,
)

__all__ = [
    "AugmentConfig",
    "BackboneConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "HeadConfig",
    "OptimizerConfig",
    "Recipe",
    "RuntimeConfig",
    "ScheduleConfig",
    "StageConfig",
    "EvaluationConfig",
    "TrackingConfig",
    "as_recipe",
    "dump_recipe",
    "flatten",
    "load_recipe",
    "locate",
    "parse_override",
    "with_data",
]
