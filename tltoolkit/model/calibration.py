"""Temperature scaling of a trained classifier: fitted on its validation predictions, stored in its output layer.

The temperature lives in the `Classifier` layer's config, so it travels with the `.keras` file, the MLflow model
and every export, and `predict` applies it with no extra step. It divides the logits, so the predicted class never
changes; only the confidence does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from tltoolkit.model.layers import Classifier
from tltoolkit.model.metrics import (
    Evaluation,
    evaluate_probabilities,
    expected_calibration_error,
    fit_temperature,
    reliability,
    with_temperature,
)

_logger = logging.getLogger(__name__)

MIN_IMAGES = 30  # Fewer validation images fit a temperature to noise (a perfect small split drives it to its bound).


@dataclass
class Calibration:
    """The fitted temperature and what it did on the validation split."""

    temperature: float
    images: int
    ece_before: float
    ece_after: float
    reliability_before: pd.DataFrame
    reliability_after: pd.DataFrame


def set_temperature(model, temperature: float) -> None:
    """Sets the temperature of `model`'s `Classifier` output layer (and drops Keras's traced predict step)."""
    layer = next(layer for layer in reversed(model.layers) if isinstance(layer, Classifier))
    layer.temperature = float(temperature)
    model.predict_function = None  # Traced with the old value; rebuilt on the next predict.


def calibrate(model, val: Evaluation) -> Calibration | None:
    """Fits a temperature on the val predictions `val` and stores it in `model`; `None` (model untouched) when the
    split is too small to fit one."""
    labels, probabilities = val.labels, val.probabilities
    if len(labels) < MIN_IMAGES:
        _logger.info(
            "Not calibrating: %d val image(s), fewer than %d (a temperature would fit noise).", len(labels), MIN_IMAGES
        )
        return None
    temperature = fit_temperature(labels, probabilities)
    if temperature is None:
        _logger.info("Not calibrating: the val predictions have no finite best temperature (all right, or all wrong).")
        return None
    calibrated = with_temperature(probabilities, temperature)
    result = Calibration(
        temperature,
        len(labels),
        expected_calibration_error(labels, probabilities),
        expected_calibration_error(labels, calibrated),
        reliability(labels, probabilities),
        reliability(labels, calibrated),
    )
    set_temperature(model, temperature)
    _logger.info(
        "Calibrated on %d val images: temperature %.3f, expected calibration error %.4f -> %.4f.",
        len(labels),
        temperature,
        result.ece_before,
        result.ece_after,
    )
    return result


def rescored(evaluation: Evaluation, temperature: float, class_names: list[str]) -> Evaluation:
    """The evaluation of the same predictions at `temperature` (for scores computed before calibration)."""
    probabilities = with_temperature(evaluation.probabilities, temperature).astype(np.float32)
    return evaluate_probabilities(evaluation.labels, probabilities, class_names)
