"""Named intermediate feature maps of a backbone, as timm's `features_only=True, out_indices=...` offers them.

A convolutional backbone halves its feature maps in steps; the last layer at each resolution ends a stage, and its
output is what detection necks, deep supervision and feature probes attach to. `feature_info` finds those layers in
any functional backbone (keras.applications or our ports alike: it reads shapes, not names), and `features_only`
builds a model that outputs them, its layers (and weights) shared with the backbone. For MobileNetV2 these are the
layers the TensorFlow segmentation tutorial picks by hand (`block_1_expand_relu`, ..., `block_13_expand_relu`).

Example:
    >>> import tltoolkit
    >>> backbone = tltoolkit.create_backbone("test_tiny", weights="none", input_size=32)
    >>> [(f.name, f.reduction, f.channels) for f in feature_info(backbone)]
    [('block1_relu', 2, 8), ('block2_relu', 4, 16), ('block3_relu', 8, 32)]
"""

from __future__ import annotations

from dataclasses import dataclass

import keras

from tltoolkit.errors import BackboneError


@dataclass(frozen=True)
class FeatureInfo:
    """One stage end of a backbone (after timm's `feature_info`)."""

    name: str  # The layer whose output it is.
    reduction: int  # Input side / feature map side: 2, 4, 8, 16, 32.
    channels: int
    index: int  # The layer's position in `backbone.layers` (the order freeze points count in).


def feature_info(backbone: keras.Model) -> list[FeatureInfo]:
    """The last layer at each spatial resolution below the input's, shallowest first.

    Padding layers are left out: they only prepare the next stage's strided convolution.
    """
    size = backbone.input_shape[1]
    ends: dict[int, FeatureInfo] = {}
    for index, layer in enumerate(backbone.layers):
        if isinstance(layer, (keras.layers.InputLayer, keras.layers.ZeroPadding2D)) or len(layer._inbound_nodes) != 1:
            continue
        shape = layer.output.shape
        if len(shape) != 4 or shape[1] is None or size is None:
            continue
        reduction = round(size / shape[1])
        if reduction > 1:
            ends[reduction] = FeatureInfo(layer.name, reduction, int(shape[-1]), index)
    return [ends[r] for r in sorted(ends)]


def features_only(backbone: keras.Model, out_indices: tuple[int | str, ...] | None = None) -> keras.Model:
    """A model from the backbone's input to the chosen stage ends' feature maps, one output each, shallowest first.

    Args:
        backbone: From `create_backbone` (any functional model).
        out_indices: Positions in `feature_info(backbone)` (negative counts from the deepest), or layer names (any
            layer, not only stage ends). Defaults to every stage end.

    Returns:
        A functional model named `<backbone>_features` whose outputs are named after their layers; it shares the
        backbone's layers and weights.

    Raises:
        BackboneError: An index out of range or a name the backbone lacks; the message lists the stage ends.
    """
    info = feature_info(backbone)
    names = [layer.name for layer in backbone.layers]
    chosen = []
    for wanted in range(len(info)) if out_indices is None else out_indices:
        if isinstance(wanted, str) and wanted in names:
            chosen.append(wanted)
        elif isinstance(wanted, int) and -len(info) <= wanted < len(info):
            chosen.append(info[wanted].name)
        else:
            ends = ", ".join(f"{i}: {f.name} (1/{f.reduction}, {f.channels} channels)" for i, f in enumerate(info))
            raise BackboneError(
                f"out_indices {wanted!r} is neither a stage end of {backbone.name} nor one of its layers; its stage "
                f"ends are {ends} (`tltoolkit backbones --layers {backbone.name}` lists every layer)."
            )
    outputs = [backbone.get_layer(name).output for name in chosen]
    return keras.Model(backbone.inputs, outputs, name=f"{backbone.name}_features")
