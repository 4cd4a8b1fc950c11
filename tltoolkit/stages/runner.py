"""Fitting one classifier stage: set what trains, recompile with a fresh optimizer, fit, restore the best epoch.

A stage fits in one of three modes, each a function of its own: through the whole classifier (`_plain`), on the
frozen prefix's cached outputs (`_cached`, see `features.py`), or with the autoencoder's reconstruction as a second
output (`_joint`). Auxiliary heads (`head.auxiliary`) add their outputs to the first two (`_supervised`, see
`supervision.py`). The modes only decide what is fitted on what; `_fit` runs the shared part, stopping at a loss
that is no longer finite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import keras
import numpy as np
import pandas as pd

from tltoolkit.data.arrays import DISK
from tltoolkit.data.pipeline import readable_images
from tltoolkit.model.freeze import TrainableSummary, set_trainable, unfrozen_prefix
from tltoolkit.model.inference import predict_batches
from tltoolkit.model.metrics import TOP_K
from tltoolkit.recipe import Recipe, StageConfig
from tltoolkit.stages.callbacks import (
    EpochRows,
    ResumableEarlyStopping,
    StageRun,
    StopOnNonFiniteLoss,
    TrainPhaseTimes,
    fit_verbosity,
)
from tltoolkit.stages.checkpoint import CheckpointCallback, restore_variables
from tltoolkit.stages.features import CachedInputs
from tltoolkit.stages.optimizers import build_optimizer
from tltoolkit.stages.supervision import Supervision, SupervisionEpochs
from tltoolkit.stages.training import Training

_logger = logging.getLogger(__name__)


@dataclass
class ClassifierOutcome:
    """What fitting a classifier stage gives back."""

    history: pd.DataFrame  # One row per epoch run: epoch, loss, accuracy, val_loss, val_accuracy, learning_rate...
    trainable: TrainableSummary
    best_epoch: int | None  # 0-based epoch whose weights were restored (early stopping), else None.
    cached_above: str | None = None  # Trained on cached features above this layer ("head": whole backbone frozen).
    eval_model: keras.Model | None = None  # Scores `eval_data` (the top model on cached features, else the classifier).
    eval_data: object = None  # Validation batches for `eval_model`, in file order.
    input_path: str = ""  # What the stage trained on and why ("on cached features below ...", "through the ...").
    train_images_per_s: float | None = None  # Training throughput, validation excluded (`TrainPhaseTimes`).
    feature_extraction_s: float | None = None  # On cached features: seconds computing them (0: already cached).

    def predict_val(self, count: int, batch_size: int) -> np.ndarray:
        """Validation probabilities of the trained model for the `count` val images, in file order (through the
        cache when it was used)."""
        return predict_batches(self.eval_model, self.eval_data, count, batch_size, verbose=0)


@dataclass
class _Fit:
    """What one mode fits: the model, its epochs and validation batches, and how it is described and scored."""

    model: keras.Model
    train: object
    val: object
    steps: int
    eval_model: keras.Model
    eval_data: object
    class_weight: dict | None = None
    leading: list = field(default_factory=list)  # Callbacks that run before the epoch is recorded.
    note: str = ""
    cached_above: str | None = None
    feature_extraction_s: float | None = None


def fit_stage(training: Training, run: StageRun) -> ClassifierOutcome:
    """Trains one classifier stage of `training` as `run` says (see `StageRun`).

    The backbone's layers are frozen or unfrozen per `run.stage.unfreeze` and the recipe's `backbone.freeze`. When
    the feature cache serves the stage, the layers above the cut train on cached features: the same batches, updates
    and weights as training through the frozen layers, without running them every epoch.
    """
    recipe, backbone = training.recipe, training.backbone
    frozen = unfrozen_prefix(backbone, run.stage.unfreeze, recipe.backbone.freeze)
    summary = set_trainable(training.model, backbone, frozen, run.stage.train_bn)
    if training.joint is not None:
        fit = _joint(training, run)
    else:
        features, supervision = training.features, training.supervision
        taps = list(zip(supervision.taps, supervision.heads)) if supervision is not None else []
        epochs = (run.stream, *run.epochs())
        cached = features.inputs(training.model, backbone, frozen, epochs, run.verbose != 0, taps) if features else None
        fit = _cached(training, run, cached) if cached else _plain(training, run)
        fit.note = _input_path(training, frozen, cached)
        if supervision is not None:
            fit = _supervised(training, run, fit)
    return _fit(training, run, summary, fit)


def _input_path(training: Training, frozen: int, cached) -> str:
    """What the stage trains on and why, for its log line and the stage run's `input_path` param."""
    features = training.features
    if cached is not None:
        versions = (
            f"{features.describe_variants()} of each training image, one drawn per epoch; "
            if features.variants > 1
            else ""
        )
        pooled = "pooled, " if cached.pooled else ""
        where = "on disk" if cached.where == DISK else f"in {cached.where}"
        return f"on cached features below `{cached.cut}` ({versions}{pooled}{where})"
    reason = features.usable(frozen) if features is not None else "data.feature_cache is off"
    reason = reason or (features.refusal if features is not None else None) or "not cached"
    images = training.train.images
    source = f"images from the {images.where} cache" if images.store is not None else "images decoded each epoch"
    return f"through the backbone ({reason}; {source})"


def _plain(training: Training, run: StageRun) -> _Fit:
    first, last = run.epochs()
    val = training.eval["val"]
    model = training.supervision.model if training.supervision is not None else training.model
    compile_for_stage(model, training.recipe, run.stage, training.train.steps_per_epoch, 1, training.supervision)
    return _Fit(
        model,
        training.train.epochs(run.stream, first, last),
        val,
        training.train.steps_per_epoch,
        training.model,
        val,
        training.class_weight,
    )


def _cached(training: Training, run: StageRun, cached: CachedInputs) -> _Fit:
    steps = training.train.steps_per_epoch
    # On cached features a step is tiny, so a whole epoch runs per compiled call; not across replicas, where Keras's
    # multi-step loop over a distributed iterator fails in TensorFlow 2.21 ("You must feed a value for placeholder").
    per_call = steps if cached.model.distribute_strategy.num_replicas_in_sync == 1 else 1
    compile_for_stage(cached.model, training.recipe, run.stage, steps, per_call, training.supervision)
    scorer = cached.model
    if training.supervision is not None:  # Scored on the main output alone.
        scorer = keras.Model(cached.model.inputs, cached.model.outputs[0], name=f"{cached.model.name}_main")
    return _Fit(
        cached.model,
        cached.train,
        cached.val,
        steps,
        scorer,
        cached.val,
        training.class_weight,
        cached_above=cached.cut,
        feature_extraction_s=cached.extraction_s,
    )


def _supervised(training: Training, run: StageRun, fit: _Fit) -> _Fit:
    """`fit` with the auxiliary heads' targets, weights and log names (see `supervision.py`)."""
    supervision = training.supervision
    first = [schedule[min(run.epoch_offset, len(schedule) - 1)] for schedule in supervision.schedule]
    heads = ", ".join(
        f"{name} on `{tap}` weight {w:g}" for name, tap, w in zip(supervision.names, supervision.taps, first)
    )
    return replace(
        fit,
        train=supervision.with_targets(fit.train, fit.class_weight),
        val=supervision.with_targets(fit.val, None),
        class_weight=None,
        leading=[SupervisionEpochs(supervision, run.epoch_offset, fit.model.output_names[0]), *fit.leading],
        note=f"{fit.note}, with auxiliary heads ({heads})",
    )


def _joint(training: Training, run: StageRun) -> _Fit:
    joint, first_last = training.joint, run.epochs()
    steps = joint.train.steps_per_epoch
    joint.model.compile(
        optimizer=build_optimizer(run.stage.optimizer, run.stage.schedule, steps, run.stage.epochs),
        loss=joint.losses(training.recipe.head.label_smoothing),
        metrics=[[_LabelledAccuracy(name="accuracy")], []],
    )
    outputs = [tensor._keras_history.operation.name.split("/")[0] for tensor in joint.model.outputs]
    val = training.eval["val"]
    weight = f"weight {joint.weight_at(run.epoch_offset):g} decaying {joint.config.joint_decay}"
    note = f"through the backbone, with reconstruction ({weight})"
    return _Fit(
        joint.model,
        joint.with_targets(joint.train.epochs(run.stream, *first_last)),
        joint.with_targets(val),
        steps,
        training.model,
        val,
        None,  # Keras weighs classes of one output only.
        [_JointEpochs(joint, run.epoch_offset, outputs)],
        note,
    )


def _fit(training: Training, run: StageRun, summary: TrainableSummary, fit: _Fit) -> ClassifierOutcome:
    """Restores a resumed optimizer, fits with the stage's callbacks, and collects the outcome."""
    first, last = run.epochs()
    if run.resume is not None:
        fit.model.optimizer.build(fit.model.trainable_variables)
        restore_variables(fit.model.optimizer.variables, run.resume.optimizer, "optimizer", run.resume.path)
        rate = fit.model.optimizer.learning_rate
        if isinstance(rate, keras.Variable):
            # A constant rate is one of the optimizer's variables: the recipe's value wins (the same one, unless the
            # run is resumed with a changed rate after its loss diverged). A schedule is rebuilt from the recipe.
            rate.assign(run.stage.optimizer.learning_rate)
    rows: list[dict] = [dict(row) for row in run.resume.rows] if run.resume else []
    stopper = _early_stopping(run)
    diverged = StopOnNonFiniteLoss(run.stage.name, run.stream)
    timer = TrainPhaseTimes()
    callbacks = [timer, diverged, *fit.leading, EpochRows(rows), *([stopper] if stopper else [])]
    if run.checkpoints is not None:
        callbacks.append(CheckpointCallback(run.checkpoints, training.checkpoint_model, run.state, rows, stopper))
    _describe(training, run, summary, f", {fit.note}" if fit.note else "")
    with readable_images():
        fit.model.fit(
            fit.train,
            validation_data=fit.val,
            epochs=last,
            initial_epoch=first,
            steps_per_epoch=fit.steps,
            class_weight=fit.class_weight,
            callbacks=[*callbacks, *run.callbacks],
            shuffle=False,  # The stream's order.
            verbose=fit_verbosity(run.verbose),
        )
    best = stopper.best_epoch if stopper is not None and stopper.restore_best_weights else None
    history = pd.DataFrame(rows, columns=["epoch"] if not rows else None)
    throughput = timer.images_per_s(len(training.train.items))
    return ClassifierOutcome(
        history,
        summary,
        best,
        cached_above=fit.cached_above,
        eval_model=fit.eval_model,
        eval_data=fit.eval_data,
        input_path=fit.note,
        train_images_per_s=throughput,
        feature_extraction_s=fit.feature_extraction_s,
    )


def _early_stopping(run: StageRun) -> ResumableEarlyStopping | None:
    es = run.stage.early_stopping
    if es is None:
        return None
    return ResumableEarlyStopping(
        monitor=es.monitor,
        patience=es.patience,
        min_delta=es.min_delta,
        restore_best_weights=es.restore_best_weights,
        verbose=1,
        resume=run.resume,
    )


def _describe(training: Training, run: StageRun, summary: TrainableSummary, note: str) -> None:
    stage = run.stage
    _logger.info(
        "Stage %r: %d epoch(s), %d backbone layer(s) training (first %d of %d frozen), %s trainable parameters, "
        "%s lr=%g%s%s",
        stage.name,
        stage.epochs,
        summary.trainable_layers,
        summary.frozen_layers,
        len(training.backbone.layers),
        f"{summary.trainable_params:,}",
        stage.optimizer.name,
        stage.optimizer.learning_rate,
        note,
        f"; resuming at epoch {run.resume.first_epoch + 1}." if run.resume else ".",
    )


def compile_for_stage(
    model: keras.Model,
    recipe: Recipe,
    stage: StageConfig,
    steps_per_epoch: int,
    steps_per_execution: int = 1,
    supervision: Supervision | None = None,
) -> None:
    """Compiles `model` with the stage's new optimizer and schedule (Keras needs a recompile after `trainable` changes).

    `steps_per_execution` > 1 runs that many batches per compiled call: the same updates with less Python per step,
    worth it where steps are tiny (the layers above a cached prefix). With `supervision`, `model` outputs the main
    probabilities then the auxiliary heads', and each head's weighted loss joins the main one.
    """
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if model.outputs[0].shape[-1] > TOP_K:  # The main output's classes.
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=TOP_K, name=f"top{TOP_K}_accuracy"))
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=recipe.head.label_smoothing)
    model.compile(
        optimizer=build_optimizer(stage.optimizer, stage.schedule, steps_per_epoch, stage.epochs),
        loss=supervision.losses(loss) if supervision is not None else loss,
        metrics=supervision.metrics(metrics) if supervision is not None else metrics,
        steps_per_execution=steps_per_execution,
    )


class _LabelledAccuracy(keras.metrics.CategoricalAccuracy):
    """Accuracy over the labelled rows of a joint batch (unlabelled rows have all-zero labels)."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        labelled = keras.ops.cast(keras.ops.sum(y_true, axis=-1) > 0, "float32")
        return super().update_state(y_true, y_pred, sample_weight=labelled)


class _JointEpochs(keras.callbacks.Callback):
    """Sets the reconstruction weight each epoch and gives the joint model's logs the usual names."""

    def __init__(self, joint, offset: int, outputs: list[str]):
        super().__init__()
        self.joint, self.offset = joint, offset
        self.classes, self.reconstruction = outputs

    def on_epoch_begin(self, epoch, logs=None):
        self.joint.weight.assign(self.joint.weight_at(self.offset + epoch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        renames = {
            f"{self.classes}_accuracy": "accuracy",
            f"{self.classes}_loss": "classification_loss",
            f"{self.reconstruction}_loss": "reconstruction_loss",
        }
        for prefix in ("", "val_"):
            for old, new in renames.items():
                if f"{prefix}{old}" in logs:
                    logs[f"{prefix}{new}"] = logs.pop(f"{prefix}{old}")
        logs["reconstruction_weight"] = float(self.joint.weight.numpy())
