"""Loading recipes: safe YAML, `--set` overrides applied before validation, errors that name line and fix."""

from __future__ import annotations

import copy
import difflib
import re
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tltoolkit.errors import RecipeError
from tltoolkit.recipe.schema import Recipe, StageConfig


def load_recipe(source: str | Path | dict, overrides: Iterable[str] = (), check_search: bool = True) -> Recipe:
    """Loads, overrides and validates a recipe.

    Args:
        source: A YAML file path, or the recipe as a dict (tests, tuning).
        overrides: `dotted.path=value` strings; values are parsed as YAML (`5`, `1e-5`, `[256, 128]`, `null`).
            List items are addressed by index: `stages.1.optimizer.learning_rate=1e-5`.
        check_search: Also check that every `search.space` path and value fits the recipe (what `tune` needs);
            `False` checks the section's shape only (`run`, which ignores it).

    Returns:
        The validated, frozen `Recipe`, every default filled in.

    Raises:
        RecipeError: The file is missing, is not safe YAML, has unknown keys, wrong types or out-of-range values,
            or an override names a path that does not exist. The message names the file, line, field, value and fix.
    """
    overrides = list(overrides)
    if isinstance(source, dict):
        label, text, raw = "recipe", None, copy.deepcopy(source)
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise RecipeError(f"Recipe file {label} does not exist; pass a YAML file such as recipes/quickstart.yaml.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise RecipeError(
                f"{label} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); recipes are "
                "YAML files: save it as UTF-8."
            ) from None
        raw = _safe_load(text, label)
        raw.setdefault("name", path.stem)

    origins: dict[str, str] = {}
    for override in overrides:
        keys, value = parse_override(override)
        _apply(raw, keys, value, override)
        origins[".".join(keys)] = override

    try:
        return Recipe.model_validate(raw, context={"check_search": check_search})
    except ValidationError as exc:
        raise RecipeError(_describe(exc, label, text, origins)) from None


def parse_override(override: str) -> tuple[list[str], Any]:
    """Splits `a.b.0.c=value` into `["a", "b", "0", "c"]` and the YAML-parsed value."""
    path, sep, value_text = override.partition("=")
    if not sep or not path.strip():
        raise RecipeError(f"Override {override!r} must look like `dotted.path=value`, e.g. `stages.0.epochs=5`.")
    try:
        value = _yaml(value_text, f"--set {override}") if value_text.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"Override {override!r}: the value is not valid YAML ({exc.problem}).") from None
    return [key.strip() for key in path.strip().split(".")], value


MAX_NODES = 100_000  # Nodes of the YAML document with every alias expanded: a real recipe has a few hundred.


def _yaml(text: str, label: str) -> Any:
    """Safe YAML whose size with every alias expanded is capped, checked before anything is built from it.

    Anchors and aliases stay usable (`lr: &lr 1e-3` ... `learning_rate: *lr`), but an "alias bomb" (each level
    repeating the previous one) is refused at once instead of expanding to millions of nodes in validation.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise RecipeError(f"{label}: nested too deeply to be a recipe.") from None
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_NODES:
            raise RecipeError(
                f"{label}: its anchors and aliases expand to more than {MAX_NODES:,} YAML nodes (an alias bomb?); "
                "write the recipe out, or reuse fewer aliases."
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict[int, int]) -> int:
    """Nodes under `node` as if every alias were a copy; each shared node is counted once, then reused."""
    if id(node) not in sizes:
        sizes[id(node)] = 0  # A node that (through an alias) contains itself counts as a leaf.
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [item for pair in node.value for item in pair]
        else:
            children = []
        sizes[id(node)] = 1 + sum(min(_expanded_size(child, sizes), MAX_NODES + 1) for child in children)
    return sizes[id(node)]


def _safe_load(text: str, label: str) -> dict:
    try:
        raw = _yaml(text, label)
    except yaml.constructor.ConstructorError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise RecipeError(
            f"{label}, line {line}: the tag {exc.problem.split('tag ')[-1] if exc.problem else ''} is not allowed; "
            "recipes are plain YAML (only safe tags) and nothing in them is ever executed."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{label}{where}: not valid YAML: {getattr(exc, 'problem', exc)}.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{label}: a recipe must be a mapping of sections (data, backbone, head, stages, ...).")
    return raw


def _defaults() -> dict:
    """Every field's default; the optional sections (`search`, `pretrain`) with theirs, so a recipe without one can
    still name its fields in an override (`--set search.name=...`)."""
    tree = Recipe().to_dict()
    for name, section in Recipe.model_fields.items():
        models = [t for t in typing.get_args(section.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if tree[name] is None and models:
            model = models[0]
            values = {key: f.get_default(call_default_factory=True) for key, f in model.model_fields.items()}
            tree[name] = {
                key: value.model_dump(mode="json") if isinstance(value, BaseModel) else value
                for key, value in values.items()
                if not model.model_fields[key].is_required()
            }
    return tree


def _apply(raw: dict, keys: list[str], value: Any, override: str) -> None:
    """Sets `raw[keys...] = value`, filling missing parents from the schema's defaults."""
    node: Any = raw
    default: Any = _defaults()
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(
                    f"Override {override!r}: `{where}` is not an item of a list with {len(node)} item(s); "
                    f"use an index from 0 to {len(node) - 1}."
                )
            index = int(key)
            default = default[index] if isinstance(default, list) and index < len(default) else _stage_default()
            if last:
                node[index] = value
                return
            if node[index] is None:
                node[index] = copy.deepcopy(default)
            node = node[index]
            continue
        if not isinstance(node, dict):
            parent = ".".join(keys[:depth]) or "the recipe"
            raise RecipeError(f"Override {override!r}: `{parent}` holds a single value, so it has no field `{key}`.")
        known = set(node) | (set(default) if isinstance(default, dict) else set())
        if key not in known and not _is_free_mapping(keys[:depth]):
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            fix = f" Did you mean `{'.'.join(keys[:depth] + hint)}`?" if hint else ""
            raise RecipeError(
                f"Override {override!r}: the recipe has no field `{where}`.{fix} "
                f"Fields here: {', '.join(sorted(known))}."
            )
        default = default.get(key) if isinstance(default, dict) else None
        if last:
            node[key] = value
            return
        if node.get(key) is None:
            node[key] = copy.deepcopy(default) if default is not None else {}
        node = node[key]


def _stage_default() -> dict:
    """Defaults for a list item past the default list's end (only `stages` holds mappings)."""
    return StageConfig().model_dump(mode="json")


def _is_free_mapping(parent: list[str]) -> bool:
    """Mappings whose keys are the user's own (class names, tags)."""
    return parent in (["head", "class_weight"], ["tracking", "tags"])


def _describe(exc: ValidationError, label: str, text: str | None, origins: dict[str, str]) -> str:
    node = yaml.compose(text, Loader=yaml.SafeLoader) if text else None
    lines = [f"{label} is not a valid recipe ({exc.error_count()} problem{'s' if exc.error_count() > 1 else ''}):"]
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not str(part).startswith(("function-", "literal["))]
        message = error["msg"].removeprefix("Value error, ").rstrip(".")
        space = _SPACE_PATH.match(message)
        if not loc and space:  # A search-space problem found with the whole recipe in view: point at its entry.
            loc, message = ["search", "space", space.group(1)], space.group(2)
        dotted = ".".join(loc) or "(top level)"
        where = ""
        origin = next((o for key, o in origins.items() if dotted == key or dotted.startswith(key + ".")), None)
        if origin:
            where = f" (from --set {origin})"
        elif node is not None:
            line = _line_of(node, loc)
            if line:
                where = f" (line {line})"
        if error["type"] == "extra_forbidden":
            allowed = _allowed_fields(loc[:-1])
            hint = difflib.get_close_matches(loc[-1], allowed, n=1)
            fix = f"did you mean `{hint[0]}`? " if hint else ""
            message = f"unknown field; {fix}fields allowed here: {', '.join(allowed)}"
            lines.append(f"  - `{dotted}`{where}: {message}.")
            continue
        value = error.get("input")
        shown = f" = {value!r}" if not isinstance(value, (dict, list)) else ""
        lines.append(f"  - `{dotted}`{shown}{where}: {message}.")
    return "\n".join(lines)


_SPACE_PATH = re.compile(r"^search\.space\.`([^`]+)`: (.*)$", re.DOTALL)


def _allowed_fields(loc: list[str]) -> list[str]:
    model: Any = Recipe
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        inner = [a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")]
        if not inner and hasattr(annotation, "model_fields"):
            inner = [annotation]
        if not inner:
            return []
        model = inner[0]
    return sorted(model.model_fields)


def locate(source, field: str, overrides: Iterable[str] = ()) -> str:
    """Where a recipe field was set, as a message prefix: `"--set a.b=1: "`, `"recipes/x.yaml, line 12: "` or `""`.

    For errors found after validation (a freeze point the built backbone lacks), so they point at the line too.
    """
    for override in overrides:
        if override.split("=", 1)[0].strip() == field:
            return f"--set {override}: "
    if isinstance(source, dict) or source is None or not Path(source).is_file():
        return ""
    try:
        node = yaml.compose(Path(source).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return ""
    line = _line_of(node, field.split(".")) if node is not None else None
    return f"{source}, line {line}: " if line else f"{source}: "


def _line_of(node: yaml.Node, loc: list[str]) -> int | None:
    """The 1-based line of the deepest YAML node on `loc` that exists in the file."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                return line
            line = match[0].start_mark.line + 1
            node = match[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, as saved with every run."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def with_data(recipe: Recipe, data_dir, unlabeled=None) -> Recipe:
    """`recipe` with its data folders recorded (absolute), so the recipe saved with a run runs on its own."""
    data = {"dir": str(Path(data_dir).resolve())}
    if unlabeled:
        data["unlabeled"] = str(Path(unlabeled).resolve())
    return recipe.model_copy(update={"data": recipe.data.model_copy(update=data)})


def as_recipe(recipe: Recipe | str | Path | dict, overrides: Iterable[str], check_search: bool = True) -> Recipe:
    """A `Recipe` from a file, dict or `Recipe`, with `--set` overrides applied before validation (`check_search`:
    see `load_recipe`)."""
    if isinstance(recipe, Recipe):
        return load_recipe(recipe.to_dict(), overrides, check_search) if overrides else recipe
    return load_recipe(recipe, overrides, check_search)
