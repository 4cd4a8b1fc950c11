"""`data.split_by_duplicates`: near-duplicate images kept on one side of the train/val split, so validation never
scores an image whose twin was trained on."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from tltoolkit.data.split import grouped_split
from tltoolkit.quality.embeddings import embed
from tltoolkit.quality.neighbours import groups, near_duplicates, nearest

_logger = logging.getLogger(__name__)


def split_by_duplicates(folder, recipe, backbone):
    """`folder` with its val part split again so that no near-duplicate pair (the recipe's `duplicate_similarity`
    on `backbone`'s embeddings) crosses train and val; `folder.duplicates` counts what was found. A val/ folder the
    user gave is not moved: the pairs crossing it are reported instead.

    Returns:
        The `ImageFolder` to train on.
    """
    data = recipe.data
    if folder.val_split_here:
        pool = sorted(folder.parts["train"] + folder.parts["val"])
        pairs, ids = _pairs(backbone, pool, recipe)
        before = {path for path, _ in folder.parts["val"]}
        crossed = sum((pool[a][0] in before) != (pool[b][0] in before) for a, b, _ in pairs)
        train, val = grouped_split(pool, data.val_split, recipe.seed, folder.class_names, ids)
        counts = {
            "duplicate_pairs": len(pairs),
            "duplicate_groups": int(np.sum(np.bincount(ids) > 1)),
            "leaking_pairs_avoided": int(crossed),
        }
        _logger.info(
            "data.split_by_duplicates: %d near-duplicate pair(s) in %d group(s) kept on one side of the split (%d "
            "pair(s) would have crossed it); train %d, val %d.",
            len(pairs),
            counts["duplicate_groups"],
            crossed,
            len(train),
            len(val),
        )
        return replace(folder, parts={**folder.parts, "train": train, "val": val}, duplicates=counts)
    items = [item for part in folder.parts.values() for item in part]
    splits = [part for part, part_items in folder.parts.items() for _ in part_items]
    pairs, _ = _pairs(backbone, items, recipe)
    leaking = [(a, b) for a, b, _ in pairs if splits[a] != splits[b]]
    if leaking:
        a, b = leaking[0]
        _logger.warning(
            "data.split_by_duplicates: %d near-duplicate pair(s) cross the train/val/test folders you gave (e.g. "
            "%s and %s); they are not moved (the folders are your split): `tltoolkit audit` lists them all.",
            len(leaking),
            items[a][0],
            items[b][0],
        )
    return replace(folder, duplicates={"duplicate_pairs": len(pairs), "leaking_pairs": len(leaking)})


def _pairs(backbone, items, recipe):
    embeddings = embed(backbone, items, recipe.data, recipe.backbone.weights)
    paths = [path for path, _ in items]
    pairs = near_duplicates(nearest(embeddings.vectors, seed=recipe.seed), paths, recipe.data.duplicate_similarity)
    return pairs, groups(len(items), pairs)


def recipe_folder(recipe, data_dir, backbone=None, progress: bool = True):
    """The folder a recipe trains on: scanned and split (`prepare_data`), `data.exclude` left out, near-duplicates
    kept together with `data.split_by_duplicates` (on `backbone`, built from the recipe if not given)."""
    from tltoolkit.data import prepare_data

    folder = prepare_data(data_dir, recipe.data.val_split, recipe.seed, progress=progress, exclude=recipe.data.exclude)
    if recipe.data.split_by_duplicates:
        if backbone is None:
            import keras

            from tltoolkit.stages.session import backbone_for

            keras.utils.set_random_seed(recipe.seed)
            backbone = backbone_for(recipe)
        folder = split_by_duplicates(folder, recipe, backbone)
    return folder
