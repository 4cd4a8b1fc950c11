"""Per-backbone input preprocessing as a Keras layer, so saved models take raw RGB pixels (0-255)."""

from __future__ import annotations

import keras
from keras import ops

# The three conventions of `keras.applications.imagenet_utils.preprocess_input`, and EfficientNet-Lite's.
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
MODES = ("tf", "torch", "caffe", "lite")


@keras.saving.register_keras_serializable(package="tltoolkit")
class ImagePreprocessing(keras.layers.Layer):
    """Maps raw RGB pixels in [0, 255] to what a pretrained backbone expects.

    Args:
        mode: `"tf"` scales to [-1, 1]; `"torch"` scales to [0, 1] and normalises by the ImageNet mean and std;
            `"caffe"` converts to BGR and subtracts the ImageNet mean. These three are the same as
            `keras.applications.imagenet_utils.preprocess_input(x, mode=mode)`. `"lite"` computes
            `(x - 127) / 128`, as EfficientNet-Lite was trained (integer-friendly for TFLite).

    Example:
        >>> import numpy as np
        >>> layer = ImagePreprocessing("tf")
        >>> [round(float(v), 3) for v in layer(np.array([[0.0, 127.5, 255.0]]))[0]]
        [-1.0, 0.0, 1.0]
    """

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"ImagePreprocessing mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            return (x / 255.0 - ops.convert_to_tensor(_TORCH_MEAN, x.dtype)) / ops.convert_to_tensor(
                _TORCH_STD, x.dtype
            )
        if self.mode == "lite":
            return (x - 127.0) / 128.0
        return ops.flip(x, axis=-1) - ops.convert_to_tensor(_CAFFE_BGR_MEAN, x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}
