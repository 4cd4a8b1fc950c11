"""Autoencoder encoders as backbones: built from a recipe's `pretrain.autoencoder`, or reloaded from a trained one.

An encoder takes raw RGB pixels (0-255), preprocesses them inside (as every backbone does), runs either `conv`
blocks (conv 3x3 stride 2, BatchNormalization, ReLU; one per width) or a registered backbone built with
`weights: none`, and ends in a 1x1 convolution `latent` to the bottleneck's channels. Its layers sit directly in
the encoder model, so freeze points name them (`block2_relu`, `latent`) as for any backbone. The decoder mirrors
it: one transposed convolution (stride 2) per halving, then a 3x3 convolution to RGB in [0, 1].

A trained encoder is saved as a folder: `encoder.json` (its architecture) and `encoder.weights.h5`. The backbone
`autoencoder` rebuilds it from there: `backbone: {name: autoencoder, weights: <folder | runs:/RUN/encoder | RUN>}`
(a bare run id means that run's `encoder/`), so another recipe can fine-tune it like any backbone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from tltoolkit.backbones.registry import NO_WEIGHTS, BackboneCfg, get_backbone_cfg, register_backbone
from tltoolkit.errors import BackboneError

ENCODER_JSON = "encoder.json"
ENCODER_WEIGHTS = "encoder.weights.h5"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# What `backbone: {name: autoencoder, weights: none}` builds: the recipe defaults' encoder, untrained.
DEFAULT_ARCHITECTURE = {"encoder": "conv", "widths": [32, 64, 128], "latent": 64}


def architecture_of(autoencoder) -> dict:
    """The parts of an `AutoencoderConfig` that fix the encoder's layers."""
    return {"encoder": autoencoder.encoder, "widths": list(autoencoder.widths), "latent": autoencoder.latent}


def build_encoder(architecture: dict, input_size: int | None = None, inputs=None):
    """A fresh (untrained) encoder: raw RGB `(size, size, 3)` in (or the given `inputs` tensor), latent map out."""
    import keras

    from tltoolkit.backbones.convnet import _build_convnet
    from tltoolkit.backbones.preprocessing import ImagePreprocessing

    if inputs is None:
        inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    if architecture["encoder"] == "conv":
        cfg = BackboneCfg(
            "encoder_body",
            _build_convnet,
            input_size,
            architecture["widths"][-1],
            "tf",
            options={"widths": tuple(architecture["widths"])},
        )
    else:
        cfg = get_backbone_cfg(architecture["encoder"])
    x = ImagePreprocessing(cfg.preprocessing, name="preprocessing")(inputs) if cfg.preprocessing != "none" else inputs
    body = cfg.builder(cfg, input_tensor=x, include_top=False, weights=NO_WEIGHTS)
    latent = keras.layers.Conv2D(architecture["latent"], 1, name="latent")(body.output)
    return keras.Model(keras.utils.get_source_inputs(inputs), latent, name="encoder")


def build_decoder(latent_shape: tuple, image_size: int, architecture: dict):
    """Mirrors the encoder: latent map `(h, w, c)` -> RGB `(image_size, image_size, 3)` in [0, 1]."""
    import keras

    side = int(latent_shape[0])
    steps = math.log2(image_size / side) if side else -1
    if steps < 0 or steps != int(steps):
        raise BackboneError(
            f"The encoder's {side}x{side} latent map cannot be mirrored back to {image_size} px by halvings; choose "
            "data.image_size so that it is the latent side times a power of two."
        )
    steps = int(steps)
    if architecture["encoder"] == "conv":
        widths = list(reversed(architecture["widths"]))
    else:
        widths = [min(256, 16 * 2 ** (steps - 1 - i)) for i in range(steps)]
    inputs = keras.Input(shape=tuple(latent_shape), name="latent_map")
    x = inputs
    for block, width in enumerate(widths, start=1):
        x = keras.layers.Conv2DTranspose(width, 3, strides=2, padding="same", use_bias=False, name=f"up{block}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"up{block}_bn")(x)
        x = keras.layers.ReLU(name=f"up{block}_relu")(x)
    outputs = keras.layers.Conv2D(3, 3, padding="same", activation="sigmoid", dtype="float32", name="reconstruction")(x)
    return keras.Model(inputs, outputs, name="decoder")


def save_encoder(encoder, folder: str | Path, architecture: dict) -> Path:
    """Writes `encoder.json` and `encoder.weights.h5` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {**architecture, "image_size": int(encoder.input_shape[1]), "latent_shape": list(encoder.output_shape[1:])}
    (folder / ENCODER_JSON).write_text(json.dumps(record, indent=2))
    encoder.save_weights(folder / ENCODER_WEIGHTS)
    return folder


def encoder_folder(weights: str) -> Path:
    """The local folder of a saved encoder named by a folder, its weights file, `runs:/RUN/encoder` or a run id."""
    if _RUN_ID.match(weights):
        weights = f"runs:/{weights}/encoder"
    if "://" in weights or weights.startswith(("runs:/", "models:/")):
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(weights))
        except Exception as exc:  # MLflow raises several types for "not found".
            raise BackboneError(
                f"backbone.weights {weights!r}: no saved encoder there in the MLflow store {mlflow.get_tracking_uri()} "
                f"({str(exc).splitlines()[0][:200]}). Name the run of an autoencoder recipe, or a folder holding "
                f"{ENCODER_JSON} and {ENCODER_WEIGHTS}."
            ) from None
    path = Path(weights).expanduser()
    folder = path.parent if path.is_file() else path
    if not (folder / ENCODER_JSON).is_file() or not (folder / ENCODER_WEIGHTS).is_file():
        raise BackboneError(
            f"backbone.weights {weights!r} is not a saved encoder: {folder} lacks {ENCODER_JSON} and "
            f"{ENCODER_WEIGHTS}. "
            "Name the run id of an autoencoder recipe's run, `runs:/<run id>/encoder`, or such a folder."
        )
    return folder


def _build_saved(cfg: BackboneCfg, input_tensor, include_top: bool, weights: str):
    import keras

    if include_top:
        raise BackboneError("the autoencoder backbone has no classifier; use include_top=False.")
    if weights == "imagenet":
        raise BackboneError(
            "the autoencoder backbone has no ImageNet weights: name a trained encoder (a run id, "
            "runs:/<run id>/encoder, or its folder), or `none`."
        )
    folder, architecture = None, DEFAULT_ARCHITECTURE
    if weights != NO_WEIGHTS:
        folder = encoder_folder(weights)
        architecture = json.loads((folder / ENCODER_JSON).read_text())
    encoder = build_encoder(architecture, inputs=input_tensor)
    if folder is not None:
        try:
            encoder.load_weights(folder / ENCODER_WEIGHTS)
        except ValueError as exc:
            raise BackboneError(
                f"The encoder in {folder} does not load at {int(input_tensor.shape[1])} px: {exc}"
            ) from None
    return keras.Model(encoder.inputs, encoder.output, name=cfg.name)


register_backbone(
    BackboneCfg(
        name="autoencoder",
        builder=_build_saved,
        input_size=32,
        feature_width=DEFAULT_ARCHITECTURE["latent"],
        preprocessing="none",  # The encoder preprocesses inside, as it did when it was trained.
        min_input_size=2 ** len(DEFAULT_ARCHITECTURE["widths"]),
        family="Autoencoder encoder (pretrained here, on unlabelled images)",
    )
)
