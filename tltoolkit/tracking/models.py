"""The trained classifier as an MLflow model, and loading a classifier back from a path, run id or model URI."""

from __future__ import annotations

import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

from tltoolkit.errors import ModelLoadError


class KerasClassifierModel(PythonModel):
    """pyfunc wrapper: images in, class probabilities out; what `mlflow models serve` and `pyfunc.load_model` run.

    Takes either a float32 batch of raw RGB pixels `(N, H, W, 3)` in [0, 255] at the model's size (returns the
    `(N, classes)` probabilities), or images a client can send over HTTP: a DataFrame with a column `image` (base64
    of the file's bytes, or the bytes) or `path` (files readable where the model runs), or a list of such strings.
    Those are decoded and resized exactly as training read its images, and each row gets `class`, `probability` and
    `probabilities` (class name -> probability).
    """

    def load_context(self, context):
        # Importing the package registers its custom layers for Keras's safe-mode loading.
        import keras

        import tltoolkit.backbones.preprocessing  # noqa: F401
        import tltoolkit.model.layers  # noqa: F401

        self.model = keras.saving.load_model(context.artifacts["keras_model"], safe_mode=True, compile=False)
        self.class_names = tltoolkit.model.layers.class_names_of(self.model)
        self.reading = _image_reading(context, int(self.model.input_shape[1]))

    # `np.ndarray` keeps MLflow from inferring a schema from the hint (it cannot from this one) and from enforcing
    # one: the model takes tensors and image columns alike, so it is logged without a signature.
    def predict(self, context, model_input: np.ndarray, params=None):
        images = _encoded_images(model_input)
        if images is None:
            probabilities = self.model.predict(np.asarray(model_input, dtype=np.float32), verbose=0)
            return np.asarray(probabilities, dtype=np.float32)
        pixels = np.stack([_decode(kind, value, self.reading, row) for row, (kind, value) in enumerate(images)])
        probabilities = np.asarray(self.model.predict(pixels.astype(np.float32), verbose=0), dtype=np.float64)
        import pandas as pd

        best = probabilities.argmax(axis=1)
        return pd.DataFrame(
            {
                "class": [self.class_names[i] for i in best],
                "probability": probabilities[np.arange(len(best)), best],
                "probabilities": [dict(zip(self.class_names, map(float, row))) for row in probabilities],
            }
        )


def _image_reading(context, size: int) -> dict:
    """How training read images (`model_config` of the logged model; older models: their recipe artifact)."""
    config = dict(getattr(context, "model_config", None) or {})
    if "resize" not in config and "recipe" in context.artifacts:
        import yaml

        recipe = yaml.safe_load(Path(context.artifacts["recipe"]).read_text(encoding="utf-8")) or {}
        config = {key: (recipe.get("data") or {}).get(key) for key in ("resize", "interpolation")}
    return {
        "size": size,
        "resize": config.get("resize") or "squash",
        "interpolation": config.get("interpolation") or "antialiased",
    }


def _encoded_images(model_input) -> list[tuple[str, object]] | None:
    """`(kind, value)` per image for image columns or lists of strings (`kind`: `image` or `path`); `None` for
    pixel tensors."""
    import pandas as pd

    if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": {"image": [...]}}
        ((key, value),) = model_input.items()
        model_input = pd.DataFrame({key: list(value)}) if key in ("image", "path") else value
    if isinstance(model_input, pd.DataFrame):
        for kind in ("image", "path"):
            if kind in model_input.columns:
                return [(kind, value) for value in model_input[kind]]
        if all(dtype.kind == "O" for dtype in model_input.dtypes):
            raise ValueError(
                f"Got columns {list(model_input.columns)}; send images in a column `image` (base64 of the file) or "
                "`path`, or pixels as a float32 tensor (N, H, W, 3)."
            )
        return None
    array = np.asarray(model_input)
    if array.dtype.kind in "USO" and array.ndim == 1:
        return [("image", value) for value in array]
    return None


def _decode(kind: str, value, reading: dict, row: int) -> np.ndarray:
    import base64
    import binascii
    import io

    from tltoolkit.data.images import UnreadableImage, load_image_array

    try:
        if kind == "path":
            source = str(value)
        elif isinstance(value, bytes | bytearray):
            source = io.BytesIO(value)
        else:
            source = io.BytesIO(base64.b64decode(str(value), validate=True))
        return load_image_array(source, reading["size"], reading["resize"], reading["interpolation"])
    except (UnreadableImage, binascii.Error, OSError) as exc:
        what = f"path {str(value)[:200]!r}" if kind == "path" else "its base64 `image`"
        raise ValueError(f"Row {row}: cannot read {what}: {exc}") from None


INPUTS = (
    "float32 RGB pixels (N, image_size, image_size, 3) in [0, 255] -> probabilities (N, classes); or a column `image` "
    "(base64 of image files) or `path` -> columns class, probability, probabilities (resized as in training)"
)
MODEL_NAME = "model"  # What `runs:/<run>/model` names; tltoolkit runs name their model and tag it (MODEL_TAG).
MODEL_TAG = "tltoolkit.model_name"
_KERAS_FILE = "classifier.keras"
_AUTOENCODER_FILE = "autoencoder.keras"
# A run id or a prefix of one (as `compare` prints them), or an MLflow model URI.
_REFERENCE = re.compile(r"^([0-9a-f]{1,32}|(runs|models):/.+)$")


@dataclass
class LoadedClassifier:
    """A classifier ready to predict, with what it needs to read images as it was trained."""

    model: keras.Model  # noqa: F821
    class_names: list[str]
    image_size: int
    resize: str
    source: str  # What the user pointed at.
    run_id: str | None = None  # The MLflow run that produced it, when known.
    interpolation: str = "antialiased"  # Models logged before the option existed were trained antialiased.
    autoencoder: keras.Model | None = None  # noqa: F821  (autoencoder recipes: scores reconstruction error)
    anomaly_threshold: float | None = None  # Errors above it are flagged (a percentile of the training images').
    anomaly_loss: str = "mse"
    recipe_yaml: str | None = None  # The resolved recipe it was trained with (MLflow models carry it).
    export_format: str | None = None  # Set for an exported artifact (`model` is then an `ExportedModel`).

    def data_config(self, batch_size: int = 32):
        """How this model's images are read: its size, resize mode and filter, as in training (no caching)."""
        from tltoolkit.recipe import DataConfig

        return DataConfig(
            image_size=self.image_size,
            resize=self.resize,
            interpolation=self.interpolation,
            batch_size=batch_size,
            cache=False,
        )


def log_classifier(
    model,
    class_names: list[str],
    resize: str,
    recipe_yaml: str,
    interpolation: str = "antialiased",
    anomaly: dict | None = None,
    name: str = MODEL_NAME,
) -> str:
    """Logs `model` to the active run as an MLflow pyfunc model named `name`; returns its model URI.

    Args:
        name: The logged model's name (see `model_name_for`); `runs:/<run>/<name>` names it in MLflow.
        anomaly: For autoencoder recipes: `{"autoencoder": path of its .keras file, "threshold": ..., "loss": "mse",
            "percentile": 99}`; the autoencoder travels inside the model and the rest in its metadata.
    """
    import keras
    import tensorflow as tf

    import tltoolkit

    size = int(model.input_shape[1])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # No signature on purpose (see `KerasClassifierModel.predict`); the accepted inputs are in the metadata.
        warnings.filterwarnings("ignore", message=".*(input example|signature).*")
        warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)
        keras_path = Path(tmp) / _KERAS_FILE
        model.save(keras_path)
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(recipe_yaml)
        artifacts = {"keras_model": str(keras_path), "recipe": str(recipe_path)}
        reading = {"image_size": size, "resize": resize, "interpolation": interpolation}
        metadata = {"class_names": class_names, **reading, "inputs": INPUTS}
        if anomaly is not None:
            artifacts["autoencoder"] = str(anomaly["autoencoder"])
            metadata.update(
                {
                    "anomaly_threshold": float(anomaly["threshold"]),
                    "anomaly_loss": anomaly["loss"],
                    "anomaly_percentile": float(anomaly["percentile"]),
                }
            )
        pyfunc_logger = logging.getLogger("mlflow.pyfunc")
        level = pyfunc_logger.level
        pyfunc_logger.setLevel(logging.ERROR)  # "Failed to infer model signature": there is none on purpose.
        try:
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts=artifacts,
                code_paths=[str(Path(tltoolkit.__file__).parent)],
                model_config=reading,
                pip_requirements=[
                    f"tensorflow=={tf.__version__}",
                    f"keras=={keras.__version__}",
                    f"mlflow=={mlflow.__version__}",
                    "pillow",
                    "pyyaml",
                    "pydantic",
                ],
                metadata=metadata,
            )
        finally:
            pyfunc_logger.setLevel(level)
    return info.model_uri


def is_model_reference(text: str) -> bool:
    """Whether `text` looks like a run id (or prefix) or an MLflow model URI rather than a path."""
    return bool(_REFERENCE.match(text))


def resolve_model_ref(ref: str) -> tuple[str, str | None]:
    """The MLflow URI that a model reference names, and the run that trained it (when known).

    Accepted: a run id or any unique prefix of one (as `compare` prints them), `runs:/<run id>/<path>`,
    `models:/<name>/<version>`, `models:/<name>@<alias>` and the `models:/m-...` ids of logged models.

    Raises:
        ModelLoadError: No run has that prefix, several do (they are listed), or the registry lacks the model.
    """
    client = mlflow.MlflowClient()
    if ref.startswith("runs:/"):
        run_id, _, path = ref.removeprefix("runs:/").partition("/")
        if path == MODEL_NAME:  # The generic name stands for the run's own model, whatever it is called.
            return f"runs:/{run_id}/{_model_name(client, run_id)}", run_id
        return ref, run_id
    if ref.startswith("models:/"):
        return ref, _source_run(client, ref.removeprefix("models:/"))
    run_id = _run_with_prefix(client, ref)
    return f"runs:/{run_id}/{_model_name(client, run_id)}", run_id


def _model_name(client, run_id: str) -> str:
    """The name of the model a run logged: its `tltoolkit.model_name` tag, else `model`."""
    try:
        return client.get_run(run_id).data.tags.get(MODEL_TAG, MODEL_NAME)
    except Exception:  # An unknown run: the download that follows says so, with the store.
        return MODEL_NAME


def model_name_for(run_name: str) -> str:
    """A logged model's name from its run's name, in letters, digits, `_` and `-` (MLflow refuses `/ : . % " '`,
    and `#`, `[` or spaces would not survive in a `runs:/` URI)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", run_name).strip("-") or MODEL_NAME


def _source_run(client, name: str) -> str | None:
    """The run behind `models:/<name>`: a registered version's, an alias's, or a logged model's source run."""
    try:
        if name.startswith("m-") and "/" not in name and "@" not in name:
            return client.get_logged_model(name).source_run_id
        if "@" in name:
            registered, alias = name.split("@", 1)
            return client.get_model_version_by_alias(registered, alias).run_id
        registered, _, version = name.rpartition("/")
        return client.get_model_version(registered, version).run_id
    except Exception as exc:  # MLflow raises MlflowException (or RestException) for every "not found".
        raise ModelLoadError(
            f"No model models:/{name} in the MLflow store {mlflow.get_tracking_uri()} "
            f"({str(exc).splitlines()[0][:200]}). Name a registered model as models:/<name>/<version> or "
            "models:/<name>@<alias>, or a logged model as models:/m-..., and check --tracking-uri."
        ) from exc


def _run_with_prefix(client, prefix: str) -> str:
    """The one run whose id starts with `prefix` (a whole id is its own prefix)."""
    if len(prefix) == 32:
        return prefix
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=50_000) if experiments else []
    matches = [run for run in runs if run.info.run_id.startswith(prefix)]
    if len(matches) == 1:
        return matches[0].info.run_id
    if not matches:
        raise ModelLoadError(
            f"No run id starts with {prefix!r} in the MLflow store {mlflow.get_tracking_uri()}; pass a run id (or a "
            "unique prefix, as `tltoolkit compare` prints them), a runs:/ or models:/ URI, an MLflow model folder or a "
            ".keras file, and check --tracking-uri."
        )
    listed = ", ".join(f"{r.info.run_id} ({r.info.run_name})" for r in matches[:10])
    more = f" and {len(matches) - 10} more" if len(matches) > 10 else ""
    raise ModelLoadError(f"Run id prefix {prefix!r} is ambiguous: {listed}{more}. Give more of the id.")


def _local_model_dir(ref: str) -> tuple[Path, str | None]:
    """Downloads (if needed) the MLflow model that `ref` names; returns its folder and run id."""
    uri, run_id = resolve_model_ref(ref)
    try:
        return Path(mlflow.artifacts.download_artifacts(uri)), run_id
    except Exception as exc:  # MLflow raises several types for "not found".
        raise ModelLoadError(
            f"Cannot load model {ref!r} ({uri}) from the MLflow store {mlflow.get_tracking_uri()} "
            f"({str(exc).splitlines()[0][:200]}). "
            "Pass a run id of `tltoolkit run`, a runs:/ or models:/ URI, an MLflow model folder or a .keras file, and "
            "check --tracking-uri."
        ) from exc


def load_classifier(ref: str | Path) -> LoadedClassifier:
    """Loads a tltoolkit classifier (Keras safe mode on: a model with a Lambda layer is refused).

    Args:
        ref: A `.keras` file, an MLflow model folder, a folder of `tltoolkit export` (or its `.tflite`, `.onnx` or
            `saved_model/`), a run id of `tltoolkit run` (or a unique prefix of one), or a
            `runs:/`, `models:/<name>/<version>`, `models:/<name>@<alias>` or `models:/m-...` URI (see
            `resolve_model_ref`).

    Raises:
        ModelLoadError: Nothing loadable at `ref`, or the model is not a tltoolkit classifier, or it is unsafe.
    """
    text = str(ref)
    path = Path(text).expanduser()
    exported = _load_export(path, text)
    if exported is not None:
        return exported
    run_id, resize, meta, autoencoder_file, recipe_file = None, "squash", {}, None, None
    if path.is_file():
        keras_file = path
    elif path.is_dir() or _REFERENCE.match(text):
        folder, run_id = (path, None) if path.is_dir() else _local_model_dir(text)
        keras_file = next(iter(sorted(folder.rglob(_KERAS_FILE))), None) or next(
            iter(sorted(folder.rglob("*.keras"))), None
        )
        autoencoder_file = next(iter(sorted(folder.rglob(_AUTOENCODER_FILE))), None)
        recipe_file = next(iter(sorted(folder.rglob("recipe.yaml"))), None)
        if keras_file is None or not (folder / "MLmodel").is_file():
            raise ModelLoadError(f"{text} is not a tltoolkit MLflow model folder (no MLmodel and .keras file in it).")
        meta = _mlmodel_metadata(folder / "MLmodel")
        resize = meta.get("resize", resize)
    else:
        raise ModelLoadError(
            f"Model {text!r} is neither a file, a folder, a run id nor an MLflow URI; "
            "pass a .keras file, an MLflow model folder or the run id that `tltoolkit run` printed."
        )
    import keras  # Only once the reference resolved: a wrong one fails before TensorFlow loads.

    import tltoolkit.backbones.preprocessing  # noqa: F401  (registers custom layers)
    from tltoolkit.model.layers import class_names_of

    try:
        model = keras.saving.load_model(keras_file, safe_mode=True, compile=False)
        autoencoder = (
            keras.saving.load_model(autoencoder_file, safe_mode=True, compile=False) if autoencoder_file else None
        )
    except ValueError as exc:
        unsafe = "safe_mode" in str(exc) or "Lambda" in str(exc)
        why = (
            "it contains a Lambda layer (arbitrary code), which tltoolkit never loads; rebuild it without Lambda layers"
            if unsafe
            else str(exc).splitlines()[0][:300]
        )
        raise ModelLoadError(f"Cannot load {keras_file}: {why}.") from exc
    try:
        class_names = class_names_of(model)
    except ValueError as exc:
        raise ModelLoadError(f"{keras_file} is not a tltoolkit classifier: {exc}") from exc
    interpolation = meta.get("interpolation", "antialiased")
    return LoadedClassifier(
        model,
        class_names,
        int(model.input_shape[1]),
        resize,
        text,
        run_id,
        interpolation,
        autoencoder,
        meta.get("anomaly_threshold"),
        meta.get("anomaly_loss", "mse"),
        recipe_file.read_text(encoding="utf-8") if recipe_file else None,
    )


def _load_export(path: Path, text: str) -> LoadedClassifier | None:
    """An artifact of `tltoolkit export` (its folder, file or `saved_model/`), or `None` if `path` is not one."""
    from tltoolkit.deploy.artifacts import ExportedModel, find_export

    found = find_export(path)
    if found is None:
        return None
    artifact, meta = found
    return LoadedClassifier(
        ExportedModel(artifact, meta.format),
        meta.class_names,
        meta.image_size,
        meta.resize,
        text,
        meta.run_id,
        meta.interpolation,
        export_format=meta.format,
    )


def _mlmodel_metadata(mlmodel: Path) -> dict:
    """The `metadata` of an MLmodel file; a damaged or edited one is a `ModelLoadError` naming it."""
    import yaml

    try:
        content = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
        if not isinstance(content, dict):
            raise ValueError("it is not a YAML mapping")
        meta = content.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ValueError("its `metadata` is not a mapping")
        for key, allowed in (("resize", ("squash", "crop", "pad")), ("interpolation", ("antialiased", "bilinear"))):
            if key in meta and meta[key] not in allowed:
                raise ValueError(f"metadata {key}={meta[key]!r} is none of {', '.join(allowed)}")
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"{mlmodel} is damaged ({first}); it is the model's description, written by MLflow. Log the model again "
            "(or pass its .keras file)."
        ) from None
    return meta
