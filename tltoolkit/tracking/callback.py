"""Per-epoch metrics to MLflow, as a Keras callback (after MLflow's own `MlflowCallback`)."""

from __future__ import annotations

import time

import keras
from mlflow import MlflowClient
from mlflow.entities import Metric

from tltoolkit.stages.optimizers import current_learning_rate


class MlflowMetrics(keras.callbacks.Callback):
    """Logs `loss`, `accuracy`, `val_loss`, `val_accuracy` (and any other logs) plus `learning_rate` each epoch.

    Args:
        run_id: The MLflow run to log to (the stage's child run).
        client: Defaults to a client on the current tracking URI.
        prefix: Put before every key, e.g. `"head/"` when several stages log into one run (a search trial).

    Each epoch is logged with `step=epoch` (0-based, as Keras counts) in one batch call. The callback keeps every
    epoch's logs in `history` (reset in `on_train_begin`, so it can be reused).
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None, prefix: str = ""):
        super().__init__()
        self.run_id = run_id
        self.client = client or MlflowClient()
        self.prefix = prefix
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, logs=None):
        self.history = []

    def on_epoch_end(self, epoch, logs=None):
        values = {key: float(value) for key, value in (logs or {}).items() if key != "learning_rate"}
        values["learning_rate"] = current_learning_rate(self.model.optimizer)
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(self.prefix + key, value, now, epoch) for key, value in sorted(values.items())]
        )
        self.history.append({"epoch": epoch, **values})
