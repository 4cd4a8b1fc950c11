"""The MLflow structure of a run, in a temporary store: parent, children, tags, params, metrics, artifacts, model."""

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import tiny_recipe, write_images
from mlflow import MlflowClient

import tltoolkit
from tltoolkit.errors import ModelLoadError, TrackingError
from tltoolkit.tracking.models import load_classifier


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    data = write_images(root / "images", per_class=8)
    (data / "red" / "broken.jpg").write_text("not a jpeg")
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    recipe = tiny_recipe(
        tracking={"experiment": "tracked", "tags": {"team": "vision"}},
        data={"image_size": 32, "batch_size": 8, "val_split": 0.25, "interpolation": "bilinear"},
    )
    result = tltoolkit.run(recipe, data, tracking_uri=uri, verbose=0)
    return result, uri, data


@pytest.fixture
def client(finished):
    mlflow.set_tracking_uri(finished[1])
    return MlflowClient(finished[1])


def artifact_paths(client, run_id, path=None):
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return found


def test_parent_run_with_tags_params_and_artifacts(finished, client):
    result, _, data = finished
    parent = client.get_run(result.run_id)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert tags["tltoolkit.kind"] == "run" and tags["tltoolkit.backbone"] == "test_tiny"
    assert tags["tltoolkit.recipe"] == "tiny" and tags["tltoolkit.dataset"] == "images" and tags["team"] == "vision"
    assert parent.info.run_name == "tiny-test_tiny-images"
    params = parent.data.params
    assert params["stages.0.epochs"] == "2" and params["backbone.name"] == "test_tiny" and params["data.classes"] == "3"
    assert {"val_accuracy", "val_loss", "head_val_accuracy", "finetune_val_accuracy"} <= set(parent.data.metrics)
    paths = set(artifact_paths(client, result.run_id))
    assert {
        "recipe.yaml",
        "data/class_names.json",
        "data/skipped_files.csv",
        "data/manifest.csv",
        "curves.png",
        "evaluation/val_confusion_matrix.png",
        "evaluation/val_classification_report.txt",
        "history.csv",
    } <= paths
    skipped = mlflow.artifacts.load_text(f"runs:/{result.run_id}/data/skipped_files.csv")
    assert "broken.jpg" in skipped
    resolved = tltoolkit.load_recipe(
        dict(__import__("yaml").safe_load(mlflow.artifacts.load_text(f"runs:/{result.run_id}/recipe.yaml")))
    )
    assert resolved.stages[0].epochs == 2 and resolved.data.image_size == 32


def test_one_child_run_per_stage_with_per_epoch_metrics(finished, client):
    result, _, _ = finished
    children = client.search_runs(
        [client.get_run(result.run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'",
    )
    assert sorted(c.data.tags["tltoolkit.stage"] for c in children) == ["finetune", "head"]
    assert result.stage_runs.keys() == {"head", "finetune"}
    head = client.get_run(result.stage_runs["head"])
    assert head.data.tags["tltoolkit.backbone"] == "test_tiny"
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        history = client.get_metric_history(head.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
    assert "top5_accuracy" not in head.data.metrics, "top-k only with more than 5 classes"
    assert head.data.params["frozen_layers"] == "11"
    assert client.get_run(result.stage_runs["finetune"]).data.params["frozen_layers"] == "0"
    assert head.data.metrics["epochs_run"] == 2 and head.data.metrics["train_images_per_s"] > 0
    # The head trained on cached features: how long computing them took is part of its time (fine-tune has none).
    assert head.data.params["feature_cache"] == "head"
    assert 0 < head.data.metrics["feature_extraction_s"] < head.data.metrics["wall_s"]
    assert "feature_extraction_s" not in client.get_run(result.stage_runs["finetune"]).data.metrics
    assert {"curves.png", "evaluation/final_val_confusion_matrix.png"} <= set(artifact_paths(client, head.info.run_id))


def test_one_curve_across_stages_on_the_stage_runs_and_the_parent(finished, client):
    """The UI draws a run's whole training as one line: fine-tune's epochs continue the head's on one step axis,
    and the parent logs the curve keys per epoch; its latest `val_accuracy` is the final model's score."""
    result, _, _ = finished
    finetune = result.stage_runs["finetune"]
    assert [m.step for m in client.get_metric_history(finetune, "val_loss")] == [2], "after the head's 2 epochs"
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "learning_rate"):
        steps = [m.step for m in client.get_metric_history(result.run_id, key)]
        assert steps[:3] == [0, 1, 2] and set(steps) == {0, 1, 2}, key
    parent = client.get_run(result.run_id).data.metrics
    assert parent["val_accuracy"] == pytest.approx(result.metrics["val_accuracy"]), "the final score is the latest"


def test_logged_model_reloads_and_predicts_like_the_trained_model(finished, client):
    result, _, _ = finished
    pixels = np.random.default_rng(0).uniform(0, 255, (5, 32, 32, 3)).astype("float32")
    expected = result.model.predict(pixels, verbose=0)
    name = client.get_run(result.run_id).data.tags["tltoolkit.model_name"]
    assert name == "tiny-test_tiny-images", "the model says whose it is"
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/{name}")
    probabilities = pyfunc.predict(pixels)
    assert probabilities.shape == (5, 3)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert pyfunc.metadata.get_input_schema() is None, "no signature: tensors and image columns are both accepted"
    assert "base64" in pyfunc.metadata.metadata["inputs"], "what it accepts is written down instead"
    loaded = load_classifier(result.run_id)
    assert loaded.class_names == result.class_names == ["blue", "green", "red"]
    assert (loaded.resize, loaded.interpolation) == ("squash", "bilinear"), "read images as in training"
    np.testing.assert_allclose(loaded.model.predict(pixels, verbose=0), expected, atol=1e-5)


def test_unreachable_store_fails_fast_before_any_data_is_read(tmp_path):
    import time

    started = time.perf_counter()
    with pytest.raises(TrackingError, match="cannot be used"):
        tltoolkit.run(tiny_recipe(), tmp_path, tracking_uri="http://127.0.0.1:9")  # An empty folder: never read.
    assert time.perf_counter() - started < 30


def test_unsafe_models_are_refused(tmp_path):
    import keras

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ModelLoadError, match="Lambda"):
        load_classifier(path)
    with pytest.raises(ModelLoadError, match="neither a file"):
        load_classifier("no-such-model")


def test_runs_say_what_they_are_and_their_saved_recipe_runs_on_its_own(finished, client, tmp_path):
    result, uri, data = finished
    parent = client.get_run(result.run_id)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("Recipe 'tiny': test_tiny (weights none) at 32 px on") and "3 classes" in note
    assert f"Final model: val_accuracy {result.metrics['val_accuracy']:.4f}" in note
    assert client.get_run(result.stage_runs["head"]).info.run_name == "tiny-test_tiny-images / head"
    assert "tltoolkit.checkpoints" not in parent.data.tags, "its folder was removed when the run finished"

    saved = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{result.run_id}/recipe.yaml"))
    assert saved["data"]["dir"] == str(data.resolve()), "the data folder is recorded"
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(saved))
    names = [
        tltoolkit.run(path, tracking_uri=uri, overrides=["stages.0.epochs=1"], verbose=0).run_id for _ in range(2)
    ]  # No --data: the saved recipe names its folder.
    assert [client.get_run(r).info.run_name for r in names] == [
        "tiny-test_tiny-images [stages.0.epochs=1]",
        "tiny-test_tiny-images [stages.0.epochs=1] #2",
    ], "what differs is in the name, and equal names are numbered"


def test_class_names_are_data_not_markup(tmp_path):
    """Folder names that are mathtext, report row names, multi-line or very long train, plot and report as given."""
    names = [r"$\frac$", "accuracy", "macro avg", "two\nlines", "x" * 150]
    colours = {name: (40 * i, 200 - 40 * i, 30 + 40 * i) for i, name in enumerate(names)}
    data = write_images(tmp_path / "odd", colours, per_class=4)
    recipe = tiny_recipe(evaluation={"top_losses": 2}, stages=[{"name": "head", "epochs": 1}])
    result = tltoolkit.run(recipe, data, verbose=0)
    assert result.class_names == sorted(names)
    client = MlflowClient(result.tracking_uri)
    report = pd.read_csv(client.download_artifacts(result.run_id, "evaluation/val_classification_report.csv"))
    classes = report[report.row == "class"]
    assert sorted(classes["class"]) == sorted(names), "every class has its own row"
    assert list(report[report.row == "summary"]["class"]) == ["accuracy", "macro avg", "weighted avg"]
    logged = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert "evaluation/val_confusion_matrix.png" in logged
    assert len(client.list_artifacts(result.run_id, "interpretation/gradcam")) == 2


def unreachable_while(outage):
    """`MlflowClient.log_batch` as a server that is down while `outage()` says so."""
    from mlflow.exceptions import MlflowException

    original = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        if outage():
            raise MlflowException(
                "API request to http://tracking:5000/api/2.0/mlflow/runs/log-batch failed: "
                "Max retries exceeded (Connection refused)"
            )
        return original(self, run_id, metrics, params, tags, **kwargs)

    return log_batch


def steps(client, run_id, key="loss"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_a_tracking_outage_during_training_is_ridden_out_and_each_epoch_logged_once(image_folder, monkeypatch, caplog):
    from tltoolkit.tracking.runs import RunTracker

    epochs = []
    original_end = RunTracker.on_epoch_end

    def counting(self, stage, epoch, logs):
        epochs.append((stage.name, epoch))
        original_end(self, stage, epoch, logs)

    monkeypatch.setattr(RunTracker, "on_epoch_end", counting)
    # Down while the head's epochs 1 and 2 end; back for epoch 3.
    monkeypatch.setattr(
        MlflowClient, "log_batch", unreachable_while(lambda: epochs[-1:] in ([("head", 1)], [("head", 2)]))
    )
    recipe = tiny_recipe(stages=[{"name": "head", "epochs": 4, "optimizer": {"learning_rate": 1e-2}}])
    result = tltoolkit.run(recipe, image_folder, verbose=0)
    client = MlflowClient()
    assert steps(client, result.stage_runs["head"]) == [0, 1, 2, 3], "each epoch once, the missed ones sent later"
    assert steps(client, result.run_id) == [0, 1, 2, 3]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert "does not answer" in caplog.text and "answers again" in caplog.text


def test_a_tracking_outage_past_the_patience_stops_with_one_error_and_resumes(image_folder, monkeypatch):
    from tltoolkit.tracking.runs import RunTracker

    monkeypatch.setenv("TLTOOLKIT_TRACKING_PATIENCE_S", "0")
    down = []
    original_end = RunTracker.on_epoch_end

    def going_down(self, stage, epoch, logs):
        if epoch == 1:
            down.append(True)  # The server goes away as the head's second epoch ends, for good.
        original_end(self, stage, epoch, logs)

    original_log = MlflowClient.log_batch
    monkeypatch.setattr(RunTracker, "on_epoch_end", going_down)
    monkeypatch.setattr(MlflowClient, "log_batch", unreachable_while(lambda: bool(down)))
    recipe = tiny_recipe(stages=[{"name": "head", "epochs": 3, "optimizer": {"learning_rate": 1e-2}}])
    with pytest.raises(TrackingError, match="has not answered for 0 s .*--resume") as raised:
        tltoolkit.run(recipe, image_folder, verbose=0)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__, "one message, no chained traceback"

    monkeypatch.setattr(RunTracker, "on_epoch_end", original_end)  # The server is back.
    monkeypatch.setattr(MlflowClient, "log_batch", original_log)
    result = tltoolkit.run(recipe, image_folder, verbose=0, resume=True)
    assert steps(MlflowClient(), result.stage_runs["head"]) == [0, 1, 2], "epoch 1 from the checkpoint, once"


def test_a_store_that_blinks_at_a_stage_end_is_waited_for(image_folder, monkeypatch, caplog):
    from mlflow.exceptions import MlflowException

    original, failures = MlflowClient.log_figure, []

    def log_figure(self, *args, **kwargs):
        if len(failures) < 2:  # The first two pictures meet a restarting server.
            failures.append(True)
            raise MlflowException("API request to http://tracking:5000 failed: Connection refused")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_figure", log_figure)
    result = tltoolkit.run(tiny_recipe(), image_folder, verbose=0)
    assert len(failures) == 2 and MlflowClient().get_run(result.run_id).info.status == "FINISHED"
    assert "waiting up to" in caplog.text
