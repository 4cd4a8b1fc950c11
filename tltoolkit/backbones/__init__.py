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
    "WeightSource",
    "create_backbone",
    "get_backbone_cfg",
    "list_backbones",
    "register_backbone",
    "register_weight_source",
]
