"""A recipe's `search.space` as keras-tuner hyperparameters, and a trial's values back as recipe values."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import keras_tuner as kt

from tltoolkit.recipe import Recipe
from tltoolkit.recipe.schema import HyperparameterSpec
from tltoolkit.recipe.space import base_tree, lookup

# keras-tuner's own hyperparameters (Hyperband's budget and bracket bookkeeping); not recipe fields.
TUNER_PREFIX = "tuner/"


def _encoded(spec: HyperparameterSpec) -> bool:
    """keras-tuner's Choice holds one type (int, float, str or bool): anything else travels as JSON text."""
    types = {type(v) for v in spec.values}
    return not (len(types) == 1 and types <= {int, float, str, bool}) and not types <= {int, float}


def _choice_values(spec: HyperparameterSpec) -> list:
    if _encoded(spec):
        return [json.dumps(v) for v in spec.values]
    if {type(v) for v in spec.values} == {int, float}:
        return [float(v) for v in spec.values]
    return list(spec.values)


def declare(hp: kt.HyperParameters, recipe: Recipe) -> None:
    """Declares every `search.space` entry on `hp`, each defaulting to the recipe's own value."""
    tree = base_tree(recipe)
    for path, spec in recipe.search.space.items():
        current = lookup(tree, path)
        if spec.type == "boolean":
            hp.Boolean(path, default=current)
        elif spec.type == "int":
            hp.Int(
                path,
                int(spec.min),
                int(spec.max),
                step=int(spec.step) if spec.step else None,
                sampling=spec.sampling,
                default=int(current),
            )
        elif spec.type == "float":
            hp.Float(path, spec.min, spec.max, step=spec.step, sampling=spec.sampling, default=float(current))
        else:
            values = _choice_values(spec)
            default = json.dumps(current) if _encoded(spec) else type(values[0])(current)
            hp.Choice(path, values, default=default)


def recipe_values(recipe: Recipe, values: dict[str, Any]) -> dict[str, Any]:
    """A trial's hyperparameter values as recipe values (JSON-encoded choices decoded, tuner bookkeeping dropped)."""
    out = {}
    for path, value in values.items():
        if path.startswith(TUNER_PREFIX):
            continue
        spec = recipe.search.space.get(path)
        if spec is not None and spec.type == "choice" and _encoded(spec):
            value = json.loads(value)
        elif spec is not None and spec.type == "int":
            value = int(value)
        out[path] = value
    return out


def space_fingerprint(recipe: Recipe) -> str:
    """Changes when the searched paths, their ranges, the tuner or the objective change."""
    search = recipe.search
    described = {
        "space": {path: spec.model_dump(mode="json") for path, spec in sorted(search.space.items())},
        "tuner": search.tuner,
        "objective": search.objective,
        "direction": search.objective_direction,
        "seed": search.seed,
        "executions": search.executions_per_trial,
        "max_epochs": search.max_epochs,
        "factor": search.factor,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def recipe_fingerprint(recipe: Recipe) -> str:
    """Changes when anything a trial trains with changes (the recipe without its search, tracking and runtime
    sections: a search may continue on other devices)."""
    tree = base_tree(recipe)
    tree.pop("tracking", None)
    tree.pop("runtime", None)
    tree.pop("name", None)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def describe(spec: HyperparameterSpec) -> str:
    """A short text for MLflow params and tables: `float [0.0001, 0.01] log`, `choice [[], [256]]`."""
    if spec.type in ("int", "float"):
        extra = (f" step {spec.step:g}" if spec.step else "") + (
            f" {spec.sampling}" if spec.sampling != "linear" else ""
        )
        return f"{spec.type} [{spec.min:g}, {spec.max:g}]{extra}"
    return "boolean" if spec.type == "boolean" else f"choice {json.dumps(spec.values)}"
