"""Data quality, what `tltoolkit audit` (`tltoolkit.commands.audit`) reports: embeddings of every image, label issues
(confident learning), near-duplicates and leakage across the split, outliers; `run` uses its duplicate groups for
`data.split_by_duplicates`."""

from tltoolkit.quality.embeddings import Embeddings, embed, normalise
from tltoolkit.quality.labels import LabelIssues, label_issues, out_of_sample_probabilities
from tltoolkit.quality.neighbours import (
    Neighbours,
    duplicate_pairs,
    groups,
    near_duplicates,
    nearest,
    outlier_scores,
    outliers,
)

__all__ = [
    "Embeddings",
    "LabelIssues",
    "Neighbours",
    "duplicate_pairs",
    "embed",
    "groups",
    "label_issues",
    "near_duplicates",
    "nearest",
    "normalise",
    "out_of_sample_probabilities",
    "outlier_scores",
    "outliers",
]
