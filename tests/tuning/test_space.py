import keras_tuner as kt
import pytest
from conftest import tiny_recipe

from tltoolkit.errors import RecipeError
from tltoolkit.recipe import load_recipe
from tltoolkit.tuning import declare, recipe_values, resolve_trial, space_fingerprint


def with_space(space, **search):
    recipe = tiny_recipe(head={"dense": [16], "dropout": 0.2})
    recipe["search"] = {"space": space, **search}
    return recipe


def test_space_declares_every_kind_with_the_recipes_values_as_defaults():
    recipe = load_recipe(
        with_space(
            {
                "head.dropout": {"type": "float", "min": 0.0, "max": 0.5},
                "stages.0.optimizer.learning_rate": {"type": "float", "min": 1e-4, "max": 1e-1, "sampling": "log"},
                "head.dense.0": {"type": "int", "min": 8, "max": 64, "step": 8},
                "stages.1.unfreeze": ["all", 2, "block3_conv"],  # a list is a choice; mixed types are fine
                "head.dense": [[16], [32, 8]],
                "stages.1.train_bn": {"type": "boolean"},
                "data.augment.rotation": {"type": "float", "min": 0.0, "max": 0.1},
                "backbone.name": ["test_tiny", "convnet_small"],
            }
        )
    )
    hp = kt.HyperParameters()
    declare(hp, recipe)
    defaults = recipe_values(recipe, hp.values)
    assert defaults == {
        "head.dropout": 0.2,
        "stages.0.optimizer.learning_rate": 1e-2,
        "head.dense.0": 16,
        "stages.1.unfreeze": "all",
        "head.dense": [16],
        "stages.1.train_bn": False,
        "data.augment.rotation": 0.0,
        "backbone.name": "test_tiny",
    }
    assert resolve_trial(recipe, hp.values).search is None
    values = dict(hp.values, **{"stages.1.unfreeze": "2", "head.dense": "[32, 8]", "stages.1.train_bn": True})
    trial = resolve_trial(recipe, values)
    assert trial.stages[1].unfreeze == 2 and trial.head.dense == [32, 8] and trial.stages[1].train_bn


def test_hyperband_budget_scales_every_stage():
    recipe = load_recipe(with_space({"head.dropout": [0.2, 0.4]}, tuner="hyperband"))
    assert [s.epochs for s in recipe.stages] == [2, 1]
    assert [s.epochs for s in resolve_trial(recipe, {"tuner/epochs": 1}).stages] == [1, 1]
    assert [s.epochs for s in resolve_trial(recipe, {"tuner/epochs": 6}).stages] == [4, 2]


@pytest.mark.parametrize(
    "space, search, message",
    [
        (
            {"head.dropuot": {"type": "float", "min": 0, "max": 0.5}},
            {},
            r"search.space.head.dropuot.*Did you mean `head.dropout`",
        ),
        ({"head.dense.3": {"type": "int", "min": 8, "max": 64}}, {}, r"index from 0 to 0"),
        ({"stages.2.epochs": {"type": "int", "min": 1, "max": 5}}, {}, r"`stages` is a list of 2"),
        ({"head": {"type": "float", "min": 0, "max": 0.5}}, {}, r"a section, not a field"),
        ({"head.dropout": {"type": "float", "min": 0.3, "max": 0.5}}, {}, r"own value 0.2 is outside \[0.3, 0.5\]"),
        ({"head.dropout": {"type": "float", "min": 0.0, "max": 1.5}}, {}, r"1.5 is not valid for `head.dropout`"),
        ({"head.dropout": {"type": "float", "min": 0.5, "max": 0.1}}, {}, r"`min` \(0.5\) must be below `max`"),
        (
            {"stages.0.optimizer.learning_rate": {"type": "float", "min": 0, "max": 1, "sampling": "log"}},
            {},
            "min` > 0",
        ),
        ({"backbone.name": ["test_tiny", "resnet_nope"]}, {}, r"'resnet_nope' is not valid"),
        ({"stages.1.unfreeze": ["none", "block2_conv"]}, {}, r"own value 'all' is not among"),
        ({"head.dropout": {"type": "float", "min": 0, "max": 0.5}}, {"tuner": "grid"}, r"needs a `step`"),
        ({"head.dropout": [0.2]}, {"objective": "val_acc"}, r"objective must be one of"),
        ({"tracking.experiment": ["a", "b"]}, {}, r"cannot be searched"),
    ],
)
def test_bad_spaces_are_errors_naming_the_path(space, search, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(with_space(space, **search))


def test_errors_point_at_the_yaml_line(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("head:\n  dropout: 0.2\nsearch:\n  space:\n    head.dropuot: [0.1, 0.2]\n")
    with pytest.raises(RecipeError, match=r"search.space.head.dropuot` \(line 5\)"):
        load_recipe(path)


def test_fingerprint_changes_with_the_space_only():
    a = load_recipe(with_space({"head.dropout": [0.2, 0.4]}))
    b = load_recipe(with_space({"head.dropout": [0.2, 0.4]}, max_trials=50))
    c = load_recipe(with_space({"head.dropout": [0.2, 0.3]}))
    assert space_fingerprint(a) == space_fingerprint(b) != space_fingerprint(c)


def test_shipped_search_recipe_is_valid():
    from pathlib import Path

    recipe = load_recipe(Path(__file__).parents[2] / "recipes" / "search_head.yaml")
    assert recipe.search.max_trials >= 10 and recipe.backbone.weights == "torchvision"
    assert any(path.startswith("stages.0.optimizer") for path in recipe.search.space)


@pytest.mark.parametrize("tuner", ["random", "bayesian"])
def test_first_trial_is_the_recipe_as_written(tuner):
    from tltoolkit.tuning import build_oracle

    recipe = load_recipe(
        with_space(
            {"head.dropout": {"type": "float", "min": 0.0, "max": 0.5}, "head.dense": [[], [16], [32]]}, tuner=tuner
        )
    )
    oracle = build_oracle(recipe)
    hp = oracle.get_space()
    declare(hp, recipe)
    oracle.update_space(hp)
    first = oracle.populate_space("0")["values"]
    assert recipe_values(recipe, first) == {"head.dropout": 0.2, "head.dense": [16]}


def test_importance_ranks_what_explains_the_objective():
    import pandas as pd

    from tltoolkit.tracking.plots import hyperparameter_importance, search_figure

    trials = pd.DataFrame(
        {
            "trial": ["0", "1", "2", "3"],
            "val_accuracy": [0.5, 0.6, 0.7, 0.8],
            "lr": [1e-4, 1e-3, 1e-2, 1e-1],
            "dense": ["[]", "[]", "[256]", "[256]"],
            "flat": [0.2] * 4,
        }
    )
    importance = hyperparameter_importance(trials, "val_accuracy", ["lr", "dense", "flat"])
    assert importance["lr"] == pytest.approx(1.0) and importance["flat"] == 0.0
    assert importance["dense"] == pytest.approx(0.8) and list(importance.index) == ["lr", "dense", "flat"]
    figure = search_figure(trials, "val_accuracy", "max", ["lr", "dense", "flat"])
    assert len(figure.axes) == 4 and figure.axes[1].get_xlabel() == "lr" and figure.axes[1].get_xscale() == "log"
