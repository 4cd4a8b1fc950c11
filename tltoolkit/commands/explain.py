"""`tltoolkit explain`: what a trained classifier gets wrong on a labelled folder and where it looks: the most
confused classes, the images with the highest loss, and Grad-CAM heat maps over them."""

from __future__ import annotations

import logging
from pathlib import Path

from tltoolkit.errors import ModelLoadError, TltoolkitError

_logger = logging.getLogger(__name__)


def explain(
    model: str | Path,
    data: str | Path,
    output: str | Path | None = None,
    top_losses: int = 8,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    log: bool = True,
):
    """Interprets `model` on a class-per-subfolder folder (its `test/`, else `val/`, where it has train/ + val/).

    Args:
        model: A run id, `runs:/` or `models:/` URI, MLflow model folder or `.keras` file (Grad-CAM needs the Keras
            model: an exported artifact is refused).
        data: The labelled images; class folders must be classes of the model.
        output: Folder for `most_confused.csv`, `top_losses.csv`, `top_losses.jpg` and `gradcam/*.jpg`. Defaults to
            `explain-<folder name>`.
        top_losses: How many of the highest-loss images to show and map. Defaults to 8.
        tracking_uri: MLflow store. Defaults as for `run`.
        experiment: Where to log. Defaults to the source run's experiment, or `tltoolkit`.
        log: Log an MLflow run tagged `tltoolkit.kind=explain` (nested under the source run) with the files under
            `interpretation/`. Defaults to `True`.

    Returns:
        The `Interpretation` (tables, images, heat maps).
    """
    import mlflow
    import numpy as np

    from tltoolkit.data import labelled_images
    from tltoolkit.model.inference import predict_images
    from tltoolkit.model.interpret import interpret
    from tltoolkit.model.metrics import evaluate_probabilities
    from tltoolkit.tracking.models import load_classifier
    from tltoolkit.tracking.reports import save_interpretation
    from tltoolkit.tracking.store import resolve_tracking_uri

    if top_losses < 1:
        raise TltoolkitError(f"--top must be at least 1, got {top_losses}.")
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    loaded = load_classifier(model)
    if loaded.export_format is not None:
        raise ModelLoadError(
            f"{model} is an exported {loaded.export_format} model; Grad-CAM needs the Keras model: pass its run id, "
            "models:/ URI, MLflow model folder or .keras file."
        )
    items, skipped = labelled_images(data, loaded.class_names)
    for item in skipped:
        _logger.warning("Skipped %s: %s", item.path, item.reason)
    paths, config = [path for path, _ in items], loaded.data_config()
    probabilities = predict_images(loaded.model, paths, config)
    evaluation = evaluate_probabilities(np.array([label for _, label in items]), probabilities, loaded.class_names)
    found = interpret(loaded.model, paths, evaluation, loaded.class_names, config, top_losses)
    folder = save_interpretation(found, Path(output) if output else Path(f"explain-{Path(data).resolve().name}"))
    confused = found.most_confused.head(10).to_string(index=False) if len(found.most_confused) else "  (none)"
    shown = found.top_losses.drop(columns="path").assign(file=[Path(p).name for p in found.top_losses["path"]])
    _logger.info(
        "%d images of %s, accuracy %.4f.\nMost confused (true -> predicted):\n%s\nTop losses:\n%s\nWritten to %s",
        len(items),
        data,
        evaluation.metrics["accuracy"],
        confused,
        shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"),
        folder,
    )
    if log:
        from mlflow import MlflowClient

        from tltoolkit.tracking.reports import log_evaluation_run

        run_id = log_evaluation_run(uri, evaluation, loaded, model, data, skipped, experiment, kind="explain")
        MlflowClient(uri).log_artifacts(run_id, str(folder), "interpretation")
        _logger.info("Logged as MLflow run %s (interpretation/).", run_id)
    return found
