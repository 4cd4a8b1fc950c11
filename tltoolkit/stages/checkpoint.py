"""Checkpoints, so a killed training resumes where it was: atomic files, and the newest readable one wins.

Why not Keras's `BackupAndRestore`: it saves the model and optimizer of one `fit`, but a training here is several
fits (pretraining, head, fine-tune, each with its own optimizer and trainable set) whose position, epoch logs,
early-stopping bookkeeping and tracking run ids must come back together, and a kill mid-write must never leave
half a file.

A checkpoint is one `.npz` file: a JSON `TrainingState` (where the training is: stage, epoch, every epoch's logs so
far, the tracking run ids, early-stopping bookkeeping; versioned by `LAYOUT`) and groups of arrays: `model` (every
variable of the classifier, BatchNormalization statistics and dropout seed states included), `optimizer` (its step,
moments and velocities) and `best` (early stopping's best weights). It is written to a temporary file in the same
folder, flushed to disk and renamed over its final name, so a kill at any instant leaves either the old file or the
new one, never half of one. The newest `keep` files are kept; when the newest cannot be read (a disk fault, a copy
cut short), loading warns and falls back to the one before.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import numpy as np

from tltoolkit.errors import ResumeError

_NAME = re.compile(r"^checkpoint-(\d{6})\.npz$")

# The version of `TrainingState`'s layout. Raise it whenever a field changes meaning; older files are refused.
LAYOUT = 2


class CheckpointLayoutError(ResumeError):
    """A checkpoint written by another version of tltoolkit, whose state this one would misread."""


@dataclass
class StopperState:
    """Keras `EarlyStopping`'s bookkeeping, so a resumed stage stops where an uninterrupted one would."""

    wait: int
    best: float | None
    best_epoch: int
    stopped_epoch: int


@dataclass
class TrainingState:
    """Where a training is: what a checkpoint's JSON holds (the arrays travel beside it).

    `stage` is a position in the session's stage plan (pretraining first, when the recipe has it); `epoch` the last
    finished epoch of that stage (-1: none yet). `stage_runs` maps plan positions (as strings) to the tracking runs
    the hooks opened for them, so a resumed stage continues the same run.
    """

    key: str  # Identifies the command: the resolved recipe and data folders (see `commands.run`).
    data: str  # A digest of every image file (paths, sizes, mtimes): a changed folder cannot be resumed.
    stage: int = 0
    epoch: int = -1
    rows: list[dict] = field(default_factory=list)  # The epochs of `stage` so far, as `fit` logged them.
    stage_runs: dict[str, str] = field(default_factory=dict)
    histories: list[list[dict]] = field(default_factory=list)  # Rows of every finished stage, in plan order.
    stopped: bool = False  # Early stopping had ended `stage`.
    stopper: StopperState | None = None
    layout: int = LAYOUT

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, path: Path | None = None) -> TrainingState:
        """Reads a state; a checkpoint of another layout raises `CheckpointLayoutError` instead of being misread."""
        raw = json.loads(text)
        layout = raw.get("layout", 1) if isinstance(raw, dict) else None
        if layout != LAYOUT:
            raise CheckpointLayoutError(
                f"Checkpoint {path} was written by another version of tltoolkit (state layout {layout}, this version "
                f"reads {LAYOUT}), so it cannot be resumed safely. Finish the run with the version that started it, "
                "or start a new run without --resume."
            )
        stopper = raw.pop("stopper", None)
        return cls(**raw, stopper=StopperState(**stopper) if stopper else None)

    def at_stage(self, stage: int, **changes) -> TrainingState:
        """This state moved to the beginning of plan position `stage` (no epoch done, no early stopping yet)."""
        return replace(self, stage=stage, epoch=-1, rows=[], stopped=False, stopper=None, **changes)


@dataclass
class Checkpoint:
    """One saved moment of a training."""

    state: TrainingState
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    path: Path | None = None


class CheckpointStore:
    """The checkpoint files of one training, in `folder`.

    Args:
        folder: Created if needed.
        keep: How many of the newest files to keep (at least 2, so there is one to fall back to).
    """

    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder = Path(folder)
        self.keep = max(2, keep)

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))

    def save(self, state: TrainingState, arrays: dict[str, list[np.ndarray]]) -> Path:
        """Writes a new checkpoint atomically (temporary file, fsync, rename) and prunes the oldest."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".checkpoint-*.tmp"):  # Left by a process killed mid-write...
            if not _writer_alive(stale):  # ... never one another live process is writing now.
                stale.unlink(missing_ok=True)
        existing = self.paths()
        number = int(_NAME.match(existing[-1].name).group(1)) + 1 if existing else 0
        final = self.folder / f"checkpoint-{number:06d}.npz"
        temporary = self.folder / f".{final.name}.{os.getpid()}.tmp"
        payload = {"state": np.frombuffer(state.to_json().encode(), dtype=np.uint8)}
        for group, values in arrays.items():
            payload.update({f"{group}.{i:05d}": np.asarray(v) for i, v in enumerate(values)})
        try:
            with open(temporary, "wb") as handle:
                np.savez(handle, **payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_folder(self.folder)
        for old in self.paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return final

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that reads back whole; a warning names each unreadable one skipped.

        Raises:
            CheckpointLayoutError: The newest readable checkpoint was written by another version of tltoolkit.
        """
        for path in reversed(self.paths()):
            try:
                return read_checkpoint(path)
            except CheckpointLayoutError:
                raise
            except Exception as exc:  # A damaged zip raises BadZipFile, EOFError, ValueError, zlib.error...
                warnings.warn(
                    f"Checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); falling back to the one before.",
                    stacklevel=2,
                )
        return None

    def remove(self) -> None:
        """Deletes every checkpoint file (after the training finished and its model is logged)."""
        for path in self.paths():
            path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass


def _writer_alive(temporary: Path) -> bool:
    """Whether the process that names a temporary checkpoint file (`.checkpoint-N.npz.<pid>.tmp`) still runs here."""
    pid = temporary.name.split(".")[-2]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # Alive, someone else's.
        return True
    return True


def read_checkpoint(path: Path) -> Checkpoint:
    """Reads every array (so a damaged file fails here, by its CRC, not halfway through a restore)."""
    with np.load(path, allow_pickle=False) as data:
        state = TrainingState.from_json(bytes(data["state"]).decode(), path)
        arrays: dict[str, list[np.ndarray]] = {}
        for key in sorted(k for k in data.files if k != "state"):
            group, _ = key.rsplit(".", 1)
            arrays.setdefault(group, []).append(data[key])
    return Checkpoint(state, arrays, path)


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def variable_values(variables) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in variables]


def restore_variables(variables, values: list[np.ndarray], what: str, path: Path | None) -> None:
    """Assigns saved values to `variables` in order, after checking that they fit one to one."""
    variables = list(variables)
    mismatch = len(variables) != len(values) or any(tuple(v.shape) != tuple(a.shape) for v, a in zip(variables, values))
    if mismatch:
        raise ResumeError(
            f"Checkpoint {path} holds {len(values)} {what} arrays that do not fit this training's {len(variables)} "
            "variables: the recipe or the data's classes changed since it was written. Resume with the same recipe, "
            "--set overrides and data, or start a new run without --resume."
        )
    for variable, value in zip(variables, values):
        variable.assign(value)


@dataclass
class StageResume:
    """Where a stage picks up: its epochs done so far and the state of its optimizer and early stopping."""

    first_epoch: int  # Epochs already done (the next one to run, 0-based).
    rows: list[dict]  # Their logs, as `fit` wrote them.
    optimizer: list[np.ndarray]
    stopper: StopperState | None = None
    best_weights: list[np.ndarray] | None = None
    stopped: bool = False  # Early stopping had ended the stage.
    path: Path | None = None


class CheckpointCallback(keras.callbacks.Callback):
    """Writes a checkpoint at the end of every epoch, before the epoch's metrics are logged anywhere.

    Args:
        store: Where.
        classifier: The full model whose every variable is saved (the fit model may be its top, on cached features).
        state: The training's state at the start of this stage (run ids, finished stages...).
        rows: The stage's epoch logs so far (a list the stage keeps appending to).
        stopper: The stage's early stopping, if any.
    """

    def __init__(
        self, store: CheckpointStore, classifier: keras.Model, state: TrainingState, rows: list[dict], stopper=None
    ):
        super().__init__()
        self.store, self.classifier, self.state, self.rows, self.stopper = store, classifier, state, rows, stopper
        self.fixed: dict[int, np.ndarray] = {}  # id(variable) -> its value, for variables this fit cannot change.

    def on_train_begin(self, logs=None):
        # The classifier's variables outside the fitted model (the frozen layers below cached features) cannot change
        # during this fit: they are read once, not every epoch (for a head on cached MobileNetV2 features, reading
        # them took most of each epoch).
        fitted = {id(v) for v in self.model.variables}
        fixed = [v for v in self.classifier.variables if id(v) not in fitted]
        self.fixed = dict(zip(map(id, fixed), variable_values(fixed)))

    def on_epoch_end(self, epoch, logs=None):
        variables = self.classifier.variables
        changing = variable_values([v for v in variables if id(v) not in self.fixed])[::-1]
        arrays = {
            "model": [self.fixed[id(v)] if id(v) in self.fixed else changing.pop() for v in variables],
            "optimizer": variable_values(self.model.optimizer.variables),
        }
        stopper = None
        if self.stopper is not None:
            best = self.stopper.best
            stopper = StopperState(
                self.stopper.wait,
                None if best is None else float(best),
                self.stopper.best_epoch,
                self.stopper.stopped_epoch,
            )
            if self.stopper.best_weights is not None:
                arrays["best"] = [np.asarray(w) for w in self.stopper.best_weights]
        state = replace(
            self.state, epoch=epoch, rows=list(self.rows), stopped=bool(self.model.stop_training), stopper=stopper
        )
        self.store.save(state, arrays)
