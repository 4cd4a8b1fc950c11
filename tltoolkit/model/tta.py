"""Test-time augmentation: a model's mean prediction over a few fixed views of each image.

`flip`: the image and its mirror. `flip_crops`: those, plus the four corner crops (87.5% of the side, resized back)
and their mirrors: 10 views. The views are deterministic, so TTA scores are reproducible; they are reported beside
the plain scores, never instead of them.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

MODES = ("none", "flip", "flip_crops")
CROP = 0.875


def _views(mode: str) -> list:
    """Functions from a float32 image batch to one view of it."""
    if mode not in MODES or mode == "none":
        raise ValueError(f"TTA mode must be one of {MODES[1:]}, got {mode!r}")
    mirror = tf.image.flip_left_right
    views = [lambda x: x, mirror]
    if mode == "flip_crops":
        low = 1.0 - CROP
        for y, x in ((0.0, 0.0), (0.0, low), (low, 0.0), (low, low)):
            box = [y, x, y + CROP, x + CROP]
            crop = _crop(box)
            views += [crop, lambda images, crop=crop: mirror(crop(images))]
    return views


def _crop(box: list[float]):
    def crop(images):
        size = tf.shape(images)[1:3]
        boxes = tf.repeat(tf.constant([box], tf.float32), tf.shape(images)[0], axis=0)
        return tf.image.crop_and_resize(images, boxes, tf.range(tf.shape(images)[0]), size)

    return crop


def predict_tta(model, batches: tf.data.Dataset, mode: str) -> np.ndarray:
    """The mean of `model`'s probabilities over the views of every image of `batches` (float32 images, or
    `(images, labels)` pairs)."""
    outputs = list(iter_tta(model, batches, mode))
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def iter_tta(model, batches, mode: str, batch_size: int | None = None):
    """`predict_tta` batch by batch, for passes too large to keep: each batch's mean over the views (the batch
    padded to `batch_size`, by default the first batch's size, so the model traces once)."""
    from tltoolkit.model.inference import pad_batch

    views = _views(mode)
    for x in batches:
        x = x[0] if isinstance(x, tuple) else x
        count = int(x.shape[0])
        batch_size = batch_size or count
        padded = pad_batch(tf.convert_to_tensor(x), batch_size)
        yield np.mean([np.asarray(model.predict_on_batch(view(padded)))[:count] for view in views], axis=0)
