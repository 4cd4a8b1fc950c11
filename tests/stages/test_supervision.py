"""Deep supervision: auxiliary heads on intermediate layers, their decaying weights, and a single-output model."""

import keras_tuner as kt
import numpy as np
import pytest
import yaml
from conftest import tiny_recipe

import tltoolkit
from tltoolkit.backbones import create_backbone
from tltoolkit.cli import main
from tltoolkit.data import prepare_data
from tltoolkit.deploy.artifacts import tflite_interpreter
from tltoolkit.recipe import load_recipe
from tltoolkit.stages import SessionOptions, TrainingSession
from tltoolkit.stages.supervision import weight_schedule
from tltoolkit.tracking.models import load_classifier
from tltoolkit.tuning import declare, resolve_trial


def aux_recipe(*heads, finetune_epochs=3, **changes) -> dict:
    """Head stage (backbone frozen), then fine-tune from `block2_conv` up (layer 5 of test_tiny's 11)."""
    return tiny_recipe(
        head={"dropout": 0.0, "auxiliary": list(heads)},
        stages=[
            {"name": "head", "epochs": 2, "optimizer": {"learning_rate": 1e-2}},
            {
                "name": "finetune",
                "epochs": finetune_epochs,
                "unfreeze": "block2_conv",
                "optimizer": {"learning_rate": 1e-3},
            },
        ],
        **changes,
    )


def test_weights_decay_to_zero_over_the_stages_that_train_below_the_tap(caplog):
    backbone = create_backbone("test_tiny", "none", input_size=32)
    heads = [
        {"at": "block2_relu", "weight": 0.6},
        {"at": "block3_relu", "decay": "cosine"},
        {"at": "block3_conv", "decay": "none"},
        {"at": "block1_relu"},  # Below the fine-tune's unfreeze point: frozen throughout.
    ]
    linear, cosine, constant, frozen = weight_schedule(load_recipe(aux_recipe(*heads, finetune_epochs=4)), backbone)
    # Head stage (2 epochs, tap frozen): the full weight; fine-tune (4 epochs): down to zero in its last epoch.
    assert linear == pytest.approx([0.6, 0.6, 0.6, 0.4, 0.2, 0.0])
    assert cosine == pytest.approx([0.3, 0.3, 0.3, 0.225, 0.075, 0.0])
    assert constant == pytest.approx([0.3] * 6)
    assert frozen == pytest.approx([0.3] * 6)
    assert "block1_relu is frozen in every stage" in caplog.text


def session_history(folder, recipe: dict):
    recipe = load_recipe(recipe)
    session = TrainingSession(recipe, SessionOptions(verbose=0))
    session.check_points()
    session.load_data(prepare_data(folder, recipe.data.val_split, recipe.seed, progress=False))
    return session, session.run().history


def test_auxiliary_heads_train_on_their_taps_and_the_model_keeps_one_output(image_folder):
    _, plain = session_history(image_folder, aux_recipe())
    session, supervised = session_history(image_folder, aux_recipe({"at": "block2_relu", "weight": 0.5}))
    head, finetune = (supervised.stage == "head").to_numpy(), (supervised.stage == "finetune").to_numpy()

    # While the tap is frozen only the auxiliary head learns: the main model trains exactly as without it, and
    # `loss` is the main head's (the total less the weighted auxiliary loss).
    for key in ("loss", "val_loss", "accuracy", "val_accuracy"):
        np.testing.assert_allclose(supervised[key][head], plain[key][head], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(
        supervised["total_loss"], supervised["loss"] + supervised["aux0_weight"] * supervised["aux0_loss"], rtol=1e-5
    )
    # Once the layers below the tap train, its gradient changes them: the main model's path differs.
    assert not np.allclose(supervised["val_loss"][finetune], plain["val_loss"][finetune], rtol=1e-6)
    assert list(supervised["aux0_weight"]) == pytest.approx([0.5, 0.5, 0.5, 0.25, 0.0])
    assert {"aux0_accuracy", "val_aux0_accuracy", "val_aux0_loss"} <= set(supervised.columns)

    model = session.training.model
    assert len(model.outputs) == 1 and not any(layer.name.startswith("aux") for layer in model.layers)

    # On cached features (the default here) the same numbers as through the backbone, auxiliary heads included.
    uncached = aux_recipe({"at": "block2_relu", "weight": 0.5}, data={**tiny_recipe()["data"], "feature_cache": False})
    _, through = session_history(image_folder, uncached)
    for key in ("loss", "val_loss", "aux0_loss", "val_aux0_loss"):
        np.testing.assert_allclose(through[key], supervised[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_resume_with_auxiliary_heads_is_bit_identical_and_models_have_one_output(image_folder, monkeypatch):
    from tltoolkit.tracking.runs import RunTracker

    recipe = aux_recipe({"at": "block2_relu", "dense": [8]}, {"at": "block3_relu", "decay": "cosine"})
    # The reference needs no logged model (the rest of the recipe, and so the training, is the same).
    whole = tltoolkit.run({**recipe, "tracking": {"log_model": False}}, image_folder, verbose=0, experiment="whole")

    original = RunTracker.on_epoch_end

    def interrupted(self, stage, epoch, logs):
        if stage.name == "finetune" and epoch == 1:
            raise KeyboardInterrupt  # After fine-tune epoch 1's checkpoint.
        original(self, stage, epoch, logs)

    monkeypatch.setattr(RunTracker, "on_epoch_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tltoolkit.run(recipe, image_folder, verbose=0, experiment="resumed")
    monkeypatch.setattr(RunTracker, "on_epoch_end", original)
    resumed = tltoolkit.run(recipe, image_folder, resume=True, verbose=0, experiment="resumed")

    a, b = whole.model, load_classifier(resumed.run_id).model
    assert len(a.outputs) == 1 and [w.shape for w in a.weights] == [w.shape for w in b.weights]
    for left, right in zip(a.weights, b.weights):
        np.testing.assert_array_equal(left.numpy(), right.numpy())
    for key in ("aux0_weight", "aux1_weight", "val_aux1_loss"):
        np.testing.assert_array_equal(whole.history[key], resumed.history[key], err_msg=key)
    assert whole.history["aux1_weight"].iloc[-1] == 0.0

    exported = tltoolkit.export(resumed.run_id, "tflite", output="exported")  # Verified against Keras as always.
    (output,) = tflite_interpreter(str(exported.artifact)).get_output_details()
    assert list(output["shape"]) == [1, 3], "the main head's probabilities only"


def test_an_unknown_tap_fails_before_data_is_read_naming_the_yaml_line(tmp_path, capsys):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text(yaml.safe_dump(aux_recipe({"at": "block2_rleu"}), sort_keys=False))
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "block2_rleu" in text)
    (tmp_path / "never-read").mkdir()
    assert main(["run", str(recipe), "--data", str(tmp_path / "never-read")]) == 2
    err = capsys.readouterr().err
    assert f"{recipe}, line {line}: head.auxiliary.0.at='block2_rleu' is not a layer of test_tiny" in err
    assert "Did you mean block2_relu" in err


def test_an_auxiliary_weight_is_searchable():
    recipe = aux_recipe({"at": "block2_relu"})
    recipe["search"] = {"space": {"head.auxiliary.0.weight": {"type": "float", "min": 0.1, "max": 1.0}}}
    recipe = load_recipe(recipe)
    hp = kt.HyperParameters()
    declare(hp, recipe)
    assert hp.values == {"head.auxiliary.0.weight": 0.3}
    assert resolve_trial(recipe, {"head.auxiliary.0.weight": 0.8}).head.auxiliary[0].weight == 0.8
