"""Temperature scaling (fitted on val, stored in the model, applied everywhere) and test-time augmentation (beside
the plain scores, never instead of them)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_recipe, use_store, write_images
from mlflow import MlflowClient

import tltoolkit
from tltoolkit.commands.evaluate import evaluate
from tltoolkit.commands.predict import predict
from tltoolkit.model.calibration import calibrate
from tltoolkit.model.layers import Classifier
from tltoolkit.model.metrics import evaluate_probabilities, expected_calibration_error, fit_temperature
from tltoolkit.model.tta import predict_tta
from tltoolkit.tracking.models import load_classifier


def _overconfident(n=200, seed=0):
    """Labels and probabilities that say 0.98 but are right 70% of the time."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    right = rng.random(n) < 0.7
    predicted = np.where(right, labels, 1 - labels)
    probabilities = np.full((n, 2), 0.02)
    probabilities[np.arange(n), predicted] = 0.98
    return labels, probabilities


def _classifier_model():
    inputs = keras.Input((4,))
    return keras.Model(inputs, Classifier(["a", "b"], name="predictions")(inputs))


def test_an_overconfident_models_ece_drops_and_the_temperature_lives_in_the_model(tmp_path):
    labels, probabilities = _overconfident()
    model = _classifier_model()
    x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
    before = model.predict(x, verbose=0)
    calibration = calibrate(model, evaluate_probabilities(labels, probabilities, ["a", "b"]))
    assert calibration.temperature > 2, "over-confident: soften"
    assert calibration.ece_after < calibration.ece_before / 3
    assert calibration.ece_before == pytest.approx(expected_calibration_error(labels, probabilities))
    after = model.predict(x, verbose=0)
    expected = tf.nn.softmax(np.log(before) / calibration.temperature).numpy()
    np.testing.assert_allclose(after, expected, atol=1e-5)
    assert (after.argmax(1) == before.argmax(1)).all(), "the class never changes"
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), after, atol=1e-6)


def test_a_temperature_that_would_not_help_held_out_val_images_is_not_applied_and_the_log_says_so(caplog):
    rng = np.random.default_rng(3)
    confidence = rng.uniform(0.55, 0.95, 300)
    probabilities = np.stack([confidence, 1 - confidence], axis=1)
    labels = (rng.random(300) > confidence).astype(int)  # Calibrated already: right as often as it says.
    model = _classifier_model()
    caplog.set_level("INFO", logger="tltoolkit")
    assert calibrate(model, evaluate_probabilities(labels, probabilities, ["a", "b"])) is None
    assert model.layers[-1].temperature == 1.0
    assert "would not lower the log loss of val images it was not fitted on (cross-validated" in caplog.text


def test_the_calibration_log_gives_both_losses_and_both_eces(caplog):
    labels, probabilities = _overconfident()
    caplog.set_level("INFO", logger="tltoolkit")
    calibration = calibrate(_classifier_model(), evaluate_probabilities(labels, probabilities, ["a", "b"]))
    assert calibration.held_out_after < calibration.held_out_before and calibration.loss_after < calibration.loss_before
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Calibrated on"))
    assert f"val log loss {calibration.loss_before:.4f} -> {calibration.loss_after:.4f}" in line
    assert f"expected calibration error {calibration.ece_before:.4f} -> {calibration.ece_after:.4f}" in line


def test_no_temperature_from_too_few_images_or_a_perfect_split():
    labels, probabilities = _overconfident(20)
    model = _classifier_model()
    assert calibrate(model, evaluate_probabilities(labels, probabilities, ["a", "b"])) is None
    perfect = np.eye(2)[labels] * 0.9 + 0.05
    assert fit_temperature(labels, perfect) is None
    assert model.layers[-1].temperature == 1.0


def test_models_saved_before_the_temperature_load_unchanged():
    config = Classifier(["a", "b"]).get_config()
    config.pop("temperature")
    config["activation"] = "softmax"  # What older models carry.
    layer = Classifier.from_config(config)
    layer.build((None, 3))
    x = np.ones((1, 3), np.float32)
    np.testing.assert_allclose(layer(x), tf.nn.softmax(x @ layer.kernel + layer.bias), atol=1e-6)


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    """40 images per class, two classes of the same colour: the val split cannot be perfect, so it calibrates."""
    root = tmp_path_factory.mktemp("calibration")
    colours = {"red": (220, 30, 30), "crimson": (220, 30, 30), "blue": (30, 30, 220)}
    data = write_images(root / "photos", colours, per_class=40)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    recipe = tiny_recipe(evaluation={"tta": "flip"}, stages=[{"name": "head", "epochs": 3}])
    return tltoolkit.run(recipe, data, tracking_uri=uri, verbose=0), data, uri


def test_a_run_calibrates_logs_it_and_every_loader_applies_it(noisy_run, monkeypatch):
    result, data, uri = noisy_run
    use_store(uri, monkeypatch)
    temperature = result.metrics["temperature"]
    assert temperature != 1.0 and {"val_ece", "val_ece_uncalibrated"} <= set(result.metrics)
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.data.metrics["temperature"] == pytest.approx(temperature)
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(result.run_id, "calibration")}
    assert {"calibration/reliability.png", "calibration/reliability.csv"} <= artifacts
    loaded = load_classifier(result.run_id)
    assert loaded.model.get_layer("predictions").temperature == pytest.approx(temperature)
    pixels = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.model.predict(pixels, verbose=0), result.model.predict(pixels, verbose=0), 1e-5)
    uncalibrated = tltoolkit.run(
        tiny_recipe(evaluation={"calibrate": False}, stages=[{"name": "head", "epochs": 1}]), data, verbose=0
    )
    assert "temperature" not in uncalibrated.metrics
    assert uncalibrated.model.get_layer("predictions").temperature == 1.0


def test_tta_is_scored_beside_the_plain_scores(noisy_run, monkeypatch):
    result, data, uri = noisy_run
    use_store(uri, monkeypatch)
    assert {"val_accuracy", "val_tta_accuracy", "val_tta_loss"} <= set(result.metrics)
    assert "val_tta_accuracy" in MlflowClient(uri).get_run(result.run_id).data.metrics
    evaluation = evaluate(result.run_id, data, tta="flip_crops")
    assert evaluation.tta is not None and evaluation.metrics != evaluation.tta.metrics
    table = predict(result.run_id, [str(next(data.rglob("*.png")))], tta="flip")
    assert table["probability_1"][0] > 0


def test_flip_tta_is_the_mean_over_the_image_and_its_mirror():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs)))
    images = np.random.default_rng(0).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    batches = tf.data.Dataset.from_tensor_slices(images).batch(3)
    expected = (model.predict(images, verbose=0) + model.predict(images[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(predict_tta(model, batches, "flip"), expected, atol=1e-6)
    assert predict_tta(model, batches, "flip_crops").shape == (4, 2)
    with pytest.raises(ValueError, match="TTA mode"):
        predict_tta(model, batches, "rotate")
