"""The backbone registry: one `BackboneCfg` per backbone, one factory, `create_backbone`.

Importing this module does not import Keras, so recipes validate backbone names in milliseconds.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tltoolkit.errors import BackboneError

if TYPE_CHECKING:
    import keras

# The weight source every backbone understands: random initialisation.
NO_WEIGHTS = "none"


@dataclass(frozen=True)
class WeightSource:
    """One named way to get a backbone's pretrained weights, as written in `backbone.weights`.

    A source may need its own port of the architecture (a PyTorch checkpoint needs PyTorch's padding and
    BatchNormalization epsilon) and its own preprocessing; both default to the backbone's.
    """

    name: str  # As written in recipes, e.g. "imagenet" or "torchvision".
    summary: str  # One line for `tltoolkit backbones`: where the weights come from.
    is_cached: Callable[[], bool]  # Whether the weights are on this machine now (usable with no network).
    builder: Callable[..., keras.Model] | None = None  # Overrides `BackboneCfg.builder` for these weights.
    preprocessing: str | None = None  # Overrides `BackboneCfg.preprocessing` for these weights.
    file_suffixes: tuple[str, ...] = ()  # Local files this source's builder reads (e.g. ".pth"), beside its name.


@dataclass(frozen=True)
class BackboneCfg:
    """What the toolkit knows about one backbone (after timm's `PretrainedCfg`).

    Example:
        >>> from tltoolkit.backbones import get_backbone_cfg
        >>> cfg = get_backbone_cfg("mobilenet_v2")
        >>> cfg.input_size, cfg.feature_width, cfg.preprocessing
        (224, 1280, 'tf')
    """

    name: str  # Registry name, as written in recipes: `backbone.name`.
    builder: Callable[..., keras.Model]  # (cfg, input_tensor, include_top, weights) -> Functional model.
    input_size: int  # Side of the square images the pretrained weights were trained on.
    feature_width: int  # Channels of the last feature map, the width a new head sits on.
    preprocessing: str  # An `ImagePreprocessing` mode ("tf", "torch", "caffe", "lite"), or "none" (built in).
    weight_sources: tuple[WeightSource, ...] = ()  # Pretrained sources; `none` and a Keras weights file always work.
    min_input_size: int = 32  # Smallest side the architecture accepts.
    family: str = ""  # Paper / keras.applications family, for listings.
    options: dict[str, Any] = field(default_factory=dict)  # Extra keyword arguments for the builder.
    params: int | None = None  # Parameters at `input_size` without the top (a test checks them); None: it varies.
    layers: int | None = None  # `len(model.layers)`, the count freeze points index into; None: it varies.
    listed: bool = True  # Shown by `tltoolkit backbones` (test-only backbones are not).

    def weight_source(self, weights: str) -> WeightSource | None:
        """The source `weights` names or, for a file path, the source whose builder reads that kind of file.

        `None` means the backbone's own builder handles it: `none`, or a Keras weights file.
        """
        for source in self.weight_sources:
            if weights == source.name:
                return source
        path = weights.lower()
        return next((s for s in self.weight_sources if s.file_suffixes and path.endswith(s.file_suffixes)), None)

    @property
    def source_names(self) -> tuple[str, ...]:
        """Every name `backbone.weights` accepts besides a file path."""
        return (*(source.name for source in self.weight_sources), NO_WEIGHTS)


_REGISTRY: dict[str, BackboneCfg] = {}


def register_backbone(cfg: BackboneCfg) -> BackboneCfg:
    """Adds a backbone to the registry so recipes can name it.

    Raises:
        BackboneError: The name is taken.
    """
    if cfg.name in _REGISTRY:
        raise BackboneError(f"A backbone named {cfg.name!r} is already registered; pick another name.")
    _REGISTRY[cfg.name] = cfg
    return cfg


def register_weight_source(backbone: str, source: WeightSource) -> BackboneCfg:
    """Adds a weight source to a registered backbone (e.g. an offline checkpoint for a keras.applications one).

    Raises:
        BackboneError: The backbone is unknown, or already has a source of that name.
    """
    cfg = get_backbone_cfg(backbone)
    if source.name in cfg.source_names:
        raise BackboneError(f"{backbone} already has a weight source named {source.name!r}.")
    _REGISTRY[backbone] = replace(cfg, weight_sources=(*cfg.weight_sources, source))
    return _REGISTRY[backbone]


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def check_backbone_name(name: str) -> str:
    """Returns `name` if registered, else raises with the closest names and the full list."""
    if name in _REGISTRY:
        return name
    close = difflib.get_close_matches(name, list_backbones(), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    raise BackboneError(
        f"unknown backbone {name!r}; {hint}known backbones: {', '.join(list_backbones())} "
        "(`tltoolkit backbones` describes them)"
    )


def get_backbone_cfg(name: str) -> BackboneCfg:
    """The `BackboneCfg` registered under `name`.

    Raises:
        BackboneError: The name is not registered; the message lists the known names.
    """
    return _REGISTRY[check_backbone_name(name)]


def create_backbone(
    name: str,
    weights: str | None = "imagenet",
    include_top: bool = False,
    input_size: int | None = None,
    features_only: bool = False,
    out_indices: tuple[int | str, ...] | None = None,
) -> keras.Model:
    """Builds a registered backbone that takes raw RGB pixels (0-255) and preprocesses them inside.

    Args:
        name: A registered name, e.g. `"mobilenet_v2"`; `tltoolkit backbones` lists them.
        weights: A source the backbone lists (`"imagenet"`: for keras.applications backbones Keras's own download
            and cache under `~/.keras/models`; `"torchvision"` for `mobilenet_v2`: an offline checkpoint),
            `"none"` or `None` (random initialisation), the path of a Keras weights file, or of a file a source
            reads (a PyTorch `.pth` checkpoint for the ported backbones). Defaults to `"imagenet"`.
        include_top: Keep the original classifier (its 1000 ImageNet outputs: probabilities for keras.applications
            backbones, logits for the PyTorch ports). Defaults to `False` (the last feature map is the output).
        input_size: Square image side. Defaults to the backbone's own input size.
        features_only: Output the feature maps where the network's stages end (see `features_only`), not the last.
        out_indices: With `features_only`: which stage ends (positions, or layer names). Defaults to all.

    Returns:
        A functional `keras.Model` named `name`, input `(None, size, size, 3)` float RGB in 0-255 (with
        `features_only`, a model of several outputs around it, named `<name>_features`).

    Raises:
        BackboneError: Unknown name or weight source, missing weights file, or weights that cannot be downloaded.

    Example:
        >>> import tltoolkit
        >>> model = tltoolkit.create_backbone("test_tiny", weights="none", input_size=32)
        >>> tuple(model.output.shape)
        (None, 4, 4, 32)
    """
    cfg = get_backbone_cfg(name)
    size = input_size or cfg.input_size
    if size < cfg.min_input_size:
        raise BackboneError(
            f"{name} needs images of at least {cfg.min_input_size} px, got {size}; raise data.image_size."
        )
    weights = NO_WEIGHTS if weights is None else str(weights)
    source = cfg.weight_source(weights)
    builder = source.builder if source is not None and source.builder is not None else cfg.builder
    preprocessing = source.preprocessing if source is not None and source.preprocessing else cfg.preprocessing
    import keras

    from tltoolkit.backbones.preprocessing import ImagePreprocessing

    inputs = keras.Input(shape=(size, size, 3), name="image")
    x = ImagePreprocessing(preprocessing, name="preprocessing")(inputs) if preprocessing != "none" else inputs
    model = builder(cfg, input_tensor=x, include_top=include_top, weights=weights)
    if not features_only:
        return model
    from tltoolkit.backbones.features import features_only as stage_ends

    return stage_ends(model, out_indices)
