"""`tltoolkit export`: every format and quantization written, verified against Keras, logged; the artifacts run in
`predict` and `evaluate`; bad input refused before any work and nothing left half-written."""

import json

import mlflow
import numpy as np
import pytest
from conftest import tiny_recipe, train_in_own_store, use_store
from mlflow import MlflowClient

import tltoolkit
from tltoolkit.cli import main
from tltoolkit.commands.evaluate import evaluate
from tltoolkit.commands.export import ExportOptions, _images, export
from tltoolkit.commands.predict import predict
from tltoolkit.data import prepare_data
from tltoolkit.deploy import ExportSpec
from tltoolkit.deploy.formats import unsupported_ops_message, write_saved_model, write_tflite
from tltoolkit.errors import ExportError, ModelLoadError
from tltoolkit.tracking.models import load_classifier

EXPORTS = [
    ("saved_model", "none"),
    ("tflite", "none"),
    ("tflite", "float16"),
    ("tflite", "dynamic"),
    ("tflite", "int8"),
    ("onnx", "none"),
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    recipe = tiny_recipe(head={"dropout": 0.3})  # Dropout must not reach any exported graph.
    return train_in_own_store(tmp_path_factory.mktemp("export"), recipe, per_class=8)


@pytest.fixture
def store(trained, monkeypatch):
    result, uri, data, root = trained
    use_store(uri, monkeypatch)
    return trained


@pytest.fixture(scope="module")
def exported(trained):
    """Every format and quantization, exported once from the run."""
    result, uri, _, root = trained
    mlflow.set_tracking_uri(uri)
    return {
        (fmt, q): export(result.run_id, fmt, q, root / "exports" / f"{fmt}-{q}", tracking_uri=uri) for fmt, q in EXPORTS
    }


def test_every_format_is_written_with_labels_and_metadata_and_verified(store, exported):
    result, *_ = store
    for (fmt, quantize), done in exported.items():
        files = sorted(p.name for p in done.folder.iterdir())
        assert files == sorted(["labels.txt", "metadata.json", "report.json", done.artifact.name]), fmt
        assert (done.folder / "labels.txt").read_text().splitlines() == result.class_names
        meta = json.loads((done.folder / "metadata.json").read_text())
        assert meta["class_names"] == result.class_names and meta["run_id"] == result.run_id
        assert meta["input"]["shape"] == [None, 32, 32, 3] and meta["input"]["value_range"] == [0, 255]
        assert (meta["resize"], meta["interpolation"], meta["quantize"]) == ("squash", "antialiased", quantize)
        assert len(meta["recipe_sha256"]) == 64
        report = json.loads((done.folder / "report.json").read_text())
        val = report["splits"]["val"]
        assert val["images"] == 6 and report["size_bytes"] > 0 and report["latency_ms"]["artifact"] > 0
        if quantize == "none":
            assert report["passed"] and val["conversion_max_abs_diff"] <= 1e-3, fmt
            assert val["top1_agreement"] == 1.0 and val["accuracy"] == val["keras_accuracy"], fmt
        else:
            assert 0 < val["max_abs_diff"] < 0.2, f"{quantize} changes the numbers a little, not wholesale"
    sizes = {q: exported[("tflite", q)].report["size_bytes"] for q in ("none", "float16", "dynamic", "int8")}
    assert sizes["float16"] < sizes["none"] and sizes["dynamic"] < sizes["float16"], sizes


def test_exports_are_logged_to_the_run(store, exported):
    result, uri, *_ = store
    client = MlflowClient(uri)
    logged = {item.path for item in client.list_artifacts(result.run_id, "export")}
    for done in exported.values():
        assert f"export/{done.report['artifact']}" in logged
    reports = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/export/report.json"))
    assert set(reports) == {"saved_model", "tflite", "tflite-float16", "tflite-dynamic", "tflite-int8", "onnx"}


def test_predict_and_evaluate_run_the_exported_artifact(store, exported, capsys):
    result, _, data, _ = store
    images = sorted(str(p) for p in data.rglob("*.png"))
    keras_table = predict(result.run_id, images)
    for (fmt, quantize), done in exported.items():
        for ref in (done.folder, done.artifact):
            loaded = load_classifier(ref)
            assert loaded.export_format == fmt and loaded.class_names == result.class_names
        table = predict(done.folder, images)
        if quantize == "none":
            assert list(table["class_1"]) == list(keras_table["class_1"]), fmt
            np.testing.assert_allclose(table["probability_1"], keras_table["probability_1"], atol=1e-4)
        evaluation = evaluate(done.artifact, data, log=False)
        assert set(evaluation.metrics) >= {"accuracy"}
    assert main(["predict", str(exported[("tflite", "int8")].folder), images[0]]) == 0
    assert "class_1" in capsys.readouterr().out


def test_int8_calibrates_on_a_sample_of_the_runs_own_training_split(store):
    result, _, data, _ = store
    loaded = load_classifier(result.run_id)
    splits, calibration = _images(loaded, None, 5)
    folder = prepare_data(data, 0.25, 42, progress=False)
    train = {path for path, _ in folder.parts["train"]}
    assert len(calibration) == 5 and set(calibration) <= train, "training images only, from the data in the recipe"
    assert splits["val"] == folder.parts["val"], "verified on the run's own held-out images"
    assert _images(loaded, None, 5)[1] == calibration, "the same sample every time"
    assert len(_images(loaded, None, 1000)[1]) == len(train)


def test_resizing_in_the_graph_takes_any_image_size(store, tmp_path):
    result, uri, data, _ = store
    done = export(result.run_id, "tflite", output=tmp_path / "any", options=ExportOptions(resize_in_graph=True))
    meta = json.loads((done.folder / "metadata.json").read_text())
    assert meta["input"]["shape"] == [None, None, None, 3] and meta["input"]["resized_by"] == "graph"
    assert meta["interpolation"] == "bilinear" and meta["training_interpolation"] == "antialiased"
    assert done.report["splits"]["val"]["conversion_max_abs_diff"] <= 1e-3
    loaded = load_classifier(done.folder)
    wide = np.random.default_rng(0).uniform(0, 255, (1, 40, 70, 3)).astype(np.float32)
    probabilities = loaded.model.predict_batch(wide)
    assert probabilities.shape == (1, 3) and abs(probabilities.sum() - 1) < 1e-5


def test_bad_requests_are_refused_before_any_work(store, tmp_path):
    result, *_ = store
    with pytest.raises(ExportError, match="Unknown export format 'coreml'"):
        export(result.run_id, "coreml")
    with pytest.raises(ExportError, match="does not apply to format 'saved_model'.*tflite option"):
        export(result.run_id, "saved_model", "int8")
    with pytest.raises(ExportError, match="--calibration-images must be at least 1 .got 0."):
        export(result.run_id, "tflite", "int8", options=ExportOptions(calibration_images=0))
    with pytest.raises(ModelLoadError, match="No run id starts with 'ffffff'"):
        export("ffffff", "tflite", output=tmp_path / "x")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export(result.run_id, "tflite", output=taken)
    assert (taken / "keep.txt").read_text() == "mine"
    assert main(["export", result.run_id, "--format", "saved_model", "--quantize", "int8"]) == 2
    done = export(result.run_id, "tflite", output=taken, overwrite=True)
    assert not (taken / "keep.txt").exists() and done.artifact.is_file()


def test_a_failed_export_leaves_nothing_behind(store, tmp_path, monkeypatch):
    result, *_ = store

    def broken(*args, **kwargs):
        raise ExportError("converter exploded")

    monkeypatch.setattr("tltoolkit.deploy.formats.write_tflite", broken)
    with pytest.raises(ExportError, match="exploded"):
        export(result.run_id, "tflite", output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == [], "no output folder and no partial folder"


def test_a_float_export_that_disagrees_with_keras_is_an_error(store, tmp_path, monkeypatch):
    result, *_ = store
    from tltoolkit.deploy.artifacts import ExportedModel

    honest = ExportedModel.predict_batch
    monkeypatch.setattr(ExportedModel, "predict_batch", lambda self, images: honest(self, images)[:, ::-1])
    with pytest.raises(ExportError, match="disagrees with the Keras model.*Nothing was written"):
        export(result.run_id, "onnx", output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_op_tflite_lacks_is_named_with_its_layer(tmp_path):
    import keras
    import tensorflow as tf

    class Gaussianise(keras.layers.Layer):
        def call(self, x):
            return tf.math.erfinv(tf.tanh(x))

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(Gaussianise(name="gaussianise")(inputs)))
    write_saved_model(model, tmp_path / "saved")
    with pytest.raises(ExportError, match=r"needs op\(s\) tf.Erfinv in layer\(s\) gaussianise.*Flex"):
        write_tflite(model, tmp_path / "m.tflite", "none", tmp_path / "saved")
    assert not (tmp_path / "m.tflite").exists()
    assert "conversion failed: boom" in unsupported_ops_message("boom\nmore", model)


def test_onnx_without_its_packages_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_tf2onnx(name, *args, **kwargs):
        if name == "tf2onnx":
            raise ImportError("No module named 'tf2onnx'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tf2onnx)
    with pytest.raises(ExportError, match=r"needs tf2onnx.*pip install 'tltoolkit\[onnx\]'"):
        ExportSpec("onnx").check()


def test_an_export_without_its_metadata_is_refused(store, exported, tmp_path):
    lonely = tmp_path / "model.tflite"
    lonely.write_bytes(exported[("tflite", "none")].artifact.read_bytes())
    with pytest.raises(ModelLoadError, match="no metadata.json beside it"):
        load_classifier(lonely)
    with pytest.raises(ExportError, match="already an exported tflite model"):
        export(str(exported[("tflite", "none")].folder), "onnx", output=tmp_path / "again")


def test_a_keras_file_exports_with_its_data_folder_and_an_alias_logs_to_its_run(store, tmp_path):
    result, uri, data, _ = store
    keras_file = tmp_path / "model.keras"
    result.model.save(keras_file)
    with pytest.raises(ExportError, match="records no data folder: pass --data DIR"):
        export(keras_file, "tflite", output=tmp_path / "no-data")
    done = export(keras_file, "tflite", output=tmp_path / "from-file", data=data)
    assert done.report["splits"]["val"]["images"] == 24, "no recipe, no split: the whole folder verifies"
    assert json.loads((done.folder / "metadata.json").read_text())["run_id"] is None
    tltoolkit.register(result.run_id, "shipped", ["champion"])
    done = export("models:/shipped@champion", "onnx", output=tmp_path / "from-alias")
    assert done.metadata.run_id == result.run_id
    logged = {item.path for item in MlflowClient(uri).list_artifacts(result.run_id, "export")}
    assert "export/onnx" in logged
