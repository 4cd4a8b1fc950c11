"""The recipe schema: typed, frozen, validated once.

A recipe describes everything a run needs. Every section has defaults, so `Recipe()` is a complete, valid recipe
(MobileNetV2, head stage then fine-tune); a YAML file only states what differs. Unknown keys are errors.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tltoolkit.backbones.registry import check_backbone_name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


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
            raise ValueError(f"{what} as a fraction of the backbone's layers must be in (0, 1]; use an integer for a count")
        return value
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"{what} must be one of {', '.join(words)}, a layer count, a fraction or a layer name")


class AugmentConfig(_Section):
    """Random augmentation applied to training batches only (Keras preprocessing layers)."""

    flip: Literal["none", "horizontal", "vertical", "horizontal_and_vertical"] = "none"
    rotation: float = Field(0.0, ge=0.0, le=0.5, description="Max rotation as a fraction of a full turn.")
    zoom: float = Field(0.0, ge=0.0, lt=1.0, description="Max zoom in or out, as a fraction of the size.")
    contrast: float = Field(0.0, ge=0.0, le=1.0, description="Max contrast change factor.")
    translation: float = Field(0.0, ge=0.0, lt=1.0, description="Max shift, as a fraction of the size.")

    @property
    def enabled(self) -> bool:
        return self.flip != "none" or any((self.rotation, self.zoom, self.contrast, self.translation))


class DataConfig(_Section):
    dir: str | None = Field(None, description="Image folder; `--data` overrides it.")
    image_size: int = Field(224, ge=16, le=1024, description="Square side in pixels that images are resized to.")
    batch_size: int = Field(32, ge=1, le=4096)
    val_split: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction held out for validation when there is no val/.")
    resize: Literal["squash", "crop", "pad"] = "squash"
    cache: bool = Field(True, description="Keep decoded, resized images in memory after the first epoch.")
    feature_cache: bool = Field(
        True,
        description="A stage that trains only above a frozen prefix, with no augmentation, trains on the prefix's "
        "outputs computed once instead of running the frozen layers every epoch (same result, much faster).",
    )
    augment: AugmentConfig = AugmentConfig()


class BackboneConfig(_Section):
    name: str = "mobilenet_v2"
    weights: str = Field("imagenet", description="`imagenet`, `none`, another source the backbone lists, or a path.")
    freeze: Any = Field("all", description="`all`, `none`, N first layers, a fraction, or up to a layer name.")

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        return check_backbone_name(value)

    @field_validator("freeze", mode="before")
    @classmethod
    def _freeze_point(cls, value: Any) -> Any:
        return _check_layer_point(value, what="freeze", words=("all", "none"))


class HeadConfig(_Section):
    pooling: Literal["avg", "max"] = "avg"
    dense: list[int] = Field(default_factory=list, description="Widths of hidden dense layers, e.g. [256].")
    activation: Literal["relu", "gelu", "silu", "swish", "elu", "selu", "tanh", "leaky_relu"] = "relu"
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Dropout before each dense layer and the classifier.")
    l1: float = Field(0.0, ge=0.0)
    l2: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weight: Literal["none", "auto"] | dict[str, float] = Field(
        "none", description="`auto` weights classes inversely to their frequency (scikit-learn's `balanced`)."
    )

    @field_validator("dense")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if any(width < 1 for width in value):
            raise ValueError("every dense width must be a positive integer, e.g. [256, 128]")
        return value

    @field_validator("class_weight")
    @classmethod
    def _positive_weights(cls, value: Any) -> Any:
        if isinstance(value, dict) and any(weight <= 0 for weight in value.values()):
            raise ValueError("class weights must be positive numbers, one per class name")
        return value


class OptimizerConfig(_Section):
    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (all optimizers).")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Used by sgd and rmsprop.")
    nesterov: bool = Field(False, description="Used by sgd.")
    clipnorm: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _adamw_decays(self) -> OptimizerConfig:
        if self.name == "adamw" and self.weight_decay <= 0:
            raise ValueError("optimizer adamw needs weight_decay > 0 (e.g. 1e-4); for no decay use adam")
        return self


class ScheduleConfig(_Section):
    name: Literal["constant", "cosine"] = "constant"
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up from 0, in epochs (fractions allowed).")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Cosine: final learning rate / initial.")


class EarlyStoppingConfig(_Section):
    monitor: Literal["loss", "accuracy", "val_loss", "val_accuracy"] = "val_loss"
    patience: int = Field(3, ge=0)
    min_delta: float = Field(0.0, ge=0.0)
    restore_best_weights: bool = True


_STAGE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class StageConfig(_Section):
    name: str = "head"
    epochs: int = Field(5, ge=1, le=100_000)
    unfreeze: Any = Field(
        "none",
        description="`none` keeps backbone.freeze; `all`; top K layers; a top fraction; or from a layer name up.",
    )
    train_bn: bool = Field(False, description="Also train BatchNormalization gamma/beta (statistics never update).")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    early_stopping: EarlyStoppingConfig | None = None

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        if not _STAGE_NAME.match(value):
            raise ValueError("a stage name may hold only letters, digits, '_' and '-', e.g. `finetune`")
        return value

    @field_validator("unfreeze", mode="before")
    @classmethod
    def _unfreeze_point(cls, value: Any) -> Any:
        return _check_layer_point(value, what="unfreeze", words=("none", "all"))


def _default_stages() -> list[StageConfig]:
    return [
        StageConfig(name="head", epochs=5, unfreeze="none", optimizer=OptimizerConfig(learning_rate=1e-3)),
        StageConfig(name="finetune", epochs=5, unfreeze="all", optimizer=OptimizerConfig(learning_rate=1e-5)),
    ]


class TrackingConfig(_Section):
    experiment: str = Field("tltoolkit", min_length=1)
    run_name: str | None = None
    uri: str | None = Field(None, description="MLflow tracking URI; `--tracking-uri` and MLFLOW_TRACKING_URI win.")
    log_model: bool = True
    tags: dict[str, str] = Field(default_factory=dict)


class Recipe(_Section):
    """A complete, validated recipe. Build it with `tltoolkit.recipe.load_recipe`."""

    name: str | None = Field(None, description="Defaults to the recipe file's name.")
    seed: int = Field(42, ge=0, le=2**31 - 1)
    data: DataConfig = DataConfig()
    backbone: BackboneConfig = BackboneConfig()
    head: HeadConfig = HeadConfig()
    stages: list[StageConfig] = Field(default_factory=_default_stages, min_length=1)
    tracking: TrackingConfig = TrackingConfig()
    # Reserved for hyperparameter search and autoencoder pretraining (later versions).
    search: Any = None
    pretrain: Any = None

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, stages: list[StageConfig]) -> list[StageConfig]:
        names = [stage.name for stage in stages]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique, but {duplicates} repeat; rename one, e.g. `finetune2`")
        return stages

    @field_validator("search", "pretrain")
    @classmethod
    def _not_yet(cls, value: Any, info) -> Any:
        if value is not None:
            raise ValueError(
                f"the `{info.field_name}` section is not supported by this version of tltoolkit; remove it"
            )
        return value

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
