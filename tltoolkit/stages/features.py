"""The feature cache: a stage that trains only above a frozen prefix trains on the prefix's outputs, computed once.

A frozen prefix in inference mode is a fixed function of the image, so without augmentation before it, running it
every epoch recomputes the same numbers. `FeatureCache` computes the prefix's outputs for every training and
validation image once and keeps them in memory, keyed by the data (paths, sizes, mtimes), the backbone, its weights
(name and a digest of the prefix's current values, so a fine-tuned prefix is never mistaken for a pretrained one),
the image size, the resize mode and the cut point. The stage then fits a "top" model made of the very layers above
the cut (the backbone's suffix and the head, weights shared with the full classifier), which trains exactly as the
full model would: same batches in the same order, same weights, same updates.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tltoolkit.data.pipeline import (
    FLIP_VARIANTS,
    build_augmenter,
    draw_variant,
    drawn,
    epoch_stream,
    image_dataset,
    mirror,
    mirrors,
    readable_images,
)
from tltoolkit.data.split import Item
from tltoolkit.model import apply_head, layer_output, run_subgraph
from tltoolkit.model.inference import predict_batches
from tltoolkit.recipe import DataConfig

_logger = logging.getLogger(__name__)

# Above this many bytes of features, train through the backbone instead (a note says so).
MAX_BYTES = int(float(os.environ.get("TLTOOLKIT_FEATURE_CACHE_MAX_GB", "4")) * 2**30)


def cut_tensors(backbone: keras.Model, frozen: int) -> list:
    """The tensors that cross the cut between the first `frozen` layers and the rest, in layer order."""
    prefix = {id(layer) for layer in backbone.layers[:frozen]}
    cut: list = []
    for layer in backbone.layers[frozen:]:
        if not layer._inbound_nodes:
            continue
        for tensor in layer._inbound_nodes[0].input_tensors:  # The node made when the backbone was built.
            if id(tensor._keras_history.operation) in prefix and not any(tensor is seen for seen in cut):
                cut.append(tensor)
    return cut


def prefix_digest(backbone: keras.Model, frozen: int) -> str:
    """A digest of the frozen prefix's current weights (a few ms), so changed weights never reuse stale features."""
    digest = hashlib.blake2b(digest_size=16)
    for layer in backbone.layers[:frozen]:
        for weight in layer.weights:
            digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()


def data_digest(items: list[Item], root: str | Path | None = None) -> str:
    """Paths, labels, sizes and modification times: a changed, added or removed file changes the key.

    With `root`, paths count relative to it (resolved), so the same folder typed another way (absolute, relative,
    from another working directory) gives the same key.
    """
    base = Path(root).resolve() if root is not None else None
    digest = hashlib.blake2b(digest_size=16)
    for path, label in items:
        stat = os.stat(path)
        name = path
        if base is not None:
            resolved = Path(path).resolve()
            name = resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(resolved)
        digest.update(f"{name}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class FeatureCache:
    """Prefix outputs in memory, shared by every stage and every trial of this process (least recently used first out).

    Args:
        max_entries: How many (data, backbone, weights, size, cut) entries to keep.
    """

    max_entries: int = 4
    entries: dict[tuple, dict[str, tuple[np.ndarray, ...]]] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, key: tuple, compute) -> dict[str, tuple[np.ndarray, ...]]:
        if key in self.entries:
            self.hits += 1
            self.entries[key] = self.entries.pop(key)  # Most recently used last.
            return self.entries[key]
        self.misses += 1
        value = compute()
        self.entries[key] = value
        while len(self.entries) > self.max_entries:
            self.entries.pop(next(iter(self.entries)))
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = 0


CACHE = FeatureCache()


@dataclass
class CachedInputs:
    """What a stage fits on when its frozen prefix is cached."""

    model: keras.Model  # The layers above the cut (shared with the full classifier), from features to probabilities.
    train: tf.data.Dataset  # The stage's epochs (see `epoch_stream`), in the image stream's order.
    val: tf.data.Dataset
    cut: str  # The first layer above the cut, or "head" when the whole backbone is frozen.
    extraction_s: float = 0.0  # Seconds spent computing the features for this stage (0: the cache had them).


@dataclass
class FeatureSource:
    """The labelled images a run trains on, able to serve any stage's frozen prefix as cached features.

    Args:
        parts: `{"train": items, "val": items}` from `prepare_data`.
        num_classes: Width of the one-hot labels.
        data: The recipe's `data` section (image size, resize, batch size, augmentation, `feature_cache`).
        seed: The training shuffle's seed (the same as the image pipeline's, so batches match).
        weights_label: The backbone's weight source as the recipe names it (part of the key, for readability).
        cache: Where features live. Defaults to the process-wide `CACHE`.
    """

    parts: dict[str, list[Item]]
    num_classes: int
    data: DataConfig
    seed: int
    weights_label: str = ""
    cache: FeatureCache = field(default_factory=lambda: CACHE)

    def usable(self, frozen: int) -> str | None:
        """Why the cache cannot serve a stage with `frozen` leading layers frozen, or `None` if it can."""
        if not self.data.feature_cache:
            return "data.feature_cache is off"
        if frozen == 0:
            return "nothing is frozen"
        continuous = self.data.augment.continuous
        if continuous and not self.data.feature_cache_copies:
            return (
                f"augmentation ({', '.join(continuous)}) runs before the frozen layers, a new image every epoch; "
                "data.feature_cache_copies: K would cache K augmented copies of each image instead"
            )
        return None

    @property
    def variants(self) -> int:
        """Feature sets per training image: `data.feature_cache_copies` augmented copies with continuous augmentation,
        else one per mirror image the recipe's `augment.flip` can show."""
        return self.data.feature_cache_copies if self.data.augment.continuous else FLIP_VARIANTS[self.data.augment.flip]

    def describe_variants(self) -> str:
        """What the versions of each training image are, for logs: `2 mirror images`, `4 augmented copies`."""
        if self.data.augment.continuous:
            return f"{self.variants} augmented copies (data.feature_cache_copies, an approximation)"
        return f"{self.variants} mirror images"

    def versions(self):
        """`(uint8 image, index) -> (variants, height, width, 3)`: every version of a training image the cache keeps.
        Mirror images are exact; augmented copies are drawn once (flip by `draw_variant`, then the recipe's
        continuous augmentation), so each epoch picks among K fixed copies instead of making a new image."""
        augment, copies, seed = self.data.augment, self.data.feature_cache_copies, self.seed
        if not self.data.augment.continuous:
            return lambda image, index: mirrors(image, augment.flip)
        augmenter = build_augmenter(augment, seed + 5)
        flips = FLIP_VARIANTS[augment.flip]

        def augmented(image, index):
            drawn = [mirror(image, draw_variant(seed, -1, k, index, flips), augment.flip) for k in range(copies)]
            return augmenter(tf.cast(tf.stack(drawn), tf.float32), training=True)

        return augmented

    def inputs(
        self,
        model: keras.Model,
        backbone: keras.Model,
        frozen: int,
        epochs: tuple[int, int, int] = (0, 0, 1),
        verbose: bool = True,
        auxiliary: list[tuple[str, keras.Layer]] = (),
    ) -> CachedInputs | None:
        """Cached features and the top model for a stage whose first `frozen` backbone layers are frozen, or `None`.

        Args:
            epochs: `(stream, first_epoch, last_epoch)` of the stage's `TrainingBatches.epochs`, so batches match.
            auxiliary: `(tap layer, head)` of the auxiliary heads: a tap below the cut is cached too, one above is
                computed by the top model; the top model then outputs the main probabilities and each head's.
        """
        if self.usable(frozen) is not None:
            return None
        whole = frozen >= len(backbone.layers)
        cut = [backbone.output] if whole else cut_tensors(backbone, frozen)
        names = [layer.name for layer in backbone.layers]
        below = [tap for tap, _ in auxiliary if names.index(tap) < frozen]
        cached = cut + [t for t in (layer_output(backbone, tap) for tap in below) if not any(t is c for c in cut)]
        if not self._fits(cached):
            return None
        key = (
            data_digest(self.parts["train"]),
            data_digest(self.parts["val"]),
            backbone.name,
            self.weights_label,
            prefix_digest(backbone, frozen),
            self.data.image_size,
            self.data.resize,
            self.data.interpolation,
            frozen,
            tuple(below),
            self.data.augment,
            self.variants,
            self.seed if self.data.augment.continuous else None,  # Augmented copies are drawn from the seed.
        )
        above = "head" if whole else backbone.layers[frozen].name
        started, misses = time.perf_counter(), self.cache.misses
        features = self.cache.get(key, lambda: self._compute(backbone, cached, above, verbose))
        extraction_s = time.perf_counter() - started if self.cache.misses > misses else 0.0
        top = _top_model(model, backbone, (cut, cached), frozen, list(auxiliary))
        train = _feature_dataset(
            features["train"],
            self.parts["train"],
            self.num_classes,
            self.data.batch_size,
            (self.seed, *epochs),
            self.variants,
        )
        val = _feature_dataset(features["val"], self.parts["val"], self.num_classes, self.data.batch_size)
        return CachedInputs(top, train, val, above, extraction_s)

    def _fits(self, cached: list) -> bool:
        """Whether the features of every train and val image fit under `MAX_BYTES` (else a note says so)."""
        per_image = sum(int(np.prod(t.shape[1:])) * 4 for t in cached)
        total = per_image * (len(self.parts["train"]) * self.variants + len(self.parts["val"]))
        if total > MAX_BYTES:
            _logger.info(
                "Feature cache: %.1f GiB of features at this cut exceed the %.0f GiB limit "
                "(TLTOOLKIT_FEATURE_CACHE_MAX_GB); training through the backbone.",
                total / 2**30,
                MAX_BYTES / 2**30,
            )
        return total <= MAX_BYTES

    def _compute(self, backbone: keras.Model, cached: list, above: str, verbose: bool) -> dict:
        extractor = keras.Model(backbone.inputs, cached, name=f"{backbone.name}_prefix")
        train, val, variants = self.parts["train"], self.parts["val"], self.variants
        if variants == 1:
            what = f"{len(train) + len(val)} images ({len(train)} train, {len(val)} val) below `{above}`"
            outputs = extract(extractor, train + val, self.data, what, verbose)  # One pass, one trace.
            return {"train": tuple(o[: len(train)] for o in outputs), "val": tuple(o[len(train) :] for o in outputs)}
        what = f"{len(train)} train images x {self.describe_variants()} below `{above}`"
        outputs = extract(extractor, train, self.data, what, verbose, (self.versions(), variants))
        what = f"{len(val)} val images below `{above}`"
        return {
            "train": tuple(o.reshape(len(train), variants, *o.shape[1:]) for o in outputs),
            "val": extract(extractor, val, self.data, what, verbose),
        }


def extract(
    extractor: keras.Model, items: list[Item], data: DataConfig, what: str, verbose: bool, versions: tuple = None
):
    """Runs `extractor` over `items` in file order (compiled, as `predict`), with progress; one array per cut tensor.
    With `versions` = `(function, count)`, over the `count` versions `function(image, index)` makes of each image
    in turn (image 0's, then image 1's...)."""
    ds = image_dataset(items, 1, data.model_copy(update={"cache": False}), training=False).map(lambda x, y: x)
    if versions is not None:
        make, count = versions
        items = [item for item in items for _ in range(count)]  # One per version, in order.
        ds = tf.data.Dataset.zip(ds.unbatch().map(lambda x: tf.cast(x, tf.uint8)), tf.data.Dataset.range(len(items)))
        # float32 as the val images are, so `predict` traces once for both.
        ds = ds.flat_map(lambda x, i: tf.data.Dataset.from_tensor_slices(tf.cast(make(x, i), tf.float32)))
        ds = ds.apply(tf.data.experimental.assert_cardinality(len(items)))  # So `predict` knows where it ends.
        ds = ds.batch(data.batch_size).prefetch(tf.data.AUTOTUNE)
    if verbose:
        _logger.info("Computing the frozen layers' outputs for %s (once)...", what)
    tty = bool(verbose) and sys.stdout.isatty()
    progress = [] if tty or not verbose else [_Progress(len(items), data.batch_size)]
    with readable_images():
        outputs = predict_batches(
            extractor, ds, len(items), data.batch_size, verbose=1 if tty else 0, callbacks=progress
        )
    return tuple(outputs) if isinstance(outputs, (list, tuple)) else (outputs,)


class _Progress(keras.callbacks.Callback):
    """A line every 10 seconds and at the end, where no terminal shows Keras's progress bar."""

    def __init__(self, total: int, batch_size: int):
        super().__init__()
        self.total, self.batch_size = total, batch_size

    def on_predict_begin(self, logs=None):
        self.started = self.last = time.perf_counter()

    def on_predict_batch_end(self, batch, logs=None):
        done = min(self.total, (batch + 1) * self.batch_size)
        now = time.perf_counter()
        if now - self.last > 10 or done == self.total:
            self.last = now
            _logger.info("  %d/%d images, %.1f images/s", done, self.total, done / max(now - self.started, 1e-9))


def _feature_dataset(
    features, items: list[Item], num_classes: int, batch_size: int, epochs: tuple | None = None, variants: int = 1
):
    """Batches of `(features, one-hot labels)`: with `epochs` = `(seed, stream, first_epoch, last_epoch)`, the
    shuffled epochs of `epoch_stream`, in the very order of the image stream, each image's features those of the
    version `draw_variant` draws for it (with `variants` > 1 the features hold every version, `(images, variants,
    ...)`: mirror images, as the image stream shows them, or augmented copies); else one pass in file order."""
    labels = np.array([label for _, label in items], dtype=np.int32)
    x = features[0] if len(features) == 1 else tuple(features)
    ds = tf.data.Dataset.from_tensor_slices((x, labels))
    if epochs is None:
        ds = ds.batch(batch_size)
    elif variants == 1:
        ds = epoch_stream(ds, len(items), batch_size, *epochs)
    else:
        seed, stream = epochs[:2]
        ds = tf.data.Dataset.zip(ds, tf.data.Dataset.range(len(items)))
        pick = drawn(
            seed, stream, variants, lambda example, v: (tf.nest.map_structure(lambda f: f[v], example[0]), example[1])
        )
        ds = epoch_stream(ds, len(items), batch_size, *epochs, per_example=pick)
    return ds.map(lambda f, y: (f, tf.one_hot(y, num_classes))).prefetch(tf.data.AUTOTUNE)


def _top_model(
    model: keras.Model, backbone: keras.Model, tensors: tuple[list, list], frozen: int, auxiliary: list
) -> keras.Model:
    """Features -> (backbone layers above the cut, in inference mode) -> the classifier's head, weights shared.

    `tensors` is `(cut, cached)`: the tensors crossing the cut, and those plus the auxiliary taps below it (the top
    model's inputs, in that order). With `auxiliary` (`(tap, head)` pairs) it also outputs each head's probabilities.
    """
    cut, cached = tensors
    inputs = [keras.Input(shape=t.shape[1:], name=f"features{i}") for i, t in enumerate(cached)]
    names = [layer.name for layer in backbone.layers]
    above = [tap for tap, _ in auxiliary if names.index(tap) >= frozen]
    if frozen >= len(backbone.layers):
        x, taps = inputs[0], []
    else:
        tensors = [backbone.output, *(layer_output(backbone, tap) for tap in above)]
        x, *taps = run_subgraph(cut, tensors, inputs[0] if len(cut) == 1 else inputs[: len(cut)], "backbone_suffix")
    x = apply_head(model, x)
    heads = []
    for tap, head in auxiliary:
        if tap in above:
            heads.append(head(taps[above.index(tap)]))
        else:
            tensor = layer_output(backbone, tap)
            heads.append(head(inputs[next(i for i, t in enumerate(cached) if t is tensor)]))
    model_inputs = inputs[0] if len(inputs) == 1 else inputs
    return keras.Model(model_inputs, [x, *heads] if heads else x, name=f"{model.name}_top")
