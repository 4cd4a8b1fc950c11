"""The recipe schema: typed, frozen, validated once.

A recipe describes everything a run needs. Every section has defaults, so `Recipe()` is a complete, valid recipe
(MobileNetV2, head stage then fine-tune); a YAML file only states what differs. Unknown keys are errors.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tltoolkit.backbones.registry import check_backbone_name


def plain_name(value: str | None) -> str | None:
    """A name that becomes a folder (a search's, a run's): one path component, so it cannot point elsewhere."""
    if value is not None and (value in ("", ".", "..") or any(c in value for c in "/\\\0")):
        raise ValueError(f"{value!r} must be a plain name (no `/`, `\\`, or `..`), as it names a folder")
    return value


# A name that becomes a folder: `name`, `search.name`.
PlainName = Annotated[str | None, AfterValidator(plain_name)]


class _Section(BaseModel):
    # Infinity and NaN (YAML's .inf and .nan) are refused in every float field: no setting can work with them.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def _check_layer_point(value: Any, *, what: str, words: tuple[str, ...]) -> Any:
    """Validates a freeze or unfreeze point: a keyword, a layer count, a fraction in (0, 1] or a layer name."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be one of {', '.join(words)}, a layer count, a fraction or a layer name")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} as a layer count must be >= 0")
        return value
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"{what} as a fraction of the backbone's layers must be in (0, 1]; use an integer for a count"
            )
        return value
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"{what} must be one of {', '.join(words)}, a layer count, a fraction or a layer name")


class AugmentConfig(_Section):
    """Random augmentation applied to training batches only (Keras preprocessing layers)."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = Field(
        "none", description="Random mirroring of training images."
    )
    rotation: float = Field(0.0, ge=0.0, le=0.5, description="Max rotation as a fraction of a full turn.")
    zoom: float = Field(0.0, ge=0.0, lt=1.0, description="Max zoom in or out, as a fraction of the size.")
    contrast: float = Field(0.0, ge=0.0, le=1.0, description="Max contrast change factor.")
    translation: float = Field(0.0, ge=0.0, lt=1.0, description="Max shift, as a fraction of the size.")

    @property
    def continuous(self) -> list[str]:
        """The augmentations on, by name, that make a new image every epoch (all but flips, which make a few)."""
        return [name for name in ("rotation", "zoom", "contrast", "translation") if getattr(self, name)]


class DataConfig(_Section):
    dir: str | None = Field(None, description="Image folder; `--data` overrides it.")
    unlabeled: str | None = Field(
        None, description="Folder of unlabelled images (any depth) for `pretrain`; `--unlabeled` overrides it."
    )
    image_size: int = Field(224, ge=16, le=1024, description="Square side in pixels that images are resized to.")
    batch_size: int = Field(
        32,
        ge=1,
        le=4096,
        description="Images per training and scoring batch; with `runtime.strategy: mirrored` the global batch, split "
        "between the devices.",
    )
    val_split: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction held out for validation when there is no val/.")
    resize: Literal["squash", "crop", "pad"] = Field(
        "squash", description="`squash` to the square, `crop` the centre square, or `pad` to a square (black)."
    )
    interpolation: Literal["antialiased", "bilinear"] = Field(
        "antialiased",
        description="`antialiased` (Pillow's bilinear, filter widened when shrinking, as torchvision) or `bilinear` "
        "(no antialiasing, exactly as tf.image.resize and Keras's image_dataset_from_directory).",
    )
    cache: bool = Field(
        True,
        description="Keep decoded, resized images for stages that train through the backbone: in memory, or in the "
        "disk cache where `memory_budget` leaves too little (see `memory_budget`); `false`: decode them every epoch.",
    )
    memory_budget: str = Field(
        "auto",
        description="What the run may take in memory, caches included: a size with its unit (`2GB`, `512MB`) or "
        "`auto` (half of the memory available at the start). Each cache (decoded images, a stage's features) is "
        "kept in memory while it fits what the budget leaves, else on disk in the tltoolkit cache folder (reused by "
        "later runs, `tltoolkit cache clear` removes it), else not at all; the run's log and params say which and why.",
    )
    feature_cache: bool = Field(
        True,
        description="A stage that trains only above a frozen prefix, with no augmentation but flips, trains on the "
        "prefix's outputs computed once (once per mirror image with `augment.flip`) instead of running the frozen "
        "layers every epoch (same result, much faster). Rotation, zoom, contrast or translation turn it off.",
    )
    feature_cache_copies: int = Field(
        0,
        ge=0,
        le=64,
        description="With rotation, zoom, contrast or translation: cache K augmented copies of each training image "
        "(each epoch draws one per image) instead of training through the frozen layers. An approximation: K fixed "
        "copies, not a new image every epoch. 0 (default) keeps training through the backbone.",
    )

    exclude: str | None = Field(
        None,
        description="A file of images to leave out: a CSV with a `path` column (such as `tltoolkit audit`'s "
        "label_issues.csv, edited to the rows to drop) or one path per line. They are reported as skipped.",
    )
    split_by_duplicates: bool = Field(
        False,
        description="Keep near-duplicate images (the audit's embeddings, cosine similarity >= "
        "`duplicate_similarity`) on one side of the train/val split, so none leaks into validation. With a given "
        "val/ or test/ folder the leaking pairs are reported instead.",
    )
    duplicate_similarity: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="Cosine similarity of the backbone's embeddings from which two images are "
        "near-duplicates (`split_by_duplicates`, `tltoolkit audit`).",
    )

    augment: AugmentConfig = Field(AugmentConfig(), description="Random changes to training images (never to scoring).")

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget(cls, value: Any) -> str:
        from tltoolkit.data.budget import parse_size

        parse_size(value)  # Raises with the accepted forms.
        return value.strip()

    @field_validator("feature_cache_copies")
    @classmethod
    def _copies(cls, copies: int) -> int:
        if copies == 1:
            raise ValueError(
                "data.feature_cache_copies 1 would train every epoch on one fixed augmentation of each image; use 2 or "
                "more copies (or 0: a new augmentation every epoch, through the backbone)"
            )
        return copies


class BackboneConfig(_Section):
    name: str = Field("mobilenet_v2", description="A registered backbone; `tltoolkit backbones` lists them.")
    weights: str = Field("imagenet", description="`imagenet`, `none`, another source the backbone lists, or a path.")
    freeze: Any = Field(
        "all",
        description="`all`, `none`, N first layers, a fraction, up to a layer name, or `auto` (what `tltoolkit probe` "
        "measures on the data: `all` when the backbone's output serves best, else up to the best depth).",
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        return check_backbone_name(value)

    @field_validator("freeze", mode="before")
    @classmethod
    def _freeze_point(cls, value: Any) -> Any:
        return _check_layer_point(value, what="freeze", words=("all", "none", "auto"))


class AuxiliaryHeadConfig(_Section):
    """An extra classifier on an intermediate backbone layer (deep supervision); trained alongside, then dropped."""

    at: str = Field(
        description="The backbone layer whose output it classifies (`tltoolkit backbones --layers NAME` lists them; "
        "stage ends, e.g. `block_13_expand_relu` of mobilenet_v2, are the usual taps)."
    )
    weight: float = Field(0.3, gt=0.0, le=10.0, description="Its loss's weight at the start (GoogLeNet used 0.3).")
    decay: Literal["none", "linear", "cosine"] = Field(
        "linear",
        description="How the weight falls to zero over the epochs of the stages that train layers below the tap "
        "(before those, only the auxiliary head itself learns, at full weight). `none`: it stays.",
    )
    dense: list[int] = Field(default_factory=list, description="Hidden dense widths between its pooling and classes.")

    @field_validator("at")
    @classmethod
    def _named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("`at` must name a backbone layer, e.g. block_13_expand_relu")
        return value.strip()

    @field_validator("dense")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        return _positive_widths(value)


def _repeated(values: list) -> list:
    return sorted({value for value in values if values.count(value) > 1})


def _positive_widths(value: list[int]) -> list[int]:
    if any(width < 1 for width in value):
        raise ValueError("every dense width must be a positive integer, e.g. [256, 128]")
    return value


class HeadConfig(_Section):
    pooling: Literal["avg", "max", "flatten"] = Field(
        "avg",
        description="`avg`/`max`: global pooling; `flatten`: keep where features are (small maps: an autoencoder's).",
    )
    dense: list[int] = Field(default_factory=list, description="Widths of hidden dense layers, e.g. [256].")
    activation: Literal["relu", "gelu", "silu", "swish", "elu", "selu", "tanh", "leaky_relu"] = Field(
        "relu", description="Activation of the hidden dense layers."
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout before each dense layer and the classifier.")
    l1: float = Field(0.0, ge=0.0, description="L1 penalty on the head's dense kernels.")
    l2: float = Field(0.0, ge=0.0, description="L2 penalty on the head's dense kernels.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="Cross-entropy label smoothing.")
    class_weight: Literal["none", "auto"] | dict[str, float] = Field(
        "none", description="`auto` weights classes inversely to their frequency (scikit-learn's `balanced`)."
    )

    auxiliary: list[AuxiliaryHeadConfig] = Field(
        default_factory=list,
        max_length=8,
        description="Deep supervision: extra classifiers on intermediate layers (`{at, weight, decay, dense}` each), "
        "their losses added with decaying weights; the saved and exported model has the main output only.",
    )

    @field_validator("dense")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        return _positive_widths(value)

    @field_validator("auxiliary")
    @classmethod
    def _distinct_taps(cls, value: list[AuxiliaryHeadConfig]) -> list[AuxiliaryHeadConfig]:
        repeated = _repeated([head.at for head in value])
        if repeated:
            raise ValueError(f"two auxiliary heads tap the same layer {repeated}; give each head its own `at`")
        return value

    @field_validator("class_weight")
    @classmethod
    def _positive_weights(cls, value: Any) -> Any:
        if isinstance(value, dict) and any(weight <= 0 for weight in value.values()):
            raise ValueError("class weights must be positive numbers, one per class name")
        return value


class OptimizerConfig(_Section):
    name: Literal["adam", "adamw", "sgd", "rmsprop"] = Field("adam", description="The Keras optimizer.")
    learning_rate: float = Field(1e-3, gt=0.0, le=10.0, description="Peak learning rate (after any warm-up).")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (all optimizers).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Used by sgd and rmsprop.")
    nesterov: bool = Field(False, description="Used by sgd.")
    clipnorm: float | None = Field(None, gt=0.0, description="Clip each gradient to this norm.")

    @model_validator(mode="after")
    def _adamw_decays(self) -> OptimizerConfig:
        if self.name == "adamw" and self.weight_decay <= 0:
            raise ValueError("optimizer adamw needs weight_decay > 0 (e.g. 1e-4); for no decay use adam")
        return self


class ScheduleConfig(_Section):
    name: Literal["constant", "cosine"] = Field("constant", description="`cosine` decays to `min_lr_ratio` by the end.")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up from 0, in epochs (fractions allowed).")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine: final learning rate / initial.")


class EarlyStoppingConfig(_Section):
    monitor: Literal["loss", "accuracy", "val_loss", "val_accuracy"] = Field("val_loss", description="Watched metric.")
    patience: int = Field(3, ge=0, description="Epochs without improvement before the stage stops.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")
    restore_best_weights: bool = Field(True, description="End the stage with the best epoch's weights.")


_STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class StageConfig(_Section):
    name: str = Field("head", description="Names the stage's MLflow run and metrics (letters, digits, `_`, `-`).")
    epochs: int = Field(5, ge=1, le=100_000, description="Epochs to train (fewer if early stopping ends it).")
    unfreeze: Any = Field(
        "none",
        description="`none` keeps backbone.freeze; `all`; top K layers; a top fraction; from a layer name up; or "
        "`auto`: the probe's answer (`tltoolkit probe`): none, from the layer above the best depth, or all.",
    )
    train_bn: bool = Field(False, description="Also train BatchNormalization gamma/beta (statistics never update).")
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="A fresh optimizer for this stage.")
    schedule: ScheduleConfig = Field(ScheduleConfig(), description="The learning-rate schedule over the stage.")
    early_stopping: EarlyStoppingConfig | None = Field(None, description="Stop when the monitored metric stalls.")

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        if not _STAGE_NAME.match(value):
            raise ValueError("a stage name may hold only letters, digits, '_' and '-', e.g. `finetune`")
        return value

    @field_validator("unfreeze", mode="before")
    @classmethod
    def _unfreeze_point(cls, value: Any) -> Any:
        return _check_layer_point(value, what="unfreeze", words=("none", "all", "auto"))


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig(name="head", epochs=5, unfreeze="none", optimizer=OptimizerConfig(learning_rate=1e-3)),
        StageConfig(name="finetune", epochs=5, unfreeze="all", optimizer=OptimizerConfig(learning_rate=1e-5)),
    ]


class AutoencoderConfig(_Section):
    """A (denoising) convolutional autoencoder trained on unlabelled images; its encoder becomes the backbone."""

    encoder: str = Field(
        "conv",
        description="`conv` (blocks of `widths`, then a 1x1 conv to `latent` channels) or a registered "
        "backbone name, built with `weights: none`, followed by the same 1x1 latent conv.",
    )
    widths: list[int] = Field(
        [32, 64, 128],
        min_length=1,
        max_length=8,
        description="`conv`: channels per block (each halves the image side); the depth is their count.",
    )
    latent: int = Field(64, ge=1, le=4096, description="Channels of the bottleneck feature map.")
    noise: Literal["none", "gaussian", "masking"] = Field("gaussian", description="Denoising corruption of inputs.")
    sigma: float = Field(0.1, ge=0.0, le=1.0, description="`gaussian`: noise std, as a fraction of the 0-255 range.")
    mask_ratio: float = Field(0.25, ge=0.0, lt=1.0, description="`masking`: fraction of pixels set to black.")
    loss: Literal["mse", "mae"] = Field("mse", description="Reconstruction loss (and anomaly score), pixels in [0, 1].")
    epochs: int = Field(10, ge=1, le=100_000, description="Pretraining epochs.")
    batch_size: int = Field(32, ge=1, le=4096, description="Images per pretraining batch.")
    optimizer: OptimizerConfig = Field(OptimizerConfig(), description="Pretraining's optimizer (constant rate).")
    val_split: float = Field(0.1, gt=0.0, lt=1.0, description="Unlabelled images held out to score reconstruction.")
    use_labeled: bool = Field(True, description="The labelled training images' pixels join the unlabelled ones.")
    joint: bool = Field(
        False,
        description="No separate pretraining: every stage trains classification and "
        "reconstruction together, reconstruction an auxiliary loss.",
    )
    joint_weight: float = Field(1.0, ge=0.0, description="`joint`: the reconstruction loss's weight at the start.")
    joint_decay: Literal["none", "linear", "cosine"] = Field(
        "linear", description="`joint`: how that weight falls to zero over all stages' epochs (`none`: stays)."
    )
    anomaly_percentile: float = Field(
        99.0,
        gt=0.0,
        le=100.0,
        description="Reconstruction errors above this percentile of the training images' "
        "are flagged as anomalies by `predict`.",
    )

    @field_validator("encoder")
    @classmethod
    def _known_encoder(cls, value: str) -> str:
        return value if value == "conv" else check_backbone_name(value)

    @field_validator("widths")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(width < 1 for width in value):
            raise ValueError("every width must be a positive integer, e.g. [32, 64, 128]")
        return value


class PretrainConfig(_Section):
    autoencoder: AutoencoderConfig = Field(AutoencoderConfig(), description="The autoencoder and its training.")


class EvaluationConfig(_Section):
    calibrate: bool = Field(
        True,
        description="After the last stage, fit a softmax temperature on the val split (temperature scaling; needs at "
        "least 30 val images) and store it in the model, so predict, the MLflow model and exports give calibrated "
        "probabilities; never changes the predicted class. `val_ece_uncalibrated` and `val_ece` are logged.",
    )
    tta: Literal["none", "flip", "flip_crops"] = Field(
        "none",
        description="Test-time augmentation scored beside the plain final scores (`<part>_tta_accuracy`, ...): the "
        "mean prediction over the image and its mirror (`flip`), plus four corner crops and their mirrors "
        "(`flip_crops`). The plain scores are never replaced.",
    )
    top_losses: int = Field(
        8,
        ge=0,
        le=64,
        description="The interpretation report after the run (most confused classes, the val images with the highest "
        "loss, Grad-CAM heat maps over them, under `interpretation/`): how many images; 0 turns it off.",
    )


class TrackingConfig(_Section):
    experiment: str = Field("tltoolkit", min_length=1, description="MLflow experiment; `--experiment` overrides it.")
    run_name: str | None = Field(None, description="Defaults to `<recipe>-<backbone>-<dataset>`.")
    uri: str | None = Field(None, description="MLflow tracking URI; `--tracking-uri` and MLFLOW_TRACKING_URI win.")
    log_model: bool = Field(True, description="Log the trained model (an MLflow pyfunc model) with the run.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on every run.")


MULTI_WORKER_REFUSED = (
    "runtime.strategy multi_worker: Keras 3 cannot train one model across machines "
    "(MultiWorkerMirroredStrategy fails in `fit`, https://github.com/keras-team/keras/issues/20585). Use "
    "`strategy: mirrored` for all the devices of one machine, and `tltoolkit tune --distributed chief|worker` to "
    "spread a search over machines (each worker trains its own trials)"
)


class RuntimeConfig(_Section):
    """Where a run trains: one device, or every device of one machine in one `tf.distribute` scope."""

    strategy: Literal["none", "mirrored", "multi_worker"] = Field(
        "none",
        description="`none`: one device (TensorFlow's choice: the first GPU, else the CPU). `mirrored`: "
        "`tf.distribute.MirroredStrategy`, one replica per device, each batch split between them "
        "(`data.batch_size` is the global batch; learning rates are not rescaled). `multi_worker` is refused: Keras 3 "
        "does not support it (keras-team/keras#20585).",
    )
    devices: int | list[str] | None = Field(
        None,
        description="With `mirrored`: a count (the first N GPUs; on a machine without GPUs, the CPU split into N "
        'logical devices) or a list of device names (`["/gpu:0", "/gpu:2"]`). Default: every GPU (the CPU alone '
        "on a machine without).",
    )
    mixed_precision: Literal["auto", "off", "on"] = Field(
        "auto",
        description="`mixed_float16` compute with float32 weights: `auto` turns it on where a GPU supports it "
        "(compute capability 7.0 or newer) and off on CPUs; the output layer always computes in float32.",
    )

    @field_validator("strategy")
    @classmethod
    def _no_multi_worker(cls, strategy: str) -> str:
        if strategy == "multi_worker":
            raise ValueError(MULTI_WORKER_REFUSED)
        return strategy

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices):
        if isinstance(devices, int) and not isinstance(devices, bool) and devices < 1:
            raise ValueError(f"runtime.devices must be at least 1, not {devices}")
        if isinstance(devices, list) and (not devices or len(set(devices)) != len(devices)):
            raise ValueError(
                f"runtime.devices as a list must name distinct devices, e.g. [/gpu:0, /gpu:1]; got {devices}"
            )
        return devices

    @model_validator(mode="after")
    def _devices_need_mirrored(self) -> RuntimeConfig:
        if self.strategy == "none" and self.devices not in (None, 1):
            raise ValueError(
                f"runtime.devices {self.devices} needs `runtime.strategy: mirrored` (with `none` a run uses one device)"
            )
        return self


class HyperparameterSpec(_Section):
    """One searched recipe field. Its default is always the recipe's own value at that path.

    `int`/`float`: `min`, `max`, optional `step`, `sampling` (`linear`, `log`, `reverse_log`). `choice`: `values`
    (numbers, strings, lists such as `[[], [256]]` for `head.dense`, or a mix). `boolean`: no options.
    """

    type: Literal["int", "float", "choice", "boolean"] = Field(description="What kind of value is searched.")
    min: float | None = Field(None, description="`int`/`float`: the lowest value.")
    max: float | None = Field(None, description="`int`/`float`: the highest value.")
    step: float | None = Field(None, gt=0.0, description="Grid step (with log sampling: a factor > 1).")
    sampling: Literal["linear", "log", "reverse_log"] = Field("linear", description="`int`/`float`: how to draw.")
    values: list[Any] | None = Field(None, description="`choice`: the candidates (a plain list is a choice).")

    @model_validator(mode="before")
    @classmethod
    def _list_is_choice(cls, value: Any) -> Any:
        return {"type": "choice", "values": value} if isinstance(value, list) else value

    @model_validator(mode="after")
    def _consistent(self) -> HyperparameterSpec:
        ranged = self.type in ("int", "float")
        if ranged:
            if self.min is None or self.max is None:
                raise ValueError(f"a {self.type} hyperparameter needs `min` and `max`")
            if not self.min < self.max:
                raise ValueError(f"`min` ({self.min:g}) must be below `max` ({self.max:g})")
            if self.sampling != "linear" and self.min <= 0:
                raise ValueError(f"{self.sampling} sampling needs `min` > 0, got {self.min:g}")
            if self.sampling != "linear" and self.step is not None and self.step <= 1:
                raise ValueError("with log sampling `step` is a factor and must be > 1, e.g. 10")
            if self.type == "int" and any(v is not None and v != int(v) for v in (self.min, self.max, self.step)):
                raise ValueError("an int hyperparameter needs whole-number `min`, `max` and `step`")
        elif self.min is not None or self.max is not None or self.step is not None or self.sampling != "linear":
            raise ValueError(f"`min`, `max`, `step` and `sampling` apply to int and float, not to {self.type}")
        if self.type == "choice":
            if not self.values:
                raise ValueError("a choice needs a non-empty list of `values`")
            if len({repr(v) for v in self.values}) != len(self.values):
                raise ValueError(f"choice values repeat: {self.values}")
        elif self.values is not None:
            raise ValueError(f"`values` applies to choice, not to {self.type}")
        return self


# Objectives: the final model's scores on the validation part (a trial's result is what it would deliver).
OBJECTIVES = {"val_accuracy": "max", "val_loss": "min", "val_macro_f1": "max", "val_top5_accuracy": "max"}


class SearchConfig(_Section):
    """A keras-tuner search over recipe fields (`tltoolkit tune`)."""

    tuner: Literal["random", "bayesian", "hyperband", "grid"] = Field("random", description="keras-tuner's oracle.")
    objective: str = Field("val_accuracy", description=f"One of {', '.join(OBJECTIVES)}: the final model's score.")
    direction: Literal["max", "min"] | None = Field(None, description="Defaults to the objective's natural one.")
    max_trials: int = Field(10, ge=1, le=100_000, description="Trials to finish (hyperband: an upper bound).")
    executions_per_trial: int = Field(1, ge=1, le=100, description="Runs per trial with seeds seed, seed+1...; mean.")
    seed: int | None = Field(None, ge=0, description="The tuner's seed. Defaults to the recipe's seed.")
    max_epochs: int | None = Field(
        None, ge=1, description="Hyperband: the full budget, in total stage epochs. Defaults to the recipe's total."
    )
    factor: int = Field(3, ge=2, description="Hyperband's reduction factor.")
    directory: str = Field("tuning", description="Where the search's state lives (for resuming).")
    name: PlainName = Field(None, description="The search's folder under `directory`. Defaults to the recipe name.")
    space: dict[str, HyperparameterSpec] = Field(min_length=1, description="Dotted recipe path -> hyperparameter.")

    @field_validator("directory")
    @classmethod
    def _directory_stays_put(cls, value: str) -> str:
        if ".." in PurePath(value).parts:
            raise ValueError(
                f"{value!r} climbs out with `..`; name the folder itself (relative to where you run, or absolute)"
            )
        return value

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        if value not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
        return value

    @property
    def objective_direction(self) -> str:
        return self.direction or OBJECTIVES[self.objective]

    @model_validator(mode="after")
    def _grid_is_finite(self) -> SearchConfig:
        if self.tuner == "grid":
            open_ended = [path for path, hp in self.space.items() if hp.type == "float" and hp.step is None]
            if open_ended:
                raise ValueError(
                    f"a grid search needs a `step` for every float hyperparameter; add one to {open_ended}"
                )
        return self


class Recipe(_Section):
    """A complete, validated recipe. Build it with `tltoolkit.recipe.load_recipe`."""

    name: PlainName = Field(None, description="Defaults to the recipe file's name.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="Split, shuffling, augmentation and initialisation.")
    data: DataConfig = Field(DataConfig(), description="The images: size, batches, split, augmentation, caches.")
    backbone: BackboneConfig = Field(BackboneConfig(), description="The pretrained network and what stays frozen.")
    head: HeadConfig = Field(HeadConfig(), description="The new layers on the backbone's features.")
    stages: list[StageConfig] = Field(
        default_factory=_default_stages,
        min_length=1,
        description="Trained in order; by default `head` (frozen backbone, Adam 1e-3, 5 epochs) then `finetune` "
        "(all unfrozen, Adam 1e-5, 5 epochs). Each starts with a fresh optimizer and a recompile.",
    )
    evaluation: EvaluationConfig = Field(
        EvaluationConfig(), description="How the final model is scored: calibration, test-time augmentation."
    )
    tracking: TrackingConfig = Field(TrackingConfig(), description="Where and how runs are logged (MLflow).")
    runtime: RuntimeConfig = Field(
        RuntimeConfig(), description="The devices a run trains on (several GPUs of one machine) and mixed precision."
    )
    search: SearchConfig | None = Field(None, description="What `tltoolkit tune` searches; `run` ignores it.")
    pretrain: PretrainConfig | None = Field(
        None, description="Autoencoder pretraining on unlabelled images; its encoder replaces `backbone.name`."
    )

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        duplicates = _repeated([stage.name for stage in stages])
        if duplicates:
            raise ValueError(f"stage names must be unique, but {duplicates} repeat; rename one, e.g. `finetune2`")
        return stages

    @model_validator(mode="after")
    def _encoder_fits_the_images(self) -> Recipe:
        ae = self.pretrain.autoencoder if self.pretrain else None
        if ae is not None and ae.encoder == "conv" and self.data.image_size % 2 ** len(ae.widths):
            raise ValueError(
                f"pretrain.autoencoder: data.image_size {self.data.image_size} must be divisible by "
                f"2**{len(ae.widths)} = {2 ** len(ae.widths)} (one halving per width), so the decoder mirrors the "
                "encoder exactly; change one of them"
            )
        return self

    @model_validator(mode="after")
    def _auto_needs_a_pretrained_backbone(self) -> Recipe:
        if self.uses_auto and self.pretrain is not None:
            raise ValueError(
                "`auto` freeze points come from probing a pretrained backbone, but this recipe's encoder is trained in "
                "the run itself (pretrain); give the freeze and unfreeze points (a layer name, a count, all or none)"
            )
        return self

    @model_validator(mode="after")
    def _auxiliary_without_joint(self) -> Recipe:
        if self.head.auxiliary and self.pretrain is not None and self.pretrain.autoencoder.joint:
            raise ValueError(
                "head.auxiliary and pretrain.autoencoder.joint both add outputs to the model; use one of them "
                "(or pretrain separately: joint: false)"
            )
        return self

    @model_validator(mode="after")
    def _search_paths_exist(self, info: ValidationInfo) -> Recipe:
        if self.search is not None and (info.context or {}).get("check_search", True):
            from tltoolkit.recipe.space import check_space

            check_space(self)
        return self

    @property
    def uses_auto(self) -> bool:
        """Whether a freeze point is the probe's answer (`backbone.freeze: auto` or a stage's `unfreeze: auto`)."""
        return self.backbone.freeze == "auto" or any(stage.unfreeze == "auto" for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, every default filled in."""
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """The recipe as `{"dotted.path": value}`, list items by index, as logged to MLflow params."""
        return flatten(self.to_dict())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flattens nested dicts and lists into dotted paths (`stages.0.epochs`). Empty containers stay as leaves."""
    items: dict[str, Any] = {}
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            items.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(tree, list) and tree and any(isinstance(v, (dict, list)) for v in tree):
        for index, value in enumerate(tree):
            items.update(flatten(value, f"{prefix}{index}."))
    else:
        items[prefix[:-1]] = tree
    return items
