"""tf.data input pipelines: parallel decode and resize (or a cache of decoded images), shuffled indices, batch,
augment (training only), prefetch."""

from __future__ import annotations

import contextlib
import logging
import math
import re

import numpy as np
import tensorflow as tf

from tltoolkit.data.arrays import DISK, MEMORY, MEMORY_CACHE, NONE, DiskRows, MemoryRows, Rows, cache_key
from tltoolkit.data.budget import size_text
from tltoolkit.data.images import load_image_array
from tltoolkit.data.split import Item
from tltoolkit.errors import DataError
from tltoolkit.progress import Progress
from tltoolkit.recipe import AugmentConfig, DataConfig

_logger = logging.getLogger(__name__)

# Decoded images kept in memory, shared by the sessions and trials of this process (with the features).
IMAGES = MEMORY_CACHE

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
    return mirror_batch(image[tf.newaxis], tf.reshape(variant, [1]), flip)[0]


def mirrors(image: tf.Tensor, flip: str) -> tf.Tensor:
    """Every mirror variant of `image`, stacked: `(FLIP_VARIANTS[flip], height, width, channels)`."""
    return tf.stack([mirror(image, v, flip) for v in range(FLIP_VARIANTS[flip])])


def mirror_batch(images: tf.Tensor, variants: tf.Tensor, flip: str) -> tf.Tensor:
    """`mirror` for a batch: `images` (batch, height, width, channels), each as its own variant of `variants`."""
    if flip == "none":
        return images
    variants = tf.reshape(tf.cast(variants, tf.int32), [-1, 1, 1, 1])
    if flip in ("horizontal", "horizontal_and_vertical"):
        images = tf.where(tf.equal(variants % 2, 1), tf.reverse(images, [2]), images)
    if flip == "vertical":
        images = tf.where(tf.equal(variants, 1), tf.reverse(images, [1]), images)
    if flip == "horizontal_and_vertical":
        images = tf.where(variants >= 2, tf.reverse(images, [1]), images)
    return images


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
    per_batch=None,
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
        per_batch: A function mapped over each batch (reading a cache's rows by their indices).
    """
    base = (seed * 1_000_003 + stream * 10_007) % 2**31
    if last_epoch <= first_epoch:
        return examples.batch(batch_size).take(0)

    def one_epoch(epoch):
        shuffled = examples.shuffle(size, seed=base + epoch, reshuffle_each_iteration=False)
        if per_example is not None:
            shuffled = shuffled.map(per_example(epoch), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        batched = shuffled.batch(batch_size)
        if per_batch is not None:
            batched = batched.map(per_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return batched

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


class ImageRows:
    """The decoded images of `items` (`(size, size, 3)` uint8, as `config` reads them), by index: from a cache
    filled once (`where` memory or disk, see `tltoolkit.data.arrays`), or decoded each time they are read (none).

    Args:
        items: `(path, label)` pairs.
        config: The recipe's `data` section (image size, resize mode, filter, batch size).
        where: `memory`, `disk` or `none`. Defaults to `none`.
        name: What they are, for the logs (`train images`).
        memory: Where memory caches are shared (trials of one process reuse them). Defaults to `IMAGES`.

    `fill()` decodes what the cache lacks (a disk cache resumes after its last finished shard); a disk cache that
    cannot be written (full disk, unwritable folder) falls back to decoding, with a warning.
    """

    def __init__(self, items: list[Item], config: DataConfig, where: str = NONE, name: str = "images", memory=None):
        self.items, self.config, self.where, self.name = items, config, where, name
        self.memory = IMAGES if memory is None else memory
        self.paths = [path for path, _ in items]
        self.labels = np.array([label for _, label in items], dtype=np.int32)
        self.store: Rows | None = None
        self.note = ""  # Why the cache is not where the plan put it (a disk that refused it), for logs.

    def __len__(self) -> int:
        return len(self.items)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.config.image_size, self.config.image_size, 3)

    def key(self) -> tuple:
        """What decides the pixels: the files (paths, sizes, mtimes), the size, resize mode and filter."""
        from tltoolkit.data.scan import SCAN_VERSION, content_digest

        config = self.config
        return (
            "images",
            content_digest(self.items),
            config.image_size,
            config.resize,
            config.interpolation,
            SCAN_VERSION,
        )

    def fill(self, verbose: bool = True) -> ImageRows:
        """Opens the cache (memory or disk) and decodes into it what it lacks; returns itself."""
        if self.where == NONE or self.store is not None:
            return self
        key = self.key()
        try:
            if self.where == MEMORY:
                self.store = self.memory.get(key, lambda: self._filled(self._in_memory(key), verbose))
            else:
                self.store = self._filled(self._disk(key), verbose)
        except OSError as exc:
            self._fall_back(exc)
        return self

    def _disk(self, key: tuple) -> DiskRows:
        from tltoolkit import cache as cache_folder

        folder = cache_folder.arrays_dir() / f"images-{cache_key(*key)}"
        rows = DiskRows(
            folder,
            len(self),
            self.shape,
            np.uint8,
            f"{len(self)} {self.name} at {self.shape[0]} px",
            self.config.batch_size,
        )
        if not rows.complete:
            cache_folder.make_room(rows.nbytes - rows.start * rows.row_bytes, keep=folder)
        return rows

    def _in_memory(self, key: tuple) -> MemoryRows:
        """Empty rows in memory, or a finished disk cache of these images read back (no decoding)."""
        disk = self._disk_copy(key)
        rows = MemoryRows(len(self), self.shape, np.uint8, disk)
        if disk is not None:
            disk.close()
        return rows

    def _disk_copy(self, key: tuple) -> Rows | None:
        """A finished disk cache of these very images, to read back instead of decoding (else `None`)."""
        from tltoolkit import cache as cache_folder

        folder = cache_folder.arrays_dir() / f"images-{cache_key(*key)}"
        if not (folder / "meta.json").exists():
            return None
        try:
            rows = DiskRows(folder, len(self), self.shape, np.uint8, multiple=self.config.batch_size)
        except OSError:
            return None
        return rows if rows.complete else None

    def _filled(self, rows: Rows, verbose: bool) -> Rows:
        if rows.complete:
            if rows.where == DISK:
                _logger.info("%s: reusing the disk cache in %s.", self.name.capitalize(), rows.folder)
            return rows
        left = len(self) - rows.start
        where = f"the disk cache ({size_text(rows.nbytes)} in {rows.folder})" if rows.where == DISK else "memory"
        resumed = f", continuing after {rows.start:,} already cached" if rows.start else ""
        _logger.info("Decoding %s %s into %s%s...", f"{left:,}", self.name, where, resumed)
        progress = Progress(left, "images", verbose)
        with readable_images():
            for batch in self._decoded_from(rows.start):
                rows.append(batch)
                progress.advance(len(batch))
        return rows

    def _decoded_from(self, start: int):
        """uint8 batches of the images from `start` on, decoded in parallel, in order."""
        ds = tf.data.Dataset.range(start, len(self)).map(self._decode_index(), num_parallel_calls=tf.data.AUTOTUNE)
        yield from ds.batch(self.config.batch_size).prefetch(2).as_numpy_iterator()

    def _fall_back(self, exc: OSError) -> None:
        self.note = f"{self.where} cache refused ({exc.strerror or exc}): decoded each time instead"
        _logger.warning(
            "%s: the %s cache could not be written (%s); decoding them each time instead, no cache.",
            self.name.capitalize(),
            self.where,
            exc.strerror or exc,
        )
        self.where, self.store = NONE, None

    def _decode_index(self):
        """`index -> uint8 image`, decoding the file (parallel calls decode at once: Pillow releases the GIL)."""
        paths, config = self.paths, self.config

        def load(index):
            image = tf.numpy_function(
                lambda i: load_image_array(paths[int(i)], config.image_size, config.resize, config.interpolation),
                [index],
                tf.uint8,
                stateful=False,
            )
            image.set_shape(self.shape)
            return image

        return load

    def by_index(self):
        """`(per_example, per_batch)` for `epoch_stream`: with a cache, images are read per batch of indices; without,
        each index is decoded on its own (in parallel). Either maps `index -> image` (the batch's rows)."""
        if self.store is None:
            return self._decode_index(), None
        store, shape = self.store, self.shape

        def read(indices):
            images = tf.numpy_function(store.read, [indices], tf.uint8, stateful=False)
            images.set_shape((None, *shape))
            return images

        return None, read

    def batches(self, num_classes: int) -> tf.data.Dataset:
        """`(float32 pixels, one-hot labels)` batches in file order, for scoring."""
        per_example, per_batch = self.by_index()
        labels = tf.constant(self.labels)
        ds = tf.data.Dataset.range(len(self))
        if per_example is not None:
            ds = ds.map(lambda i: (per_example(i), tf.gather(labels, i)), num_parallel_calls=tf.data.AUTOTUNE)
            ds = ds.batch(self.config.batch_size)
        else:
            ds = ds.batch(self.config.batch_size).map(lambda i: (per_batch(i), tf.gather(labels, i)))
        return ds.map(_to_float(num_classes), num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


class TrainingBatches:
    """The training set: served as an endless, resumable stream of shuffled epochs, its images decoded each time or
    read from a cache (`ImageRows`).

    Args:
        items: `(path, label)` pairs from `prepare_data`.
        num_classes: Width of the one-hot labels.
        config: The recipe's `data` section (image size, batch size, resize mode, augmentation).
        seed: Seeds the epochs' orders and the augmentation.
        images: Where the images come from. Defaults to decoding them each time (no cache).

    `epochs(stream, first_epoch, last_epoch)` gives the batches of `epoch_stream`, cast to float32 with one-hot labels
    and augmented; `steps_per_epoch` is what `fit` needs with them. Only indices are shuffled, so memory does not grow
    with the images' size or number.
    """

    def __init__(
        self, items: list[Item], num_classes: int, config: DataConfig, seed: int = 42, images: ImageRows | None = None
    ):
        self.items, self.num_classes, self.config, self.seed = items, num_classes, config, seed
        self.steps_per_epoch = steps_per_epoch(len(items), config.batch_size)
        self.images = images if images is not None else ImageRows(items, config)

    def epochs(self, stream: int = 0, first_epoch: int = 0, last_epoch: int = 1) -> tf.data.Dataset:
        flip, variants = self.config.augment.flip, FLIP_VARIANTS[self.config.augment.flip]
        decode, read = self.images.fill().by_index()
        labels = tf.constant(self.images.labels)
        seed = self.seed

        def per_example(epoch):
            def example(index):
                variant = draw_variant(seed, stream, epoch, index, variants) if flip != "none" else tf.constant(0)
                if decode is not None:
                    return mirror(decode(index), variant, flip), tf.gather(labels, index)
                return index, variant

            return example

        def per_batch(indices, variant):
            return mirror_batch(read(indices), variant, flip), tf.gather(labels, indices)

        ds = epoch_stream(
            tf.data.Dataset.range(len(self.items)),
            len(self.items),
            self.config.batch_size,
            seed,
            stream,
            first_epoch,
            last_epoch,
            per_example,
            per_batch if decode is None else None,
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


def _to_float(num_classes: int):
    return lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes))


def image_dataset(
    items: list[Item],
    num_classes: int,
    config: DataConfig,
    *,
    training: bool = False,
    seed: int = 42,
    images: ImageRows | None = None,
) -> tf.data.Dataset:
    """Batches of `(float32 RGB pixels in [0, 255], one-hot labels)`.

    Args:
        items: `(path, label)` pairs from `prepare_data`.
        num_classes: Width of the one-hot labels.
        config: The recipe's `data` section (image size, batch size, resize mode, augmentation).
        training: One shuffled, augmented epoch (epoch 0 of `TrainingBatches`; train with `TrainingBatches` itself).
            Otherwise the file order, no augmentation.
        seed: Seeds shuffling and augmentation.
        images: Where the images come from (a cache). Defaults to decoding them as they are read.
    """
    if training:
        return TrainingBatches(items, num_classes, config, seed, images).epochs()
    return (images if images is not None else ImageRows(items, config)).fill().batches(num_classes)


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
