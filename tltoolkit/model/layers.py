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


def class_names_of(model: keras.Model) -> list[str]:
    """The class names a tltoolkit classifier carries in its `Classifier` output layer."""
    for layer in reversed(model.layers):
        if isinstance(layer, Classifier):
            return list(layer.class_names)
    raise ValueError(f"Model {model.name} has no tltoolkit Classifier layer, so it carries no class names.")
