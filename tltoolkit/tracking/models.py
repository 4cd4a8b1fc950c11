"""The trained classifier as an MLflow model, and loading a classifier back from a path, run id or model URI."""

from __future__ import annotations

import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import Schema, TensorSpec

from tltoolkit.errors import ModelLoadError


class KerasClassifierModel(PythonModel):
    """pyfunc wrapper: a float32 batch of raw RGB images `(N, H, W, 3)` in [0, 255] -> probabilities `(N, classes)`."""

    def load_context(self, context):
        # Importing the package registers its custom layers for Keras's safe-mode loading.
        import keras

        import tltoolkit.backbones.preprocessing  # noqa: F401
        import tltoolkit.model.layers  # noqa: F401

        self.model = keras.saving.load_model(context.artifacts["keras_model"], safe_mode=True, compile=False)

    # `np.ndarray` tells MLflow the input is a tensor batch checked by the logged signature (no schema from hints),
    # which also keeps it from asking for type hints on every import.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        probabilities = self.model.predict(np.asarray(model_input, dtype=np.float32), verbose=0)
        return np.asarray(probabilities, dtype=np.float32)


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
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, size, size, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(class_names)))]),
    )
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The signature is explicit; an input example would store a full image as JSON.
        warnings.filterwarnings("ignore", message=".*input example was not provided.*")
        warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)
        keras_path = Path(tmp) / _KERAS_FILE
        model.save(keras_path)
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(recipe_yaml)
        artifacts = {"keras_model": str(keras_path), "recipe": str(recipe_path)}
        metadata = {"class_names": class_names, "image_size": size, "resize": resize, "interpolation": interpolation}
        if anomaly is not None:
            artifacts["autoencoder"] = str(anomaly["autoencoder"])
            metadata.update(
                {
                    "anomaly_threshold": float(anomaly["threshold"]),
                    "anomaly_loss": anomaly["loss"],
                    "anomaly_percentile": float(anomaly["percentile"]),
                }
            )
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts=artifacts,
            code_paths=[str(Path(tltoolkit.__file__).parent)],
            signature=signature,
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
    return info.model_uri


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
        ref: A `.keras` file, an MLflow model folder, a run id of `tltoolkit run` (or a unique prefix of one), or a
            `runs:/`, `models:/<name>/<version>`, `models:/<name>@<alias>` or `models:/m-...` URI (see
            `resolve_model_ref`).

    Raises:
        ModelLoadError: Nothing loadable at `ref`, or the model is not a tltoolkit classifier, or it is unsafe.
    """
    text = str(ref)
    path = Path(text).expanduser()
    run_id, resize, meta, autoencoder_file = None, "squash", {}, None
    if path.is_file():
        keras_file = path
    elif path.is_dir() or _REFERENCE.match(text):
        folder, run_id = (path, None) if path.is_dir() else _local_model_dir(text)
        keras_file = next(iter(sorted(folder.rglob(_KERAS_FILE))), None) or next(
            iter(sorted(folder.rglob("*.keras"))), None
        )
        autoencoder_file = next(iter(sorted(folder.rglob(_AUTOENCODER_FILE))), None)
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
    )


def _mlmodel_metadata(mlmodel: Path) -> dict:
    import yaml

    return (yaml.safe_load(mlmodel.read_text()) or {}).get("metadata") or {}
