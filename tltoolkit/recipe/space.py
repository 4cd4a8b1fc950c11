"""Search spaces over recipe fields: checking dotted paths and ranges, and making a trial's recipe from its values."""

from __future__ import annotations

import copy
import difflib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tltoolkit.recipe.schema import HyperparameterSpec, Recipe


def _fields(node: Any) -> list[str]:
    if isinstance(node, dict):
        return sorted(node)
    if isinstance(node, list):
        return [str(i) for i in range(len(node))]
    return []


def lookup(tree: dict, path: str) -> Any:
    """The value at dotted `path` (`stages.0.optimizer.learning_rate`).

    Raises:
        ValueError: A part of the path does not exist; the message lists what does.
    """
    node: Any = tree
    keys = path.split(".")
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            options = _fields(node)
            hint = difflib.get_close_matches(key, options, n=1)
            fix = f" Did you mean `{'.'.join(keys[:depth] + hint)}`?" if hint else ""
            where = f"`{'.'.join(keys[:depth])}`" if depth else "the recipe"
            has = f" {where} has: {', '.join(options)}." if options else f" {where} holds a single value."
            if isinstance(node, list):
                has = f" {where} is a list of {len(node)} item(s); use an index from 0 to {len(node) - 1}."
            raise ValueError(f"search.space.`{path}`: no such recipe field (no `{here}`).{fix}{has}")
    return node


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _check_default(path: str, spec: HyperparameterSpec, current: Any) -> None:
    """The recipe's own value is the hyperparameter's default, so it must lie in the space."""
    problem = None
    if spec.type == "boolean" and not isinstance(current, bool):
        problem = f"is {current!r}, not true or false"
    elif spec.type in ("int", "float"):
        numeric = isinstance(current, (int, float)) and not isinstance(current, bool)
        if not numeric or (spec.type == "int" and current != int(current)):
            problem = f"is {current!r}, not {'a whole number' if spec.type == 'int' else 'a number'}"
        elif not spec.min <= current <= spec.max:
            problem = f"{current!r} is outside [{spec.min:g}, {spec.max:g}]"
    elif spec.type == "choice" and not any(_same(current, v) for v in spec.values):
        problem = f"{current!r} is not among the values {spec.values}"
    if problem:
        raise ValueError(
            f"search.space.`{path}`: the recipe's own value {problem}. A search starts from the recipe's values, "
            f"so include it in the space or change `{path}` in the recipe."
        )


def candidates(spec: HyperparameterSpec) -> list[Any]:
    """Values that show whether the whole range is valid: the ends of a range, every choice, both booleans."""
    if spec.type == "boolean":
        return [False, True]
    if spec.type == "choice":
        return list(spec.values)
    ends = [spec.min, spec.max]
    return [int(v) for v in ends] if spec.type == "int" else ends


def check_space(recipe: Recipe) -> None:
    """Every path exists and is a single field, the recipe's value lies in its range, and every end is valid.

    Raises:
        ValueError: Naming the path, the value and the fix (reported by the loader with the recipe's name).
    """
    from pydantic import ValidationError

    base = base_tree(recipe)
    for path, spec in recipe.search.space.items():
        if path.split(".")[0] in ("search", "tracking", "name"):
            raise ValueError(
                f"search.space.`{path}`: cannot be searched; search data, backbone, head, stages or seed fields"
            )
        current = lookup(base, path)
        if isinstance(current, dict):
            raise ValueError(
                f"search.space.`{path}`: a section, not a field; name one of its fields "
                f"({', '.join(_fields(current))})."
            )
        _check_default(path, spec, current)
        for value in candidates(spec):
            try:
                type(recipe).model_validate(set_values(base, {path: value}))
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(p) for p in error["loc"] if not str(p).startswith(("function-", "literal[")))
                message = error["msg"].removeprefix("Value error, ")
                raise ValueError(
                    f"search.space.`{path}`: the value {value!r} is not valid for `{where or path}` ({message}); "
                    "narrow the range or drop the value."
                ) from None


def base_tree(recipe: Recipe) -> dict:
    """The recipe as data, without its `search` section: what every trial starts from."""
    tree = recipe.to_dict()
    tree["search"] = None
    return tree


def set_values(tree: dict, values: dict[str, Any]) -> dict:
    """A copy of `tree` with each dotted path (already checked to exist) set to its value."""
    tree = copy.deepcopy(tree)
    for path, value in values.items():
        *parents, last = path.split(".")
        node: Any = tree
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = copy.deepcopy(value)
    return tree


def trial_recipe(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """The recipe a trial runs: `recipe` without `search`, with `values` at their paths.

    Raises:
        RecipeError: This combination of values is not a valid recipe (each value alone was checked up front).
    """
    from pydantic import ValidationError

    from tltoolkit.errors import RecipeError

    try:
        return type(recipe).model_validate(set_values(base_tree(recipe), values))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise RecipeError(f"The trial values {values} do not make a valid recipe: {problems}.") from None
