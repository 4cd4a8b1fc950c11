"""The recipe field reference is generated from the schema, so it cannot drift from what recipes accept."""

from pathlib import Path

from tltoolkit.recipe.reference import render_reference, undocumented

PAGE = Path(__file__).resolve().parents[2] / "docs" / "recipe-fields.md"


def test_the_committed_reference_is_what_the_schema_generates():
    assert PAGE.read_text(encoding="utf-8") == render_reference(), (
        "docs/recipe-fields.md is stale: run `python -m tltoolkit.recipe.reference > docs/recipe-fields.md`"
    )


def test_every_recipe_field_says_what_it_does():
    assert undocumented() == []


def test_the_reference_lists_nested_fields_with_their_defaults():
    page = render_reference()
    assert "| `stages.N.optimizer.learning_rate` | float | `0.001` |" in page
    assert "| `data.augment.flip` | `none` / `horizontal` / `vertical` / `horizontal_and_vertical` |" in page
    assert "## `search.space.PATH`" in page and "## `pretrain.autoencoder`" in page
