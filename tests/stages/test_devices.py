"""The recipe's `runtime`: a MirroredStrategy over two logical CPU devices (in a fresh process, through the CLI),
mixed precision with a float32 output, and the clear refusals."""

import signal

import keras
import numpy as np
import pytest
import yaml
from conftest import cli, tiny_recipe, wait_until_paused
from mlflow import MlflowClient

import tltoolkit
from tltoolkit.errors import RecipeError
from tltoolkit.recipe import RuntimeConfig, as_recipe
from tltoolkit.stages import devices

MIRRORED = ("--set", "runtime.strategy=mirrored", "--set", "runtime.devices=2")


def two_stage_recipe() -> dict:
    """The head stage trains on cached features, the fine-tune through the backbone: both paths run mirrored."""
    return tiny_recipe(
        stages=[
            {"name": "head", "epochs": 2, "optimizer": {"learning_rate": 1e-2}},
            {"name": "finetune", "epochs": 3, "unfreeze": "all", "optimizer": {"learning_rate": 1e-3}},
        ]
    )


def history(client, run_id, key):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_mirrored_on_two_cpu_devices_matches_one_device_and_resumes(image_folder, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(two_stage_recipe()))
    client = MlflowClient()
    log = tmp_path / "run.log"
    command = ("run", str(path), "--data", str(image_folder), "--experiment", "mirrored", *MIRRORED)

    process = cli(*command, log=log, paused=tmp_path / "paused", after=3)  # After the fine-tune's first epoch.
    wait_until_paused(tmp_path / "paused", process, timeout=300, what="the fine-tune's first epoch")
    process.send_signal(signal.SIGKILL)
    process.wait()
    process = cli(*command, "--resume", log=log)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "MirroredStrategy, 2 replicas" in text and "Resuming run" in text

    reference = tltoolkit.run(two_stage_recipe(), image_folder, experiment="one-device", verbose=0)
    runs = client.search_runs([client.get_experiment_by_name("mirrored").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("tltoolkit.kind") == "run")
    assert parent.info.status == "FINISHED" and parent.data.params["runtime.strategy"] == "mirrored"
    for key in ("loss", "val_loss"):
        mirrored = history(client, parent.info.run_id, key)[:5]
        assert [step for step, _ in mirrored] == [0, 1, 2, 3, 4], f"{key}: every epoch once"
        one = reference.history[key].to_numpy()
        # Two replicas sum their gradients in another order than one device: equal to float32 round-off.
        np.testing.assert_allclose([value for _, value in mirrored], one, rtol=1e-4, err_msg=key)


def test_mixed_precision_computes_in_float16_with_a_float32_output(image_folder):
    recipe = tiny_recipe(runtime={"mixed_precision": "on"})
    recipe["stages"] = recipe["stages"][:1]
    result = tltoolkit.run(recipe, image_folder, verbose=0, tracking_uri=None)
    model = result.model
    assert model.get_layer("backbone").layer.layers[1].compute_dtype == "float16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    assert keras.config.dtype_policy().name == "float32", "the process's policy is restored after the run"
    assert np.isfinite(result.metrics["val_loss"])


def test_auto_mixed_precision_only_on_gpus_that_gain_from_it(monkeypatch):
    monkeypatch.setattr(devices, "_capability", lambda gpu: {"v100": (7, 0), "p100": (6, 0)}[gpu])
    auto = RuntimeConfig()
    assert devices.precision_policy(auto, gpus=[]) == "float32", "off on CPU"
    assert devices.precision_policy(auto, gpus=["v100", "v100"]) == "mixed_float16"
    assert devices.precision_policy(auto, gpus=["p100"]) == "float32"
    assert devices.precision_policy(RuntimeConfig(mixed_precision="off"), gpus=["v100"]) == "float32"


def test_multi_worker_and_impossible_device_counts_are_refused_clearly(image_folder):
    with pytest.raises(RecipeError, match=r"keras-team/keras/issues/20585.*strategy: mirrored.*--distributed"):
        as_recipe(tiny_recipe(), ["runtime.strategy=multi_worker"])
    with pytest.raises(RecipeError, match="runtime.devices 2 needs `runtime.strategy: mirrored`"):
        as_recipe(tiny_recipe(), ["runtime.devices=2"])
    # This test process started TensorFlow on one CPU device: it cannot be split any more.
    with pytest.raises(RecipeError, match="runtime.devices 3: TensorFlow already started .* fresh process"):
        tltoolkit.run(tiny_recipe(runtime={"strategy": "mirrored", "devices": 3}), image_folder, verbose=0)
    with pytest.raises(RecipeError, match=r"runtime.devices names \['/gpu:7'\]"):
        tltoolkit.run(tiny_recipe(runtime={"strategy": "mirrored", "devices": ["/gpu:7"]}), image_folder, verbose=0)
    client = MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()]), "refused before any run"
