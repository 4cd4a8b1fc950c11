"""Caches under a memory budget, end to end: a budget smaller than the images trains from the disk cache to the same
weights as the memory cache; the disk cache is reused by the next run and not after a file changed; a full disk or
an unwritable cache folder costs speed, never the run; a writer killed mid-shard is resumed without reading it."""

import errno
import signal
import subprocess
import sys

import numpy as np
import yaml
from conftest import cli, tiny_recipe, wait_until
from mlflow import MlflowClient
from PIL import Image

import tltoolkit
from tltoolkit import cache as cache_folder
from tltoolkit.data import arrays

TINY_BUDGET = ["data.memory_budget=1MB"]  # Less than the process holds: nothing is kept in memory.


def cached_recipe(**changes) -> dict:
    """The head on pooled features (flips: 2 versions), a stage above `block2_relu` on its feature maps, then the
    whole backbone through the images: every kind of cache."""
    return tiny_recipe(
        data={"image_size": 32, "batch_size": 4, "val_split": 0.25, "augment": {"flip": "horizontal"}},
        head={"dense": [8], "dropout": 0.0},
        tracking={"log_model": False},
        stages=[
            {"name": "head", "epochs": 2, "optimizer": {"learning_rate": 1e-2}},
            {"name": "top", "epochs": 1, "unfreeze": "block3_conv", "optimizer": {"learning_rate": 1e-3}},
            {"name": "all", "epochs": 1, "unfreeze": "all", "optimizer": {"learning_rate": 1e-4}},
        ],
        **changes,
    )


def stage_params(result, name):
    return MlflowClient().get_run(result.stage_runs[name]).data


def assert_same_weights(a, b):
    assert len(a.weights) == len(b.weights)
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=x.path)


def test_a_budget_below_the_images_trains_from_disk_to_the_same_weights_and_later_runs_reuse_it(
    image_folder, monkeypatch, caplog
):
    monkeypatch.setattr(arrays, "SHARD_BYTES", 2048)  # Several shards per cache.
    memory = tltoolkit.run(cached_recipe(), image_folder, verbose=0)
    disk = tltoolkit.run(cached_recipe(), image_folder, TINY_BUDGET, verbose=0)
    params = MlflowClient().get_run(disk.run_id).data.params
    for name in ("features_below_head", "features_below_block3_conv", "train_images", "val_images"):
        assert params[f"cache.{name}"].startswith("disk ("), (name, params[f"cache.{name}"])
        assert MlflowClient().get_run(memory.run_id).data.params[f"cache.{name}"].startswith("memory (")
    assert params["data.memory_budget"] == "1MB" and params["data.memory_budget_mb"] == "1"
    assert stage_params(disk, "head").params["input_path"].endswith("pooled, on disk)")
    assert stage_params(disk, "top").params["input_path"].endswith("one drawn per epoch; on disk)")
    assert stage_params(disk, "all").params["input_path"].endswith("images from the disk cache)")
    assert_same_weights(memory.model, disk.model)  # Bit for bit: the disk gives back exactly what was stored.
    assert disk.metrics["val_loss"] == memory.metrics["val_loss"]
    entries = {e.what for e in cache_folder.entries(("arrays",)) if str(image_folder) not in e.what}
    assert any("below `head`" in what for what in entries) and any("train images" in what for what in entries)

    caplog.set_level("INFO", logger="tltoolkit")
    again = tltoolkit.run(cached_recipe(), image_folder, TINY_BUDGET, verbose=0)
    assert stage_params(again, "head").metrics["feature_extraction_s"] == 0.0, "the next run reads the disk cache"
    assert stage_params(again, "top").metrics["feature_extraction_s"] == 0.0
    assert "Train images: reusing the disk cache" in caplog.text
    assert_same_weights(memory.model, again.model)

    changed = sorted((image_folder / "red").iterdir())[0]
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(changed)
    caplog.clear()
    after = tltoolkit.run(cached_recipe(), image_folder, TINY_BUDGET, verbose=0)
    assert stage_params(after, "head").metrics["feature_extraction_s"] > 0, "a changed file is another cache"
    assert "Decoding" in caplog.text, "the images of the changed part are decoded again"


def test_a_full_disk_falls_back_to_no_cache_with_a_warning_and_the_run_finishes(
    image_folder, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("TLTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    write = np.lib.format.write_array

    def full(handle, array, *args, **kwargs):  # The disk fills up under the caches (checkpoints still fit).
        if str(cache_folder.arrays_dir()) in str(getattr(handle, "name", "")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(handle, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", full)
    result = tltoolkit.run(cached_recipe(), image_folder, TINY_BUDGET, verbose=0)
    assert MlflowClient().get_run(result.run_id).info.status == "FINISHED" and result.metrics["val_accuracy"] >= 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("Train images: the disk cache could not be written (No space left on device)" in w for w in warnings)
    assert any("Feature cache: the disk cache of features below `head` could not be written" in w for w in warnings)
    head_path = stage_params(result, "head").params["input_path"]
    assert head_path.startswith("through the backbone (the disk cache of features below `head` could not be written")
    assert stage_params(result, "all").params["input_path"].endswith("images decoded each epoch)")
    assert not [p for p in cache_folder.arrays_dir().rglob("*") if p.name.endswith((".npy", ".tmp"))]


def test_an_unwritable_cache_folder_means_no_disk_cache_and_says_why(image_folder, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TLTOOLKIT_CACHE_DIR", str(blocker / "cache"))
    result = tltoolkit.run(cached_recipe(), image_folder, TINY_BUDGET, verbose=0)
    params = MlflowClient().get_run(result.run_id).data.params
    assert params["cache.train_images"].startswith("none (") and "is not writable" in params["cache.train_images"]
    assert stage_params(result, "head").params["input_path"].startswith("through the backbone (features below")


PAUSED_IN_A_SHARD = """
import time
from pathlib import Path
import numpy as np
from tltoolkit.data import arrays
arrays.SHARD_BYTES = 2048
_write = np.lib.format.write_array
def write_array(handle, array, *args, **kwargs):
    name = str(getattr(handle, "name", ""))
    if "features-" in name and array.ndim == 3 and array.shape[-1] > 32 and ".00001.npy" in name:
        handle.write(b"half a shard")  # The second shard of the `top` stage's feature maps, half written...
        handle.flush()
        Path({folder!r}, "logged").write_text(name)
        while True:  # ... and killed here.
            time.sleep(0.1)
    return _write(handle, array, *args, **kwargs)
np.lib.format.write_array = write_array
"""


def test_a_run_killed_while_writing_a_shard_resumes_and_never_reads_it(image_folder, tmp_path, monkeypatch):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cached_recipe()))
    log, paused = tmp_path / "run.log", tmp_path / "paused"
    paused.mkdir()
    (paused / "sitecustomize.py").write_text(PAUSED_IN_A_SHARD.format(folder=str(paused)))
    monkeypatch.setenv("PYTHONPATH", str(paused))
    command = ("run", str(path), "--data", str(image_folder), "--set", TINY_BUDGET[0], "--experiment", "killed")
    process = cli(*command, log=log)
    wait_until((paused / "logged").exists, process, 300, "the second shard of the `top` stage's features")
    torn = (paused / "logged").read_text()
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert open(torn, "rb").read() == b"half a shard"
    monkeypatch.delenv("PYTHONPATH")
    resumed = subprocess.run(
        [sys.executable, "-m", "tltoolkit", *command, "--resume"], stdout=log.open("a"), stderr=subprocess.STDOUT
    )
    text = log.read_text()
    assert resumed.returncode == 0, text[-3000:]
    assert "Resuming run" in text and "already cached" in text
    folder = next(
        p
        for p in cache_folder.arrays_dir().glob("features-*-train")
        if "block3_conv" in p.joinpath("meta.json").read_text()
    )
    assert not list(folder.glob(".*.tmp")), "the killed writer's half shard is gone"
    run_id = next(
        r.info.run_id
        for r in MlflowClient().search_runs([MlflowClient().get_experiment_by_name("killed").experiment_id])
        if r.data.tags.get("tltoolkit.kind") == "run"
    )
    monkeypatch.setenv("TLTOOLKIT_CACHE_DIR", str(tmp_path / "fresh-cache"))  # Computes every cache itself.
    straight = tltoolkit.run(path, image_folder, TINY_BUDGET, experiment="straight", verbose=0)
    assert MlflowClient().get_run(run_id).data.metrics["val_loss"] == straight.metrics["val_loss"]
