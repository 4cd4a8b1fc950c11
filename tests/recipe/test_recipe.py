from pathlib import Path

import pytest
from pydantic import ValidationError

from tltoolkit.errors import RecipeError
from tltoolkit.recipe import Recipe, dump_recipe, load_recipe

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_make_a_complete_recipe():
    recipe = Recipe()
    assert [s.name for s in recipe.stages] == ["head", "finetune"]
    assert recipe.stages[1].optimizer.learning_rate == 1e-5
    assert recipe.flat()["stages.0.epochs"] == 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid_and_commented(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert path.read_text().count("#") >= 5, "shipped recipes teach their fields in comments"


def test_required_recipes_ship():
    shipped = {p.stem for p in RECIPES}
    assert {"quickstart", "mobilenet_v2", "efficientnet_lite0", "efficientnet_b0", "resnet50"} <= shipped


def test_unknown_key_names_field_line_and_suggestion(tmp_path):
    path = write(tmp_path, "data:\n  batch_size: 8\n  imge_size: 64\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "data.imge_size" in message and "line 3" in message and "did you mean `image_size`" in message
    assert str(path) in message


def test_wrong_type_and_range_name_value(tmp_path):
    path = write(tmp_path, "stages:\n  - name: head\n    epochs: zero\n  - name: ft\n    epochs: -2\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "`stages.0.epochs` = 'zero' (line 3)" in message
    assert "`stages.1.epochs` = -2 (line 5)" in message and "greater than or equal to 1" in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("backbone:\n  name: resnet_50\n", "did you mean 'resnet50'"),
        ("backbone:\n  freeze: -3\n", "freeze as a layer count must be >= 0"),
        ("backbone:\n  freeze: 1.5\n", "fraction"),
        ("stages:\n  - name: a\n  - name: a\n", "stage names must be unique"),
        ("stages: []\n", "at least 1 item"),
        ("stages:\n  - optimizer: {name: adamw}\n", "adamw needs weight_decay"),
        ("head:\n  pooling: mean\n", "'avg', 'max' or 'flatten'"),
        ("search: {tuner: random}\n", r"search.space` (line 1): Field required"),
        ("pretrain: {epochs: 3}\n", "`pretrain.epochs` (line 1): unknown field; fields allowed here: autoencoder"),
        ("pretrain:\n  autoencoder: {encoder: resnet_50}\n", "did you mean 'resnet50'"),
        ("pretrain:\n  autoencoder: {noise: salt}\n", "'none', 'gaussian' or 'masking'"),
        ("data: {image_size: 36}\npretrain: {autoencoder: {widths: [8, 16, 32]}}\n", "divisible by 2**3 = 8"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_invalid_values_are_explained(tmp_path, text, fragment):
    with pytest.raises(RecipeError, match=None) as info:
        load_recipe(write(tmp_path, text))
    assert fragment in str(info.value)


def test_python_tags_are_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f'head: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(RecipeError, match="line 1.*not allowed"):
        load_recipe(path)
    assert not marker.exists()


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_apply_before_validation_with_list_indices(tmp_path):
    path = write(tmp_path, "data:\n  image_size: 224\n")
    recipe = load_recipe(
        path,
        [
            "stages.0.epochs=7",
            "data.image_size=96",
            "stages.1.optimizer.learning_rate=3e-6",
            "head.dense=[256, 128]",
            "backbone.freeze=block_13_expand",
            "tracking.tags.owner=me",
        ],
    )
    assert recipe.stages[0].epochs == 7
    assert recipe.data.image_size == 96
    assert recipe.stages[1].optimizer.learning_rate == 3e-6
    assert recipe.head.dense == [256, 128]
    assert recipe.backbone.freeze == "block_13_expand"
    assert recipe.tracking.tags == {"owner": "me"}


def test_override_can_fix_an_invalid_file_value(tmp_path):
    path = write(tmp_path, "stages:\n  - name: head\n    epochs: 0\n")
    assert load_recipe(path, ["stages.0.epochs=2"]).stages[0].epochs == 2


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("stages.0.epoch=3", "Did you mean `stages.0.epochs`"),
        ("stages.5.epochs=3", "index from 0 to 1"),
        ("nonsense", "dotted.path=value"),
        ("data.image_size.x=3", "holds a single value"),
    ],
)
def test_bad_overrides_are_explained(override, fragment):
    with pytest.raises(RecipeError) as info:
        load_recipe({}, [override])
    assert fragment in str(info.value)


def test_overrides_reach_fields_of_sections_the_file_leaves_out():
    """`search` and `pretrain` default to absent; their fields are still known to `--set`, with their defaults."""
    searched = load_recipe({"search": {"space": {"head.dropout": [0.1, 0.2]}}}, ["search.name=nightly"])
    assert searched.search.name == "nightly" and searched.search.max_trials == 10
    assert load_recipe({}, ["pretrain.autoencoder.epochs=3"]).pretrain.autoencoder.epochs == 3
    with pytest.raises(RecipeError, match="Did you mean `search.name`"):
        load_recipe({}, ["search.nmae=x"])


def test_invalid_override_value_names_the_flag():
    with pytest.raises(RecipeError, match=r"from --set data.batch_size=0"):
        load_recipe({}, ["data.batch_size=0"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe({"head": {"dense": [32]}}, ["stages.0.epochs=3"])
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again.to_dict() == recipe.to_dict()


def test_recipes_are_frozen():
    recipe = Recipe()
    with pytest.raises(ValidationError):
        recipe.seed = 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_freeze_points_exist_in_their_backbones(path):
    """A recipe naming a layer (e.g. resnet50's `conv5_block1_1_conv`) must name a real one."""
    import keras

    import tltoolkit
    from tltoolkit.model import check_points

    recipe = load_recipe(path)
    backbone = tltoolkit.create_backbone(recipe.backbone.name, weights="none", input_size=recipe.data.image_size)
    check_points(backbone, recipe.backbone.freeze, recipe.stages)
    keras.backend.clear_session()


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "../../escape"),
        ("name", "a/b"),
        ("search.name", ".."),
        ("search.name", "x\\y"),
        ("search.directory", "../outside"),
        ("search.directory", "tuning/../../up"),
    ],
)
def test_names_and_folders_cannot_escape_where_they_point(field, value):
    recipe = {"search": {"space": {"head.dropout": [0.0, 0.2]}}}
    section, _, key = field.rpartition(".")
    (recipe[section] if section else recipe)[key] = value
    with pytest.raises(RecipeError, match=rf"`{field}`.*(plain name|climbs out)"):
        load_recipe(recipe)


def test_an_alias_bomb_is_refused_at_once_and_plain_aliases_still_work(tmp_path):
    import time

    levels = "".join(f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"search:\n  l0: &l0 [x, x, x, x, x, x, x, x, x]\n{levels}")
    assert len(bomb.read_bytes()) < 500
    started = time.perf_counter()
    with pytest.raises(RecipeError, match=r"expand to more than 100,000 YAML nodes \(an alias bomb\?\)"):
        load_recipe(bomb)
    assert time.perf_counter() - started < 2
    assert load_recipe({}, ["head.dense=[256]"]).head.dense == [256]
    with pytest.raises(RecipeError, match="--set head.dense=.*alias bomb"):
        load_recipe({}, [f"head.dense={_flow_bomb()}"])
    shared = tmp_path / "shared.yaml"
    shared.write_text(
        "stages:\n  - {name: head, optimizer: {learning_rate: &lr 0.003}}\n"
        "  - {name: finetune, unfreeze: all, optimizer: {learning_rate: *lr}}\n"
    )
    assert load_recipe(shared).stages[1].optimizer.learning_rate == 0.003


def test_infinities_nan_deep_nesting_and_non_utf8_get_one_line_errors(tmp_path):
    numbers = tmp_path / "numbers.yaml"
    numbers.write_text("head:\n  l2: .nan\n  class_weight: {a: .inf}\nstages:\n  - {name: head, epochs: 1}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(numbers)
    assert "`head.l2` = nan (line 2): Input should be a finite number" in str(caught.value)
    assert "head.class_weight" in str(caught.value) and "finite" in str(caught.value)
    with pytest.raises(RecipeError, match="finite number"):
        load_recipe({}, ["stages.0.optimizer.weight_decay=.inf"])
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(RecipeError, match="deep.yaml: nested too deeply to be a recipe"):
        load_recipe(deep)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match=r"latin.yaml is not UTF-8 text \(byte 0xe9 at offset 9\)"):
        load_recipe(latin)


def _flow_bomb() -> str:
    """An alias bomb on one line, for --set: nine levels, each nine aliases of the one before."""
    text = "[&l0 [x, x, x, x, x, x, x, x, x]"
    for i in range(1, 9):
        text += f", &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]"
    return text + "]"


def test_run_checks_only_the_shape_of_the_search_section_it_ignores(tmp_path):
    import tltoolkit
    from tltoolkit.errors import DataError

    recipe = {"search": {"space": {"head.no_such_field": [1, 2]}}}
    with pytest.raises(RecipeError, match="head.no_such_field"):
        load_recipe(recipe)  # What `tune` loads: every path must exist.
    assert load_recipe(recipe, check_search=False).search.space["head.no_such_field"].values == [1, 2]
    with pytest.raises(RecipeError, match="search.space"):
        load_recipe({"search": {"tuner": "random"}}, check_search=False)  # The shape still counts.
    with pytest.raises(DataError, match="does not exist"):  # Past the recipe: `run` did not check the space.
        tltoolkit.run(recipe, tmp_path / "no-such-folder")
