"""Scoring a classifier's predictions: accuracy, loss, top-k, confusion matrix, per-class report (scikit-learn);
calibration: expected calibration error and temperature scaling.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar fitted to minimise the validation log loss.
The classifier outputs probabilities, and `log p` are logits up to a per-row constant that softmax ignores, so the
temperature is fitted on the probabilities a model already produced, with SciPy's bounded scalar minimiser.
scikit-learn's calibrators fit estimators it trains, not a network's outputs, hence these few lines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

TOP_K = 5


@dataclass
class Evaluation:
    metrics: dict[str, float]  # accuracy, loss, macro_f1, ece, and top5_accuracy with more than 5 classes.
    confusion: np.ndarray  # Counts, true classes as rows.
    report: pd.DataFrame  # Per-class precision, recall, f1, support.
    labels: np.ndarray
    probabilities: np.ndarray
    tta: Evaluation | None = None  # The same images scored with test-time augmentation, where asked for.


def evaluate_probabilities(labels: np.ndarray, probabilities: np.ndarray, class_names: list[str]) -> Evaluation:
    """Scores `probabilities` (N, classes) against integer `labels` (N,)."""
    all_labels = list(range(len(class_names)))
    predicted = probabilities.argmax(axis=1)
    metrics = {
        "accuracy": float(accuracy_score(labels, predicted)),
        "loss": float(log_loss(labels, np.clip(probabilities, 1e-7, 1.0), labels=all_labels)),
        "macro_f1": float(f1_score(labels, predicted, labels=all_labels, average="macro", zero_division=0)),
        "ece": expected_calibration_error(labels, probabilities),
    }
    if len(class_names) > TOP_K:
        metrics[f"top{TOP_K}_accuracy"] = float(top_k_accuracy_score(labels, probabilities, k=TOP_K, labels=all_labels))
    return Evaluation(
        metrics=metrics,
        confusion=confusion_matrix(labels, predicted, labels=all_labels),
        report=per_class_report(labels, predicted, class_names),
        labels=np.asarray(labels),
        probabilities=probabilities,
    )


def per_class_report(labels: np.ndarray, predicted: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """Precision, recall, f1-score and support per class, then the `accuracy`, `macro avg` and `weighted avg` rows,
    as scikit-learn's classification report; column `row` says which rows are classes, so a class named `accuracy`
    or `macro avg` is its own row (scikit-learn's dict output would let the summary overwrite it).

    Example:
        >>> per_class_report(np.array([0, 1]), np.array([0, 0]), ["accuracy", "b"])[["class", "row", "recall"]]
                  class      row  recall
        0      accuracy    class     1.0
        1             b    class     0.0
        2      accuracy  summary     0.5
        3     macro avg  summary     0.5
        4  weighted avg  summary     0.5
    """
    all_labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=all_labels, zero_division=0
    )
    table = pd.DataFrame(
        {
            "class": class_names,
            "row": "class",
            "precision": precision,
            "recall": recall,
            "f1-score": f1,
            "support": support,
        }
    )
    total = int(support.sum())
    accuracy = float(accuracy_score(labels, predicted)) if total else 0.0
    weights = support / max(total, 1)
    summary = pd.DataFrame(
        [
            {"class": "accuracy", "precision": accuracy, "recall": accuracy, "f1-score": accuracy, "support": total},
            {
                "class": "macro avg",
                "precision": precision.mean(),
                "recall": recall.mean(),
                "f1-score": f1.mean(),
                "support": total,
            },
            {
                "class": "weighted avg",
                "precision": (precision * weights).sum(),
                "recall": (recall * weights).sum(),
                "f1-score": (f1 * weights).sum(),
                "support": total,
            },
        ]
    ).assign(row="summary")
    return pd.concat([table, summary], ignore_index=True)


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


ECE_BINS = 15
TEMPERATURE_BOUNDS = (0.05, 20.0)


def with_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """`softmax(log(p) / T)`: the probabilities a classifier gives once its logits are divided by `temperature`.

    Example:
        >>> with_temperature(np.array([[0.8, 0.2]]), 2.0).round(3)
        array([[0.667, 0.333]])
    """
    logits = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """The temperature that minimises the log loss of `probabilities` on integer `labels` (within 0.05-20), or
    `None` when every prediction is right (or every one wrong): the loss then keeps falling as the temperature
    goes to 0 (or infinity), and any value found would only overfit the split."""
    right = probabilities.argmax(axis=1) == labels
    if right.all() or not right.any():
        return None
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-np.log(with_temperature(probabilities, float(np.exp(log_t)))[rows, labels] + 1e-12).mean())

    low, high = np.log(TEMPERATURE_BOUNDS)
    return float(np.exp(minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4}).x))


def reliability(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """Top-1 confidence in `bins` equal-width bins: images, mean confidence and accuracy per bin (empty bins kept)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "images": int(mask.sum()),
                "confidence": float(confidence[mask].mean()) if mask.any() else np.nan,
                "accuracy": float(correct[mask].mean()) if mask.any() else np.nan,
            }
        )
    return pd.DataFrame(rows)


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the image-weighted mean |accuracy - confidence| over top-1 confidence bins (0 = perfectly calibrated).

    Example:
        >>> expected_calibration_error(np.array([0, 1]), np.array([[0.9, 0.1], [0.9, 0.1]]))
        0.4
    """
    table = reliability(labels, probabilities, bins)
    used = table[table.images > 0]
    return float((used.images * (used.accuracy - used.confidence).abs()).sum() / max(1, len(labels)))
