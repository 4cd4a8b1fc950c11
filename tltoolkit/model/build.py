"""Assembling a classifier: raw pixels -> backbone (inference mode) -> pooling -> head -> class probabilities."""

from __future__ import annotations

import keras

from tltoolkit.model.layers import Classifier, InferenceMode
from tltoolkit.recipe import HeadConfig
from tltoolkit.recipe.schema import AuxiliaryHeadConfig


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


def layer_output(backbone: keras.Model, name: str):
    """The output tensor of backbone layer `name` in the backbone's own graph (the node made when it was built)."""
    return backbone.get_layer(name)._inbound_nodes[0].output_tensors[0]


def run_subgraph(inputs: list, tensors: list, x, name: str) -> list:
    """Runs the part of a backbone's graph from `inputs` to `tensors` on `x`, in inference mode (`InferenceMode`
    named `name`); one result per tensor (a tensor listed twice, such as a tap that is the backbone's output, is
    one output of the subgraph)."""
    distinct: list = []
    for tensor in tensors:
        if not any(tensor is seen for seen in distinct):
            distinct.append(tensor)
    results = InferenceMode(keras.Model(inputs, distinct, name=f"{name}_graph"), name=name)(x)
    results = results if isinstance(results, (list, tuple)) else [results]
    return [results[next(i for i, seen in enumerate(distinct) if seen is tensor)] for tensor in tensors]


def apply_head(model: keras.Model, features, after: str = "backbone"):
    """`model`'s layers after its backbone (pooling, head, classifier), applied to `features`: weights shared.
    With `after="pool"`, the layers after its pooling, for features pooled already."""
    names = [layer.name for layer in model.layers]
    for layer in model.layers[names.index(after) + 1 :]:
        features = layer(features)
    return features


def auxiliary_heads(head: HeadConfig, classes: int) -> list[keras.Sequential]:
    """One small classifier per `head.auxiliary` entry: global average pooling, its hidden layers (the main head's
    activation and dropout), softmax. Named `aux0`, `aux1`... (their logged metrics carry these names)."""
    heads = []
    for index, config in enumerate(head.auxiliary):
        layers: list[keras.Layer] = [keras.layers.GlobalAveragePooling2D()]
        for width in config.dense:
            layers += [keras.layers.Dropout(head.dropout)] if head.dropout else []
            layers.append(keras.layers.Dense(width, activation=head.activation))
        layers += [keras.layers.Dropout(head.dropout)] if head.dropout else []
        layers.append(keras.layers.Dense(classes, activation="softmax", dtype="float32"))
        heads.append(keras.Sequential(layers, name=f"aux{index}"))
    return heads


def supervised_model(
    model: keras.Model, backbone: keras.Model, taps: list[AuxiliaryHeadConfig], heads: list[keras.Sequential]
) -> keras.Model:
    """`model` with deep supervision: image -> [main probabilities, each auxiliary head's], every layer shared.

    The backbone runs once (in inference mode, as in `model`) with its tap layers' outputs as extra outputs.
    """
    tensors = [backbone.output, *(layer_output(backbone, tap.at) for tap in taps)]
    outputs = run_subgraph(backbone.inputs, tensors, model.inputs[0], "backbone_tapped")
    auxiliary = [head(output) for head, output in zip(heads, outputs[1:])]
    return keras.Model(model.inputs, [apply_head(model, outputs[0]), *auxiliary], name=f"{model.name}_supervised")
