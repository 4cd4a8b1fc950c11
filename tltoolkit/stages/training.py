"""What every stage of one training shares: the classifier, its batches, class weights and the feature cache."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from tltoolkit.data.pipeline import TrainingBatches, image_dataset
from tltoolkit.errors import DataError
from tltoolkit.model import build_classifier
from tltoolkit.recipe import HeadConfig, Recipe
from tltoolkit.stages.features import FeatureSource
from tltoolkit.stages.pretrain import reconstruction_loss
from tltoolkit.stages.supervision import Supervision, decayed, prepare_supervision


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
    recipe: Recipe, folder, backbone: keras.Model, seed: int | None = None, pretraining=None
) -> Training:
    """Builds the classifier on `backbone` and the pipelines its stages train and score on.

    Args:
        recipe: The head, data and class-weight settings.
        folder: From `prepare_data`.
        backbone: From `create_backbone` (or the encoder of an autoencoder recipe).
        seed: Shuffling (and augmentation) seed. Defaults to `recipe.seed`.
        pretraining: An autoencoder recipe's `Pretraining`; in `joint` mode its decoder and images train alongside.
    """
    seed = recipe.seed if seed is None else seed
    labels = [label for _, label in folder.parts["train"]]
    model = build_classifier(backbone, folder.class_names, recipe.head)
    joint = None
    if pretraining is not None and recipe.pretrain.autoencoder.joint:
        joint = _joint(recipe, folder, model, pretraining, seed)
    return Training(
        recipe=recipe,
        backbone=backbone,
        model=model,
        train=TrainingBatches(folder.parts["train"], folder.num_classes, recipe.data, seed=seed),
        eval={
            part: image_dataset(items, folder.num_classes, recipe.data, training=False)
            for part, items in folder.parts.items()
            if part != "train"
        },
        class_weight=class_weights(recipe.head, labels, folder.class_names),
        features=FeatureSource(folder.parts, folder.num_classes, recipe.data, seed, recipe.backbone.weights),
        joint=joint,
        supervision=prepare_supervision(recipe, model, backbone, folder.num_classes),
    )


def _joint(recipe: Recipe, folder, model: keras.Model, pretraining, seed: int) -> Joint:
    labelled = set(path for path, _ in folder.parts["train"])
    extra = [(path, -1) for path, _ in pretraining.train if path not in labelled]  # -1: an all-zero one-hot label.
    reconstruction = pretraining.autoencoder.decoder(model.get_layer("backbone").output)
    config = recipe.pretrain.autoencoder
    return Joint(
        model=keras.Model(model.inputs, [model.output, reconstruction], name=f"{model.name}_joint"),
        train=TrainingBatches(folder.parts["train"] + extra, folder.num_classes, recipe.data, seed=seed),
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
