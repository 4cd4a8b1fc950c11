"""The semi-supervised path: autoencoder pretraining on unlabelled images, its encoder under a classifier head."""

import numpy as np
import pytest
from conftest import COLOURS, tiny_recipe, write_images
from mlflow import MlflowClient
from PIL import Image

import tltoolkit
from tltoolkit.errors import BackboneError, DataError
from tltoolkit.model.layers import Corrupt


def ae_recipe(**autoencoder) -> dict:
    recipe = tiny_recipe(head={"dropout": 0.0, "pooling": "flatten"})
    recipe["pretrain"] = {
        "autoencoder": {
            "widths": [8, 16],
            "latent": 8,
            "epochs": 2,
            "batch_size": 8,
            "optimizer": {"learning_rate": 1e-2},
            **autoencoder,
        }
    }
    recipe["backbone"] = {"name": "autoencoder", "weights": "none", "freeze": "all"}
    return recipe


@pytest.fixture
def unlabeled(tmp_path):
    """Unlabelled images at several depths, plus a file to skip."""
    root = write_images(tmp_path / "unlabeled", per_class=6, seed=5)
    (root / "red" / "deeper").mkdir()
    Image.new("RGB", (24, 24), COLOURS["red"]).save(root / "red" / "deeper" / "x.png")
    (root / "notes.txt").write_text("not an image")
    return root


def child_runs(client, parent_id):
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags["tltoolkit.stage"]: r for r in runs}


def test_pretrain_stage_then_head_on_the_encoder_tracked_and_reusable(image_folder, unlabeled):
    recipe = ae_recipe()
    recipe["stages"] = recipe["stages"][:1]  # Head only: the encoder stays as pretrained.
    result = tltoolkit.run(recipe, image_folder, unlabeled=unlabeled, verbose=0)
    client = MlflowClient()
    children = child_runs(client, result.run_id)
    assert list(result.stage_runs) == ["pretrain", "head"] and set(children) == {"pretrain", "head"}
    pretrain = children["pretrain"]
    # Pretraining is the first stage of the plan, not a special index -1.
    assert (pretrain.data.tags["tltoolkit.stage_index"], children["head"].data.tags["tltoolkit.stage_index"]) == (
        "0",
        "1",
    )
    for key in ("loss", "val_loss", "learning_rate"):
        assert [m.step for m in client.get_metric_history(pretrain.info.run_id, key)] == [0, 1]
    images = int(pretrain.data.params["train_images"]) + int(pretrain.data.params["val_images"])
    assert images == 19 + 18, "19 unlabelled (any depth) + 18 labelled training images"
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id)}
    assert {"curves.png", "reconstructions.png", "reconstruction_errors.png", "encoder", "autoencoder"} <= artifacts
    skipped = client.download_artifacts(pretrain.info.run_id, "data/skipped_files.csv")
    assert "notes.txt" in open(skipped).read()
    threshold = pretrain.data.metrics["anomaly_threshold"]
    assert threshold > 0 and pretrain.data.metrics["val_reconstruction_error"] > 0
    assert "encoder" in {a.path for a in client.list_artifacts(result.run_id)}

    # The head trained on the pretrained encoder, frozen: its weights are the saved encoder's, exactly.
    saved = tltoolkit.create_backbone("autoencoder", weights=f"runs:/{pretrain.info.run_id}/encoder", input_size=32)
    inside = result.model.get_layer("backbone").layer
    assert [layer.name for layer in saved.layers] == [layer.name for layer in inside.layers]
    for a, b in zip(saved.weights, inside.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Another recipe names that encoder as its backbone (a run id means its `encoder/`), and fine-tunes it.
    reuse = tiny_recipe(
        backbone={"name": "autoencoder", "weights": result.run_id, "freeze": "latent"}, head={"pooling": "flatten"}
    )
    again = tltoolkit.run(reuse, image_folder, verbose=0)
    assert "val_accuracy" in again.metrics and "pretrain" not in again.stage_runs


def test_predict_flags_images_unlike_the_training_images(image_folder, unlabeled, tmp_path):
    from tltoolkit.commands.predict import predict

    result = tltoolkit.run(ae_recipe(epochs=6, noise="masking"), image_folder, unlabeled=unlabeled, verbose=0)
    odd = tmp_path / "odd"
    odd.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(odd / f"noise{i}.png")
    table = predict(result.run_id, [odd, image_folder / "red"])
    assert list(table.columns[-2:]) == ["reconstruction_error", "anomaly"]
    noise = table[table.path.str.contains("noise")]
    assert noise.anomaly.all(), "random noise reconstructs far worse than anything trained on"
    assert table[~table.path.str.contains("noise")].anomaly.mean() <= 0.25
    assert noise.reconstruction_error.min() > table[~table.path.str.contains("noise")].reconstruction_error.max()


def test_joint_mode_trains_reconstruction_alongside_with_a_decaying_weight(image_folder, unlabeled):
    recipe = ae_recipe(joint=True, joint_weight=2.0, joint_decay="linear")
    recipe["stages"][0]["unfreeze"] = "all"
    result = tltoolkit.run(recipe, image_folder, unlabeled=unlabeled, verbose=0)
    client = MlflowClient()
    children = child_runs(client, result.run_id)
    assert set(children) == {"head", "finetune"}, "no separate pretrain stage"
    head = children["head"].info.run_id
    weights = [m.value for m in client.get_metric_history(head, "reconstruction_weight")]
    weights += [m.value for m in client.get_metric_history(children["finetune"].info.run_id, "reconstruction_weight")]
    assert weights == pytest.approx([2.0, 1.0, 0.0]), "linear over all 3 epochs, zero at the last"
    for key in ("accuracy", "val_accuracy", "reconstruction_loss", "classification_loss"):
        assert client.get_metric_history(head, key), key
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(head, "accuracy")), "labelled rows only"
    assert client.get_run(result.run_id).data.metrics["anomaly_threshold"] > 0


def test_killed_in_pretraining_resumes_the_same_pretrain_run(image_folder, unlabeled, monkeypatch):
    from tltoolkit.tracking.runs import RunTracker

    original = RunTracker.on_epoch_end

    def interrupted(self, stage, epoch, logs):
        if epoch == 1 and "val_accuracy" not in logs:
            raise KeyboardInterrupt  # Pretraining's epoch 1 is checkpointed; MLflow has not seen it.
        original(self, stage, epoch, logs)

    monkeypatch.setattr(RunTracker, "on_epoch_end", interrupted)
    recipe = ae_recipe(epochs=3)
    with pytest.raises(KeyboardInterrupt):
        tltoolkit.run(recipe, image_folder, unlabeled=unlabeled, verbose=0)
    monkeypatch.setattr(RunTracker, "on_epoch_end", original)
    result = tltoolkit.run(recipe, image_folder, unlabeled=unlabeled, resume=True, verbose=0)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tltoolkit").experiment_id])
    assert len([r for r in runs if r.data.tags.get("tltoolkit.stage") == "pretrain"]) == 1
    assert [m.step for m in client.get_metric_history(result.stage_runs["pretrain"], "loss")] == [0, 1, 2]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_a_search_over_autoencoder_settings(image_folder, unlabeled):
    recipe = ae_recipe(epochs=1)
    recipe["tracking"] = {"log_model": False}
    recipe["search"] = {"tuner": "grid", "max_trials": 2, "space": {"pretrain.autoencoder.latent": [4, 8]}}
    result = tltoolkit.tune(recipe, image_folder, unlabeled=unlabeled, verbose=0)
    client = MlflowClient()
    assert sorted(result.trials["pretrain.autoencoder.latent"]) == [4, 8]
    for run_id in result.trials["run_id"]:
        assert [m.step for m in client.get_metric_history(run_id, "pretrain/loss")] == [0]


def test_missing_unlabelled_images_are_clear_errors(image_folder, tmp_path):
    with pytest.raises(DataError, match="needs images.*--unlabeled DIR.*use_labeled"):
        tltoolkit.run(ae_recipe(use_labeled=False), image_folder, verbose=0)
    with pytest.raises(DataError, match="unlabelled image folder .*nowhere does not exist"):
        tltoolkit.run(ae_recipe(), image_folder, unlabeled=tmp_path / "nowhere", verbose=0)


def test_corruption_is_seeded_noise_in_training_and_nothing_at_inference():
    x = np.full((4, 16, 16, 3), 128.0, np.float32)
    gaussian = Corrupt("gaussian", 0.1, seed=1)
    noisy = np.asarray(gaussian(x, training=True))
    assert abs(noisy.std() - 25.5) < 3 and noisy.min() >= 0 and noisy.max() <= 255
    np.testing.assert_array_equal(np.asarray(gaussian(x)), x)
    masked = np.asarray(Corrupt("masking", 0.25, seed=1)(x, training=True))
    zero = (masked == 0).all(axis=-1)
    assert 0.18 < zero.mean() < 0.32 and ((masked == 0) | (masked == 128)).all(), "whole pixels masked, no rescale"


def test_a_registered_backbone_as_the_encoder_is_mirrored_by_the_decoder():
    from tltoolkit.backbones.encoder import build_decoder, build_encoder
    from tltoolkit.recipe.schema import AutoencoderConfig
    from tltoolkit.stages.pretrain import build_autoencoder

    config = AutoencoderConfig(encoder="test_tiny", latent=6, epochs=1)
    encoder = build_encoder({"encoder": "test_tiny", "widths": [1], "latent": 6}, 32)
    assert encoder.output_shape == (None, 4, 4, 6) and "block3_relu" in [layer.name for layer in encoder.layers]
    autoencoder = build_autoencoder(encoder, config, seed=0)
    assert autoencoder.scorer.output_shape == (None, 32, 32, 3)
    assert [layer.name for layer in autoencoder.decoder.layers if "conv" in layer.name] == [
        "up1_conv",
        "up2_conv",
        "up3_conv",
    ], "three halvings undone"
    with pytest.raises(BackboneError, match="cannot be mirrored"):
        build_decoder((3, 3, 6), 32, {"encoder": "test_tiny", "widths": [1], "latent": 6})
