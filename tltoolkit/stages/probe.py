"""The probe: how well a backbone's frozen features separate this data at each depth, and how much to unfreeze.

The data-size rule of transfer learning (little data: freeze everything and train the classifier; a medium amount:
freeze most and train the last layers; a lot: fine-tune everything) leaves the user to guess where "most" ends.
The probe measures it: it extracts the globally pooled features of every training and validation image at the end of
each stage of blocks (`feature_info`, plus the backbone's output) in one pass, fits a linear classifier on each
(scikit-learn's logistic regression on standardised features), and scores it on the validation images. Where
accuracy peaks is how deep the pretrained features still fit these images: the layers above the peak fit ImageNet
more than them, so they are the ones worth training. `decide` turns the curve into the rule's three answers.

Written here because no library probes a Keras backbone across its depths; the fitting is scikit-learn's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from tltoolkit.backbones.features import FeatureInfo, feature_info
from tltoolkit.data.split import Item
from tltoolkit.model import layer_output
from tltoolkit.recipe import DataConfig, Recipe

_logger = logging.getLogger(__name__)

AUTO = "auto"
# Images per class from which the rule says "fine-tune everything" whatever the probe shows (the rule's "a lot").
LARGE_PER_CLASS = 1000
# Images per part the probe uses at most (a fixed sample beyond): the curve is clear long before, the cost is not.
MAX_IMAGES = 10_000
HEAD_ONLY, UNFREEZE, FINETUNE_ALL = "head only", "unfreeze from a layer", "fine-tune all"


@dataclass(frozen=True)
class ProbePoint:
    """A linear classifier on the frozen features after one layer."""

    layer: str
    index: int  # In `backbone.layers` (the order freeze points count in).
    reduction: int  # Input side / feature map side.
    channels: int
    val_accuracy: float
    val_loss: float  # Log loss.
    train_accuracy: float


@dataclass(frozen=True)
class ProbeResult:
    """The probe's curve and what it suggests."""

    points: list[ProbePoint]  # Shallowest first; the last is the backbone's output.
    chosen: ProbePoint  # The deepest point within one standard error of the best accuracy.
    suggestion: str  # HEAD_ONLY, UNFREEZE or FINETUNE_ALL.
    freeze: str  # What `backbone.freeze: auto` becomes.
    unfreeze: str  # What a stage's `unfreeze: auto` becomes.
    evidence: str  # Why, in a sentence or two.
    train_images: int
    val_images: int
    per_class: int  # Training images of the smallest class.

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([vars(point) for point in self.points])


def cut_points(backbone: keras.Model) -> list[FeatureInfo]:
    """The end of each stage of blocks, and the backbone's output layer (whatever its shape)."""
    points = feature_info(backbone)
    last = len(backbone.layers) - 1
    if not points or points[-1].index != last:
        shape = backbone.layers[last].output.shape
        size = backbone.input_shape[1]
        reduction = round(size / shape[1]) if len(shape) == 4 and shape[1] and size else 0
        points.append(FeatureInfo(backbone.layers[last].name, reduction, int(shape[-1]), last))
    return points


def probe_backbone(
    backbone: keras.Model, parts: dict[str, list[Item]], data: DataConfig, verbose: bool = True
) -> ProbeResult:
    """Fits and scores a linear classifier on the frozen, pooled features at every cut point.

    Args:
        backbone: From `create_backbone` (its current weights are what is probed).
        parts: `{"train": items, "val": items}` from `prepare_data`.
        data: The recipe's `data` section (image size, resizing, batch size).
        verbose: Log the extraction's progress.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from tltoolkit.stages.features import extract

    points = cut_points(backbone)
    pooled = [_pooled(layer_output(backbone, point.name)) for point in points]
    extractor = keras.Model(backbone.inputs, pooled, name=f"{backbone.name}_probe")
    per_class = int(np.bincount([label for _, label in parts["train"]]).min())
    train, val = _sample(parts["train"]), _sample(parts["val"])
    what = f"{len(train) + len(val)} images at {len(points)} depths of {backbone.name}"
    features = extract(extractor, train + val, data, what, verbose)
    y_train = np.array([label for _, label in train])
    y_val = np.array([label for _, label in val])
    probed = []
    for point, values in zip(points, features):
        x_train, x_val = values[: len(train)], values[len(train) :]
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        classifier.fit(x_train, y_train)
        probabilities = classifier.predict_proba(x_val)
        labels = classifier.classes_
        probed.append(
            ProbePoint(
                point.name,
                point.index,
                point.reduction,
                point.channels,
                float(np.mean(labels[probabilities.argmax(axis=1)] == y_val)),
                _log_loss(y_val, probabilities, labels),
                float(classifier.score(x_train, y_train)),
            )
        )
        _logger.debug("Probe at %s (layer %d): val accuracy %.4f", point.name, point.index, probed[-1].val_accuracy)
    return decide(probed, backbone, len(parts["train"]), len(val), per_class)


def _sample(items: list[Item]) -> list[Item]:
    """At most `MAX_IMAGES` of `items` (a fixed sample), so a large folder costs a bounded pass and fit."""
    if len(items) <= MAX_IMAGES:
        return items
    keep = np.sort(np.random.default_rng(0).choice(len(items), MAX_IMAGES, replace=False))
    _logger.info("Probe: a sample of %d of %d images.", MAX_IMAGES, len(items))
    return [items[i] for i in keep]


def _pooled(tensor):
    return keras.layers.GlobalAveragePooling2D()(tensor) if len(tensor.shape) == 4 else tensor


def _log_loss(y: np.ndarray, probabilities: np.ndarray, labels: np.ndarray) -> float:
    column = {label: i for i, label in enumerate(labels)}
    picked = np.array([probabilities[row, column[label]] if label in column else 0.0 for row, label in enumerate(y)])
    return float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0))))


def decide(points: list[ProbePoint], backbone: keras.Model, train: int, val: int, per_class: int) -> ProbeResult:
    """The rule, measured: `points` (shallowest first, the backbone's output last) -> a suggestion with evidence.

    The chosen depth is the deepest whose val accuracy is within one standard error of the best (fewer layers to
    train when the curve cannot tell them apart). At the output: head only. Below it: keep the chosen layer and
    everything under it frozen and unfreeze from the next layer up. With `LARGE_PER_CLASS` images or more in every
    class: fine-tune all (the rule's "a lot of data"), the curve reported as evidence.
    """
    best = max(point.val_accuracy for point in points)
    error = max(math.sqrt(best * (1 - best) / max(val, 1)), 1 / max(val, 1))
    chosen = next(p for p in reversed(points) if p.val_accuracy >= best - error)
    top = points[-1]
    curve = ", ".join(f"{p.layer} {p.val_accuracy:.3f}" for p in points)
    base = dict(points=points, chosen=chosen, train_images=train, val_images=val, per_class=per_class)
    if per_class >= LARGE_PER_CLASS:
        evidence = (
            f"At least {per_class} training images per class (>= {LARGE_PER_CLASS}): enough to fine-tune every "
            f"layer from the pretrained weights. Frozen features by depth: {curve}."
        )
        return ProbeResult(suggestion=FINETUNE_ALL, freeze="all", unfreeze="all", evidence=evidence, **base)
    if chosen is top:
        evidence = (
            f"The backbone's output gives the best frozen features (val accuracy {top.val_accuracy:.3f}; by depth: "
            f"{curve}): train the head on the frozen backbone; unfreezing pretrained layers is not indicated."
        )
        return ProbeResult(suggestion=HEAD_ONLY, freeze="all", unfreeze="none", evidence=evidence, **base)
    above = backbone.layers[chosen.index + 1].name
    evidence = (
        f"Frozen features peak at {chosen.layer} (layer {chosen.index} of {len(backbone.layers)}, val accuracy "
        f"{chosen.val_accuracy:.3f}) and reach {top.val_accuracy:.3f} at the output (by depth: {curve}): the layers "
        f"above {chosen.layer} fit ImageNet more than these images. Keep it and everything below frozen; train from "
        f"{above} up."
    )
    return ProbeResult(suggestion=UNFREEZE, freeze=chosen.layer, unfreeze=above, evidence=evidence, **base)


def resolve_auto(recipe: Recipe, result: ProbeResult) -> Recipe:
    """`recipe` with `auto` freeze and unfreeze points replaced by the probe's answer."""
    backbone = recipe.backbone
    if backbone.freeze == AUTO:
        backbone = backbone.model_copy(update={"freeze": result.freeze})
    stages = [
        stage.model_copy(update={"unfreeze": result.unfreeze}) if stage.unfreeze == AUTO else stage
        for stage in recipe.stages
    ]
    return recipe.model_copy(update={"backbone": backbone, "stages": stages})
