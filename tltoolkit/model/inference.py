"""Keras `predict` over a dataset whose batches all have one shape, so the model is traced once, not twice.

Keras's `predict` compiles its step for the shape of the data it is given (its train and test steps take an iterator
and trace once). A dataset of N images in batches of B ends with a short batch whenever B does not divide N, and
that batch traces and optimises the whole model a second time: 1.3-1.4 s for MobileNetV2 at 224 px on 2 CPU cores,
measured per batch (`bench/run.py head-cache` pays it in the feature extraction; `tltoolkit predict` on a folder
too). Filling the short batch up with zeros costs at most B - 1 images' forward pass, about a third of that trace
there, and less on a GPU; the extra rows are cut off the outputs. A dataset of one batch (one image, say) is left as
it is: there is nothing to trace twice.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def predict_batches(model: keras.Model, batches: tf.data.Dataset, count: int, batch_size: int, **kwargs):
    """`model.predict(batches, **kwargs)` with `batches`' short last batch padded to `batch_size` (see above).

    Args:
        batches: `count` examples in batches of `batch_size`, only the last one shorter (as `Dataset.batch` makes
            them); an example is its inputs, or `(inputs, targets...)`, every tensor's first axis the batch.
    Returns:
        What `predict` returns (an array, or a list of arrays for several outputs), `count` rows each.
    """
    if count <= batch_size or count % batch_size == 0:
        return model.predict(batches, **kwargs)

    def pad(tensor):
        fill = [[0, batch_size - tf.shape(tensor)[0]]] + [[0, 0]] * (tensor.shape.rank - 1)
        return tf.ensure_shape(tf.pad(tensor, fill), [batch_size, *tensor.shape[1:]])

    full = batches.map(lambda *example: tf.nest.map_structure(pad, example if len(example) > 1 else example[0]))
    outputs = model.predict(full, **kwargs)
    return tf.nest.map_structure(lambda array: np.asarray(array)[:count], outputs)


def predict_images(model: keras.Model, paths: list[str], config) -> np.ndarray:
    """`model`'s outputs for the images at `paths`, read as `config` (a recipe's `DataConfig`) says, in their order;
    decoding runs ahead of the model (`image_batches` prefetches)."""
    from tltoolkit.data.pipeline import image_batches

    return predict_batches(model, image_batches(paths, config), len(paths), config.batch_size, verbose=0)


def iter_outputs(model: keras.Model, batches: tf.data.Dataset, batch_size: int):
    """`model`'s outputs batch by batch (a list of arrays, one per output), without holding them all: for passes
    too large to keep (a feature extraction written to disk, a million predictions written as they come).

    Every batch reaches the model at `batch_size` rows (a short one is padded, then cut), so it traces once, as
    `predict_batches` does; `predict_on_batch` runs the same compiled step `predict` runs. `batches` yields model
    inputs only (one tensor or a tuple); decoding in `batches` runs ahead while the model runs (prefetch it).
    """
    for x in batches:
        count = int(tf.nest.flatten(x)[0].shape[0])
        outputs = model.predict_on_batch(tf.nest.map_structure(lambda t: pad_batch(t, batch_size), x))
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        yield [np.asarray(output)[:count] for output in outputs]


def pad_batch(tensor, batch_size: int):
    """`tensor` (a tensor or an array) with zero rows added up to `batch_size` rows (unchanged if it has as many)."""
    if isinstance(tensor, np.ndarray):
        missing = batch_size - len(tensor)
        return np.concatenate([tensor, np.zeros((missing, *tensor.shape[1:]), tensor.dtype)]) if missing > 0 else tensor
    missing = batch_size - int(tensor.shape[0])
    if missing <= 0:
        return tensor
    return tf.pad(tensor, [[0, missing]] + [[0, 0]] * (tensor.shape.rank - 1))
