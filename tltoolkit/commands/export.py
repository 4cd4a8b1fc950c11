"""`tltoolkit export`: a trained classifier as a SavedModel, a TFLite file or an ONNX file, verified before it is
published, with its labels and input contract beside it, and logged to the run that trained it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tltoolkit.deploy.formats import ExportSpec
from tltoolkit.deploy.verify import TOLERANCE
from tltoolkit.errors import ExportError

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportOptions:
    """The less common export settings.

    Attributes:
        resize_in_graph: The graph takes images of any size and resizes them (bilinear) instead of expecting
            already-resized pixels; see `docs/export.md` for what it changes.
        calibration_images: Training images that calibrate int8 activations (a seeded sample of the run's own
            training split).
        tolerance: Largest |probability difference| against Keras a float export may show.
    """

    resize_in_graph: bool = False
    calibration_images: int = 200
    tolerance: float = TOLERANCE


@dataclass
class ExportResult:
    """The export folder, its artifact, the metadata written beside it and the verification report."""

    folder: Path
    artifact: Path
    metadata: object  # ExportMetadata
    report: dict = field(default_factory=dict)


def export(
    model: str | Path,
    format: str = "tflite",
    quantize: str = "none",
    output: str | Path | None = None,
    data: str | Path | None = None,
    tracking_uri: str | None = None,
    overwrite: bool = False,
    options: ExportOptions | None = None,
) -> ExportResult:
    """Exports a classifier, verifies the artifact against the Keras model, and logs both to the source run.

    Args:
        model: A run id (or prefix), `runs:/` or `models:/` URI, MLflow model folder or `.keras` file.
        format: `saved_model`, `tflite` or `onnx` (needs `pip install 'tltoolkit[onnx]'`).
        quantize: For `tflite`: `none`, `float16`, `dynamic` or `int8`; other formats take `none`.
        output: The folder to write. Defaults to `exports/<run or file name>-<format>[-<quantize>]`.
        data: The image folder the model was trained on. Defaults to the one recorded in the model's recipe; the
            run's own split is rebuilt from it (seed, val_split), so val/test images verify and training images
            calibrate. A `.keras` file carries no recipe: its `--data` folder is used whole for both.
        tracking_uri: MLflow store, to resolve run ids and log the export. Defaults as for `run`.
        overwrite: Replace `output` if it exists (else that is an error, before any work).
        options: `ExportOptions` (in-graph resizing, calibration image count, tolerance).

    Returns:
        An `ExportResult`; `report` is also `report.json` in the folder and `export/report.json` on the run.

    Raises:
        ExportError: Bad format or quantization, `output` exists, a converter cannot take a layer (named), or a float
            export disagrees with Keras. Nothing is left half-written: the folder appears only when all passed.
    """
    options = options or ExportOptions()
    spec = ExportSpec(format, quantize, options.resize_in_graph).check()
    if options.calibration_images < 1 or not options.tolerance > 0:
        raise ExportError(
            f"--calibration-images must be at least 1 (got {options.calibration_images}) and the tolerance positive "
            f"(got {options.tolerance})."
        )
    if output is not None:
        _check_output(Path(output), overwrite)
    import mlflow

    from tltoolkit.tracking.models import load_classifier
    from tltoolkit.tracking.store import resolve_tracking_uri

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    loaded = load_classifier(model)
    if loaded.export_format is not None:
        raise ExportError(
            f"{model} is already an exported {loaded.export_format} model; export from its run or its .keras file."
        )
    output = Path(output) if output is not None else Path("exports") / f"{_stem(loaded)}-{spec.label}"
    _check_output(output, overwrite)
    splits, calibration = _images(loaded, data, options.calibration_images)
    result = _write(loaded, spec, splits, calibration, output, options)
    if loaded.run_id:
        _log_to_run(loaded.run_id, result)
    else:
        _logger.info("Not logged to MLflow: %s comes from no run (a run id or models:/ URI would be).", model)
    return result


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ExportError(f"Output folder {output} already exists; choose another with -o, or pass --overwrite.")
    if output.exists() and not output.is_dir():
        raise ExportError(f"Output {output} is a file; export writes a folder. Choose another path with -o.")


def _stem(loaded) -> str:
    if loaded.run_id:
        return loaded.run_id[:8]
    return Path(loaded.source).stem or "model"


def _images(loaded, data, count: int) -> tuple[dict, list[str]]:
    """Held-out images by split (to verify) and training images (to calibrate int8), as the run split them."""
    import yaml

    from tltoolkit.data import labelled_images
    from tltoolkit.quality.grouping import recipe_folder
    from tltoolkit.recipe import load_recipe

    recipe = load_recipe(yaml.safe_load(loaded.recipe_yaml), check_search=False) if loaded.recipe_yaml else None
    folder_path = data or (recipe.data.dir if recipe else None)
    if not folder_path:
        raise ExportError(
            f"Verifying the export needs labelled images and {loaded.source} records no data folder: pass --data DIR "
            "(class subfolders, or train/ + val/ [+ test/])."
        )
    if not Path(folder_path).expanduser().is_dir():
        raise ExportError(
            f"The image folder {folder_path} (the one the model was trained on) does not exist here; pass --data DIR "
            "with the same images."
        )
    if recipe is None:  # No recipe, no split to rebuild: the folder's evaluation images serve both purposes.
        items, _ = labelled_images(folder_path, loaded.class_names, progress=False)
        _logger.info(
            "No recipe with %s: verifying on and calibrating with all %d images of %s.",
            loaded.source,
            len(items),
            folder_path,
        )
        return {"val": items}, [path for path, _ in items][:count]
    folder = recipe_folder(recipe, folder_path, progress=False)  # The run's split: exclusions, duplicate groups.
    if folder.class_names != loaded.class_names:
        raise ExportError(
            f"{folder_path} has classes {folder.class_names} but the model has {loaded.class_names}; pass --data with "
            "the folder it was trained on."
        )
    train = [path for path, _ in folder.parts["train"]]
    order = np.random.default_rng(recipe.seed).permutation(len(train))[:count]
    splits = {part: folder.parts[part] for part in ("val", "test") if folder.parts.get(part)}
    return splits, [train[i] for i in sorted(order)]


def _write(loaded, spec: ExportSpec, splits: dict, calibration: list[str], output: Path, options) -> ExportResult:
    """Converts into a hidden folder beside `output`, verifies, then moves it into place."""
    from tltoolkit.deploy.artifacts import ExportedModel, write_sidecars
    from tltoolkit.deploy.verify import Verification, report_table, verify

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        graph = _convert(loaded, spec, staging, calibration)
        metadata = _metadata(loaded, spec)
        write_sidecars(staging, metadata)
        artifact = staging / metadata.artifact
        check = Verification(loaded.model, graph, ExportedModel(artifact, spec.format), spec, loaded.data_config())
        _logger.info("Verifying %s on %s ...", spec.label, ", ".join(f"{len(v)} {k}" for k, v in splits.items()))
        report = verify(check, splits, artifact, options.tolerance)
        report["calibration_images"] = len(calibration) if spec.quantize == "int8" else 0
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _logger.info("Exported %s to %s\n%s", spec.label, output, report_table(report).to_string(index=False))
    return ExportResult(output, output / metadata.artifact, metadata, report)


def _convert(loaded, spec: ExportSpec, folder: Path, calibration: list[str]):
    """Writes the artifact into `folder`; returns the Keras model that was converted."""
    from tltoolkit.deploy import formats

    graph = formats.graph_model(loaded.model, loaded.resize, spec.resize_in_graph)
    _logger.info("Converting to %s ...", spec.label)
    if spec.format == "onnx":
        formats.write_onnx(graph, folder / "model.onnx")
        return graph
    saved = folder / "saved_model"
    if spec.format == "tflite":
        saved = Path(tempfile.mkdtemp(prefix="tltoolkit-export-"))
    try:
        formats.write_saved_model(graph, saved)
        if spec.format == "tflite":
            representative = _representative(loaded, calibration)
            formats.write_tflite(graph, folder / "model.tflite", spec.quantize, saved, representative)
    finally:
        if spec.format == "tflite":
            shutil.rmtree(saved, ignore_errors=True)
    return graph


def _representative(loaded, paths: list[str]):
    """Single-image float32 batches of the calibration images, resized as training did."""
    from tltoolkit.data.pipeline import resized_images

    def images():
        for image in resized_images(paths, loaded.data_config()):
            yield image[None].astype(np.float32)

    return images if paths else None


def _metadata(loaded, spec: ExportSpec):
    import tltoolkit
    from tltoolkit.deploy.artifacts import ExportMetadata

    digest = hashlib.sha256(loaded.recipe_yaml.encode()).hexdigest() if loaded.recipe_yaml else None
    return ExportMetadata(
        format=spec.format,
        quantize=spec.quantize,
        class_names=list(loaded.class_names),
        image_size=loaded.image_size,
        resize=loaded.resize,
        interpolation=loaded.interpolation,
        resize_in_graph=spec.resize_in_graph,
        run_id=loaded.run_id,
        recipe_sha256=digest,
        tltoolkit_version=tltoolkit.__version__,
    )


def _log_to_run(run_id: str, result: ExportResult) -> None:
    """The folder under `export/<label>/` of the run, and `export/report.json`: every export of the run so far."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    label = result.report["artifact"]
    client.log_artifacts(run_id, str(result.folder), f"export/{label}")
    reports = {}
    try:
        reports = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/export/report.json"))
    except Exception:  # The run's first export: no report yet.
        reports = {}
    reports[label] = result.report
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.json"
        path.write_text(json.dumps(reports, indent=2) + "\n")
        client.log_artifact(run_id, str(path), "export")
    _logger.info("Logged to run %s under export/%s (and export/report.json).", run_id, label)
