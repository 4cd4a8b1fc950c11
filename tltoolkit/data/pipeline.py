"""tf.data input pipelines: parallel decode, resize, cache, shuffle, batch, augment (training only), prefetch."""

from __future__ import annotations

import contextlib
import math
import re

import numpy as np
import tensorflow as tf

from tltoolkit.data.images import load_image_array
from tltoolkit.data.split import Item
from tltoolkit.errors import DataError
from tltoolkit.recipe import AugmentConfig, DataConfig

# How many mirror images each `augment.flip` gives: the finite augmentation the feature cache can serve.
FLIP_VARIANTS = {"none": 1, "horizontal": 2, "vertical": 2, "horizontal_and_vertical": 4}


def build_augmenter(augment: AugmentConfig, seed: int):
    """The recipe's continuous augmentation (rotation, zoom, translation, contrast) as a `keras.Sequential` of random
    preprocessing layers, or `None` without any. Flips are drawn per image and epoch by `draw_variant` instead."""
    if not augment.continuous:
        return None
    import keras

    layers = []
    if augment.rotation:
        layers.append(keras.layers.RandomRotation(augment.rotation, seed=seed + 1))
    if augment.zoom:
        layers.append(keras.layers.RandomZoom(augment.zoom, seed=seed + 2))
    if augment.translation:
        layers.append(keras.layers.RandomTranslation(augment.translation, augment.translation, seed=seed + 3))
    if augment.contrast:
        layers.append(keras.layers.RandomContrast(augment.contrast, value_range=(0, 255), seed=seed + 4))
    return keras.Sequential(layers, name="augmentation")


def draw_variant(seed: int, stream: int, epoch, index, variants: int) -> tf.Tensor:
    """Which of `variants` versions of example `index` (its mirror images; or the feature cache's augmented copies)
    the example shows in `epoch`: uniform, and a function of `(seed, stream, epoch, index)` alone (a stateless draw),
    so the image pipeline and the feature cache draw the same, and a resumed training draws what the uninterrupted
    one would have."""
    key = tf.stack(
        [
            tf.constant((seed * 7_919 + stream * 104_729 + 1) % 2**31, tf.int64),
            tf.cast(epoch, tf.int64) * 2**32 + tf.cast(index, tf.int64),
        ]
    )
    return tf.random.stateless_uniform([], seed=key, minval=0, maxval=variants, dtype=tf.int32)


def mirror(image: tf.Tensor, variant, flip: str) -> tf.Tensor:
    """`image` (height, width, channels) as mirror variant `variant` of `flip`: 0 is the image itself; with
    `horizontal` 1 mirrors left-right, with `vertical` 1 mirrors up-down; with both, bit 0 is left-right, bit 1
    up-down (as Keras's `RandomFlip` modes)."""
    if flip in ("horizontal", "horizontal_and_vertical"):
        image = tf.where(tf.equal(variant % 2, 1), tf.reverse(image, [1]), image)
    if flip == "vertical":
        image = tf.where(tf.equal(variant, 1), tf.reverse(image, [0]), image)
    if flip == "horizontal_and_vertical":
        image = tf.where(variant >= 2, tf.reverse(image, [0]), image)
    return image


def mirrors(image: tf.Tensor, flip: str) -> tf.Tensor:
    """Every mirror variant of `image`, stacked: `(FLIP_VARIANTS[flip], height, width, channels)`."""
    return tf.stack([mirror(image, v, flip) for v in range(FLIP_VARIANTS[flip])])


def _decode(size: int, resize: str, interpolation: str):
    def load(path: tf.Tensor) -> tf.Tensor:
        image = tf.numpy_function(
            lambda p: load_image_array(p.decode(), size, resize, interpolation), [path], tf.uint8, stateful=False
        )
        image.set_shape((size, size, 3))
        return image

    return load


_UNREADABLE = re.compile(r"(FileNotFoundError|PermissionError|IsADirectoryError|UnreadableImage)[^:\n]*: ([^\n]*)")


@contextlib.contextmanager
def readable_images():
    """Turns an image that became unreadable after the folder was scanned (deleted, moved, its permissions changed)
    into one `DataError` naming it, instead of TensorFlow's traceback from inside the input pipeline."""
    try:
        yield
    except tf.errors.OpError as exc:
        found = _UNREADABLE.search(exc.message or "")
        if found is None:
            raise
        raise DataError(
            f"An image became unreadable after the folder was scanned ({found.group(1)}: {found.group(2)[:300]}). "
            "Restore it and resume with --resume (the last finished epoch is checkpointed), or start a new run "
            "without --resume to train on the folder as it is now."
        ) from None


def epoch_stream(
    examples: tf.data.Dataset,
    size: int,
    batch_size: int,
    seed: int,
    stream: int = 0,
    first_epoch: int = 0,
    last_epoch: int = 1,
    per_example=None,
) -> tf.data.Dataset:
    """Batches of epochs `first_epoch` to `last_epoch - 1`, one after another, each epoch's order a function of
    `(seed, stream, epoch)` alone.

    tf.data's `reshuffle_each_iteration` draws each epoch's order from a generator that lives in the process, so a
    resumed training could not get back the order epoch 7 would have had. Here epoch `e` is shuffled with its own
    seed, so a stream started at `first_epoch=e` yields exactly what the uninterrupted one yields from epoch `e` on.
    Fit it with `steps_per_epoch` (Keras then keeps one iterator across epochs).

    Args:
        examples: Unbatched examples (cached upstream if they are expensive to make).
        size: How many examples (the whole set is one shuffle buffer).
        batch_size: Batch size; an epoch's last batch may be smaller, and no batch spans two epochs.
        seed: The recipe's seed.
        stream: Separates streams that share a seed (one per stage), so stages do not repeat each other's orders.
        first_epoch: The epoch to start at.
        last_epoch: One past the last epoch.
        per_example: `epoch -> function` mapped over each epoch's shuffled examples before batching (the flips).
    """
    base = (seed * 1_000_003 + stream * 10_007) % 2**31
    if last_epoch <= first_epoch:
        return examples.batch(batch_size).take(0)

    def one_epoch(epoch):
        shuffled = examples.shuffle(size, seed=base + epoch, reshuffle_each_iteration=False)
        if per_example is not None:
            shuffled = shuffled.map(per_example(epoch), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return shuffled.batch(batch_size)

    if tf.compat.v1.get_seed(1)[0] % (2**31 - 1) == 0:
        # A global seed of 0 makes TensorFlow compare the op seed in Python (`random_seed.get_seed`), which a tensor
        # seed cannot meet: build the epochs one by one (the same orders; slower to set up for very many epochs).
        epochs = [one_epoch(epoch) for epoch in range(first_epoch, last_epoch)]
        choice = tf.data.Dataset.range(len(epochs)).flat_map(
            lambda i: tf.data.Dataset.from_tensors(i).repeat(steps_per_epoch(size, batch_size))
        )
        return epochs[0] if len(epochs) == 1 else tf.data.Dataset.choose_from_datasets(epochs, choice)
    # Each epoch is its own shuffle of `examples` (sharing its cache), made lazily as the stream reaches it: setting
    # up 100,000 epochs costs what one does. A tensor seed gives the orders the same Python seed gives.
    return tf.data.Dataset.range(first_epoch, last_epoch).flat_map(one_epoch)


def steps_per_epoch(size: int, batch_size: int) -> int:
    """Batches in one epoch of `size` examples (the last one may be partial)."""
    return max(1, math.ceil(size / batch_size))


class TrainingBatches:
    """The training set: decoded (and cached) once, served as an endless, resumable stream of shuffled epochs.

    Args:
        items: `(path, label)` pairs from `prepare_data`.
        num_classes: Width of the one-hot labels.
        config: The recipe's `data` section (image size, batch size, resize mode, cache, augmentation).
        seed: Seeds the epochs' orders and the augmentation.

    `epochs(stream, first_epoch, last_epoch)` gives the batches of `epoch_stream`, cast to float32 with one-hot labels
    and augmented; `steps_per_epoch` is what `fit` needs with them.
    """

    def __init__(self, items: list[Item], num_classes: int, config: DataConfig, seed: int = 42):
        self.items, self.num_classes, self.config, self.seed = items, num_classes, config, seed
        self.steps_per_epoch = steps_per_epoch(len(items), config.batch_size)
        self._examples = _decoded(items, config)

    def epochs(self, stream: int = 0, first_epoch: int = 0, last_epoch: int = 1) -> tf.data.Dataset:
        examples, flip = self._examples, self.config.augment.flip
        per_example = None
        if flip != "none":
            examples = tf.data.Dataset.zip(examples, tf.data.Dataset.range(len(self.items)))
            per_example = drawn(
                self.seed, stream, FLIP_VARIANTS[flip], lambda example, v: (mirror(example[0], v, flip), example[1])
            )
        ds = epoch_stream(
            examples, len(self.items), self.config.batch_size, self.seed, stream, first_epoch, last_epoch, per_example
        )
        ds = ds.map(_to_float(self.num_classes), num_parallel_calls=tf.data.AUTOTUNE)
        augmenter = build_augmenter(self.config.augment, self.seed)
        if augmenter is not None:
            ds = ds.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)


def drawn(seed: int, stream: int, variants: int, choose):
    """The `per_example` of `epoch_stream` for examples `(example, index)`: `choose(example, variant)` with the
    variant `draw_variant` draws for that example in that epoch. The image pipeline mirrors the pixels; the feature
    cache picks the features it computed from that version of the image."""

    def per_example(epoch):
        return lambda example, index: choose(example, draw_variant(seed, stream, epoch, index, variants))

    return per_example


def _decoded(items: list[Item], config: DataConfig) -> tf.data.Dataset:
    """`(uint8 image, label)` examples in file order, decoded in parallel, cached in memory if `config.cache`."""
    paths = np.array([path for path, _ in items], dtype=object).astype(str)
    labels = np.array([label for _, label in items], dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    load = _decode(config.image_size, config.resize, config.interpolation)
    ds = ds.map(lambda p, y: (load(p), y), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.cache() if config.cache else ds


def _to_float(num_classes: int):
    return lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes))


def image_dataset(
    items: list[Item],
    num_classes: int,
    config: DataConfig,
    *,
    training: bool = False,
    seed: int = 42,
) -> tf.data.Dataset:
    """Batches of `(float32 RGB pixels in [0, 255], one-hot labels)`.

    Args:
        items: `(path, label)` pairs from `prepare_data`.
        num_classes: Width of the one-hot labels.
        config: The recipe's `data` section (image size, batch size, resize mode, cache, augmentation).
        training: One shuffled, augmented epoch (epoch 0 of `TrainingBatches`; train with `TrainingBatches` itself).
            Otherwise the file order, no augmentation.
        seed: Seeds shuffling and augmentation.
    """
    if training:
        return TrainingBatches(items, num_classes, config, seed).epochs()
    ds = _decoded(items, config).batch(config.batch_size)
    return ds.map(_to_float(num_classes), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def resized_images(paths: list[str], config: DataConfig) -> np.ndarray:
    """A few images read as `config` says (size, resize mode, filter), in memory: uint8 `(N, size, size, 3)`."""
    images = np.zeros((len(paths), config.image_size, config.image_size, 3), np.uint8)
    for i, path in enumerate(paths):
        images[i] = load_image_array(path, config.image_size, config.resize, config.interpolation)
    return images


def image_batches(paths: list[str], config: DataConfig) -> tf.data.Dataset:
    """Unlabelled batches of float32 pixels in file order, for prediction."""
    ds = tf.data.Dataset.from_tensor_slices(np.array(paths, dtype=object).astype(str))
    load = _decode(config.image_size, config.resize, config.interpolation)
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(config.batch_size).map(lambda x: tf.cast(x, tf.float32)).prefetch(tf.data.AUTOTUNE)
