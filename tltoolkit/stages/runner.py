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


def prepare_training(recipe: Recipe, folder, backbone: keras.Model, seed: int | None = None) -> Training:
    """Builds the classifier on `backbone` and the pipelines its stages train and score on.

    Args:
        recipe: The head, data and class-weight settings.
        folder: From `prepare_data`.
        backbone: From `create_backbone`.
        seed: Shuffling (and augmentation) seed. Defaults to `recipe.seed`.
    """
    from tltoolkit.data.pipeline import image_dataset
    from tltoolkit.model import build_classifier

    seed = recipe.seed if seed is None else seed
    labels = [label for _, label in folder.parts["train"]]
    return Training(
        model=build_classifier(backbone, folder.class_names, recipe.head),
        train=TrainingBatches(folder.parts["train"], folder.num_classes, recipe.data, seed=seed),
        eval={
            part: image_dataset(items, folder.num_classes, recipe.data, training=False)
            for part, items in folder.parts.items()
            if part != "train"
        },
        class_weight=class_weights(recipe.head, labels, folder.class_names),
        features=FeatureSource(folder.parts, folder.num_classes, recipe.data, seed, recipe.backbone.weights),
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


class _EpochRows(keras.callbacks.Callback):
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
    """
    frozen = unfrozen_prefix(backbone, stage.unfreeze, recipe.backbone.freeze)
    summary = set_trainable(model, backbone, frozen, stage.train_bn)
    first = resume.first_epoch if resume else 0
    last = first if resume and resume.stopped else stage.epochs  # Stopped early: nothing left but the restore.
    cached = (
        features.inputs(model, backbone, frozen, verbose != 0, stream, first, last) if features is not None else None
    )
    fit_model = cached.model if cached else model
    train_ds, val_ds = (cached.train, cached.val) if cached else (train.epochs(stream, first, last), val_ds)
    steps = train.steps_per_epoch
    # On cached features a step is tiny, so a whole epoch runs per compiled call.
    compile_for_stage(fit_model, recipe, stage, steps, steps_per_execution=steps if cached else 1)
    if resume is not None:
        fit_model.optimizer.build(fit_model.trainable_variables)
        restore_variables(fit_model.optimizer.variables, resume.optimizer, "optimizer", resume.path)
    rows: list[dict] = [dict(row) for row in resume.rows] if resume else []
    stage_callbacks: list[keras.callbacks.Callback] = [_EpochRows(rows)]
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
        stage_callbacks.append(CheckpointCallback(checkpoints, model, checkpoint_state or {}, rows, stopper))
    stage_callbacks.extend(callbacks)
    print(
        f"Stage {stage.name!r}: {stage.epochs} epoch(s), {summary.trainable_layers} backbone layer(s) training "
        f"(first {summary.frozen_layers} of {len(backbone.layers)} frozen), "
        f"{summary.trainable_params:,} trainable parameters, {stage.optimizer.name} lr={stage.optimizer.learning_rate:g}"
        + (f", on cached features below `{cached.cut}`" if cached else "")
        + (f"; resuming at epoch {first + 1}." if resume else ".")
    )
    fit_model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=last,
        initial_epoch=first,
        steps_per_epoch=steps,
        class_weight=class_weight,
        callbacks=stage_callbacks,
        shuffle=False,  # Each epoch's order is the stream's own.
        verbose=(1 if sys.stdout.isatty() else 2) if verbose is None else verbose,
    )
    history = pd.DataFrame(rows, columns=["epoch"] if not rows else None)
    best = stopper.best_epoch if stopper is not None and stopper.restore_best_weights else None
    return StageOutcome(
        stage.name, history, summary, best, bool(stopper and stopper.stopped_epoch),
        cached.cut if cached else None, fit_model, val_ds,
    )  # fmt: skip
