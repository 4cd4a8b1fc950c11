"""Running one training stage: set what trains, recompile with a fresh optimizer, fit, restore the best epoch."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from tltoolkit.data.pipeline import TrainingBatches
from tltoolkit.errors import DataError
from tltoolkit.model.freeze import TrainableSummary, set_trainable, unfrozen_prefix
from tltoolkit.model.metrics import TOP_K
from tltoolkit.recipe import HeadConfig, Recipe, StageConfig
from tltoolkit.stages.checkpoint import CheckpointCallback, CheckpointStore, StageResume, restore_variables
from tltoolkit.stages.features import FeatureSource
from tltoolkit.stages.optimizers import build_optimizer


@dataclass
class StageOutcome:
    name: str
    history: pd.DataFrame  # One row per epoch run: epoch, loss, accuracy, val_loss, val_accuracy, learning_rate...
    trainable: TrainableSummary
    best_epoch: int | None  # 0-based epoch whose weights were restored (early stopping), else None.
    stopped_early: bool
    cached_above: str | None = None  # Trained on cached features above this layer ("head": whole backbone frozen).
    eval_model: keras.Model | None = None  # Scores `eval_data` (the top model on cached features, else the classifier).
    eval_data: object = None  # Validation batches for `eval_model`, in file order.

    def predict_val(self) -> np.ndarray:
        """Validation probabilities of the trained model, in file order (through the cache when it was used)."""
        return self.eval_model.predict(self.eval_data, verbose=0)


@dataclass
class Training:
    """What every stage of one training shares: the classifier, its batches, class weights and the feature cache."""

    model: keras.Model
    train: TrainingBatches  # Shuffled epochs, one stream per stage, resumable at any epoch.
    eval: dict  # Part name ("val", maybe "test") -> batches in file order.
    class_weight: dict[int, float] | None
    features: FeatureSource
    joint: Joint | None = None  # An autoencoder recipe in `joint` mode: reconstruction trains alongside.

    @property
    def checkpoint_model(self) -> keras.Model:
        """The model whose every variable a checkpoint holds (the joint model includes the decoder)."""
        return self.joint.model if self.joint is not None else self.model


@dataclass
class Joint:
    """Classification and reconstruction trained together (`pretrain.autoencoder.joint`).

    Every stage fits `model` (image -> [class probabilities, reconstruction]) on the labelled training images plus
    the autoencoder's images (their labels all zero, so they add reconstruction loss only), with reconstruction an
    auxiliary loss whose weight `joint_weight` decays over all stages' epochs as `joint_decay` says.
    """

    model: keras.Model
    train: TrainingBatches
    config: object  # AutoencoderConfig
    total_epochs: int
    weight: keras.Variable

    def weight_at(self, epoch: int) -> float:
        """The reconstruction loss's weight in (global, 0-based) epoch `epoch`."""
        progress = min(1.0, epoch / max(1, self.total_epochs - 1))  # Zero in the last epoch.
        w0, decay = self.config.joint_weight, self.config.joint_decay
        if decay == "linear":
            return w0 * (1.0 - progress)
        if decay == "cosine":
            return w0 * 0.5 * (1.0 + float(np.cos(np.pi * progress)))
        return w0


class _JointEpochs(keras.callbacks.Callback):
    """Sets the reconstruction weight each epoch and gives the joint model's logs the usual names."""

    def __init__(self, joint: Joint, offset: int, outputs: list[str]):
        super().__init__()
        self.joint, self.offset = joint, offset
        self.classes, self.reconstruction = outputs

    def on_epoch_begin(self, epoch, logs=None):
        self.joint.weight.assign(self.joint.weight_at(self.offset + epoch))

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for prefix in ("", "val_"):
            if f"{prefix}{self.classes}_accuracy" in logs:
                logs[f"{prefix}accuracy"] = logs.pop(f"{prefix}{self.classes}_accuracy")
            if f"{prefix}{self.classes}_loss" in logs:
                logs[f"{prefix}classification_loss"] = logs.pop(f"{prefix}{self.classes}_loss")
            if f"{prefix}{self.reconstruction}_loss" in logs:
                logs[f"{prefix}reconstruction_loss"] = logs.pop(f"{prefix}{self.reconstruction}_loss")
        logs["reconstruction_weight"] = float(self.joint.weight.numpy())


def _masked_crossentropy(label_smoothing: float):
    """Categorical cross-entropy over labelled rows only: rows whose one-hot label is all zero add nothing."""
    base = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=None)

    def loss(y_true, y_pred):
        labelled = keras.ops.cast(keras.ops.sum(y_true, axis=-1) > 0, y_pred.dtype)
        return base(y_true, y_pred) * labelled

    return loss


class _LabelledAccuracy(keras.metrics.CategoricalAccuracy):
    """Accuracy over the labelled rows of a joint batch (unlabelled rows have all-zero labels)."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        labelled = keras.ops.cast(keras.ops.sum(y_true, axis=-1) > 0, "float32")
        return super().update_state(y_true, y_pred, sample_weight=labelled)


def _weighted_reconstruction(name: str, weight: keras.Variable):
    """The autoencoder's reconstruction loss times `weight` (a variable: changing it needs no recompile)."""
    from tltoolkit.stages.pretrain import reconstruction_loss

    base = reconstruction_loss(name)
    return lambda y_true, y_pred: weight * base(y_true, y_pred)


def _with_targets(ds):
    import tensorflow as tf

    return ds.map(lambda x, y: (x, (y, x / 255.0)), num_parallel_calls=tf.data.AUTOTUNE)


def prepare_training(recipe: Recipe, folder, backbone: keras.Model, seed: int | None = None, autoencoder=None,
                     unlabeled: list | None = None) -> Training:  # fmt: skip
    """Builds the classifier on `backbone` and the pipelines its stages train and score on.

    Args:
        recipe: The head, data and class-weight settings.
        folder: From `prepare_data`.
        backbone: From `create_backbone` (or the encoder of an autoencoder recipe).
        seed: Shuffling (and augmentation) seed. Defaults to `recipe.seed`.
        autoencoder: With `pretrain.autoencoder.joint`: the `Autoencoder` whose decoder trains alongside.
        unlabeled: Its images (`(path, 0)` items), joined to the labelled training images in `joint` mode.
    """
    from tltoolkit.data.pipeline import image_dataset
    from tltoolkit.model import build_classifier

    seed = recipe.seed if seed is None else seed
    labels = [label for _, label in folder.parts["train"]]
    model = build_classifier(backbone, folder.class_names, recipe.head)
    joint = None
    if autoencoder is not None and recipe.pretrain is not None and recipe.pretrain.autoencoder.joint:
        labelled = set(path for path, _ in folder.parts["train"])
        extra = [(path, -1) for path, _ in unlabeled or [] if path not in labelled]  # -1: an all-zero one-hot label.
        reconstruction = autoencoder.decoder(model.get_layer("backbone").output)
        joint = Joint(
            model=keras.Model(model.inputs, [model.output, reconstruction], name=f"{model.name}_joint"),
            train=TrainingBatches(folder.parts["train"] + extra, folder.num_classes, recipe.data, seed=seed),
            config=recipe.pretrain.autoencoder,
            total_epochs=sum(stage.epochs for stage in recipe.stages),
            weight=keras.Variable(recipe.pretrain.autoencoder.joint_weight, trainable=False, name="reconstruction_weight"),
        )
    return Training(
        model=model,
        train=TrainingBatches(folder.parts["train"], folder.num_classes, recipe.data, seed=seed),
        eval={
            part: image_dataset(items, folder.num_classes, recipe.data, training=False)
            for part, items in folder.parts.items()
            if part != "train"
        },
        class_weight=class_weights(recipe.head, labels, folder.class_names),
        features=FeatureSource(folder.parts, folder.num_classes, recipe.data, seed, recipe.backbone.weights),
        joint=joint,
    )


def class_weights(head: HeadConfig, labels: list[int], class_names: list[str]) -> dict[int, float] | None:
    """`head.class_weight` as Keras's `{label: weight}`: `auto` is scikit-learn's `balanced`."""
    if head.class_weight == "none":
        return None
    if head.class_weight == "auto":
        classes = np.arange(len(class_names))
        weights = compute_class_weight("balanced", classes=classes, y=np.asarray(labels))
        return {int(c): float(w) for c, w in zip(classes, weights)}
    unknown = sorted(set(head.class_weight) - set(class_names))
    if unknown:
        raise DataError(f"head.class_weight names classes {unknown} that the data lacks; its classes are {class_names}.")
    return {index: float(head.class_weight.get(name, 1.0)) for index, name in enumerate(class_names)}


def compile_for_stage(
    model: keras.Model, recipe: Recipe, stage: StageConfig, steps_per_epoch: int, steps_per_execution: int = 1
) -> None:
    """Compiles `model` with the stage's new optimizer and schedule (Keras needs a recompile after `trainable` changes).

    `steps_per_execution` > 1 runs that many batches per compiled call: the same updates with less Python per step,
    worth it where steps are tiny (the layers above a cached prefix).
    """
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if model.output_shape[-1] > TOP_K:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=TOP_K, name=f"top{TOP_K}_accuracy"))
    model.compile(
        optimizer=build_optimizer(stage.optimizer, stage.schedule, steps_per_epoch, stage.epochs),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe.head.label_smoothing),
        metrics=metrics,
        steps_per_execution=steps_per_execution,
    )


class EpochRows(keras.callbacks.Callback):
    """Every epoch's logs as `fit` reports them, continuing the rows of a resumed stage."""

    def __init__(self, rows: list[dict]):
        super().__init__()
        self.rows = rows

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}})


class _EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's early stopping, able to pick up the bookkeeping of a resumed stage."""

    def __init__(self, *args, resume: StageResume | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume = resume

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.resume is not None and self.resume.stopper is not None:
            for key, value in self.resume.stopper.items():
                setattr(self, key, value)
            self.best_weights = self.resume.best_weights


def fit_stage(
    model: keras.Model,
    backbone: keras.Model,
    recipe: Recipe,
    stage: StageConfig,
    train: TrainingBatches,
    val_ds,
    class_weight: dict[int, float] | None = None,
    callbacks: list[keras.callbacks.Callback] = (),
    verbose: int | None = None,
    features: FeatureSource | None = None,
    stream: int = 0,
    resume: StageResume | None = None,
    checkpoints: CheckpointStore | None = None,
    checkpoint_state: dict | None = None,
    joint: Joint | None = None,
    epoch_offset: int = 0,
) -> StageOutcome:
    """Trains one stage.

    Args:
        model: The classifier from `build_classifier`.
        backbone: Its backbone (its layers are frozen or unfrozen per `stage.unfreeze` and `recipe.backbone.freeze`).
        recipe: For the freeze policy and the loss.
        stage: What trains, optimizer, schedule, epochs, early stopping.
        train: The training set (`TrainingBatches`).
        val_ds: Validation batches.
        class_weight: From `class_weights`.
        callbacks: More callbacks, e.g. `MlflowMetrics`; they run after the checkpoint is written.
        verbose: Keras verbosity. Defaults to a progress bar on a terminal, one line per epoch otherwise.
        features: Where the frozen prefix's outputs can be cached (see `FeatureSource`). When it serves this stage,
            the layers above the cut train on cached features: the same batches, updates and weights as training
            through the frozen layers, without running them every epoch.
        stream: Which of `train`'s epoch streams (the stage's index), so stages draw different orders.
        resume: Continue a stage a checkpoint stopped in: from its next epoch, with its optimizer's state and early
            stopping's bookkeeping (the model's variables are the caller's to restore, before this call).
        checkpoints: Write a checkpoint after every epoch, before `callbacks` see it.
        checkpoint_state: What the caller wants in every checkpoint's state (run ids, finished stages...).
        joint: Train classification and reconstruction together (see `Joint`); the feature cache is then off.
        epoch_offset: Epochs of the stages before this one (the joint reconstruction weight decays over all).
    """
    frozen = unfrozen_prefix(backbone, stage.unfreeze, recipe.backbone.freeze)
    summary = set_trainable(model, backbone, frozen, stage.train_bn)
    first = resume.first_epoch if resume else 0
    last = first if resume and resume.stopped else stage.epochs  # Stopped early: nothing left but the restore.
    cached = (
        features.inputs(model, backbone, frozen, verbose != 0, stream, first, last)
        if features is not None and joint is None
        else None
    )
    fit_model = cached.model if cached else model
    eval_data = val_ds
    train_ds, val_ds = (cached.train, cached.val) if cached else (train.epochs(stream, first, last), val_ds)
    steps = train.steps_per_epoch
    leading: list[keras.callbacks.Callback] = []
    if joint is not None:
        fit_model, steps = joint.model, joint.train.steps_per_epoch
        train_ds, val_ds = _with_targets(joint.train.epochs(stream, first, last)), _with_targets(val_ds)
        fit_model.compile(
            optimizer=build_optimizer(stage.optimizer, stage.schedule, steps, stage.epochs),
            loss=[_masked_crossentropy(recipe.head.label_smoothing), _weighted_reconstruction(joint.config.loss, joint.weight)],
            metrics=[[_LabelledAccuracy(name="accuracy")], []],
        )
        leading.append(_JointEpochs(joint, epoch_offset, [o.name.split("/")[0] for o in _output_layers(fit_model)]))
    else:
        # On cached features a step is tiny, so a whole epoch runs per compiled call.
        compile_for_stage(fit_model, recipe, stage, steps, steps_per_execution=steps if cached else 1)
    if resume is not None:
        fit_model.optimizer.build(fit_model.trainable_variables)
        restore_variables(fit_model.optimizer.variables, resume.optimizer, "optimizer", resume.path)
    rows: list[dict] = [dict(row) for row in resume.rows] if resume else []
    stage_callbacks: list[keras.callbacks.Callback] = [*leading, EpochRows(rows)]
    stopper = None
    if stage.early_stopping is not None:
        es = stage.early_stopping
        stopper = _EarlyStopping(
            monitor=es.monitor,
            patience=es.patience,
            min_delta=es.min_delta,
            restore_best_weights=es.restore_best_weights,
            verbose=1,
            resume=resume,
        )
        stage_callbacks.append(stopper)
    if checkpoints is not None:
        saved = joint.model if joint is not None else model
        stage_callbacks.append(CheckpointCallback(checkpoints, saved, checkpoint_state or {}, rows, stopper))
    stage_callbacks.extend(callbacks)
    print(
        f"Stage {stage.name!r}: {stage.epochs} epoch(s), {summary.trainable_layers} backbone layer(s) training "
        f"(first {summary.frozen_layers} of {len(backbone.layers)} frozen), "
        f"{summary.trainable_params:,} trainable parameters, {stage.optimizer.name} lr={stage.optimizer.learning_rate:g}"
        + (f", on cached features below `{cached.cut}`" if cached else "")
        + (f", with reconstruction (weight {joint.weight_at(epoch_offset):g} decaying {joint.config.joint_decay})"
           if joint is not None else "")
        + (f"; resuming at epoch {first + 1}." if resume else ".")
    )
    fit_model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=last,
        initial_epoch=first,
        steps_per_epoch=steps,
        class_weight=None if joint is not None else class_weight,  # Keras weighs classes of one output only.
        callbacks=stage_callbacks,
        shuffle=False,  # Each epoch's order is the stream's own.
        verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose,
    )
    history = pd.DataFrame(rows, columns=["epoch"] if not rows else None)
    best = stopper.best_epoch if stopper is not None and stopper.restore_best_weights else None
    eval_model, eval_data = (model, eval_data) if joint is not None else (fit_model, val_ds)
    return StageOutcome(
        stage.name, history, summary, best, bool(stopper and stopper.stopped_epoch),
        cached.cut if cached else None, eval_model, eval_data,
    )  # fmt: skip


def _output_layers(model: keras.Model) -> list:
    """The layers that make a functional model's outputs, in output order."""
    return [tensor._keras_history.operation for tensor in model.outputs]
