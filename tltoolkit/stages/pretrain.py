"""The `pretrain` stage: a (denoising) autoencoder trained on unlabelled images; its encoder is the backbone after.

The autoencoder is `Corrupt` (noise, training only) -> encoder -> decoder, trained to give back the clean image
(pixels / 255) under MSE or MAE. Its epochs stream, checkpoint and resume like any stage's. Afterwards every
training image's reconstruction error (the same loss, clean input, per image) calibrates the anomaly threshold
(`anomaly_percentile`, 99 by default) that `predict` uses to flag images unlike the training set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from tltoolkit.data.pipeline import TrainingBatches, image_dataset
from tltoolkit.data.split import Item
from tltoolkit.errors import DataError
from tltoolkit.model.layers import Corrupt
from tltoolkit.recipe import DataConfig, ScheduleConfig
from tltoolkit.recipe.schema import AutoencoderConfig
from tltoolkit.stages.callbacks import EpochRows, StageRun, fit_verbosity
from tltoolkit.stages.checkpoint import CheckpointCallback, restore_variables
from tltoolkit.stages.optimizers import build_optimizer

# The stream index of pretraining's epochs (stages use their own index; this keeps the orders apart).
PRETRAIN_STREAM = 1000
_logger = logging.getLogger(__name__)


@dataclass
class Autoencoder:
    """The models of one autoencoder, sharing the encoder's and decoder's layers."""

    trainer: keras.Model  # Raw pixels -> Corrupt (training only) -> encoder -> decoder: what is fitted.
    scorer: keras.Model  # Raw pixels -> encoder -> decoder, no corruption: reconstructions and anomaly scores.
    encoder: keras.Model
    decoder: keras.Model


def build_autoencoder(encoder: keras.Model, config: AutoencoderConfig, seed: int) -> Autoencoder:
    """Wraps `encoder` (from `build_encoder`) with the mirrored decoder and the recipe's corruption."""
    from tltoolkit.backbones.encoder import architecture_of, build_decoder

    size = int(encoder.input_shape[1])
    decoder = build_decoder(encoder.output_shape[1:], size, architecture_of(config))
    inputs = keras.Input(shape=(size, size, 3), name="image")
    amount = config.sigma if config.noise == "gaussian" else config.mask_ratio
    corrupted = Corrupt(config.noise, amount, seed=seed, name="corrupt")(inputs)
    trainer = keras.Model(inputs, decoder(encoder(corrupted)), name="autoencoder")
    clean = keras.Input(shape=(size, size, 3), name="image")
    scorer = keras.Model(clean, decoder(encoder(clean)), name="autoencoder_scorer")
    return Autoencoder(trainer, scorer, encoder, decoder)


@dataclass
class Pretraining:
    """An autoencoder recipe's extra parts: the autoencoder around its encoder (the backbone) and its images."""

    autoencoder: Autoencoder
    train: list[Item]
    val: list[Item]
    skipped: list  # SkippedFile: unusable files in the unlabelled folder.
    unlabeled_dir: str | None
    images: object = None  # `ImageRows` of `train` (a cache, as the session's plan says); decoded each time if None.


def prepare_pretraining(
    recipe,
    encoder: keras.Model,
    labelled_train: list[Item],
    unlabeled: str | Path | None,
    seed: int,
    progress: bool = True,
) -> Pretraining:
    """The autoencoder around `encoder` and the images it trains on (see `unlabeled_items`)."""
    config = recipe.pretrain.autoencoder
    train, val, skipped = unlabeled_items(unlabeled, labelled_train, config, seed, progress)
    return Pretraining(
        build_autoencoder(encoder, config, seed), train, val, skipped, str(unlabeled) if unlabeled else None
    )


def unlabeled_items(
    unlabeled: str | Path | None,
    labelled_train: list[Item],
    config: AutoencoderConfig,
    seed: int,
    progress: bool = True,
):
    """The autoencoder's images: the unlabelled folder's (checked like any scan), plus the labelled training
    images' pixels when `use_labeled`; split into train and validation (`val_split`, seeded).

    Returns:
        `(train items, val items, skipped files)`; items are `(path, 0)`.

    Raises:
        DataError: No usable unlabelled image and `use_labeled` off, or the folder is missing.
    """
    from sklearn.model_selection import train_test_split

    from tltoolkit.data.folder import image_files

    paths, skipped = [], []
    if unlabeled is not None:
        if not Path(unlabeled).is_dir():
            raise DataError(f"The unlabelled image folder {unlabeled} does not exist; pass --unlabeled DIR.")
        scan = image_files([unlabeled], progress=progress)
        paths, skipped = scan.images, scan.skipped
    if config.use_labeled:
        paths = paths + [path for path, _ in labelled_train]
    if len(paths) < 2:
        raise DataError(
            f"Autoencoder pretraining needs images: {len(paths)} found. Pass --unlabeled DIR (or data.unlabeled), "
            "or set pretrain.autoencoder.use_labeled: true to use the labelled training images' pixels."
        )
    train, val = train_test_split(sorted(paths), test_size=config.val_split, random_state=seed)
    return [(p, 0) for p in train], [(p, 0) for p in sorted(val)], skipped


def _targets(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.map(lambda x, y: (x, x / 255.0), num_parallel_calls=tf.data.AUTOTUNE)


def autoencoder_data(config: AutoencoderConfig, data: DataConfig) -> DataConfig:
    """The data settings the autoencoder reads with: the recipe's size and resizing, its own batch, no augmentation."""
    return data.model_copy(
        update={
            "batch_size": config.batch_size,
            "augment": data.augment.model_copy(
                update={"flip": "none", "rotation": 0.0, "zoom": 0.0, "contrast": 0.0, "translation": 0.0}
            ),
        }
    )


def reconstruction_loss(name: str):
    return keras.losses.MeanSquaredError() if name == "mse" else keras.losses.MeanAbsoluteError()


def fit_autoencoder(
    pretraining: Pretraining, config: AutoencoderConfig, data: DataConfig, seed: int, run: StageRun
) -> pd.DataFrame:
    """Trains the autoencoder, then recalibrates its BatchNormalization statistics (`recalibrate_batchnorm`);
    returns one row per epoch (`loss`, `val_loss`, `learning_rate`). `run` says how (resume, checkpoints, callbacks;
    its `stage` is unused: the epochs are `config.epochs`)."""
    autoencoder, data = pretraining.autoencoder, autoencoder_data(config, data)
    # The planned image cache serves it: `autoencoder_data` changes only the batch size and augmentation.
    batches = TrainingBatches(pretraining.train, 1, data, seed, pretraining.images)
    first, last = run.epochs(config.epochs)
    model = autoencoder.trainer
    model.compile(
        optimizer=build_optimizer(config.optimizer, ScheduleConfig(), batches.steps_per_epoch, config.epochs),
        loss=reconstruction_loss(config.loss),
    )
    if run.resume is not None:
        model.optimizer.build(model.trainable_variables)
        restore_variables(model.optimizer.variables, run.resume.optimizer, "optimizer", run.resume.path)
    rows: list[dict] = [dict(row) for row in run.resume.rows] if run.resume else []
    callbacks: list[keras.callbacks.Callback] = [EpochRows(rows)]
    if run.checkpoints is not None:
        callbacks.append(CheckpointCallback(run.checkpoints, model, run.state, rows))
    _logger.info(
        "Stage 'pretrain': autoencoder (%s encoder, latent %d, %s noise, %s) on %d images (%d held out), %d epoch(s), "
        "%s parameters%s",
        config.encoder,
        config.latent,
        config.noise,
        config.loss,
        len(pretraining.train),
        len(pretraining.val),
        config.epochs,
        f"{model.count_params():,}",
        f"; resuming at epoch {first + 1}." if run.resume else ".",
    )
    model.fit(
        _targets(batches.epochs(PRETRAIN_STREAM, first, config.epochs)),
        validation_data=_targets(image_dataset(pretraining.val, 1, data)),
        epochs=last,
        initial_epoch=first,
        steps_per_epoch=batches.steps_per_epoch,
        callbacks=[*callbacks, *run.callbacks],
        shuffle=False,
        verbose=fit_verbosity(run.verbose),
    )
    recalibrate_batchnorm(autoencoder, pretraining.train, data)
    return pd.DataFrame(rows, columns=["epoch"] if not rows else None)


def recalibrate_batchnorm(autoencoder: Autoencoder, items: list[Item], data: DataConfig, max_batches: int = 200) -> int:
    """Sets every BatchNormalization layer's moving statistics to the mean of its batch statistics over (up to
    `max_batches` of) the clean training images.

    Keras's moving averages lag far behind short trainings (momentum 0.99 forgets 1% per step), and once the encoder
    is a backbone it runs in inference mode, on those averages. A cumulative mean over a pass of clean images gives
    it the statistics of the images it will see. Returns the number of batches used.
    """
    layers = [
        layer for layer in autoencoder.scorer._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return 0
    saved = [layer.momentum for layer in layers]
    used = 0
    try:
        for used, (x, _) in enumerate(image_dataset(items, 1, data).take(max_batches), start=1):
            for layer in layers:
                layer.momentum = (used - 1) / used  # Cumulative mean: the k-th batch weighs 1/k.
            autoencoder.scorer(x, training=True)
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return used


def reconstruction_errors(scorer: keras.Model, items: list[Item], data: DataConfig, loss: str) -> np.ndarray:
    """Each image's reconstruction error: the mean squared (`mse`) or absolute (`mae`) pixel error, pixels in [0, 1]."""
    from tltoolkit.model.metrics import reconstruction_error

    errors = [
        reconstruction_error(scorer.predict_on_batch(x), x.numpy(), loss) for x, _ in image_dataset(items, 1, data)
    ]
    return np.concatenate(errors) if errors else np.zeros(0)


def samples(autoencoder: Autoencoder, items: list[Item], data: DataConfig, count: int = 8):
    """`(images, noisy, reconstructed)` for the first `count` items: what the reconstruction grid shows."""
    x = next(iter(image_dataset(items[:count], 1, data.model_copy(update={"batch_size": count}))))[0]
    corrupt = autoencoder.trainer.get_layer("corrupt")
    noisy = keras.ops.convert_to_numpy(corrupt(x, training=True))
    return x.numpy(), noisy, np.asarray(autoencoder.scorer.predict_on_batch(noisy))
