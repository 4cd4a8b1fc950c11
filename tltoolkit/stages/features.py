"""The feature cache: a stage that trains only above a frozen prefix trains on the prefix's outputs, computed once.

A frozen prefix in inference mode is a fixed function of the image, so without augmentation before it, running it
every epoch recomputes the same numbers. `FeatureSource` computes the prefix's outputs for every training and
validation image once, keyed by the data (paths, sizes, mtimes), the backbone, its weights (name and a digest of the
prefix's current values, so a fine-tuned prefix is never mistaken for a pretrained one), the image size, the resize
mode and the cut point. Where the session's cache plan says (see `tltoolkit.data.budget`), they are kept in memory
(shared by the stages and trials of the process) or on disk (`tltoolkit.data.arrays`: reused by later runs on the
same data and backbone, resumed after a kill). Where the whole backbone is frozen and the head starts with global
pooling, the pooled outputs are what is kept (a 7x7 map is 49 times the size and pooled the same way each epoch).

The stage then fits a "top" model made of the very layers above the cut (the backbone's suffix and the head,
weights shared with the full classifier), which trains exactly as the full model would: same batches in the same
order, same weights, same updates. Only indices are shuffled; each batch's rows are read from the cache.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from tltoolkit import cache as cache_folder
from tltoolkit.data.arrays import DISK, MEMORY, MEMORY_CACHE, NONE, DiskRows, MemoryCache, MemoryRows, Rows, cache_key
from tltoolkit.data.budget import CacheChoice, size_text
from tltoolkit.data.pipeline import (
    FLIP_VARIANTS,
    ImageRows,
    build_augmenter,
    draw_variant,
    epoch_stream,
    mirror,
    mirrors,
    readable_images,
)
from tltoolkit.data.scan import content_digest
from tltoolkit.data.split import Item
from tltoolkit.model import apply_head, layer_output, run_subgraph
from tltoolkit.model.inference import iter_outputs
from tltoolkit.progress import Progress
from tltoolkit.recipe import DataConfig

_logger = logging.getLogger(__name__)
POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)

FeatureCache = MemoryCache  # Prefix outputs in memory, shared by every stage and every trial of this process.
CACHE = MEMORY_CACHE


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


@dataclass
class Cut:
    """Where a stage's frozen prefix ends and what of it is cached.

    Attributes:
        cut: The tensors that cross the cut (the backbone's output when all of it is frozen).
        cached: What the extractor outputs: `cut`, then auxiliary taps below the cut.
        above: The first layer above the cut, or "head" when the whole backbone is frozen.
        pooled: The head's global pooling is applied before caching (whole backbone frozen, pooling head).
        shapes: Each cached tensor's shape per image (pooled: `(channels,)`).
    """

    cut: list
    cached: list
    above: str
    pooled: bool
    shapes: list[tuple[int, ...]]
    pool: keras.Layer | None = None  # The classifier's own pooling layer, applied to the output when `pooled`.

    @property
    def name(self) -> str:
        return f"features below `{self.above}`"

    @property
    def floats(self) -> int:
        """float32 values per image version (all cached tensors, flattened)."""
        return sum(int(np.prod(shape)) for shape in self.shapes)


@dataclass
class CachedInputs:
    """What a stage fits on when its frozen prefix is cached."""

    model: keras.Model  # The layers above the cut (shared with the full classifier), from features to probabilities.
    train: tf.data.Dataset  # The stage's epochs (see `epoch_stream`), in the image stream's order.
    val: tf.data.Dataset
    cut: str  # The first layer above the cut, or "head" when the whole backbone is frozen.
    extraction_s: float = 0.0  # Seconds spent computing the features for this stage (0: the cache had them).
    where: str = MEMORY  # MEMORY or DISK.
    pooled: bool = False  # The head's pooling was applied before caching.


@dataclass
class FeatureSource:
    """The labelled images a run trains on, able to serve any stage's frozen prefix as cached features.

    Args:
        parts: `{"train": items, "val": items}` from `prepare_data`.
        num_classes: Width of the one-hot labels.
        data: The recipe's `data` section (image size, resize, batch size, augmentation, `feature_cache`).
        seed: The training shuffle's seed (the same as the image pipeline's, so batches match).
        weights_label: The backbone's weight source as the recipe names it (part of the key, for readability).
        cache: Where features kept in memory live. Defaults to the process-wide `CACHE`.
        images: `{"train": ImageRows, "val": ImageRows}`: a cache of decoded images to extract from (decoded
            otherwise).
        placements: The session's cache plan by cache name (`features below `head``); a cut it does not name is kept
            in memory.
    """

    parts: dict[str, list[Item]]
    num_classes: int
    data: DataConfig
    seed: int
    weights_label: str = ""
    cache: MemoryCache = field(default_factory=lambda: CACHE)
    images: dict[str, ImageRows] = field(default_factory=dict)
    placements: dict[str, CacheChoice] = field(default_factory=dict)
    refusal: str | None = None  # Why the last stage the cache could have served trained through the backbone.

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

    def cut(self, model: keras.Model, backbone: keras.Model, frozen: int, auxiliary=()) -> Cut:
        """What a stage with `frozen` frozen layers (and `auxiliary` `(tap, head)` pairs) would cache."""
        whole = frozen >= len(backbone.layers)
        cut = [backbone.output] if whole else cut_tensors(backbone, frozen)
        names = [layer.name for layer in backbone.layers]
        below = [tap for tap, _ in auxiliary if names.index(tap) < frozen]
        cached = cut + [t for t in (layer_output(backbone, tap) for tap in below) if not any(t is c for c in cut)]
        pool = model.get_layer("pool") if "pool" in [layer.name for layer in model.layers] else None
        pooled = whole and len(cached) == 1 and isinstance(pool, POOLING) and len(backbone.output.shape) == 4
        shapes = [(int(cached[0].shape[-1]),)] if pooled else [tuple(int(d) for d in t.shape[1:]) for t in cached]
        return Cut(cut, cached, "head" if whole else backbone.layers[frozen].name, pooled, shapes, pool)

    def nbytes(self, cut: Cut) -> int:
        """What the features of every train and val image take at `cut` (float32, every version of train images)."""
        return cut.floats * 4 * (len(self.parts["train"]) * self.variants + len(self.parts["val"]))

    def key(self, backbone: keras.Model, frozen: int, cut: Cut) -> tuple:
        return (
            "features",
            content_digest(self.parts["train"]),
            content_digest(self.parts["val"]),
            backbone.name,
            self.weights_label,
            prefix_digest(backbone, frozen),
            self.data.image_size,
            self.data.resize,
            self.data.interpolation,
            frozen,
            tuple(tuple(shape) for shape in cut.shapes),
            cut.pooled,
            self.data.augment,
            self.variants,
            self.seed if self.data.augment.continuous else None,  # Augmented copies are drawn from the seed.
        )

    def on_disk(self, key: tuple, cut: Cut) -> list[DiskRows] | None:
        """The finished disk caches (train, val) of this key, if both exist: reading them costs no extraction."""
        if not all((_folder(key, part) / "meta.json").exists() for part in ("train", "val")):
            return None
        try:
            rows = self._disk_rows(key, cut)
        except (OSError, ValueError):
            return None
        if all(r.complete for r in rows):
            return rows
        for r in rows:
            r.close()
        return None

    def inputs(
        self,
        model: keras.Model,
        backbone: keras.Model,
        frozen: int,
        epochs: tuple[int, int, int] = (0, 0, 1),
        verbose: bool = True,
        auxiliary: list[tuple[str, keras.Layer]] = (),
    ) -> CachedInputs | None:
        """Cached features and the top model for a stage whose first `frozen` backbone layers are frozen, or `None`
        (then `refusal` says why, where it is not `usable`'s reason).

        Args:
            epochs: `(stream, first_epoch, last_epoch)` of the stage's `TrainingBatches.epochs`, so batches match.
            auxiliary: `(tap layer, head)` of the auxiliary heads: a tap below the cut is cached too, one above is
                computed by the top model; the top model then outputs the main probabilities and each head's.
        """
        if self.usable(frozen) is not None:
            return None
        cut = self.cut(model, backbone, frozen, list(auxiliary))
        choice = self.placements.get(cut.name)
        where = choice.where if choice is not None else MEMORY
        if where == NONE:
            self.refusal = f"{cut.name}: {choice.why}"
            return None
        key = self.key(backbone, frozen, cut)
        started = time.perf_counter()
        try:
            stores, extracted = self._stores(key, where, backbone, cut, verbose)
        except OSError as exc:
            self.refusal = f"the disk cache of {cut.name} could not be written ({exc.strerror or exc})"
            _logger.warning("Feature cache: %s; training through the backbone instead.", self.refusal)
            return None
        extraction_s = time.perf_counter() - started if extracted else 0.0
        top = _top_model(model, backbone, cut, frozen, list(auxiliary))
        train = _feature_batches(
            stores["train"],
            self.parts["train"],
            cut,
            self.num_classes,
            self.data.batch_size,
            (self.seed, *epochs),
            self.variants,
        )
        val = _feature_batches(stores["val"], self.parts["val"], cut, self.num_classes, self.data.batch_size)
        return CachedInputs(top, train, val, cut.above, extraction_s, where, cut.pooled)

    def _stores(self, key: tuple, where: str, backbone, cut: Cut, verbose: bool) -> tuple[dict[str, Rows], bool]:
        """The train and val feature rows for `key` (computed where missing) and whether any were computed now."""
        extracted = []

        def filled(stores: dict[str, Rows]) -> dict[str, Rows]:
            if not all(rows.complete for rows in stores.values()):
                extracted.append(True)
                self._extract(backbone, cut, stores, verbose)
            return stores

        if where == MEMORY:
            stores = self.cache.get(key, lambda: filled(self._memory_rows(cut, self.on_disk(key, cut))))
        else:
            rows = self._disk_rows(key, cut)
            missing = sum(r.nbytes - r.start * r.row_bytes for r in rows)
            if missing:
                cache_folder.make_room(missing, keep=rows[0].folder)
            stores = filled(dict(zip(("train", "val"), rows)))
        return stores, bool(extracted)

    def _row_shapes(self, cut: Cut) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Rows of the train and val stores: every version of an image in one train row."""
        return ((self.variants, cut.floats) if self.variants > 1 else (cut.floats,)), (cut.floats,)

    def _memory_rows(self, cut: Cut, disk: list[DiskRows] | None) -> dict[str, Rows]:
        """Empty rows in memory, or a finished disk cache's rows read back (no extraction)."""
        shapes, sources = self._row_shapes(cut), disk or (None, None)
        stores = {
            part: MemoryRows(len(self.parts[part]), shape, np.float32, source)
            for part, shape, source in zip(("train", "val"), shapes, sources)
        }
        for rows in disk or ():
            rows.close()
        return stores

    def _disk_rows(self, key: tuple, cut: Cut) -> list[DiskRows]:
        shapes, batch = self._row_shapes(cut), self.data.batch_size
        what = f"{cut.name} of {{}} {{}} images, {cut.floats:,} floats each"
        return [
            DiskRows(
                _folder(key, part),
                len(self.parts[part]),
                shape,
                np.float32,
                what.format(len(self.parts[part]), part),
                # Train rows hold every version; batches of versions start at a shard's start as they would anyway.
                batch,
            )
            for part, shape in zip(("train", "val"), shapes)
        ]

    def _extract(self, backbone, cut: Cut, stores: dict[str, Rows], verbose: bool) -> None:
        extractor = _extractor(backbone, cut)
        train, val = self.parts["train"], self.parts["val"]
        versions = (self.versions(), self.variants) if self.variants > 1 else None
        for part, items, made in (("train", train, versions), ("val", val, None)):
            rows = stores[part]
            if rows.complete:
                continue
            what = f"{len(items) - rows.start:,} {part} images" + (f" x {self.describe_variants()}" if made else "")
            where = f"the disk cache ({rows.folder})" if rows.where == DISK else "memory"
            resumed = f", continuing after {rows.start:,} already cached" if rows.start else ""
            _logger.info(
                "Computing the frozen layers' outputs below `%s` for %s (%s, into %s%s)...",
                cut.above,
                what,
                size_text(rows.nbytes),
                where,
                resumed,
            )
            source = self.images.get(part) or ImageRows(items, self.data)
            extract_rows(extractor, source, rows, self.data.batch_size, made, verbose)


def extract_rows(
    extractor: keras.Model, images: ImageRows, rows: Rows, batch_size: int, versions: tuple | None, verbose: bool
) -> None:
    """Runs `extractor` over `images` from `rows.start` on, in file order, and appends its outputs to `rows`: one row
    per image, every output flattened and concatenated (with `versions` = `(function, count)`, the `count` versions
    `function(image, index)` makes of each image, in one row). Batches of `batch_size` reach the extractor, so a
    filling resumed at a shard's start sees the batches an uninterrupted one saw."""
    start = rows.start
    count = versions[1] if versions is not None else 1
    progress = Progress((len(images) - start) * count, "images", verbose)
    pending = None
    with readable_images():
        for outputs in iter_outputs(extractor, _extraction_batches(images, start, batch_size, versions), batch_size):
            flat = np.concatenate([np.asarray(o, np.float32).reshape(len(o), -1) for o in outputs], axis=1)
            pending = flat if pending is None or not len(pending) else np.concatenate([pending, flat])
            whole = len(pending) // count * count
            if whole:
                rows.append(pending[:whole].reshape(whole // count, *rows.shape))
                pending = pending[whole:]
            progress.advance(len(flat))
    if not rows.complete:
        raise RuntimeError(f"the extraction stopped at row {rows.start} of {rows.count}")


def _extraction_batches(images: ImageRows, start: int, batch_size: int, versions: tuple | None) -> tf.data.Dataset:
    """float32 batches of `images` from `start` on (or of their versions), in order."""
    per_example, per_batch = images.by_index()
    ds = tf.data.Dataset.range(start, len(images))
    if per_example is not None:
        ds = ds.map(lambda i: (per_example(i), i), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.batch(batch_size).map(lambda i: (per_batch(i), i)).unbatch()
    if versions is not None:
        make, count = versions
        # float32 as the val images are, so the extractor traces once for both.
        ds = ds.flat_map(lambda x, i: tf.data.Dataset.from_tensor_slices(tf.cast(make(x, i), tf.float32)))
    else:
        ds = ds.map(lambda x, i: tf.cast(x, tf.float32))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def extract(extractor: keras.Model, items: list[Item], data: DataConfig, what: str, verbose: bool) -> tuple:
    """`extractor`'s outputs for `items` in memory, one array per output (for passes that keep them all, as the
    probe's sample does)."""
    if verbose:
        _logger.info("Computing the frozen layers' outputs for %s (once)...", what)
    shapes = [tuple(int(d) for d in o.shape[1:]) for o in extractor.outputs]
    rows = MemoryRows(len(items), (sum(int(np.prod(s)) for s in shapes),), np.float32)
    extract_rows(extractor, ImageRows(items, data), rows, data.batch_size, None, verbose)
    return tuple(_split(rows.array, shapes))


def _split(flat, shapes: list[tuple[int, ...]]):
    """Flattened, concatenated rows (NumPy or TensorFlow) back into one array per shape."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    bounds = np.cumsum([0, *sizes])
    return [
        (
            flat[..., a:b].reshape(-1, *shape)
            if isinstance(flat, np.ndarray)
            else tf.reshape(flat[..., a:b], [-1, *shape])
        )
        for a, b, shape in zip(bounds[:-1], bounds[1:], shapes)
    ]


def _folder(key: tuple, part: str):
    return cache_folder.arrays_dir() / f"features-{cache_key(*key)}-{part}"


def _extractor(backbone: keras.Model, cut: Cut) -> keras.Model:
    outputs = list(cut.cached)
    if cut.pooled:
        outputs = [cut.pool(outputs[0])]
    return keras.Model(backbone.inputs, outputs, name=f"{backbone.name}_prefix")


def _feature_batches(
    rows: Rows, items: list[Item], cut: Cut, num_classes: int, batch_size: int, epochs=None, variants: int = 1
):
    """Batches of `(features, one-hot labels)`: with `epochs` = `(seed, stream, first_epoch, last_epoch)`, the
    shuffled epochs of `epoch_stream`, in the very order of the image stream, each image's features those of the
    version `draw_variant` draws for it (with `variants` > 1 each row holds every version: mirror images, as the
    image stream shows them, or augmented copies); else one pass in file order."""
    labels = tf.constant(np.array([label for _, label in items], dtype=np.int32))

    def read(indices):
        found = tf.numpy_function(rows.read, [indices], tf.float32, stateful=False)
        found.set_shape((None, *rows.shape))
        return found

    def example(found, indices):
        parts = _split(found, cut.shapes)
        return (parts[0] if len(parts) == 1 else tuple(parts)), tf.one_hot(tf.gather(labels, indices), num_classes)

    ds = tf.data.Dataset.range(len(items))
    if epochs is None:
        ds = ds.batch(batch_size).map(lambda i: example(read(i), i))
    elif variants == 1:
        ds = epoch_stream(ds, len(items), batch_size, *epochs, per_batch=lambda i: example(read(i), i))
    else:
        seed, stream = epochs[:2]

        def per_example(epoch):
            return lambda i: (i, draw_variant(seed, stream, epoch, i, variants))

        def per_batch(indices, variant):
            return example(tf.gather(read(indices), variant, batch_dims=1), indices)

        ds = epoch_stream(ds, len(items), batch_size, *epochs, per_example=per_example, per_batch=per_batch)
    return ds.prefetch(tf.data.AUTOTUNE)


def _top_model(model: keras.Model, backbone: keras.Model, cut: Cut, frozen: int, auxiliary: list) -> keras.Model:
    """Features -> (backbone layers above the cut, in inference mode) -> the classifier's head, weights shared.

    Its inputs are `cut.cached` (or the pooled output). With `auxiliary` (`(tap, head)` pairs) it also outputs each
    head's probabilities.
    """
    inputs = [keras.Input(shape=shape, name=f"features{i}") for i, shape in enumerate(cut.shapes)]
    names = [layer.name for layer in backbone.layers]
    above = [tap for tap, _ in auxiliary if names.index(tap) >= frozen]
    if frozen >= len(backbone.layers):
        x, taps = inputs[0], []
    else:
        tensors = [backbone.output, *(layer_output(backbone, tap) for tap in above)]
        count = len(cut.cut)
        x, *taps = run_subgraph(cut.cut, tensors, inputs[0] if count == 1 else inputs[:count], "backbone_suffix")
    x = apply_head(model, x, after="pool" if cut.pooled else "backbone")
    heads = []
    for tap, head in auxiliary:
        if tap in above:
            heads.append(head(taps[above.index(tap)]))
        else:
            tensor = layer_output(backbone, tap)
            heads.append(head(inputs[next(i for i, t in enumerate(cut.cached) if t is tensor)]))
    model_inputs = inputs[0] if len(inputs) == 1 else inputs
    return keras.Model(model_inputs, [x, *heads] if heads else x, name=f"{model.name}_top")
