"""Small VGG-style ConvNets trained from scratch: `convnet_small` for small images (the demo), `test_tiny` for tests.

Each block is conv 3x3 (stride 2) -> BatchNormalization -> ReLU. They have no pretrained weights: `none` or a file.
Because the toolkit keeps BatchNormalization in inference mode, these nets stay shallow, where that does not hurt.
"""

from __future__ import annotations

from tltoolkit.backbones.keras_apps import load_weights_file
from tltoolkit.backbones.registry import NO_WEIGHTS, BackboneCfg, register_backbone
from tltoolkit.errors import BackboneError


def _build_convnet(cfg: BackboneCfg, input_tensor, include_top: bool, weights: str):
    import keras

    if include_top:
        raise BackboneError(f"{cfg.name} has no pretrained classifier; use include_top=False.")
    if weights == "imagenet":
        raise BackboneError(f"{cfg.name} has no ImageNet weights; set backbone.weights to `none` or a weights file.")
    x = input_tensor
    for block, width in enumerate(cfg.options["widths"], start=1):
        x = keras.layers.Conv2D(
            width,
            3,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            name=f"block{block}_conv",
        )(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
    model = keras.Model(keras.utils.get_source_inputs(input_tensor), x, name=cfg.name)
    if weights != NO_WEIGHTS:
        load_weights_file(model, weights, cfg.name)
    return model


def _register(name: str, widths: tuple[int, ...], input_size: int, family: str, counts: tuple, listed: bool) -> None:
    register_backbone(
        BackboneCfg(
            name=name,
            builder=_build_convnet,
            input_size=input_size,
            feature_width=widths[-1],
            preprocessing="tf",
            min_input_size=2 ** len(widths),
            family=family,
            options={"widths": widths},
            params=counts[0],
            layers=counts[1],
            listed=listed,
        )
    )


_register("convnet_small", (32, 64, 128), 32, "ConvNet (from scratch)", (93920, 11), listed=True)
_register("test_tiny", (8, 16, 32), 32, "test", (6200, 11), listed=False)  # For tests only.
