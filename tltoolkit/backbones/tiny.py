"""`test_tiny`: a three-block conv net with BatchNormalization, for tests and smoke runs (as timm's `test_resnet`)."""

from __future__ import annotations

from tltoolkit.backbones.keras_apps import load_weights_file
from tltoolkit.backbones.registry import NO_WEIGHTS, BackboneCfg, register_backbone
from tltoolkit.errors import BackboneError

_WIDTHS = (8, 16, 32)


def _build_tiny(cfg: BackboneCfg, input_tensor, include_top: bool, weights: str):
    import keras

    if include_top:
        raise BackboneError("test_tiny has no pretrained classifier; use include_top=False.")
    if weights == "imagenet":
        raise BackboneError("test_tiny has no ImageNet weights; set backbone.weights to `none` or a weights file.")
    x = input_tensor
    for block, width in enumerate(_WIDTHS, start=1):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
    model = keras.Model(keras.utils.get_source_inputs(input_tensor), x, name=cfg.name)
    if weights != NO_WEIGHTS:
        load_weights_file(model, weights, cfg.name)
    return model


register_backbone(
    BackboneCfg(
        name="test_tiny",
        builder=_build_tiny,
        input_size=32,
        feature_width=_WIDTHS[-1],
        preprocessing="tf",
        weight_sources=(NO_WEIGHTS,),
        min_input_size=8,
        family="test",
    )
)
