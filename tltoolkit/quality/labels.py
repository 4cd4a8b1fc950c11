"""Label issues: out-of-sample class probabilities from a linear head cross-validated on the embeddings
(scikit-learn), ranked by confident learning (cleanlab's `find_label_issues`, Northcutt et al., 2021).

Each image's probabilities come from a logistic regression that never saw it (stratified K-fold), so an image whose
given label its look does not support gets a low probability for that label. Confident learning estimates, per
class, the probability above which the model is confident (the class's mean self-confidence), counts the images
confidently in another class (the confident joint), and flags that many of them, least confident in their label
first. The audit uses cleanlab for that step, rather than writing the method again.

The head is regularised more than the probe's (C = 0.1, not 1): the embeddings of every depth together have more
dimensions (2,288 for MobileNetV2) than most folders have images. With the planted flips of `bench/run.py audit`,
confident learning's flags were 0.89 precise instead of 0.79 on the digits and 0.51 instead of 0.41 on ants vs bees
(recall 0.97 and 0.96 instead of 0.99 and 1.0; the top 10% as good or better). The folds run with one BLAS thread:
after an extraction TensorFlow's threads still hold the cores, and BLAS's own threads, competing with them, made
the cross-validation 2-6x slower on 2 cores. Instead the folds run side by side in threads (one per core; NumPy
releases the GIL): 1.3x faster on the digits' 1,277 images on 2 cores (2.0 s -> 1.55 s), the same probabilities.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from tltoolkit.errors import DataError

_logger = logging.getLogger(__name__)
FOLDS = 5
REGULARISATION = 0.1  # scikit-learn's C: the inverse strength of the L2 penalty (see the module docstring).


@dataclass
class LabelIssues:
    """What confident learning finds."""

    probabilities: np.ndarray  # (images, classes) out-of-sample.
    scores: np.ndarray  # How likely each given label is wrong: 1 - its out-of-sample probability.
    issues: np.ndarray  # Indices of the flagged images, most likely wrong first.
    noise_rate: float  # Estimated share of wrong labels (cleanlab's off-diagonal count of the confident joint).


def out_of_sample_probabilities(vectors: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int = 0):
    """Class probabilities of every row from a logistic regression fitted on the other folds.

    Raises:
        DataError: Fewer than two classes, or a class with a single image (nothing to cross-validate against).
    """
    from joblib import parallel_backend
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    counts = np.bincount(labels, minlength=len(class_names))
    if (counts > 0).sum() < 2:
        raise DataError("The audit compares classes, but the folder has images of one class only; add another class.")
    small = [f"{class_names[c]!r} ({counts[c]})" for c in range(len(class_names)) if 0 < counts[c] < 2]
    if small:
        raise DataError(
            f"The audit cross-validates each class, but {', '.join(small)} ha{'s' if len(small) == 1 else 've'} a "
            "single image: add images of it, or remove the class folder."
        )
    folds = int(min(FOLDS, counts[counts > 0].min()))
    model = make_pipeline(StandardScaler(), LogisticRegression(C=REGULARISATION, max_iter=300))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    jobs = min(folds, os.cpu_count() or 1)
    with threadpool_limits(limits=1, user_api="blas"), parallel_backend("threading", n_jobs=jobs):
        probabilities = cross_val_predict(model, vectors, labels, cv=cv, method="predict_proba", n_jobs=jobs)
    full = np.zeros((len(labels), len(class_names)), np.float32)
    full[:, np.flatnonzero(counts > 0)] = probabilities  # Classes without images keep probability 0.
    return full


def label_issues(probabilities: np.ndarray, labels: np.ndarray) -> LabelIssues:
    """Confident learning on out-of-sample `probabilities` (cleanlab)."""
    from cleanlab.count import num_label_issues
    from cleanlab.filter import find_label_issues

    issues = find_label_issues(labels, probabilities, return_indices_ranked_by="self_confidence")
    scores = 1.0 - probabilities[np.arange(len(labels)), labels]
    noise = num_label_issues(labels, probabilities) / max(1, len(labels))
    return LabelIssues(probabilities, scores.astype(np.float32), np.asarray(issues, np.int64), float(noise))
