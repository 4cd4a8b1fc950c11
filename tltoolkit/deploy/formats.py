"""Converting a trained Keras classifier to the formats it ships in: SavedModel, TFLite (float, float16, dynamic
range, int8) and ONNX.

Keras's own `model.export` writes the SavedModel and the ONNX file (through tf2onnx, the optional `onnx` extra), and
TensorFlow's `TFLiteConverter` reads that SavedModel, so no conversion code of ours can drift from theirs. What is
ours: refusing what a format cannot do before any work, built-in TFLite ops only (an Android or microcontroller
runtime has no Flex delegate) with the layer that needed another op named, and the in-graph resizing option.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltoolkit.errors import ExportError

_logger = logging.getLogger(__name__)

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZATIONS = {"saved_model": ("none",), "tflite": ("none", "float16", "dynamic", "int8"), "onnx": ("none",)}
ARTIFACT_NAMES = {"saved_model": "saved_model", "tflite": "model.tflite", "onnx": "model.onnx"}


@dataclass(frozen=True)
class ExportSpec:
    """What to write: the format, its quantization, and whether the graph resizes images itself."""

    format: str
    quantize: str = "none"
    resize_in_graph: bool = False

    def check(self) -> ExportSpec:
        """Raises `ExportError` for a format or a quantization the format does not support (before any work)."""
        if self.format not in FORMATS:
            raise ExportError(f"Unknown export format {self.format!r}; choose one of {', '.join(FORMATS)}.")
        allowed = QUANTIZATIONS[self.format]
        if self.quantize not in allowed:
            other = [f for f, q in QUANTIZATIONS.items() if self.quantize in q and f != self.format]
            hint = f"; quantization {self.quantize!r} is a {other[0]} option" if other else ""
            raise ExportError(
                f"--quantize {self.quantize!r} does not apply to format {self.format!r} (it takes "
                f"{', '.join(allowed)}){hint}."
            )
        if self.format == "onnx":
            require_onnx()
        return self

    @property
    def label(self) -> str:
        """`tflite-int8`, `saved_model`, `onnx-resize`: names the artifact in reports and MLflow."""
        parts = [self.format] + ([self.quantize] if self.quantize != "none" else [])
        return "-".join(parts + (["resize"] if self.resize_in_graph else []))

    @property
    def is_float(self) -> bool:
        """Float exports must agree with Keras within the tolerance; quantized ones report their accuracy drop."""
        return self.quantize == "none"


def require_onnx() -> None:
    """Raises `ExportError` saying what to install when the optional ONNX packages are missing."""
    missing = []
    for module in ("tf2onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ExportError(
            f"ONNX export needs {' and '.join(missing)}, which are not installed: "
            "pip install 'tltoolkit[onnx]' (tf2onnx and onnxruntime), then export again."
        )


def graph_model(model, resize: str, resize_in_graph: bool):
    """The Keras model to convert: `model` itself, or with resizing in front when `resize_in_graph`.

    In-graph resizing takes float32 RGB pixels in [0, 255] of any height and width (one size per batch) and resizes
    with plain bilinear, which every runtime has as a built-in op (Pillow's antialiased filter is not one): `squash`
    stretches, `crop` centre-crops to a square first, `pad` letterboxes with black.
    """
    if not resize_in_graph:
        return model
    import keras

    size = int(model.input_shape[1])
    inputs = keras.Input(shape=(None, None, 3), name="image")
    resized = keras.layers.Resizing(
        size,
        size,
        interpolation="bilinear",
        crop_to_aspect_ratio=resize == "crop",
        pad_to_aspect_ratio=resize == "pad",
        fill_value=0.0,
        name="resize",
    )(inputs)
    # Wrapped in InferenceMode: a nested model called from another one would get the outer call's `training` flag,
    # and the exported graph would then hold its dropout's random ops (Flex ops in TFLite).
    from tltoolkit.model.layers import InferenceMode

    return keras.Model(inputs, InferenceMode(model, name="classifier")(resized), name=f"{model.name}_any_size")


def write_saved_model(model, path: Path) -> None:
    """A TensorFlow SavedModel whose `serve` and `serving_default` signatures map images to probabilities."""
    with quiet():
        model.export(str(path), format="tf_saved_model", verbose=False)


def write_onnx(model, path: Path) -> None:
    """An ONNX file (opset chosen by tf2onnx) with a dynamic batch dimension."""
    require_onnx()
    try:
        with quiet():
            model(np.zeros((1, *(d or 32 for d in model.input_shape[1:])), np.float32))  # Keras exports called models.
            model.export(str(path), format="onnx", verbose=False)
    except Exception as exc:  # tf2onnx raises plain exceptions naming the op it cannot map.
        raise ExportError(f"ONNX conversion failed: {_first_line(exc)}") from exc


def write_tflite(
    model,
    path: Path,
    quantize: str,
    saved_model: Path,
    representative: Callable[[], Iterable[np.ndarray]] | None = None,
) -> None:
    """A `.tflite` file with TFLite built-in ops only, converted from the SavedModel at `saved_model`.

    Args:
        quantize: `none` (float32), `float16` (float16 weights), `dynamic` (int8 weights, float activations) or
            `int8` (int8 weights and activations, calibrated on `representative`; float32 input and output, so the
            same pixels go in).
        representative: For `int8`: yields single-image float32 batches of training images.

    Raises:
        ExportError: An op outside TFLite's built-ins is needed (the layers that need it are named), or `int8`
            without images to calibrate on.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize != "none":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        if representative is None:
            raise ExportError("int8 quantization needs calibration images; none were given.")
        converter.representative_dataset = lambda: ([image] for image in representative())
    try:
        with quiet():
            content = converter.convert()
    except Exception as exc:  # ConverterError, with MLIR diagnostics in its text.
        raise ExportError(unsupported_ops_message(str(exc), model)) from exc
    path.write_bytes(content)


def unsupported_ops_message(error: str, model) -> str:
    """The converter's error in one sentence: which TensorFlow ops TFLite's built-ins lack, in which layers."""
    ops = sorted(set(re.findall(r"'(tf\.[A-Za-z0-9_]+)' op is neither a custom op nor a flex op", error)))
    if not ops:
        return f"TFLite conversion failed: {_first_line(error)}"
    names = {layer.name for layer in _all_layers(model)}
    # Diagnostics locate ops as `functional_1/<layer>_1/<op scope>/<op>@__inference_...` (Keras suffixes call
    # scopes with `_1`); the innermost part that names a layer of the model is the one to blame.
    found = set()
    for location in re.findall(r'"([^"]+)@__inference', error):
        layers = [_layer_name(part, names) for part in location.split("/")[1:-1]]
        found.update([name for name in layers if name][-1:])
    found = sorted(found)
    where = f" in layer(s) {', '.join(found)}" if found else ""
    return (
        f"TFLite conversion needs op(s) {', '.join(ops)}{where}, which are not TFLite built-ins (they would need the "
        "Flex delegate, which Android and microcontroller runtimes do not load). Export as saved_model or onnx, or "
        "replace the layer."
    )


def _layer_name(part: str, names: set[str]) -> str | None:
    if part in names:
        return part
    bare = re.sub(r"_\d+$", "", part)
    return bare if bare in names else None


def _all_layers(model):
    for layer in getattr(model, "layers", []):
        yield layer
        inner = getattr(layer, "layer", None)  # Wrappers (our InferenceMode) hold the backbone.
        yield from _all_layers(inner if inner is not None else layer)


def _first_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


@contextlib.contextmanager
def quiet():
    """Keeps the converters' and interpreters' chatter (tf2onnx's notes and NumPy deprecation warnings, the TFLite
    calibrator's and XNNPACK's notes on the C++ stderr) out of the user's output; it is logged at debug level."""
    from tltoolkit.startup import captured_stderr

    with contextlib.redirect_stdout(io.StringIO()) as out, captured_stderr() as lines, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield
    text = "\n".join([out.getvalue().strip(), *lines]).strip()
    if text:
        _logger.debug("%s", text)
