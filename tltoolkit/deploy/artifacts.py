"""An export folder: the artifact, `labels.txt` and `metadata.json`, and running the artifact in its own runtime.

The folder `tltoolkit export` writes holds one artifact (`saved_model/`, `model.tflite` or `model.onnx`), the class
names one per line in label order (`labels.txt`, what TFLite's task libraries read) and `metadata.json`: the input
contract (float32 RGB pixels in [0, 255], its shape, whether the caller resizes and how), the run and recipe it came
from. `ExportedModel` runs the artifact with TensorFlow, the LiteRT/TFLite interpreter or onnxruntime, so `predict`
and `evaluate` can check the very file that ships.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltoolkit.deploy.formats import ARTIFACT_NAMES
from tltoolkit.errors import ModelLoadError

METADATA_FILE = "metadata.json"
LABELS_FILE = "labels.txt"


@dataclass
class ExportMetadata:
    """What a consumer of an exported model needs to feed it and read its output (`metadata.json`)."""

    format: str
    quantize: str
    class_names: list[str]
    image_size: int
    resize: str  # squash | crop | pad, as in training.
    interpolation: str  # The filter training resized with (antialiased | bilinear).
    resize_in_graph: bool  # True: the graph takes any size and resizes (bilinear); False: the caller resizes.
    run_id: str | None = None
    recipe_sha256: str | None = None
    tltoolkit_version: str = ""

    @property
    def artifact(self) -> str:
        return ARTIFACT_NAMES[self.format]

    def to_json(self) -> dict:
        size = None if self.resize_in_graph else self.image_size
        return {
            "format": self.format,
            "quantize": self.quantize,
            "artifact": self.artifact,
            "class_names": self.class_names,
            "input": {
                "name": "image",
                "shape": [None, size, size, 3],
                "dtype": "float32",
                "value_range": [0, 255],
                "channels": "RGB",
                "resized_by": "graph" if self.resize_in_graph else "caller",
            },
            "image_size": self.image_size,
            "resize": self.resize,
            "interpolation": "bilinear" if self.resize_in_graph else self.interpolation,
            "training_interpolation": self.interpolation,
            "resize_in_graph": self.resize_in_graph,
            "output": {"shape": [None, len(self.class_names)], "dtype": "float32", "meaning": "class probabilities"},
            "run_id": self.run_id,
            "recipe_sha256": self.recipe_sha256,
            "tltoolkit_version": self.tltoolkit_version,
        }

    @classmethod
    def from_json(cls, data: dict) -> ExportMetadata:
        return cls(
            format=data["format"],
            quantize=data.get("quantize", "none"),
            class_names=[str(name) for name in data["class_names"]],
            image_size=int(data["image_size"]),
            resize=data.get("resize", "squash"),
            interpolation=data.get("training_interpolation", data.get("interpolation", "antialiased")),
            resize_in_graph=bool(data.get("resize_in_graph", False)),
            run_id=data.get("run_id"),
            recipe_sha256=data.get("recipe_sha256"),
            tltoolkit_version=data.get("tltoolkit_version", ""),
        )


def write_sidecars(folder: Path, metadata: ExportMetadata) -> None:
    """`labels.txt` and `metadata.json` beside the artifact."""
    (folder / LABELS_FILE).write_text("".join(f"{name}\n" for name in metadata.class_names), encoding="utf-8")
    (folder / METADATA_FILE).write_text(json.dumps(metadata.to_json(), indent=2) + "\n", encoding="utf-8")


def find_export(path: Path) -> tuple[Path, ExportMetadata] | None:
    """The artifact and metadata that `path` names (an export folder, its `.tflite`/`.onnx` file or its
    `saved_model/`), or `None` when `path` is not part of an export.

    Raises:
        ModelLoadError: An artifact without its `metadata.json`, or metadata that cannot be read.
    """
    path = path.expanduser()
    if not path.exists():
        return None
    if path.is_dir() and (path / METADATA_FILE).is_file():
        folder = path
    elif path.suffix in (".tflite", ".onnx") or (path.is_dir() and (path / "saved_model.pb").is_file()):
        folder = path.parent
        if not (folder / METADATA_FILE).is_file():
            raise ModelLoadError(
                f"{path} has no {METADATA_FILE} beside it, so its classes and input size are unknown; use the folder "
                "that `tltoolkit export` wrote (artifact, labels.txt, metadata.json together)."
            )
    else:
        return None
    try:
        metadata = ExportMetadata.from_json(json.loads((folder / METADATA_FILE).read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{folder / METADATA_FILE} is not tltoolkit export metadata ({exc}).") from exc
    artifact = folder / metadata.artifact
    if not artifact.exists():
        raise ModelLoadError(f"{folder / METADATA_FILE} names {metadata.artifact}, which is not in {folder}.")
    return artifact, metadata


class ExportedModel:
    """Runs an exported artifact: float32 image batches `(N, H, W, 3)` in [0, 255] -> probabilities `(N, classes)`.

    Has the part of `keras.Model`'s interface that prediction uses (`predict` over arrays or a tf.data dataset,
    `predict_on_batch`).
    """

    def __init__(self, artifact: Path, format: str):
        self.artifact, self.format = Path(artifact), format
        self._run = {"saved_model": self._saved_model, "tflite": self._tflite, "onnx": self._onnx}[format]()

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._run(np.ascontiguousarray(images, dtype=np.float32)), dtype=np.float32)

    def predict_on_batch(self, images) -> np.ndarray:
        """As Keras's: one batch's probabilities (streaming predictions call it batch by batch)."""
        return self.predict_batch(np.asarray(images))

    def predict(self, batches, verbose: int = 0) -> np.ndarray:
        """Probabilities for an array of images or an iterable of batches (tf.data datasets included)."""
        if isinstance(batches, np.ndarray):
            batches = [batches]
        outputs = [self.predict_batch(np.asarray(batch)) for batch in batches]
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)

    def _saved_model(self):
        import tensorflow as tf

        serve = tf.saved_model.load(str(self.artifact)).signatures["serving_default"]
        return lambda images: next(iter(serve(tf.constant(images)).values())).numpy()

    def _onnx(self):
        from tltoolkit.deploy.formats import require_onnx

        require_onnx()
        import onnxruntime

        session = onnxruntime.InferenceSession(str(self.artifact), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: images})[0]

    def _tflite(self):
        interpreter = tflite_interpreter(self.artifact)
        source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        shape = [None]

        def run(images: np.ndarray) -> np.ndarray:
            if shape[0] != images.shape:  # The converted graph has batch 1; any batch and size work after a resize.
                interpreter.resize_tensor_input(source["index"], list(images.shape))
                interpreter.allocate_tensors()
                shape[0] = images.shape
            interpreter.set_tensor(source["index"], images)
            interpreter.invoke()
            return interpreter.get_tensor(target["index"]).copy()

        return run


def tflite_interpreter(path: Path):
    """LiteRT's interpreter (`ai-edge-litert`) when installed, else TensorFlow's own (deprecated, still shipped)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
    from tltoolkit.deploy.formats import quiet

    with quiet(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        interpreter = Interpreter(model_path=str(path), num_threads=None)
        interpreter.allocate_tensors()  # Where XNNPACK announces itself.
    return interpreter
