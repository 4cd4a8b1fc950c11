"""Deep supervision: auxiliary classifiers on intermediate backbone layers, trained alongside, dropped afterwards.

Each `head.auxiliary` entry adds a small classifier (`tltoolkit.model.auxiliary_heads`) on a tap layer's output. The
training model outputs the main probabilities and each auxiliary head's; the total loss is the main loss plus each
auxiliary cross-entropy times its weight. A weight decays to zero over the epochs of the stages that train layers
at or below its tap (where its gradient can shape the backbone; Lee et al. 2015 decay their companion losses the
same way). In the stages before those, its layer is frozen and only the auxiliary head itself learns, at full
weight: it is warmed up, as the main head is, before its gradients reach pretrained layers. The classifier that is
saved, logged and exported is the main model, which never held the auxiliary layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from tltoolkit.model import auxiliary_heads, supervised_model, unfrozen_prefix
from tltoolkit.recipe import Recipe

_logger = logging.getLogger(__name__)


def decayed(weight: float, decay: str, progress: float) -> float:
    """`weight` after `progress` (0 to 1) of its decay: `linear`, `cosine` (both reach 0 at 1) or `none`."""
    progress = min(1.0, max(0.0, progress))
    if decay == "linear":
        return weight * (1.0 - progress)
    if decay == "cosine":
        return weight * 0.5 * (1.0 + float(np.cos(np.pi * progress)))
    return weight


def weight_schedule(recipe: Recipe, backbone: keras.Model) -> list[list[float]]:
    """Per auxiliary head, its loss weight in every classifier epoch of the recipe (all stages, in order).

    A stage is active for a head when it trains layers at or below the head's tap; the weight decays over the
    active epochs (zero in the last one) and is the initial weight before them.
    """
    names = [layer.name for layer in backbone.layers]
    schedules = []
    for head in recipe.head.auxiliary:
        tap = names.index(head.at)
        active = [
            unfrozen_prefix(backbone, stage.unfreeze, recipe.backbone.freeze) <= tap
            for stage in recipe.stages
            for _ in range(stage.epochs)
        ]
        total, seen, weights = sum(active), 0, []
        if total == 0:
            _logger.warning(
                "head.auxiliary: %s is frozen in every stage, so its auxiliary head trains alone and cannot change "
                "the model; tap a layer a stage unfreezes (at or above its `unfreeze` point).",
                head.at,
            )
        for is_active in active:
            if is_active:
                weights.append(decayed(head.weight, head.decay, seen / max(1, total - 1)))
                seen += 1
            else:  # Before its layers train: full weight; after (a later stage freezes them again): where it was.
                weights.append(head.weight if seen == 0 else weights[-1])
        schedules.append(weights)
    return schedules


@dataclass
class Supervision:
    """The auxiliary heads of one training and what fitting with them needs."""

    taps: list[str]  # The layer each head classifies, in head order.
    heads: list[keras.Sequential]  # `aux0`, `aux1`...: pooling, hidden layers, softmax.
    model: keras.Model  # image -> [main probabilities, each head's]; layers shared with the classifier.
    schedule: list[list[float]]  # Head -> weight per classifier epoch (see `weight_schedule`).
    weights: list[keras.Variable]  # The weights in use, set at every epoch's start.

    @property
    def names(self) -> list[str]:
        return [head.name for head in self.heads]

    def set_epoch(self, epoch: int) -> list[float]:
        """Sets (and returns) the heads' weights for global classifier epoch `epoch`."""
        values = [schedule[min(epoch, len(schedule) - 1)] for schedule in self.schedule]
        for variable, value in zip(self.weights, values):
            variable.assign(value)
        return values

    def losses(self, main) -> list:
        """The main loss, then each head's cross-entropy times its current weight."""
        base = keras.losses.CategoricalCrossentropy()
        return [main, *(_weighted(base, weight) for weight in self.weights)]

    def metrics(self, main: list) -> list:
        """The main output's metrics, then per head: accuracy and its loss before weighting."""
        return [main, *([keras.metrics.CategoricalAccuracy(name="accuracy"), _OutputLoss()] for _ in self.heads)]

    def with_targets(self, ds: tf.data.Dataset, class_weight: dict[int, float] | None) -> tf.data.Dataset:
        """`(x, y)` batches as `(x, (y, y, ...))`, with class weights as per-sample weights (Keras weighs the classes
        of single-output models only), which then apply to every head alike."""
        outputs = 1 + len(self.heads)
        if class_weight is None:
            return ds.map(lambda x, y: (x, (y,) * outputs))
        table = tf.constant([class_weight[i] for i in range(len(class_weight))], tf.float32)
        return ds.map(lambda x, y: (x, (y,) * outputs, tf.gather(table, tf.argmax(y, axis=-1))))


class _OutputLoss(keras.metrics.Mean):
    """An output's cross-entropy as Keras computes its loss (the batch mean of sample-weighted values), averaged over
    batches by their size as Keras averages `loss`. So the main head's loss is exactly `loss` minus each head's
    weight times this: Keras's own per-output `*_loss` logs average batches unweighted, which a short last batch
    skews."""

    def __init__(self, name: str = "xent", **kwargs):
        super().__init__(name=name, **kwargs)
        self.crossentropy = keras.losses.CategoricalCrossentropy()

    def update_state(self, y_true, y_pred, sample_weight=None):
        value = self.crossentropy(y_true, y_pred, sample_weight=sample_weight)
        return super().update_state(value, sample_weight=keras.ops.cast(keras.ops.shape(y_true)[0], "float32"))


def _weighted(base, weight: keras.Variable):
    def loss(y_true, y_pred):
        return weight * base(y_true, y_pred)

    return loss


def prepare_supervision(recipe: Recipe, model: keras.Model, backbone: keras.Model, classes: int) -> Supervision | None:
    """The recipe's auxiliary heads on `model` (a classifier from `build_classifier`), or `None` without any."""
    if not recipe.head.auxiliary:
        return None
    heads = auxiliary_heads(recipe.head, classes)
    return Supervision(
        taps=[head.at for head in recipe.head.auxiliary],
        heads=heads,
        model=supervised_model(model, backbone, list(recipe.head.auxiliary), heads),
        schedule=weight_schedule(recipe, backbone),
        weights=[
            keras.Variable(head.weight, trainable=False, name=f"aux{i}_weight")
            for i, head in enumerate(recipe.head.auxiliary)
        ],
    )


class SupervisionEpochs(keras.callbacks.Callback):
    """Sets the heads' weights at every epoch's start; at its end gives the logs the usual names.

    `loss`, `accuracy` (and their `val_`) become the main head's, so early stopping, checkpoints and curves mean
    what they mean without auxiliary heads (`loss` with any regularisation, as always); the weighted sum is
    `total_loss`; per head `aux0_loss` (before weighting), `aux0_accuracy` and `aux0_weight`.
    """

    def __init__(self, supervision: Supervision, offset: int, main: str):
        super().__init__()
        self.supervision, self.offset, self.main = supervision, offset, main

    def on_epoch_begin(self, epoch, logs=None):
        self.values = self.supervision.set_epoch(self.offset + epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for prefix in ("", "val_"):
            if f"{prefix}loss" not in logs:
                continue
            total = logs[f"{prefix}total_loss"] = logs.pop(f"{prefix}loss")
            logs.pop(f"{prefix}{self.main}_loss", None)  # Skewed by a short last batch (see `_OutputLoss`).
            for key in [k for k in logs if k.startswith(f"{prefix}{self.main}_")]:
                logs[prefix + key.removeprefix(f"{prefix}{self.main}_")] = logs.pop(key)
            for name, weight in zip(self.supervision.names, self.values):
                logs.pop(f"{prefix}{name}_loss", None)
                loss = logs[f"{prefix}{name}_loss"] = logs.pop(f"{prefix}{name}_xent")
                total -= weight * loss
            logs[f"{prefix}loss"] = total
        for name, value in zip(self.supervision.names, self.values):
            logs[f"{name}_weight"] = value
