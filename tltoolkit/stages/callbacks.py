"""What every kind of stage fits with: how it runs (`StageRun`), the epoch rows it returns, resumable early
stopping, and the bridge from Keras's epoch end to the session's hooks."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import keras
import numpy as np

from tltoolkit.errors import DivergedError
from tltoolkit.recipe import StageConfig
from tltoolkit.stages.checkpoint import CheckpointStore, StageResume, TrainingState
from tltoolkit.stages.hooks import TrainingHooks
from tltoolkit.stages.optimizers import current_learning_rate


@dataclass
class StageRun:
    """How one stage runs, besides what it trains: where its epochs come from, resuming, checkpoints, callbacks.

    Args:
        stage: The recipe's stage: what trains, optimizer, schedule, epochs, early stopping.
        stream: Which of the training batches' epoch streams (the stage's index), so stages draw different orders.
        epoch_offset: Epochs of the stages before this one (the joint reconstruction weight decays over all).
        resume: Continue a stage a checkpoint stopped in: from its next epoch, with its optimizer's state and early
            stopping's bookkeeping (the model's variables are the caller's to restore, before this call).
        checkpoints: Write a checkpoint after every epoch, before `callbacks` see it.
        state: The training's state at this stage's start, written into every checkpoint.
        callbacks: More callbacks (the session's hooks); they run after the checkpoint is written.
        verbose: Keras verbosity. Defaults to a progress bar on a terminal, one line per epoch otherwise.
    """

    stage: StageConfig | None  # None for pretraining (its epochs are the autoencoder's).
    stream: int = 0
    epoch_offset: int = 0
    resume: StageResume | None = None
    checkpoints: CheckpointStore | None = None
    state: TrainingState | None = None
    callbacks: list = field(default_factory=list)
    verbose: int | None = None

    def epochs(self, total: int | None = None) -> tuple[int, int]:
        """`(first, last)`: the epochs `fit` runs, of `total` (default: the stage's); a stage early stopping had
        ended runs none, only the restore."""
        first = self.resume.first_epoch if self.resume else 0
        return first, first if self.resume and self.resume.stopped else (total or self.stage.epochs)


def fit_verbosity(verbose: int | None) -> int:
    """Keras's `verbose`: as given, else a progress bar on a terminal and one line per epoch elsewhere."""
    return (1 if sys.stdout.isatty() else 2) if verbose is None else verbose


class EpochRows(keras.callbacks.Callback):
    """Every epoch's logs as `fit` reports them, plus the optimizer's `learning_rate`, continuing the rows of a
    resumed stage (a checkpoint keeps them, so epochs the tracker missed before a kill can be logged whole)."""

    def __init__(self, rows: list[dict]):
        super().__init__()
        self.rows = rows

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
        row.setdefault("learning_rate", current_learning_rate(self.model.optimizer))
        self.rows.append(row)


class TrainPhaseTimes(keras.callbacks.Callback):
    """Seconds each epoch spends training: from its start to the end of its last training batch, so validation,
    checkpoints and tracking after it are left out. What the stage's input pipeline and train steps deliver."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._started = self._last_batch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._started, self._last_batch = time.perf_counter(), None

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if self._started is not None and self._last_batch is not None:
            self.seconds.append(self._last_batch - self._started)

    def images_per_s(self, images_per_epoch: int) -> float | None:
        """Images per second over the epochs after this process's first (which also traces the train step and fills
        the image cache); over the first when it is the only one; None before any epoch ended."""
        timed = self.seconds[1:] or self.seconds
        return images_per_epoch / float(np.median(timed)) if timed else None


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's early stopping, able to pick up the bookkeeping of a resumed stage."""

    def __init__(self, *args, resume: StageResume | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume = resume

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.resume is not None and self.resume.stopper is not None:
            stopper = self.resume.stopper
            self.wait, self.best, self.best_epoch = stopper.wait, stopper.best, stopper.best_epoch
            self.stopped_epoch = stopper.stopped_epoch
            self.best_weights = self.resume.best_weights


class HookEpochs(keras.callbacks.Callback):
    """Hands every finished epoch's logs (plus the optimizer's current `learning_rate`) to `hooks.on_epoch_end`.

    It runs after the checkpoint callback, so whatever the hooks record happens only once the epoch is saved.
    """

    def __init__(self, hooks: TrainingHooks, stage):
        super().__init__()
        self.hooks, self.stage = hooks, stage

    def on_epoch_end(self, epoch, logs=None):
        values = {key: float(value) for key, value in (logs or {}).items() if key != "learning_rate"}
        values["learning_rate"] = current_learning_rate(self.model.optimizer)
        self.hooks.on_epoch_end(self.stage, epoch, values)


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Keras's `TerminateOnNaN`, as an error that says what happened and what to do: at the first batch whose loss is
    NaN or infinite it raises `DivergedError`, so the epoch never ends, no checkpoint of diverged weights is written,
    and the last one (finite) is what `--resume` continues from.

    Args:
        stage: The stage's name, for the message.
        index: Its position in the recipe's `stages` (the `--set` path of its learning rate).
    """

    def __init__(self, stage: str, index: int):
        super().__init__()
        self.stage, self.index, self.epoch = stage, index, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        rate = current_learning_rate(self.model.optimizer)
        raise DivergedError(
            f"Stage {self.stage!r}, epoch {self.epoch + 1}, batch {batch + 1}: the training loss became {float(loss)}; "
            f"the weights diverged, most likely because the learning rate ({rate:g}) is too high for this stage. "
            f"Training stopped before this epoch's checkpoint. Resume from the last one with a smaller rate: the same "
            f"command plus --resume <run id> --set stages.{self.index}.optimizer.learning_rate={rate / 10:g}"
        )
