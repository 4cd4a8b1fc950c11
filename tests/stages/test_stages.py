import keras
import numpy as np
import pytest
from conftest import tiny_recipe

import tltoolkit
from tltoolkit.data import prepare_data
from tltoolkit.data.pipeline import TrainingBatches, image_dataset
from tltoolkit.model import build_classifier
from tltoolkit.recipe import HeadConfig, OptimizerConfig, ScheduleConfig, StageConfig, load_recipe
from tltoolkit.stages import StageRun, build_optimizer, class_weights, current_learning_rate, fit_stage
from tltoolkit.stages.training import Training


@pytest.fixture
def setup(image_folder):
    recipe = load_recipe(tiny_recipe())
    folder = prepare_data(image_folder, recipe.data.val_split, recipe.seed, progress=False)
    backbone = tltoolkit.create_backbone("test_tiny", weights="none", input_size=32)
    model = build_classifier(backbone, folder.class_names, recipe.head)
    train = TrainingBatches(folder.parts["train"], 3, recipe.data, seed=recipe.seed)
    val = image_dataset(folder.parts["val"], 3, recipe.data, training=False)
    return recipe, model, backbone, train, val


def fit(setup, stage):
    """One stage through the plain mode (no feature cache), as `TrainingSession` runs it."""
    recipe, model, backbone, train, val = setup
    return fit_stage(Training(recipe, backbone, model, train, {"val": val}, None, None), StageRun(stage, verbose=0))


def test_stage_switch_recompiles_with_a_fresh_optimizer_and_the_new_rate(setup):
    recipe, model, backbone, train, val = setup
    head = fit(setup, recipe.stages[0])
    first = model.optimizer
    assert current_learning_rate(first) == pytest.approx(1e-2)
    assert head.trainable.trainable_layers == 0
    frozen_kernel = backbone.get_layer("block1_conv").kernel.numpy().copy()
    np.testing.assert_array_equal(frozen_kernel, backbone.get_layer("block1_conv").kernel.numpy())

    tuned = fit(setup, recipe.stages[1])
    assert model.optimizer is not first
    assert current_learning_rate(model.optimizer) == pytest.approx(1e-4)
    assert int(model.optimizer.iterations) == train.steps_per_epoch, "a new optimizer starts at step 0"
    assert tuned.trainable.trainable_layers == 3
    assert not np.allclose(frozen_kernel, backbone.get_layer("block1_conv").kernel.numpy())
    assert list(tuned.history.columns[:1]) == ["epoch"] and {"loss", "val_accuracy"} <= set(tuned.history.columns)


def test_head_stage_leaves_the_frozen_backbone_untouched(setup):
    recipe, model, backbone, train, val = setup
    before = [w.numpy().copy() for w in backbone.weights]
    fit(setup, recipe.stages[0])
    for old, new in zip(before, backbone.weights):
        np.testing.assert_array_equal(old, new.numpy())


def test_early_stopping_restores_the_best_epoch(setup):
    recipe, model, backbone, train, val = setup
    stage = StageConfig.model_validate(
        {
            "name": "head",
            "epochs": 6,
            "optimizer": {"learning_rate": 5.0},  # diverges after the first epochs
            "early_stopping": {"monitor": "val_loss", "patience": 1},
        }
    )
    outcome = fit(setup, stage)
    best = outcome.history["val_loss"].idxmin()
    assert outcome.best_epoch == outcome.history["epoch"][best]
    restored = model.evaluate(val, verbose=0, return_dict=True)["loss"]
    assert restored == pytest.approx(outcome.history["val_loss"][best], rel=1e-4)


@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
def test_optimizers(name):
    optimizer = build_optimizer(OptimizerConfig(name=name, learning_rate=0.01, clipnorm=1.0), ScheduleConfig(), 10, 2)
    assert type(optimizer).__name__.lower() == name
    assert optimizer.clipnorm == 1.0


def test_adamw_carries_its_decay():
    optimizer = build_optimizer(OptimizerConfig(name="adamw", weight_decay=1e-3), ScheduleConfig(), 10, 2)
    assert isinstance(optimizer, keras.optimizers.AdamW) and optimizer.weight_decay == pytest.approx(1e-3)


def lr_at(optimizer, step):
    optimizer.iterations.assign(step)
    return current_learning_rate(optimizer)


def test_cosine_with_warmup_and_constant_with_warmup():
    cosine = build_optimizer(OptimizerConfig(learning_rate=1.0), ScheduleConfig(name="cosine", warmup_epochs=1), 10, 3)
    assert lr_at(cosine, 0) == pytest.approx(0.0)
    assert lr_at(cosine, 5) == pytest.approx(0.5)
    assert lr_at(cosine, 10) == pytest.approx(1.0)
    assert lr_at(cosine, 30) == pytest.approx(0.0, abs=1e-6)
    flat = build_optimizer(OptimizerConfig(learning_rate=1.0), ScheduleConfig(warmup_epochs=0.5), 10, 3)
    assert lr_at(flat, 0) == pytest.approx(0.0)
    assert [lr_at(flat, s) for s in (5, 17, 29)] == pytest.approx([1.0, 1.0, 1.0])


def test_class_weights():
    head = HeadConfig(class_weight="auto")
    weights = class_weights(head, [0, 0, 0, 1], ["a", "b"])
    assert weights == pytest.approx({0: 4 / 6, 1: 2.0})
    assert class_weights(HeadConfig(class_weight={"b": 3.0}), [0, 1], ["a", "b"]) == {0: 1.0, 1: 3.0}
    assert class_weights(HeadConfig(), [0, 1], ["a", "b"]) is None
    with pytest.raises(tltoolkit.TltoolkitError, match="zebra"):
        class_weights(HeadConfig(class_weight={"zebra": 2.0}), [0, 1], ["a", "b"])


def test_same_seed_same_split_and_metrics_other_seed_other_split(image_folder):
    from mlflow import MlflowClient

    recipe = tiny_recipe(head={"dense": [8], "dropout": 0.3}, tracking={"log_model": False})
    first = tltoolkit.run(recipe, image_folder, verbose=0)
    second = tltoolkit.run(recipe, image_folder, verbose=0)
    client = MlflowClient()

    def split(result):
        return client.download_artifacts(result.run_id, "data/manifest.csv")

    assert open(split(first)).read() == open(split(second)).read()
    assert first.metrics == second.metrics
    assert first.history.drop(columns="stage").equals(second.history.drop(columns="stage"))
    other = tltoolkit.run({**recipe, "seed": 7}, image_folder, verbose=0)
    assert open(split(other)).read() != open(split(first)).read()


def test_train_images_per_s_times_training_only_and_skips_the_process_first_epoch(setup):
    """Validation made slow (0.4 s an epoch) is left out, and the first epoch (tracing) is not what is reported."""
    import time

    from tltoolkit.stages.callbacks import TrainPhaseTimes

    recipe, model, backbone, train, val = setup

    class SlowValidation(keras.callbacks.Callback):
        def on_test_begin(self, logs=None):
            time.sleep(0.4)

    timer = TrainPhaseTimes()
    model.compile(optimizer="adam", loss="categorical_crossentropy")
    model.fit(train.epochs(0, 0, 3), validation_data=val, epochs=3, callbacks=[timer, SlowValidation()], verbose=0)
    assert len(timer.seconds) == 3 and max(timer.seconds[1:]) < 0.4, timer.seconds
    assert timer.images_per_s(len(train.items)) == pytest.approx(len(train.items) / np.median(timer.seconds[1:]))
    assert TrainPhaseTimes().images_per_s(10) is None

    outcome = fit(setup, recipe.stages[0])
    assert outcome.train_images_per_s > 0
