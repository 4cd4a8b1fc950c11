"""Custom layers that saved models need (registered, so Keras safe mode loads them)."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="tltoolkit")
class Classifier(keras.layers.Dense):
    """The output layer: a softmax `Dense` that also carries the class names, so they travel with the model.

    Args:
        class_names: Class names in label order; the layer has one unit per name.
        **kwargs: Passed to `keras.layers.Dense` (activation defaults to softmax).

    Example:
        >>> layer = Classifier(["ants", "bees"])
        >>> layer.units, layer.class_names
        (2, ['ants', 'bees'])
    """

    def __init__(self, class_names, **kwargs):
        kwargs.pop("units", None)
        kwargs.setdefault("activation", "softmax")
        # Probabilities stay float32 under mixed precision.
        kwargs.setdefault("dtype", "float32")
        super().__init__(len(class_names), **kwargs)
        self.class_names = [str(name) for name in class_names]

    def get_config(self):
        config = super().get_config()
        config.pop("units")
        return {**config, "class_names": self.class_names}


@keras.saving.register_keras_serializable(package="tltoolkit")
class InferenceMode(keras.layers.Wrapper):
    """Runs the wrapped backbone with `training=False`, whatever the outer model is called with.

    Keras 3 functional models inject the outer call's `training` flag into every nested layer that accepts one,
    overriding a `backbone(x, training=False)` recorded at build time; so `fit` would switch BatchNormalization to
    batch statistics and update its moving averages as soon as those layers are trainable. This layer's `call` takes
    no `training` argument, so nothing is injected, and it always calls the backbone in inference mode: moving
    statistics never change, and BN gamma/beta may still train (`train_bn`).
    """

    def call(self, inputs):
        return self.layer(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)


def class_names_of(model: keras.Model) -> list[str]:
    """The class names a tltoolkit classifier carries in its `Classifier` output layer."""
    for layer in reversed(model.layers):
        if isinstance(layer, Classifier):
            return list(layer.class_names)
    raise ValueError(f"Model {model.name} has no tltoolkit Classifier layer, so it carries no class names.")
