import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_recipe

import tltoolkit
from tltoolkit.data import prepare_data
from tltoolkit.data.pipeline import TrainingBatches, image_dataset
from tltoolkit.errors import RecipeError
from tltoolkit.model import build_classifier
from tltoolkit.recipe import AugmentConfig, load_recipe
from tltoolkit.stages import FeatureCache, FeatureSource, StageRun, fit_stage
from tltoolkit.stages.features import cut_tensors
from tltoolkit.stages.training import Training


def train_head(image_folder, cached: bool, cache: FeatureCache, **changes):
    """One head stage from the same seed, through the frozen backbone or on cached features; the trained model."""
    recipe = load_recipe(tiny_recipe(**changes))
    keras.utils.set_random_seed(recipe.seed)
    folder = prepare_data(image_folder, recipe.data.val_split, recipe.seed, progress=False)
    backbone = tltoolkit.create_backbone("test_tiny", weights="none", input_size=32)
    model = build_classifier(backbone, folder.class_names, recipe.head)
    train = TrainingBatches(folder.parts["train"], 3, recipe.data, seed=recipe.seed)
    val = image_dataset(folder.parts["val"], 3, recipe.data, training=False)
    source = FeatureSource(folder.parts, 3, recipe.data, recipe.seed, "none", cache) if cached else None
    training = Training(recipe, backbone, model, train, {"val": val}, None, source)
    outcome = fit_stage(training, StageRun(recipe.stages[0], verbose=0))
    return model, outcome


@pytest.mark.parametrize("freeze", ["all", "block2_relu"])
def test_cached_features_train_the_same_head_as_the_frozen_backbone(image_folder, freeze):
    changes = {
        "backbone": {"name": "test_tiny", "weights": "none", "freeze": freeze},
        "head": {"dense": [16], "dropout": 0.0, "l2": 1e-3},
        "stages": [{"name": "head", "epochs": 3, "optimizer": {"name": "adam", "learning_rate": 1e-2}}],
    }
    cache = FeatureCache()
    plain, plain_outcome = train_head(image_folder, False, cache, **changes)
    fast, fast_outcome = train_head(image_folder, True, cache, **changes)
    assert plain_outcome.cached_above is None
    assert fast_outcome.cached_above == ("head" if freeze == "all" else "block3_conv")
    assert cache.misses == 1
    for name in ["head_dense0", "predictions"] + (["block3_conv"] if freeze != "all" else []):
        layer = (
            plain.get_layer(name)
            if name.startswith(("head", "pred"))
            else plain.get_layer("backbone").layer.get_layer(name)
        )
        other = (
            fast.get_layer(name)
            if name.startswith(("head", "pred"))
            else fast.get_layer("backbone").layer.get_layer(name)
        )
        for a, b in zip(layer.get_weights(), other.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(plain_outcome.history["loss"], fast_outcome.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(plain_outcome.history["val_accuracy"], fast_outcome.history["val_accuracy"])
    # The full classifier carries the weights trained on features: it predicts what the top model predicted.
    recipe = load_recipe(tiny_recipe(**changes))
    val = (
        len(prepare_data(image_folder, recipe.data.val_split, recipe.seed, progress=False).parts["val"]),
        recipe.data.batch_size,
    )
    np.testing.assert_allclose(fast_outcome.predict_val(*val), plain_outcome.predict_val(*val), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("flip", ["horizontal", "horizontal_and_vertical"])
def test_flip_aware_cache_trains_the_same_head_as_flipping_images(image_folder, flip):
    """Features of every mirror image, each epoch's variant per image drawn as the image pipeline draws it."""
    changes = {
        "data": {"image_size": 32, "batch_size": 8, "val_split": 0.25, "augment": {"flip": flip}},
        "head": {"dense": [16], "dropout": 0.0},
        "stages": [{"name": "head", "epochs": 3, "optimizer": {"name": "adam", "learning_rate": 1e-2}}],
    }
    cache = FeatureCache()
    plain, plain_outcome = train_head(image_folder, False, cache, **changes)
    fast, fast_outcome = train_head(image_folder, True, cache, **changes)
    assert fast_outcome.cached_above == "head" and plain_outcome.cached_above is None
    variants = {"horizontal": 2, "horizontal_and_vertical": 4}[flip]
    assert (
        fast_outcome.input_path == f"on cached features below `head` ({variants} mirror images of each training "
        "image, one drawn per epoch; pooled, in memory)"
    )
    features = next(iter(cache.entries.values()))
    assert features["train"].shape == (variants, 32), "the pooled features (32 channels) of each mirror image"
    for name in ("head_dense0", "predictions"):
        for a, b in zip(plain.get_layer(name).get_weights(), fast.get_layer(name).get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(plain_outcome.history["loss"], fast_outcome.history["loss"], rtol=1e-4)
    unflipped, _ = train_head(
        image_folder, True, FeatureCache(), **{**changes, "data": {**changes["data"], "augment": {}}}
    )
    assert not np.allclose(
        unflipped.get_layer("predictions").get_weights()[0], fast.get_layer("predictions").get_weights()[0]
    ), "the flips changed what trained"


def test_continuous_augmentation_is_cached_as_k_copies_only_when_asked(image_folder):
    augment = {"flip": "horizontal", "rotation": 0.1}
    changes = {
        "data": {"image_size": 32, "batch_size": 8, "val_split": 0.25, "augment": augment},
        "stages": [{"name": "head", "epochs": 2, "optimizer": {"learning_rate": 1e-2}}],
    }
    _, plain = train_head(image_folder, True, FeatureCache(), **changes)
    assert plain.cached_above is None and "data.feature_cache_copies: K" in plain.input_path
    cache = FeatureCache()
    changes["data"]["feature_cache_copies"] = 3
    _, copied = train_head(image_folder, True, cache, **changes)
    assert copied.cached_above == "head"
    assert copied.input_path == (
        "on cached features below `head` (3 augmented copies (data.feature_cache_copies, an approximation) of each "
        "training image, one drawn per epoch; pooled, in memory)"
    )
    train = next(iter(cache.entries.values()))["train"].array
    assert train.shape[1] == 3 and not np.allclose(train[:, 0], train[:, 1]), "three different copies of each image"
    assert np.isfinite(copied.history["loss"]).all()
    train_head(image_folder, True, cache, **changes, seed=7)
    assert cache.misses == 2, "copies drawn from another seed are other copies"
    with pytest.raises(RecipeError, match="feature_cache_copies 1 would train every epoch on one fixed"):
        load_recipe(tiny_recipe(), ["data.feature_cache_copies=1"])


def test_flip_draws_are_uniform_and_a_resumed_stream_draws_the_same(image_folder):
    from tltoolkit.data.pipeline import FLIP_VARIANTS, draw_variant, mirror

    draws = np.array([int(draw_variant(42, 1, epoch, i, 4)) for epoch in range(5) for i in range(200)])
    assert sorted(set(draws)) == [0, 1, 2, 3] and abs(np.mean(draws == 0) - 0.25) < 0.05
    assert int(draw_variant(42, 1, 3, 17, 2)) == int(draw_variant(42, 1, 3, 17, 2)), "a function of its inputs"
    image = tf.reshape(tf.range(12), (2, 2, 3))
    flips = {"horizontal": [[1]], "vertical": [[0]], "horizontal_and_vertical": [[1], [0], [1, 0]]}
    for flip, axes in flips.items():
        shown = tf.function(lambda v, flip=flip: mirror(image, v, flip))  # As tf.data runs it: in a graph.
        np.testing.assert_array_equal(shown(tf.constant(0)), image)
        for variant, axis in enumerate(axes, start=1):
            np.testing.assert_array_equal(shown(tf.constant(variant)), tf.reverse(image, axis), err_msg=flip)
    recipe = load_recipe(tiny_recipe(data={"image_size": 32, "batch_size": 4, "augment": {"flip": "horizontal"}}))
    folder = prepare_data(image_folder, recipe.data.val_split, recipe.seed, progress=False)
    batches = TrainingBatches(folder.parts["train"], 3, recipe.data, seed=recipe.seed)
    whole = [x.numpy() for x, _ in batches.epochs(stream=1, first_epoch=0, last_epoch=3)]
    resumed = [x.numpy() for x, _ in batches.epochs(stream=1, first_epoch=2, last_epoch=3)]
    per_epoch = batches.steps_per_epoch
    for a, b in zip(whole[2 * per_epoch :], resumed):
        np.testing.assert_array_equal(a, b)
    plain_data = recipe.data.model_copy(update={"augment": AugmentConfig()})
    plain = TrainingBatches(folder.parts["train"], 3, plain_data, seed=recipe.seed).epochs(stream=1)
    shown = np.concatenate(whole[:per_epoch])
    mirrored = [np.array_equal(x[:, ::-1], y) for x, y in zip(np.concatenate([x.numpy() for x, _ in plain]), shown)]
    assert 0 < sum(mirrored) < len(mirrored) and FLIP_VARIANTS["horizontal"] == 2, "some images mirrored, not all"


def test_cache_is_shared_and_invalidated_by_weights_data_and_augmentation(image_folder):
    cache = FeatureCache()
    recipe = load_recipe(tiny_recipe())
    folder = prepare_data(image_folder, recipe.data.val_split, recipe.seed, progress=False)
    backbone = tltoolkit.create_backbone("test_tiny", weights="none", input_size=32)
    model = build_classifier(backbone, folder.class_names, recipe.head)
    source = FeatureSource(folder.parts, 3, recipe.data, recipe.seed, "none", cache)
    frozen = len(backbone.layers)
    first = source.inputs(model, backbone, frozen, verbose=False)
    second = source.inputs(build_classifier(backbone, folder.class_names, recipe.head), backbone, frozen, verbose=False)
    assert (cache.misses, cache.hits) == (1, 1), "a second model on the same frozen backbone reuses the features"
    assert first.model is not second.model

    layer = backbone.get_layer("block1_conv")
    layer.kernel.assign(layer.kernel * 1.5)  # e.g. a fine-tune stage changed the prefix
    source.inputs(model, backbone, frozen, verbose=False)
    assert cache.misses == 2

    path = folder.parts["train"][0][0]
    os.utime(path, ns=(0, 0))  # the file changed on disk
    source.inputs(model, backbone, frozen, verbose=False)
    assert cache.misses == 3

    augmented = load_recipe(tiny_recipe(data={"image_size": 32, "augment": {"flip": "horizontal", "zoom": 0.1}}))
    blocked = FeatureSource(folder.parts, 3, augmented.data, 0, "none", cache)
    assert blocked.inputs(model, backbone, frozen, verbose=False) is None
    assert blocked.usable(frozen).startswith("augmentation (zoom) runs before the frozen layers")
    flipped = load_recipe(tiny_recipe(data={"image_size": 32, "augment": {"flip": "horizontal"}}))
    mirrored = FeatureSource(folder.parts, 3, flipped.data, recipe.seed, "none", cache)
    assert mirrored.inputs(model, backbone, frozen, verbose=False) is not None and cache.misses == 4, "flips: cached"
    assert source.usable(0) == "nothing is frozen"
    off = load_recipe(tiny_recipe(data={"image_size": 32, "feature_cache": False}))
    assert "feature_cache" in FeatureSource(folder.parts, 3, off.data, 0).usable(frozen)


def test_cut_crosses_residual_connections():
    inputs = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 1, name="a")(inputs)
    b = keras.layers.Conv2D(4, 1, name="b")(a)
    c = keras.layers.Add(name="c")([a, b])
    backbone = keras.Model(inputs, c)
    names = [layer.name for layer in backbone.layers]
    cut = cut_tensors(backbone, names.index("b"))  # `a`'s output feeds both `b` and the add above the cut.
    assert [t._keras_history.operation.name for t in cut] == ["a"]
    cut = cut_tensors(backbone, names.index("c"))
    assert sorted(t._keras_history.operation.name for t in cut) == ["a", "b"]


def test_run_uses_the_cache_for_the_head_stage_and_logs_it(image_folder):
    result = tltoolkit.run(tiny_recipe(tracking={"log_model": False}), image_folder, verbose=0)
    from mlflow import MlflowClient

    params = {stage: MlflowClient().get_run(rid).data.params for stage, rid in result.stage_runs.items()}
    assert params["head"]["feature_cache"] == "head"
    assert params["head"]["input_path"] == "on cached features below `head` (pooled, in memory)"
    assert params["finetune"]["feature_cache"] == "off"
    assert params["finetune"]["input_path"] == "through the backbone (nothing is frozen; images from the memory cache)"
    parent = MlflowClient().get_run(result.run_id).data.params
    assert parent["cache.features_below_head"].startswith("memory (")
    assert parent["cache.train_images"].startswith("memory (") and parent["cache.val_images"].startswith("memory (")
    assert int(parent["data.memory_budget_mb"]) > 0 and parent["data.memory_budget"] == "auto"
