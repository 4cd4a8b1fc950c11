"""`tltoolkit evaluate`: score a trained classifier on a labelled folder, and log the evaluation to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

from tltoolkit.model.metrics import Evaluation
from tltoolkit.tracking.store import resolve_tracking_uri

_logger = logging.getLogger(__name__)


def evaluate(
    model: str | Path,
    data: str | Path,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    batch_size: int = 32,
    log: bool = True,
    tta: str = "none",
) -> Evaluation:
    """Scores `model` on a class-per-subfolder folder (its `test/`, else `val/`, where it has train/ + val/).

    Args:
        model: A run id, `runs:/` or `models:/` URI, MLflow model folder or `.keras` file.
        data: The labelled images; class folders must be classes of the model.
        tracking_uri: MLflow store (to resolve run ids and to log). Defaults as for `run`.
        experiment: Where to log. Defaults to the source run's experiment, or `tltoolkit`.
        batch_size: Images per prediction batch. Defaults to 32.
        log: Log an MLflow run tagged `tltoolkit.kind=evaluate`. Defaults to `True`.
        tta: Also score with test-time augmentation, `flip` or `flip_crops` (see `tltoolkit.model.tta`), reported
            and logged beside the plain scores (`eval_tta_*`). Defaults to `none`.

    Returns:
        The `Evaluation` (metrics, confusion matrix, per-class report), with `.tta` holding the augmented scores.
    """
    import mlflow
    import numpy as np

    from tltoolkit.data import labelled_images
    from tltoolkit.data.pipeline import image_batches
    from tltoolkit.model.inference import predict_images
    from tltoolkit.model.metrics import evaluate_probabilities
    from tltoolkit.tracking.models import load_classifier
    from tltoolkit.tracking.reports import report_text

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    loaded = load_classifier(model)
    items, skipped = labelled_images(data, loaded.class_names)
    for item in skipped:
        _logger.warning("Skipped %s: %s", item.path, item.reason)
    paths, config = [p for p, _ in items], loaded.data_config(batch_size)
    labels = np.array([label for _, label in items])
    evaluation = evaluate_probabilities(
        labels, _normalised(loaded, predict_images(loaded.model, paths, config)), loaded.class_names
    )
    if tta != "none":
        from tltoolkit.model.tta import predict_tta

        probabilities = _normalised(loaded, predict_tta(loaded.model, image_batches(paths, config), tta))
        evaluation.tta = evaluate_probabilities(labels, probabilities, loaded.class_names)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.metrics.items())
    if evaluation.tta is not None:
        scores += f"\n  with test-time augmentation ({tta}): " + ", ".join(
            f"{k} {v:.4f}" for k, v in evaluation.tta.metrics.items()
        )
    _logger.info(
        "Evaluated %d images of %s with %s:\n  %s\n%s",
        len(items),
        data,
        model,
        scores,
        report_text(evaluation, loaded.class_names),
    )
    if log:
        from tltoolkit.tracking.reports import log_evaluation_run

        run_id = log_evaluation_run(uri, evaluation, loaded, model, data, skipped, experiment)
        _logger.info("Logged as MLflow run %s.", run_id)
    return evaluation


def _normalised(loaded, probabilities):
    """A quantized artifact's outputs sum to 1 only within its int8 steps; scores want probabilities."""
    import numpy as np

    if loaded.export_format is None:
        return probabilities
    return probabilities / np.maximum(probabilities.sum(axis=1, keepdims=True), 1e-12)
