"""Assembling a classifier: raw pixels -> backbone (inference mode) -> pooling -> head -> class probabilities."""

from __future__ import annotations

import keras

from tltoolkit.model.layers import Classifier, InferenceMode
from tltoolkit.recipe import HeadConfig


def build_classifier(backbone: keras.Model, class_names: list[str], head: HeadConfig) -> keras.Model:
    """Puts a new head on `backbone`.

    The backbone always runs with `training=False` (through `InferenceMode`, see why there), so BatchNormalization
    keeps using its moving statistics and never updates them in any stage, and Dropout inside the backbone stays off.

    Args:
        backbone: From `create_backbone`; takes raw RGB pixels.
        class_names: Class names in label order; stored in the output layer.
        head: The recipe's `head` section.

    Returns:
        A model from `(None, H, W, 3)` float pixels in [0, 255] to `(None, classes)` probabilities.
    """
    regularizer = keras.regularizers.L1L2(l1=head.l1, l2=head.l2) if (head.l1 or head.l2) else None
    inputs = keras.Input(shape=backbone.input_shape[1:], name="image")
    x = InferenceMode(backbone, name="backbone")(inputs)
    pool = {
        "avg": keras.layers.GlobalAveragePooling2D,
        "max": keras.layers.GlobalMaxPooling2D,
        "flatten": keras.layers.Flatten,
    }[head.pooling]
    x = pool(name="pool")(x)
    for index, width in enumerate(head.dense):
        if head.dropout:
            x = keras.layers.Dropout(head.dropout, name=f"head_dropout{index}")(x)
        x = keras.layers.Dense(
            width, activation=head.activation, kernel_regularizer=regularizer, name=f"head_dense{index}"
        )(x)
    if head.dropout:
        x = keras.layers.Dropout(head.dropout, name="head_dropout")(x)
    outputs = Classifier(class_names, kernel_regularizer=regularizer, name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"{backbone.name}_classifier")


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone inside a classifier built by `build_classifier`."""
    return model.get_layer("backbone").layer
