"""Checking an exported artifact against the Keras model it came from, on held-out images.

For each split (val, and test where the data has one) both run on the same images: the report gives the artifact's
accuracy beside Keras's, their top-1 agreement and the largest difference of any class probability; then file
sizes and latency per image (batch 1, median) of both on this machine. A float export must match Keras within
`tolerance` on every probability (else `ExportError`); a quantized one reports its accuracy drop instead.

With resizing in the graph, the artifact gets each image at its own size and resizes it (bilinear); the report then
also compares it with the Keras model on the training pipeline's resizing, which is what the option changes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tltoolkit.data.split import Item
from tltoolkit.deploy.formats import ExportSpec
from tltoolkit.errors import ExportError

_logger = logging.getLogger(__name__)

TOLERANCE = 1e-3  # Largest |probability difference| a float export may show against Keras.
_LATENCY_IMAGES = 20


@dataclass
class Verification:
    """The models and images to check: `keras` on pipeline-resized images is the reference; `graph` is the Keras
    model that was converted (the same model, or it behind in-graph resizing), `artifact` the exported file."""

    keras: object
    graph: object
    artifact: object  # An `ExportedModel`.
    spec: ExportSpec
    data_config: object  # The model's `DataConfig` (size, resize mode and filter).


def verify(check: Verification, splits: dict[str, list[Item]], artifact: Path, tolerance: float = TOLERANCE) -> dict:
    """Runs every split through Keras and the artifact; returns the report (see the module) as a JSON-ready dict.

    Raises:
        ExportError: A float export disagrees with Keras by more than `tolerance`.
    """
    report = {
        "artifact": check.spec.label,
        "format": check.spec.format,
        "quantize": check.spec.quantize,
        "resize_in_graph": check.spec.resize_in_graph,
        "tolerance": tolerance,
        "size_bytes": size_of(artifact),
        "splits": {},
    }
    tf_logger = logging.getLogger("tensorflow")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # Batch-1 and any-size calls retrace Keras's predict step, which TF warns of.
    try:
        for split, items in splits.items():
            if items:
                report["splits"][split] = _check_split(check, _sample(items, split))
        first = next(iter(splits.values()))
        report["latency_ms"] = _latency(check, [path for path, _ in first[:_LATENCY_IMAGES]])
    finally:
        tf_logger.setLevel(level)
    worst = max(row["conversion_max_abs_diff"] for row in report["splits"].values())
    report["passed"] = bool(worst <= tolerance) if check.spec.is_float else True
    if check.spec.is_float and not report["passed"]:
        raise ExportError(
            f"The {check.spec.label} export disagrees with the Keras model: a class probability differs by {worst:.2e} "
            f"(tolerance {tolerance:.0e}) on the held-out images. Nothing was written; please report this with the "
            "model and the versions of TensorFlow and the converter."
        )
    return report


MAX_IMAGES = 5_000  # Images per split verified at most (a seeded sample beyond): agreement is clear long before.


def _sample(items: list[Item], split: str) -> list[Item]:
    if len(items) <= MAX_IMAGES:
        return items
    keep = np.sort(np.random.default_rng(0).choice(len(items), MAX_IMAGES, replace=False))
    _logger.info("Verifying on a sample of %d of the %d %s images.", MAX_IMAGES, len(items), split)
    return [items[i] for i in keep]


def _check_split(check: Verification, items: list[Item]) -> dict:
    from tltoolkit.data.pipeline import image_batches
    from tltoolkit.model.inference import predict_images

    paths = [path for path, _ in items]
    labels = np.array([label for _, label in items])
    keras_p = np.asarray(predict_images(check.keras, paths, check.data_config))
    if check.spec.resize_in_graph:  # One original at a time: photos at their own size are large.
        artifact_p, graph_p = [], []
        for path in paths:
            original = _original(path)
            artifact_p.append(check.artifact.predict_batch(original))
            graph_p.append(np.asarray(check.graph.predict_on_batch(original)))
        artifact_p, graph_p = np.concatenate(artifact_p), np.concatenate(graph_p)
    else:
        artifact_p = check.artifact.predict(image_batches(paths, check.data_config))
        graph_p = keras_p
    keras_top, artifact_top = keras_p.argmax(axis=1), artifact_p.argmax(axis=1)
    return {
        "images": len(items),
        "keras_accuracy": float((keras_top == labels).mean()),
        "accuracy": float((artifact_top == labels).mean()),
        "accuracy_drop": float((keras_top == labels).mean() - (artifact_top == labels).mean()),
        "top1_agreement": float((keras_top == artifact_top).mean()),
        "max_abs_diff": float(np.abs(keras_p - artifact_p).max()),
        "conversion_max_abs_diff": float(np.abs(graph_p - artifact_p).max()),
    }


def _original(path: str) -> np.ndarray:
    """One image at its own size, as a float32 batch of one (what an in-graph-resizing artifact is given)."""
    from tltoolkit.data.images import read_image

    return np.asarray(read_image(path), dtype=np.float32)[None]


def _latency(check: Verification, paths: list[str]) -> dict:
    """Median milliseconds per image at batch 1, Keras (its compiled predict step) and the artifact, side by side."""
    from tltoolkit.data.pipeline import resized_images

    images = [image[None] for image in resized_images(paths, check.data_config).astype(np.float32)]
    timings = {"keras": [], "artifact": []}
    for image in images:
        for name, call in (("keras", check.keras.predict_on_batch), ("artifact", check.artifact.predict_batch)):
            start = time.perf_counter()
            call(image)
            timings[name].append(time.perf_counter() - start)
    # The first call of each builds its graph or allocates; it is not a steady-state latency.
    return {name: round(float(np.median(t[1:] if len(t) > 1 else t)) * 1000, 3) for name, t in timings.items()}


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def report_table(report: dict):
    """The report as a table: one row per split, artifact against Keras."""
    import pandas as pd

    rows = [
        {
            "artifact": report["artifact"],
            "split": split,
            "images": row["images"],
            "accuracy": row["accuracy"],
            "keras_accuracy": row["keras_accuracy"],
            "top1_agreement": row["top1_agreement"],
            "max_abs_diff": row["max_abs_diff"],
            "size_mb": report["size_bytes"] / 1e6,
            "ms_per_image": report["latency_ms"]["artifact"],
            "keras_ms_per_image": report["latency_ms"]["keras"],
        }
        for split, row in report["splits"].items()
    ]
    return pd.DataFrame(rows)
