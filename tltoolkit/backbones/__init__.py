"""Backbones: a registry of pretrained feature extractors that take raw RGB pixels."""

# Importing these registers the built-in backbones and weight sources.
from tltoolkit.backbones import convnet, efficientnet_lite, encoder, keras_apps, mobilenet_v2_torch  # noqa: F401
from tltoolkit.backbones.registry import (
    BackboneCfg,
    WeightSource,
    create_backbone,
    get_backbone_cfg,
    list_backbones,
    register_backbone,
    register_weight_source,
)

__all__ = [
    "BackboneCfg",
    "FeatureInfo",
    "WeightSource",
    "create_backbone",
    "feature_info",
    "features_only",
    "get_backbone_cfg",
    "list_backbones",
    "register_backbone",
    "register_weight_source",
]


def __getattr__(name: str):
    """`feature_info`, `features_only` and `FeatureInfo` import Keras, so they load on first use (recipes validate
    without Keras)."""
    if name in ("FeatureInfo", "feature_info", "features_only"):
        from tltoolkit.backbones import features

        return getattr(features, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
