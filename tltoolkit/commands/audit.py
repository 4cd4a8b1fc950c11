"""`tltoolkit audit`: what is wrong with an image folder before (and after) training: likely wrong labels,
near-duplicates (those across the train/val/test split leak), and outliers that belong to no class.

One extraction pass of the recipe's backbone gives pooled embeddings (`tltoolkit.quality.embeddings`, cached as the
feature cache is); label issues come from cross-validated linear heads ranked by confident learning
(`tltoolkit.quality.labels`), duplicates and outliers from nearest neighbours (`tltoolkit.quality.neighbours`). The
CSVs, JPEG galleries and a summary land in the output folder and in an MLflow run (`tltoolkit.kind=audit`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tltoolkit.recipe import Recipe, as_recipe

_logger = logging.getLogger(__name__)

# Without a recipe: MobileNetV2 with its offline ImageNet weights, at its own size.
DEFAULT_RECIPE = {"backbone": {"name": "mobilenet_v2", "weights": "torchvision"}}
GALLERY = 16  # Images (pairs) a gallery shows at most.


@dataclass
class AuditResult:
    """What `audit` found and where it wrote it."""

    images: pd.DataFrame  # Every image: path, split, given, suggested, score, label_issue, outlier_score, outlier.
    label_issues: pd.DataFrame  # path, given, suggested, score: the flagged ones, most likely wrong first.
    duplicates: pd.DataFrame  # path_a, path_b, similarity, split_a, split_b: most similar first.
    outliers: pd.DataFrame  # path, class, split, score, nearest, nearest_similarity: farthest first.
    summary: dict[str, float]  # Counts, the estimated noise rate, timings.
    output: Path
    run_id: str | None = None
    text: str = ""  # The summary as printed.
    class_names: list[str] = field(default_factory=list)

    @property
    def leaks(self) -> pd.DataFrame:
        """The duplicate pairs that cross the split."""
        return self.duplicates[self.duplicates.split_a != self.duplicates.split_b]


def audit(
    data: str | Path,
    recipe: Recipe | str | Path | dict | None = None,
    output: str | Path | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    overrides: Iterable[str] = (),
    log: bool = True,
    duplicate_similarity: float | None = None,
) -> AuditResult:
    """Audits an image folder: label issues, near-duplicates (and leakage across the split), outliers.

    Args:
        data: The image folder (class subfolders, or train/ + val/ [+ test/]); every part is audited, split as `run`
            would split it (the recipe's `data.val_split` and `seed`).
        recipe: Whose backbone, weights, image size and memory budget to use. Defaults to MobileNetV2 with its
            offline ImageNet weights.
        output: Folder for the CSVs and galleries. Defaults to `audit-<folder name>`.
        tracking_uri: MLflow store. Defaults as for `run`.
        experiment: MLflow experiment. Defaults to the recipe's `tracking.experiment`.
        overrides: `dotted.path=value` strings for the recipe.
        log: Log an MLflow run with the summary, CSVs and galleries. Defaults to `True`.
        duplicate_similarity: Cosine similarity from which two images are near-duplicates. Defaults to the
            recipe's `data.duplicate_similarity`.

    Returns:
        An `AuditResult`.

    Raises:
        DataError: The folder has one class, or a class with a single image.
    """
    import tltoolkit.quality  # noqa: F401  (TensorFlow and scikit-learn load before the clock starts)
    from tltoolkit.data import prepare_data
    from tltoolkit.data.scan import require_folder

    recipe = as_recipe(recipe if recipe is not None else DEFAULT_RECIPE, list(overrides), check_search=False)
    threshold = duplicate_similarity if duplicate_similarity is not None else recipe.data.duplicate_similarity
    require_folder(data)
    started = time.perf_counter()
    folder = prepare_data(data, recipe.data.val_split, recipe.seed, exclude=recipe.data.exclude)
    found = _analyse(recipe, folder, threshold, {"scan_s": time.perf_counter() - started})
    output = Path(output) if output else Path(f"audit-{Path(data).resolve().name}")
    result = _report(found, folder, recipe, output, threshold, started)
    if log:
        result.run_id = _log(result, recipe, folder, tracking_uri, experiment)
        _logger.info("Logged as MLflow run %s (the CSVs and galleries under audit/).", result.run_id)
    return result


@dataclass
class _Found:
    items: list
    splits: list[str]
    embeddings: object
    labels: object
    neighbours: object
    pairs: list
    outlier_scores: np.ndarray
    outliers: np.ndarray
    seconds: dict  # Each step's wall time: scan_s, backbone_s, extraction_s, labels_s, neighbours_s.


def _analyse(recipe: Recipe, folder, threshold: float, seconds: dict) -> _Found:
    from tltoolkit.quality import embed, label_issues, near_duplicates, nearest, out_of_sample_probabilities
    from tltoolkit.quality.neighbours import outlier_scores, outliers
    from tltoolkit.stages.session import backbone_for

    items = [item for part in folder.parts.values() for item in part]
    splits = [part for part, part_items in folder.parts.items() for _ in part_items]
    labels = np.array([label for _, label in items])
    import keras

    keras.utils.set_random_seed(recipe.seed)  # A backbone without pretrained weights is the same every time.
    clock = time.perf_counter()
    backbone = backbone_for(recipe)
    seconds["backbone_s"] = time.perf_counter() - clock
    embeddings = embed(backbone, items, recipe.data, recipe.backbone.weights)
    seconds["extraction_s"] = embeddings.extraction_s
    clock = time.perf_counter()
    probabilities = out_of_sample_probabilities(embeddings.depths, labels, folder.class_names, recipe.seed)
    issues = label_issues(probabilities, labels)
    seconds["labels_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    neighbours = nearest(embeddings.vectors, seed=recipe.seed)
    pairs = near_duplicates(neighbours, [path for path, _ in items], threshold)
    scores = outlier_scores(neighbours)
    seconds["neighbours_s"] = time.perf_counter() - clock
    return _Found(items, splits, embeddings, issues, neighbours, pairs, scores, outliers(scores), seconds)


def _report(found: _Found, folder, recipe: Recipe, output: Path, threshold: float, started: float) -> AuditResult:
    names = np.array(folder.class_names, dtype=object)
    paths = [path for path, _ in found.items]
    given = np.array([label for _, label in found.items])
    suggested = found.labels.probabilities.argmax(axis=1)
    flagged = np.zeros(len(paths), bool)
    flagged[found.labels.issues] = True
    images = pd.DataFrame(
        {
            "path": paths,
            "split": found.splits,
            "given": names[given],
            "suggested": names[suggested],
            "score": found.labels.scores,
            "label_issue": flagged,
            "outlier_score": found.outlier_scores,
            "outlier": found.outliers,
        }
    )
    issues = images.iloc[found.labels.issues][["path", "given", "suggested", "score"]].reset_index(drop=True)
    duplicates = pd.DataFrame(
        [(paths[a], paths[b], round(s, 6), found.splits[a], found.splits[b]) for a, b, s in found.pairs],
        columns=["path_a", "path_b", "similarity", "split_a", "split_b"],
    )
    order = np.argsort(-found.outlier_scores, kind="stable")
    chosen = [i for i in order if found.outliers[i]]
    outliers = pd.DataFrame(
        {
            "path": [paths[i] for i in chosen],
            "class": [names[given[i]] for i in chosen],
            "split": [found.splits[i] for i in chosen],
            "score": [float(found.outlier_scores[i]) for i in chosen],
            "nearest": [paths[int(found.neighbours.indices[i, 0])] for i in chosen],
            "nearest_similarity": [float(found.neighbours.similarities[i, 0]) for i in chosen],
        }
    )
    summary = {
        "images": len(paths),
        "classes": folder.num_classes,
        "label_issues": len(issues),
        "label_noise_rate": round(found.labels.noise_rate, 4),
        "duplicate_pairs": len(duplicates),
        "leaking_pairs": int((duplicates.split_a != duplicates.split_b).sum()),
        "pixel_confirmed_pairs": int((duplicates.similarity < threshold).sum()),
        "outliers": len(outliers),
    }
    result = AuditResult(images, issues, duplicates, outliers, summary, output, class_names=list(folder.class_names))
    clock = time.perf_counter()
    _write(result, recipe)
    found.seconds["report_s"] = time.perf_counter() - clock
    summary.update({key: round(value, 2) for key, value in found.seconds.items()})
    summary["audit_s"] = round(time.perf_counter() - started, 2)  # Scan to galleries: all but the MLflow run.
    result.text = _summary_text(result, folder, recipe, found, threshold)
    _logger.info("%s", result.text)
    return result


def _summary_text(result: AuditResult, folder, recipe: Recipe, found: _Found, threshold: float) -> str:
    s, out = result.summary, result.output
    parts = ", ".join(f"{part} {len(items)}" for part, items in folder.parts.items())
    search = "exact" if found.neighbours.exact else "approximate (inverted file)"
    return "\n".join(
        [
            f"Audit of {folder.root}: {s['images']} images, {s['classes']} classes ({parts}); "
            f"{recipe.backbone.name} ({recipe.backbone.weights}) at {recipe.data.image_size} px.",
            f"  Label issues: {s['label_issues']} image(s) flagged by confident learning; estimated label noise "
            f"{100 * s['label_noise_rate']:.1f}% ({out / 'label_issues.csv'}, label_issues.jpg).",
            f"  Near-duplicates: {s['duplicate_pairs']} pair(s) at cosine similarity >= {threshold:g} ({search}; "
            f"{s['pixel_confirmed_pairs']} just below it with matching pixels), "
            f"{s['leaking_pairs']} across the split: leakage ({out / 'duplicates.csv'}, duplicates.jpg).",
            f"  Outliers: {s['outliers']} image(s) far from all others ({out / 'outliers.csv'}, outliers.jpg).",
            f"  Time: {s['audit_s']:.1f} s in all: scan {s['scan_s']:.1f}, backbone {s['backbone_s']:.1f}, "
            f"embeddings {s['extraction_s']:.1f} ({found.embeddings.where}), label issues {s['labels_s']:.1f}, "
            f"neighbours {s['neighbours_s']:.1f}, files and galleries {s['report_s']:.1f}.",
            f"Leave images out of training with --set data.exclude={out / 'label_issues.csv'} (edit it first: keep "
            "the rows to leave out); keep near-duplicates on one side of the split with "
            "--set data.split_by_duplicates=true.",
        ]
    )


def _write(result: AuditResult, recipe: Recipe) -> None:
    """The CSVs and the galleries (JPEG: photographs) in `result.output`."""
    from tltoolkit.data.pipeline import resized_images
    from tltoolkit.tracking.plots import image_grid

    out = result.output
    out.mkdir(parents=True, exist_ok=True)
    result.label_issues.to_csv(out / "label_issues.csv", index=False, float_format="%.6f")
    result.duplicates.to_csv(out / "duplicates.csv", index=False, float_format="%.6f")
    result.outliers.to_csv(out / "outliers.csv", index=False, float_format="%.6f")
    result.images.to_csv(out / "images.csv", index=False, float_format="%.6f")
    issues = result.label_issues.head(GALLERY)
    pairs = result.duplicates.head(GALLERY // 2)
    odd = result.outliers.head(GALLERY)
    galleries = {
        "label_issues.jpg": (
            list(issues.path),
            [
                f"{Path(p).name}\n{g} -> {s}? ({v:.2f})"
                for p, g, s, v in issues[["path", "given", "suggested", "score"]].values
            ],
            "Likely wrong labels (given -> suggested, score), most likely first",
            None,
        ),
        "duplicates.jpg": (
            [p for a, b in pairs[["path_a", "path_b"]].values for p in (a, b)],
            [
                f"{Path(p).name} ({split})\nsimilarity {sim:.3f}"
                for a, b, sim, sa, sb in pairs.values
                for p, split in ((a, sa), (b, sb))
            ],
            "Near-duplicate pairs (red: across the split)",
            [sa != sb for _, _, _, sa, sb in pairs.values for _ in (0, 1)],
        ),
        "outliers.jpg": (
            list(odd.path),
            [f"{Path(p).name} ({c})\nscore {v:.3f}" for p, c, v in odd[["path", "class", "score"]].values],
            "Outliers: far from every other image",
            None,
        ),
    }
    for name, (paths, captions, title, marked) in galleries.items():
        images = list(resized_images(paths, recipe.data)) if paths else []
        image_grid(images, captions, title, 4, marked).save(out / name, quality=90)


def _log(result: AuditResult, recipe: Recipe, folder, tracking_uri: str | None, experiment: str | None) -> str:
    from mlflow.entities import Metric, Param

    from tltoolkit.tracking.reports import folder_run, log_skipped_files

    name = f"audit-{folder.root.resolve().name}"
    with folder_run(recipe, folder, tracking_uri, experiment, "audit", name, {"mlflow.note.content": result.text}) as (
        _,
        client,
        run_id,
    ):
        params = {
            "backbone.name": recipe.backbone.name,
            "backbone.weights": recipe.backbone.weights,
            "data.image_size": recipe.data.image_size,
            "data.val_split": recipe.data.val_split,
            "seed": recipe.seed,
            "data.duplicate_similarity": recipe.data.duplicate_similarity,
            "data.exclude": recipe.data.exclude,
        }
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in result.summary.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        client.log_artifacts(run_id, str(result.output), "audit")
        log_skipped_files(client, run_id, folder.skipped)
    return run_id
