"""The recipe field reference (`docs/recipe-fields.md`), generated from the schema's field descriptions.

There is one copy of each fact: the description in `schema.py`. `python -m tltoolkit.recipe.reference > FILE`
writes the page; a test fails when the committed page differs from what the schema generates.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tltoolkit.recipe.schema import Recipe

HEADER = """# Recipe fields

Generated from the schema's descriptions (`tltoolkit/recipe/schema.py`) by
`python -m tltoolkit.recipe.reference > docs/recipe-fields.md`; a test fails when this page is stale.
Every field but `search.space` has a default, so a recipe states only what differs. Paths are dotted as `--set`
takes them (`stages.0.epochs`: list items by index, `N` below); in `search.space`, `PATH` is a dotted recipe path.
"""


def _sections(model: type[BaseModel], path: str = "") -> list[tuple[str, type[BaseModel]]]:
    """`model` and every section below it, depth first, by dotted path (list items as `N`)."""
    found = [(path, model)]
    for name, field in model.model_fields.items():
        inner = _model_in(field.annotation)
        if inner is not None:
            item = {list: ".N", dict: ".PATH"}.get(typing.get_origin(field.annotation), "")
            found += _sections(inner, f"{path}{name}{item}.")
    return found


def _model_in(annotation) -> type[BaseModel] | None:
    """The section a field holds (directly, in a list or dict, optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, dict, Union, types.UnionType):
        for arg in typing.get_args(annotation):
            inner = _model_in(arg)
            if inner is not None:
                return inner
    return None


def _type(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " / ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type(a) for a in typing.get_args(annotation) if a is not type(None)) + " (optional)" * (
            type(None) in typing.get_args(annotation)
        )
    if origin is typing.Annotated:
        return _type(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type(a) for a in typing.get_args(annotation))
        return f"{origin.__name__}[{args}]"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} items"
    return f"`{json.dumps(value)}`"


def render_reference() -> str:
    """The whole page, as Markdown."""
    lines = [HEADER]
    for path, model in _sections(Recipe):
        title = path.rstrip(".") or "top level"
        lines += [f"## `{title}`" if path else "## Top level", ""]
        if model.__doc__ and model is not Recipe and not model.__doc__.startswith(("Usage docs", "!!!")):
            lines += [" ".join(model.__doc__.split()), ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            meaning = field.description or ""
            cells = [f"`{path}{name}`", _type(field.annotation), _default(field), meaning]
            lines.append("| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def undocumented() -> list[str]:
    """Dotted paths of fields without a description (each should say what it does)."""
    return [
        f"{path}{name}"
        for path, model in _sections(Recipe)
        for name, f in model.model_fields.items()
        if not f.description
    ]


if __name__ == "__main__":
    sys.stdout.write(render_reference())
