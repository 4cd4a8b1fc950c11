"""keras.applications backbones. `imagenet` weights use Keras's own download and cache (`~/.keras/models`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tltoolkit.backbones.registry import NO_WEIGHTS, BackboneCfg, WeightSource, get_backbone_cfg, register_backbone
from tltoolkit.errors import BackboneError


def load_weights_file(model, path: str, backbone: str) -> None:
    """Loads a Keras weights file (`.weights.h5`, legacy `.h5` or `.keras`) into `model`, with clear errors."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneError(
            f"backbone.weights for {backbone} is {path!r}, which is neither a weight source of {backbone} "
            f"({', '.join(get_backbone_cfg(backbone).source_names)}) nor an existing file; fix the path or pick a "
            "source."
        )
    try:
        model.load_weights(str(file))
    except (ValueError, OSError, KeyError) as exc:
        raise BackboneError(
            f"Weights file {file} does not fit backbone {backbone} ({exc}); "
            "it must come from the same architecture and input size."
        ) from exc


def keras_application(app: str, **options: Any):
    """A builder for `keras.applications.<app>` that resolves the recipe's weight source."""

    def build(cfg: BackboneCfg, input_tensor, include_top: bool, weights: str):
        import keras

        constructor = getattr(keras.applications, app)
        keras_weights = "imagenet" if weights == "imagenet" else None
        top = {"classifier_activation": None} if include_top else {}  # Logits, as the PyTorch ports give.
        shape = tuple(input_tensor.shape[1:])
        try:
            model = constructor(
                include_top=include_top,
                weights=keras_weights,
                input_tensor=input_tensor,
                input_shape=shape,
                **top,
                **options,
                **cfg.options,
            )
        except ValueError as exc:
            raise BackboneError(f"Cannot build {cfg.name} ({app}) with input {shape}: {exc}") from exc
        except Exception as exc:  # get_file raises a bare Exception when the download fails.
            if keras_weights != "imagenet":
                raise
            from keras.src.backend.config import keras_home

            raise BackboneError(
                f"Could not get the ImageNet weights of {cfg.name} ({exc}). Keras downloads them once into "
                f"{Path(keras_home()) / 'models'}; on a machine without network copy the file there, "
                "or set backbone.weights to a local weights file, or to `none`."
            ) from exc
        # Not through the constructor: EfficientNetV2 reads its `name` argument as the variant to build.
        model.name = cfg.name
        if weights not in ("imagenet", NO_WEIGHTS):
            load_weights_file(model, weights, cfg.name)
        return model

    return build


def _keras_imagenet(file_prefix: str) -> WeightSource:
    """Keras's own ImageNet weights, downloaded once into `$KERAS_HOME/models` (files named `file_prefix*`)."""

    def is_cached() -> bool:
        from keras.src.backend.config import keras_home

        return any((Path(keras_home()) / "models").glob(f"{file_prefix}*"))

    return WeightSource(
        "imagenet", "ImageNet, downloaded by Keras on first use into ~/.keras/models (needs network)", is_cached
    )


def _register(name: str, app: str, size: int, width: int, preprocessing: str, family: str, file_prefix: str, **kwargs):
    min_size = kwargs.pop("min_input_size", 32)
    params, layers = _COUNTS[name]
    register_backbone(
        BackboneCfg(
            name=name,
            builder=keras_application(app, **kwargs),
            input_size=size,
            feature_width=width,
            preprocessing=preprocessing,
            weight_sources=(_keras_imagenet(file_prefix),),
            min_input_size=min_size,
            family=family,
            params=params,
            layers=layers,
        )
    )


# (parameters, layers) of each without its top at its input size, so listings need not build the networks.
_COUNTS = {
    "convnext_tiny": (27820128, 133),
    "densenet121": (7037504, 428),
    "efficientnet_b0": (4049571, 237),
    "efficientnet_b1": (6575239, 339),
    "efficientnet_b2": (7768569, 339),
    "efficientnet_b3": (10783535, 384),
    "efficientnet_v2_b0": (5919312, 270),
    "inception_v3": (21802784, 312),
    "mobilenet_v2": (2257984, 155),
    "mobilenet_v2_035": (410208, 155),
    "mobilenet_v3_large": (2996352, 187),
    "mobilenet_v3_small": (939120, 157),
    "resnet50": (23587712, 176),
    "resnet50_v2": (23564800, 191),
    "vgg16": (14714688, 20),
    "xception": (20861480, 133),
}

# name, keras.applications constructor, input size, feature width, preprocessing ("none": built into the model),
# family, and the start of the names of Keras's ImageNet weight files (to tell whether they are cached).
_MOBILENET_V2 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels"
_register("mobilenet_v2", "MobileNetV2", 224, 1280, "tf", "MobileNetV2", f"{_MOBILENET_V2}_1.0_")
_register("mobilenet_v2_035", "MobileNetV2", 224, 1280, "tf", "MobileNetV2", f"{_MOBILENET_V2}_0.35_", alpha=0.35)
_register("mobilenet_v3_small", "MobileNetV3Small", 224, 576, "none", "MobileNetV3", "weights_mobilenet_v3_small_224")
_register("mobilenet_v3_large", "MobileNetV3Large", 224, 960, "none", "MobileNetV3", "weights_mobilenet_v3_large_224")
_register("efficientnet_b0", "EfficientNetB0", 224, 1280, "none", "EfficientNet", "efficientnetb0")
_register("efficientnet_b1", "EfficientNetB1", 240, 1280, "none", "EfficientNet", "efficientnetb1")
_register("efficientnet_b2", "EfficientNetB2", 260, 1408, "none", "EfficientNet", "efficientnetb2")
_register("efficientnet_b3", "EfficientNetB3", 300, 1536, "none", "EfficientNet", "efficientnetb3")
_register("efficientnet_v2_b0", "EfficientNetV2B0", 224, 1280, "none", "EfficientNetV2", "efficientnetv2-b0")
_register("resnet50", "ResNet50", 224, 2048, "caffe", "ResNet", "resnet50_weights")
_register("resnet50_v2", "ResNet50V2", 224, 2048, "tf", "ResNetV2", "resnet50v2_weights")
_register("densenet121", "DenseNet121", 224, 1024, "torch", "DenseNet", "densenet121_weights")
_register("xception", "Xception", 299, 2048, "tf", "Xception", "xception_weights", min_input_size=71)
_register("inception_v3", "InceptionV3", 299, 2048, "tf", "InceptionV3", "inception_v3_weights", min_input_size=75)
_register("convnext_tiny", "ConvNeXtTiny", 224, 768, "none", "ConvNeXt", "convnext_tiny")
_register("vgg16", "VGG16", 224, 512, "caffe", "VGG", "vgg16_weights")
