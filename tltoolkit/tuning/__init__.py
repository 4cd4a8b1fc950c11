"""Tuning: keras-tuner searches over recipe fields, each trial running the recipe's stages."""

from tltoolkit.tuning.space import declare, recipe_values, space_fingerprint
from tltoolkit.tuning.tuner import RecipeTuner, TrialRunner, build_oracle, resolve_trial

__all__ = [
    "RecipeTuner",
    "TrialRunner",
    "build_oracle",
    "declare",
    "recipe_values",
    "resolve_trial",
    "space_fingerprint",
]
