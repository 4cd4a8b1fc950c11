"""tf.data input pipelines: parallel decode, resize, cache, shuffle, batch, augment (training only), prefetch."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tltoolkit.data.images import load_image_array
from tltoolkit.data.split import Item
from tltoolkit.recipe import AugmentConfig, DataConfig


def build_augmenter(augment: AugmentConfig, seed: int):
    """The recipe's augmentation as a `keras.Sequential` of random preprocessing layers, or `None` if off."""
    if not augment.enabled:
        return None
    import keras

    layers = []
    if augment.flip != "none":
        layers.append(keras.layers.RandomFlip(augment.flip, seed=seed))
    if augment.rotation:
        layers.append(keras.layers.RandomRotation(augment.rotation, seed=seed + 1))
    if augment.zoom:
        layers.append(keras.layers.RandomZoom(augment.zoom, seed=seed + 2))
    if augment.translation:
        layers.append(keras.layers.RandomTranslation(augment.translation, augment.translation, seed=seed + 3))
    if augment.contrast:
        layers.append(keras.layers.RandomContrast(augment.contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(layers, name="augmentation")


def _decode(size: int, resize: str, interpolation: str):
    def load(path: tf.Tensor) -> tf.Tensor:
        image = tf.numpy_function(
            lambda p: load_image_array(p.decode(), size, resize, interpolation), [path], tf.uint8, stateful=False
        )
        image.set_shape((size, size, 3))
        return image

    return load


def image_dataset(
    items: list[Item],
    num_classes: int,
    config: DataConfig,
    *,
    training: bool,
    seed: int = 42,
) -> tf.data.Dataset:
    """Batches of `(float32 RGB pixels in [0, 255], one-hot labels)`.

    Args:
        items: `(path, label)` pairs from `prepare_data`.
        num_classes: Width of the one-hot labels.
        config: The recipe's `data` section (image size, batch size, resize mode, cache, augmentation).
        training: Shuffle every epoch and augment. Evaluation pipelines keep the file order.
        seed: Seeds shuffling and augmentation.
    """
    paths = np.array([path for path, _ in items], dtype=object).astype(str)
    labels = np.array([label for _, label in items], dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    load = _decode(config.image_size, config.resize, config.interpolation)
    ds = ds.map(lambda p, y: (load(p), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if config.cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(len(items), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(config.batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes)), num_parallel_calls=tf.data.AUTOTUNE)
    augmenter = build_augmenter(config.augment, seed) if training else None
    if augmenter is not None:
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def image_batches(paths: list[str], config: DataConfig) -> tf.data.Dataset:
    """Unlabelled batches of float32 pixels in file order, for prediction."""
    ds = tf.data.Dataset.from_tensor_slices(np.array(paths, dtype=object).astype(str))
    load = _decode(config.image_size, config.resize, config.interpolation)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(config.batch_size).map(lambda x: tf.cast(x, tf.float32)).prefetch(tf.data.AUTOTUNE)
