"""`tltoolkit predict`: class probabilities for image files and folders, as a CSV table."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def predict(
    model: str | Path,
    paths: list[str | Path],
    top_k: int = 3,
    output: str | Path | None = None,
    tracking_uri: str | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Predicts the classes of images.

    Args:
        model: A run id, `runs:/` or `models:/` URI, MLflow model folder or `.keras` file.
        paths: Image files and folders (searched at any depth).
        top_k: Classes reported per image, most probable first. Defaults to 3.
        output: Write the CSV here. Defaults to printing it on stdout.
        tracking_uri: MLflow store, to resolve run ids. Defaults as for `run`.
        batch_size: Images per batch. Defaults to 32.

    Returns:
        One row per readable image: `path`, then `class_1`, `probability_1`, ... `class_k`, `probability_k`.
        Unreadable files are reported on stderr with the reason.
    """
    import mlflow
    import numpy as np

    from tltoolkit.data import image_files
    from tltoolkit.data.pipeline import image_batches
    from tltoolkit.recipe import DataConfig
    from tltoolkit.tracking.models import load_classifier
    from tltoolkit.tracking.store import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    loaded = load_classifier(model)
    found = image_files(list(paths), progress=False)
    for item in found.skipped:
        print(f"Skipped {item.path}: {item.reason}", file=sys.stderr)
    config = DataConfig(image_size=loaded.image_size, resize=loaded.resize, batch_size=batch_size, cache=False)
    probabilities = loaded.model.predict(image_batches(found.images, config), verbose=0)
    k = max(1, min(top_k, len(loaded.class_names)))
    order = np.argsort(-probabilities, axis=1)[:, :k]
    table = pd.DataFrame({"path": found.images})
    names = np.array(loaded.class_names)
    for rank in range(k):
        table[f"class_{rank + 1}"] = names[order[:, rank]]
        table[f"probability_{rank + 1}"] = np.take_along_axis(probabilities, order[:, rank : rank + 1], axis=1)[:, 0]
    if output:
        table.to_csv(output, index=False, float_format="%.6f")
        print(f"Wrote {len(table)} predictions to {output}.", file=sys.stderr)
    return table
