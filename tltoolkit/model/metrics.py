"""Scoring a classifier's predictions: accuracy, loss, top-k, confusion matrix, per-class report (scikit-learn)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    log_loss,
    top_k_accuracy_score,
)

TOP_K = 5


@dataclass
class Evaluation:
    metrics: dict[str, float]  # accuracy, loss, macro_f1, and top5_accuracy with more than 5 classes.
    confusion: np.ndarray  # Counts, true classes as rows.
    report: pd.DataFrame  # Per-class precision, recall, f1, support.
    labels: np.ndarray
    probabilities: np.ndarray


def evaluate_probabilities(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> Evaluation:
    """Scores `probabilities` (N, classes) against integer `labels` (N,)."""
    all_labels = list(range(len(class_names)))
    predicted = probabilities.argmax(axis=1)
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "loss": float(log_loss(labels, np.clip(probabilities, 1e-7, 1.0), labels=all_labels)),
        "macro_f1": float(f1_score(labels, predicted, labels=all_labels, average="macro", zero_division=0)),
    }
    if len(class_names) > TOP_K:
        metrics[f"top{TOP_K}_accuracy"] = float(top_k_accuracy_score(labels, probabilities, k=TOP_K, labels=all_labels))
    report = classification_report(
        labels, predicted, labels=all_labels, target_names=class_names, output_dict=True, zero_division=0
    )
    return Evaluation(
        metrics=metrics,
        confusion=confusion_matrix(labels, predicted, labels=all_labels),
        report=pd.DataFrame(report).T.rename_axis("class").reset_index(),
        labels=np.asarray(labels),
        probabilities=probabilities,
    )


def evaluate_items(items: list[tuple[str, int]], probabilities: np.ndarray, class_names: list[str]) -> Evaluation:
    """Scores `probabilities` for `(path, label)` items (as `prepare_data` gives them), row for row."""
    return evaluate_probabilities(np.array([label for _, label in items]), probabilities, class_names)


def reconstruction_error(reconstructed: np.ndarray, pixels: np.ndarray, loss: str = "mse") -> np.ndarray:
    """Per-image reconstruction error: mean squared (`mse`) or absolute (`mae`) difference, pixels scaled to [0, 1].

    Args:
        reconstructed: `(n, h, w, 3)` decoder outputs in [0, 1].
        pixels: `(n, h, w, 3)` the images, 0-255.
    """
    difference = np.asarray(reconstructed, dtype=np.float64) - np.asarray(pixels, dtype=np.float64) / 255.0
    return np.mean(difference**2 if loss == "mse" else np.abs(difference), axis=(1, 2, 3))
