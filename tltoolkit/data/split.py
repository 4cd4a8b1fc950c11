"""Stratified, seeded train/validation split (scikit-learn's `train_test_split`)."""

from __future__ import annotations

import math
from collections import Counter

from sklearn.model_selection import train_test_split

from tltoolkit.errors import DataError

Item = tuple[str, int]


def stratified_split(
    items: list[Item], fraction: float, seed: int, class_names: list[str]
) -> tuple[list[Item], list[Item]]:
    """Splits `(path, label)` pairs so each class keeps its share in both parts.

    Args:
        items: `(path, label)` pairs.
        fraction: Share of each class held out for validation, in (0, 1).
        seed: The same seed gives the same split.
        class_names: For error messages.

    Returns:
        `(train, val)`, each sorted by path so the order does not depend on the split's shuffling.

    Raises:
        DataError: A class has fewer than 2 images, or the held-out part would miss a class.
    """
    counts = Counter(label for _, label in items)
    small = [f"{class_names[label]} ({count})" for label, count in sorted(counts.items()) if count < 2]
    if small:
        raise DataError(
            f"Classes {', '.join(small)} have fewer than 2 images, too few to split into train and validation; "
            "add images, or provide explicit train/ and val/ folders."
        )
    n_val = math.ceil(fraction * len(items))
    if n_val < len(counts) or len(items) - n_val < len(counts):
        raise DataError(
            f"data.val_split={fraction} holds out {n_val} of {len(items)} images, but each part needs at least one "
            f"image of each of the {len(counts)} classes; change data.val_split or add images."
        )
    labels = [label for _, label in items]
    train, val = train_test_split(items, test_size=n_val, stratify=labels, random_state=seed, shuffle=True)
    return sorted(train), sorted(val)


def grouped_split(
    items: list[Item], fraction: float, seed: int, class_names: list[str], groups
) -> tuple[list[Item], list[Item]]:
    """As `stratified_split`, with every group (near-duplicates) wholly on one side: scikit-learn's
    `StratifiedGroupKFold` with about `1 / fraction` folds, one of them held out.

    Raises:
        DataError: A class would be missing from a part (groups too large for this fraction).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    labels = [label for _, label in items]
    folds = max(2, round(1 / fraction))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    train_rows, val_rows = next(splitter.split(items, labels, groups))
    train, val = [items[i] for i in train_rows], [items[i] for i in val_rows]
    for part, chosen in (("train", train), ("val", val)):
        missing = sorted(set(labels) - {label for _, label in chosen})
        if missing:
            raise DataError(
                f"data.split_by_duplicates: keeping near-duplicates together leaves {part} without any image of "
                f"{', '.join(class_names[m] for m in missing)}; lower data.duplicate_similarity's reach (raise it) "
                "or add images."
            )
    return sorted(train), sorted(val)
