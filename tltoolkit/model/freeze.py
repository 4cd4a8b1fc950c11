"""Freeze and unfreeze policies: which backbone layers train in a stage.

A backbone's layers are counted in `backbone.layers` order (input and preprocessing layers included), the order
`tltoolkit backbones --layers NAME` prints. BatchNormalization layers never update their moving statistics, because
the backbone is always called with `training=False`; by default their gamma and beta stay frozen too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras

from tltoolkit.errors import BackboneError


@dataclass(frozen=True)
class TrainableSummary:
    frozen_layers: int  # Leading backbone layers that do not train.
    trainable_layers: int  # Backbone layers with weights that train.
    trainable_params: int  # Whole model, head included.
    non_trainable_params: int


def _layer_index(backbone: keras.Model, name: str, field: str) -> int:
    names = [layer.name for layer in backbone.layers]
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise BackboneError(
            f"{field}={name!r} is not a layer of {backbone.name}.{hint} "
            f"`tltoolkit backbones --layers {backbone.name}` lists its {len(names)} layers."
        )
    return names.index(name)


def _count(backbone: keras.Model, count: int, field: str) -> int:
    total = len(backbone.layers)
    if count > total:
        raise BackboneError(
            f"{field}={count} exceeds the {total} layers of {backbone.name}; use at most {total}, `all`, or a fraction."
        )
    return count


def frozen_prefix(backbone: keras.Model, freeze: Any, field: str = "backbone.freeze") -> int:
    """How many leading layers `backbone.freeze` freezes: `all`, `none`, N, a fraction, or up to a layer (inclusive)."""
    total = len(backbone.layers)
    if freeze == "auto":
        raise BackboneError(f"{field}=auto is the probe's answer; resolve it first (`stages.probe.resolve_auto`).")
    if freeze == "all":
        return total
    if freeze == "none":
        return 0
    if isinstance(freeze, float):
        return round(freeze * total)
    if isinstance(freeze, int):
        return _count(backbone, freeze, field)
    return _layer_index(backbone, freeze, field) + 1


def unfrozen_prefix(backbone: keras.Model, unfreeze: Any, freeze: Any, field: str = "unfreeze") -> int:
    """How many leading layers stay frozen when a stage unfreezes `unfreeze`.

    `none` keeps the freeze policy; `all` trains everything; K the top K layers; a fraction the top share; a layer
    name that layer and every one after it.
    """
    total = len(backbone.layers)
    if unfreeze == "none":
        return frozen_prefix(backbone, freeze)
    if unfreeze == "all":
        return 0
    if isinstance(unfreeze, float):
        return total - round(unfreeze * total)
    if isinstance(unfreeze, int):
        return total - _count(backbone, unfreeze, field)
    return _layer_index(backbone, unfreeze, field)


def set_trainable(model: keras.Model, backbone: keras.Model, frozen: int, train_bn: bool = False) -> TrainableSummary:
    """Freezes the first `frozen` backbone layers, trains the rest and the head.

    Args:
        model: The whole classifier (its non-backbone layers always train).
        backbone: The backbone inside `model`.
        frozen: Number of leading backbone layers to freeze.
        train_bn: Let BatchNormalization gamma/beta in the trainable part train. Defaults to `False`.
    """
    model.trainable = True
    backbone.trainable = True
    for index, layer in enumerate(backbone.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = index >= frozen and (train_bn or not is_bn)
    trainable_layers = sum(1 for layer in backbone.layers if layer.trainable and layer.weights)
    if trainable_layers == 0:
        # Keras then skips the backbone's weights entirely, which also keeps the training step cheap.
        backbone.trainable = False
    return TrainableSummary(
        frozen_layers=frozen,
        trainable_layers=trainable_layers,
        trainable_params=sum(int(w.numpy().size) for w in model.trainable_weights),
        non_trainable_params=sum(int(w.numpy().size) for w in model.non_trainable_weights),
    )


def check_points(backbone: keras.Model, freeze: Any, stages, where=lambda field: "", taps: list[str] = ()) -> None:
    """Resolves the freeze point, every stage's unfreeze point and every auxiliary head's tap layer, so mistakes
    surface before data is read.

    Args:
        where: Field -> a prefix saying where it was set (see `tltoolkit.recipe.locate`), put before each error.
        taps: The `at` layer of each `head.auxiliary` entry.
    """
    for index, tap in enumerate(taps):
        field = f"head.auxiliary.{index}.at"
        try:
            _layer_index(backbone, tap, field)
        except BackboneError as exc:
            raise BackboneError(f"{where(field)}{exc}") from None
    try:
        if freeze != "auto":  # `auto` points are the probe's answer, known once the data is (`stages/probe.py`).
            frozen_prefix(backbone, freeze)
    except BackboneError as exc:
        raise BackboneError(f"{where('backbone.freeze')}{exc}") from None
    for index, stage in enumerate(stages):
        field = f"stages.{index}.unfreeze"
        if stage.unfreeze == "auto" or (stage.unfreeze == "none" and freeze == "auto"):
            continue
        try:
            unfrozen_prefix(backbone, stage.unfreeze, freeze, field=field)
        except BackboneError as exc:
            raise BackboneError(f"{where(field)}{exc}") from None
