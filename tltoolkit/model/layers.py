"""Custom layers that saved models need (registered, so Keras safe mode loads them)."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="tltoolkit")
class Classifier(keras.layers.Dense):
    """The output layer: a softmax `Dense` that also carries the class names and its calibration temperature, so
    both travel with the model (and into every export).

    Args:
        class_names: Class names in label order; the layer has one unit per name.
        temperature: Divides the logits before the softmax (temperature scaling; 1 leaves them as trained). Set
            after training by calibration; it never changes which class wins.
        **kwargs: Passed to `keras.layers.Dense` (the activation is always softmax).

    Example:
        >>> layer = Classifier(["ants", "bees"])
        >>> layer.units, layer.class_names, layer.temperature
        (2, ['ants', 'bees'], 1.0)
    """

    def __init__(self, class_names, temperature: float = 1.0, **kwargs):
        kwargs.pop("units", None)
        kwargs.pop("activation", None)  # Models saved before `temperature` carry "softmax" here.
        # Probabilities stay float32 under mixed precision.
        kwargs.setdefault("dtype", "float32")
        super().__init__(len(class_names), activation=None, **kwargs)
        self.class_names = [str(name) for name in class_names]
        self.temperature = float(temperature)

    def call(self, inputs):
        logits = super().call(inputs)
        if self.temperature != 1.0:  # A Python branch: models at 1 compute exactly what they always did.
            logits = logits / self.temperature
        return keras.ops.softmax(logits, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.pop("units")
        return {**config, "class_names": self.class_names, "temperature": self.temperature}


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


@keras.saving.register_keras_serializable(package="tltoolkit")
class Corrupt(keras.layers.Layer):
    """Denoising corruption of raw RGB pixels (0-255), in training only; the identity at inference.

    Args:
        kind: `"gaussian"` (add noise of std `amount * 255`, clipped to 0-255), `"masking"` (set a random fraction
            `amount` of pixels to black, all channels alike) or `"none"`.
        amount: The noise's std as a fraction of the pixel range, or the fraction of pixels masked.
        seed: Seeds the layer's own generator (its state is a model variable, so checkpoints resume it).
    """

    def __init__(self, kind: str = "gaussian", amount: float = 0.1, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.amount, self.seed = kind, float(amount), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=False):
        if not training or self.kind == "none" or self.amount == 0:
            return inputs
        if self.kind == "gaussian":
            noise = keras.random.normal(keras.ops.shape(inputs), stddev=self.amount * 255.0, seed=self.generator)
            return keras.ops.clip(inputs + noise, 0.0, 255.0)
        shape = keras.ops.shape(inputs)
        keep = keras.random.uniform((shape[0], shape[1], shape[2], 1), seed=self.generator) >= self.amount
        return inputs * keras.ops.cast(keep, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "amount": self.amount, "seed": self.seed}
