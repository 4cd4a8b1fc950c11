import keras
import numpy as np
import pytest

import tltoolkit
from tltoolkit.errors import BackboneError
from tltoolkit.model import backbone_of, build_classifier, class_names_of, frozen_prefix, set_trainable, unfrozen_prefix
from tltoolkit.recipe import HeadConfig, Recipe


@pytest.fixture
def parts():
    backbone = tltoolkit.create_backbone("test_tiny", weights="none", input_size=32)
    model = build_classifier(backbone, ["a", "b", "c"], HeadConfig(dense=[8], dropout=0.1, l2=1e-4))
    return model, backbone


def trainable_names(backbone):
    return [layer.name for layer in backbone.layers if layer.trainable and layer.weights]


@pytest.mark.parametrize(
    "freeze, frozen, training",
    [
        ("all", 11, []),
        ("none", 0, ["block1_conv", "block2_conv", "block3_conv"]),
        (5, 5, ["block2_conv", "block3_conv"]),  # 0 image, 1 preprocessing, 2-4 block1 -> block2 starts at 5
        (0.5, 6, ["block3_conv"]),  # round(0.5 * 11) = 6
        ("block2_relu", 8, ["block3_conv"]),  # up to and including the named layer
    ],
)
def test_freeze_policies(parts, freeze, frozen, training):
    model, backbone = parts
    assert frozen_prefix(backbone, freeze) == frozen
    summary = set_trainable(model, backbone, frozen)
    assert trainable_names(backbone) == training, "BatchNormalization stays frozen by default"
    assert summary.trainable_layers == len(training)
    head_params = 32 * 8 + 8 + 8 * 3 + 3
    conv_params = {"block1_conv": 3 * 3 * 3 * 8, "block2_conv": 3 * 3 * 8 * 16, "block3_conv": 3 * 3 * 16 * 32}
    assert summary.trainable_params == head_params + sum(conv_params[n] for n in training)


@pytest.mark.parametrize(
    "unfreeze, frozen",
    [("none", 11), ("all", 0), (3, 8), (0.3, 8), ("block3_conv", 8)],
)
def test_unfreeze_policies(parts, unfreeze, frozen):
    _, backbone = parts
    assert unfrozen_prefix(backbone, unfreeze, freeze="all") == frozen


def test_train_bn_lets_gamma_beta_train(parts):
    model, backbone = parts
    set_trainable(model, backbone, 0, train_bn=True)
    assert "block1_bn" in trainable_names(backbone)


@pytest.mark.parametrize(
    "value, fragment", [(99, "exceeds the 11 layers"), ("block9_conv", "not a layer of test_tiny")]
)
def test_points_beyond_the_backbone_are_errors(parts, value, fragment):
    _, backbone = parts
    with pytest.raises(BackboneError, match=fragment):
        frozen_prefix(backbone, value)
    with pytest.raises(BackboneError, match=fragment):
        unfrozen_prefix(backbone, value, "all")


def test_finetuning_never_moves_batchnorm_statistics(parts):
    """The backbone is called with training=False: a fit with every layer (BN included) trainable leaves the
    moving mean and variance exactly as they were, while the convolutions do learn."""
    model, backbone = parts
    bn = backbone.get_layer("block2_bn")
    bn.moving_mean.assign(np.full(bn.moving_mean.shape, 0.3, "float32"))
    before_mean, before_var = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    before_conv = backbone.get_layer("block2_conv").kernel.numpy().copy()
    set_trainable(model, backbone, 0, train_bn=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(16) % 3, 3)
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before_mean)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), before_var)
    assert not np.allclose(backbone.get_layer("block2_conv").kernel.numpy(), before_conv)


def test_class_names_travel_with_the_saved_model(parts, tmp_path):
    model, _ = parts
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert class_names_of(loaded) == ["a", "b", "c"]
    assert backbone_of(loaded).name == "test_tiny", "the backbone, in its InferenceMode wrapper, survives saving"
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_head_options_shape_the_model():
    backbone = tltoolkit.create_backbone("test_tiny", weights="none")
    model = build_classifier(backbone, ["a", "b"], Recipe(head={"pooling": "max", "dense": [16, 8]}).head)
    names = [layer.name for layer in model.layers]
    assert "pool" in names and "head_dense0" in names and "head_dense1" in names
    assert isinstance(model.get_layer("pool"), keras.layers.GlobalMaxPooling2D)
    assert model.output_shape == (None, 2)
