"""What every stage of one training shares: the classifier, its batches, class weights and the feature cache."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from tltoolkit.data.arrays import MEMORY_CACHE, NONE
from tltoolkit.data.budget import CacheChoice, CacheNeed, MemoryBudget, plan_caches, process_memory
from tltoolkit.data.pipeline import ImageRows, TrainingBatches, image_dataset
from tltoolkit.errors import DataError
from tltoolkit.model import build_classifier, unfrozen_prefix
from tltoolkit.recipe import HeadConfig, Recipe
from tltoolkit.stages.features import FeatureSource
from tltoolkit.stages.pretrain import reconstruction_loss
from tltoolkit.stages.supervision import Supervision, decayed, prepare_supervision

_logger = logging.getLogger(__name__)


@dataclass
class Joint:
    """Classification and reconstruction trained together (`pretrain.autoencoder.joint`).

    Every stage fits `model` (image -> [class probabilities, reconstruction]) on the labelled training images plus
    the autoencoder's images (their labels all zero, so they add reconstruction loss only), with reconstruction an
    auxiliary loss whose weight `joint_weight` decays over all stages' epochs as `joint_decay` says.
    """

    model: keras.Model
    train: TrainingBatches
    config: object  # AutoencoderConfig
    total_epochs: int
    weight: keras.Variable

    def weight_at(self, epoch: int) -> float:
        """The reconstruction loss's weight in (global, 0-based) epoch `epoch`."""
        progress = epoch / max(1, self.total_epochs - 1)  # Zero in the last epoch.
        return decayed(self.config.joint_weight, self.config.joint_decay, progress)

    def losses(self, label_smoothing: float) -> list:
        """Masked classification loss (unlabelled rows add nothing) and the weighted reconstruction loss."""
        base = reconstruction_loss(self.config.loss)
        return [_masked_crossentropy(label_smoothing), lambda y_true, y_pred: self.weight * base(y_true, y_pred)]

    def with_targets(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        """`(x, y)` batches as the joint model's `(x, (y, x / 255))`."""
        return ds.map(lambda x, y: (x, (y, x / 255.0)), num_parallel_calls=tf.data.AUTOTUNE)


@dataclass
class Training:
    """What every stage of one training shares: the classifier, its batches, class weights and the feature cache."""

    recipe: Recipe
    backbone: keras.Model
    model: keras.Model
    train: TrainingBatches  # Shuffled epochs, one stream per stage, resumable at any epoch.
    eval: dict  # Part name ("val", maybe "test") -> batches in file order.
    class_weight: dict[int, float] | None
    features: FeatureSource | None
    joint: Joint | None = None  # An autoencoder recipe in `joint` mode: reconstruction trains alongside.
    supervision: Supervision | None = None  # `head.auxiliary`: auxiliary heads train alongside.
    caches: list[CacheChoice] = field(default_factory=list)  # Where each cache went, and why (`plan_training_caches`).
    budget: MemoryBudget | None = None

    @property
    def checkpoint_model(self) -> keras.Model:
        """The model whose every variable a checkpoint holds (with the decoder, or the auxiliary heads, if any)."""
        if self.joint is not None:
            return self.joint.model
        return self.supervision.model if self.supervision is not None else self.model


def _masked_crossentropy(label_smoothing: float):
    """Categorical cross-entropy over labelled rows only: rows whose one-hot label is all zero add nothing."""
    base = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=None)

    def loss(y_true, y_pred):
        labelled = keras.ops.cast(keras.ops.sum(y_true, axis=-1) > 0, y_pred.dtype)
        return base(y_true, y_pred) * labelled

    return loss


def prepare_training(
    recipe: Recipe, folder, backbone: keras.Model, seed: int | None = None, pretraining=None, verbose: bool = True
) -> Training:
    """Builds the classifier on `backbone`, plans its caches (`plan_training_caches`), fills the image caches, and
    builds the pipelines its stages train and score on.

    Args:
        recipe: The head, data and class-weight settings.
        folder: From `prepare_data`.
        backbone: From `create_backbone` (or the encoder of an autoencoder recipe).
        seed: Shuffling (and augmentation) seed. Defaults to `recipe.seed`.
        pretraining: An autoencoder recipe's `Pretraining`; in `joint` mode its decoder and images train alongside.
        verbose: Show the caches' filling progress.
    """
    seed = recipe.seed if seed is None else seed
    labels = [label for _, label in folder.parts["train"]]
    model = build_classifier(backbone, folder.class_names, recipe.head)
    supervision = prepare_supervision(recipe, model, backbone, folder.num_classes)
    features = FeatureSource(folder.parts, folder.num_classes, recipe.data, seed, recipe.backbone.weights)
    joint_items = (
        _joint_items(folder, pretraining) if pretraining is not None and recipe.pretrain.autoencoder.joint else None
    )
    budget, choices = plan_training_caches(recipe, folder, model, features, supervision, pretraining, joint_items)
    where = {choice.name: choice.where for choice in choices}
    train_items = folder.parts["train"] + (joint_items or [])
    images = {
        "train": ImageRows(train_items, recipe.data, where.get("train images", NONE), "train images"),
        "val": ImageRows(folder.parts["val"], recipe.data, where.get("val images", NONE), "val images"),
    }
    for rows in images.values():
        rows.fill(verbose)
    features.images = (
        {"train": images["train"], "val": images["val"]} if joint_items is None else {"val": images["val"]}
    )
    if pretraining is not None:
        pretraining.images = ImageRows(
            pretraining.train, recipe.data, where.get("autoencoder images", NONE), "autoencoder images"
        ).fill(verbose)
    joint = None
    if joint_items is not None:
        joint = _joint(recipe, folder, model, pretraining, seed, images["train"])
    return Training(
        recipe=recipe,
        backbone=backbone,
        model=model,
        train=TrainingBatches(
            folder.parts["train"], folder.num_classes, recipe.data, seed, images["train"] if joint is None else None
        ),
        eval={
            part: image_dataset(items, folder.num_classes, recipe.data, images=images.get(part))
            for part, items in folder.parts.items()
            if part != "train"
        },
        class_weight=class_weights(recipe.head, labels, folder.class_names),
        features=features,
        joint=joint,
        supervision=supervision,
        caches=choices,
        budget=budget,
    )


def plan_training_caches(
    recipe: Recipe, folder, model, features: FeatureSource, supervision, pretraining, joint_items
) -> tuple[MemoryBudget, list[CacheChoice]]:
    """Where each cache of this training goes (`plan_caches`), in the order the stages use them: each cacheable
    stage's features, then the images the stages that train through the backbone read every epoch (train, val),
    then the autoencoder's. The plan is logged, and `features.placements` set from it."""
    backbone = model.get_layer("backbone").layer
    MEMORY_CACHE.max_bytes = None
    resident = max(0, process_memory() - MEMORY_CACHE.nbytes)  # Earlier sessions' caches can make room.
    outputs = recipe.data.batch_size * 4 * layer_outputs(backbone)
    budget = MemoryBudget.resolve(recipe.data.memory_budget, resident=resident, outputs=outputs)
    from tltoolkit import cache as cache_folder

    taps = list(zip(supervision.taps, supervision.heads)) if supervision is not None else []
    feature_needs, plain = {}, joint_items is not None
    for stage in recipe.stages:
        frozen = unfrozen_prefix(backbone, stage.unfreeze, recipe.backbone.freeze)
        if joint_items is not None or features.usable(frozen) is not None:
            plain = True
            continue
        cut = features.cut(model, backbone, frozen, taps)
        if cut.name not in feature_needs:
            reusable = features.on_disk(features.key(backbone, frozen, cut), cut) is not None
            feature_needs[cut.name] = CacheNeed(cut.name, features.nbytes(cut), reusable)
    needs = list(feature_needs.values())
    first = plan_caches(needs, budget, cache_folder.cannot_hold)
    plain = plain or any(choice.where == NONE for choice in first)
    image_needs, skipped = _image_needs(recipe, folder, joint_items, pretraining, plain)
    choices = plan_caches(needs + image_needs, budget, cache_folder.cannot_hold) + skipped
    features.placements = {choice.name: choice for choice in choices if choice.name in feature_needs}
    MEMORY_CACHE.max_bytes = budget.for_caches
    _logger.info("Caches (%s):\n%s", budget.describe(), "\n".join(f"  {c.describe()}" for c in choices))
    return budget, choices


def layer_outputs(backbone: keras.Model) -> int:
    """Values every layer of `backbone` outputs for one image: what a batch keeps for its backward pass."""
    total = 0
    for layer in backbone.layers:
        for output in tf.nest.flatten(layer.output):
            total += int(np.prod([d or 1 for d in output.shape[1:]]))
    return total


def _image_needs(recipe: Recipe, folder, joint_items, pretraining, plain: bool):
    """The image caches the plan places, and the ones it does not need (with why)."""
    size = recipe.data.image_size**2 * 3
    train = len(folder.parts["train"]) + len(joint_items or [])
    wanted = [("val images", len(folder.parts["val"])), ("train images", train)]
    needs, skipped = [], []
    for name, count in wanted:
        if not recipe.data.cache:
            skipped.append(CacheChoice(name, NONE, count * size, "data.cache is off: decoded every epoch"))
        elif not plain:
            why = "every stage trains on cached features: the images are read once, for the extraction"
            skipped.append(CacheChoice(name, NONE, count * size, why))
        else:
            needs.append(CacheNeed(name, count * size, _reusable(folder_items(folder, name, joint_items), recipe)))
    if pretraining is not None:
        count = len(pretraining.train)
        if recipe.data.cache:
            needs.append(CacheNeed("autoencoder images", count * size, _reusable(pretraining.train, recipe)))
        else:
            skipped.append(CacheChoice("autoencoder images", NONE, count * size, "data.cache is off"))
    return needs, skipped


def folder_items(folder, name: str, joint_items) -> list:
    if name == "val images":
        return folder.parts["val"]
    return folder.parts["train"] + (joint_items or [])


def _reusable(items, recipe: Recipe) -> bool:
    rows = ImageRows(items, recipe.data, "disk")._disk_copy(ImageRows(items, recipe.data).key())
    if rows is None:
        return False
    rows.close()
    return True


def cache_params(training: Training) -> dict[str, str]:
    """The cache plan as run params: `data.memory_budget_mb` and `cache.<name>` = where (why)."""
    params = {}
    if training.budget is not None:
        params["data.memory_budget_mb"] = round(training.budget.total / 1e6)
        params["data.memory_budget_source"] = training.budget.source
    for choice in training.caches:
        params[f"cache.{re.sub(r'[^a-z0-9]+', '_', choice.name.lower()).strip('_')}"] = f"{choice.where} ({choice.why})"
    return params


def _joint_items(folder, pretraining) -> list:
    """The autoencoder's images beyond the labelled training images, labelled -1 (an all-zero one-hot label)."""
    labelled = set(path for path, _ in folder.parts["train"])
    return [(path, -1) for path, _ in pretraining.train if path not in labelled]


def _joint(recipe: Recipe, folder, model: keras.Model, pretraining, seed: int, images: ImageRows) -> Joint:
    reconstruction = pretraining.autoencoder.decoder(model.get_layer("backbone").output)
    config = recipe.pretrain.autoencoder
    items = folder.parts["train"] + _joint_items(folder, pretraining)
    return Joint(
        model=keras.Model(model.inputs, [model.output, reconstruction], name=f"{model.name}_joint"),
        train=TrainingBatches(items, folder.num_classes, recipe.data, seed=seed, images=images),
        config=config,
        total_epochs=sum(stage.epochs for stage in recipe.stages),
        weight=keras.Variable(config.joint_weight, trainable=False, name="reconstruction_weight"),
    )


def class_weights(head: HeadConfig, labels: list[int], class_names: list[str]) -> dict[int, float] | None:
    """`head.class_weight` as Keras's `{label: weight}`: `auto` is scikit-learn's `balanced`."""
    if head.class_weight == "none":
        return None
    if head.class_weight == "auto":
        classes = np.arange(len(class_names))
        weights = compute_class_weight("balanced", classes=classes, y=np.asarray(labels))
        return {int(c): float(w) for c, w in zip(classes, weights)}
    unknown = sorted(set(head.class_weight) - set(class_names))
    if unknown:
        raise DataError(
            f"head.class_weight names classes {unknown} that the data lacks; its classes are {class_names}."
        )
    return {index: float(head.class_weight.get(name, 1.0)) for index, name in enumerate(class_names)}
