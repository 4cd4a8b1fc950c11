"""Temperature scaling of a trained classifier: fitted on its validation predictions, stored in its output layer.

The temperature lives in the `Classifier` layer's config, so it travels with the `.keras` file, the MLflow model
and every export, and `predict` applies it with no extra step. It divides the logits, so the predicted class never
changes; only the confidence does.

It is applied only where it helps images it was not fitted on: a temperature fitted on val always lowers val's own
log loss, so the decision is made on the val images cross-validated (fitted on four fifths, scored on the fifth
left out, each fifth in turn). The log line gives the log loss and the expected calibration error before and after,
whichever way they went: ECE's bins are noisy on a few hundred images and can rise while the log loss falls.
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
FOLDS = 5


@dataclass
class Calibration:
    """The fitted temperature and what it did on the validation split."""

    temperature: float
    images: int
    ece_before: float
    ece_after: float
    reliability_before: pd.DataFrame
    reliability_after: pd.DataFrame
    loss_before: float = float("nan")  # Val log loss without and with the temperature.
    loss_after: float = float("nan")
    held_out_before: float = float("nan")  # The same, cross-validated on val (what decided to apply it).
    held_out_after: float = float("nan")


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
    held_out_before, held_out_after = cross_validated_losses(labels, probabilities)
    ece = (expected_calibration_error(labels, probabilities), expected_calibration_error(labels, calibrated))
    losses = (log_loss_of(labels, probabilities), log_loss_of(labels, calibrated))
    if not held_out_after < held_out_before:
        _logger.info(
            "Not calibrating: a temperature fitted on val would not lower the log loss of val images it was not "
            "fitted on (cross-validated %.4f -> %.4f); expected calibration error stays %.4f.",
            held_out_before,
            held_out_after,
            ece[0],
        )
        return None
    result = Calibration(
        temperature,
        len(labels),
        *ece,
        reliability(labels, probabilities),
        reliability(labels, calibrated),
        *losses,
        held_out_before,
        held_out_after,
    )
    set_temperature(model, temperature)
    rose = (
        " (higher: its bins are noisy on this many images; the temperature lowers the log loss)"
        if ece[1] > ece[0]
        else ""
    )
    _logger.info(
        "Calibrated on %d val images: temperature %.3f; val log loss %.4f -> %.4f (cross-validated %.4f -> %.4f); "
        "expected calibration error %.4f -> %.4f%s.",
        len(labels),
        temperature,
        *losses,
        held_out_before,
        held_out_after,
        *ece,
        rose,
    )
    return result


def log_loss_of(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log probability of the true class."""
    picked = np.asarray(probabilities, np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def cross_validated_losses(labels: np.ndarray, probabilities: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Log loss on each held-out fold of val, without and with the temperature fitted on the other folds."""
    from sklearn.model_selection import KFold

    before, after = 0.0, 0.0
    for fit, held in KFold(FOLDS, shuffle=True, random_state=seed).split(labels):
        temperature = fit_temperature(labels[fit], probabilities[fit]) or 1.0
        share = len(held) / len(labels)
        before += share * log_loss_of(labels[held], probabilities[held])
        after += share * log_loss_of(labels[held], with_temperature(probabilities[held], temperature))
    return before, after


def rescored(evaluation: Evaluation, temperature: float, class_names: list[str]) -> Evaluation:
    """The evaluation of the same predictions at `temperature` (for scores computed before calibration)."""
    probabilities = with_temperature(evaluation.probabilities, temperature).astype(np.float32)
    return evaluate_probabilities(evaluation.labels, probabilities, class_names)
