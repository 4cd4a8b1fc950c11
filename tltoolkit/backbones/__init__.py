"""Backbones: a registry of pretrained feature extractors that take raw RGB pixels."""

from tltoolkit.backbones import convnet, keras_apps  # noqa: F401  (registers the built-in backbones)
from tltoolkit.backbones.registry import (
    BackboneCfg,
    create_backbone,
    get_backbone_cfg,
    list_backbones,
    register_backbone,
)

__all__ = ["BackboneCfg", "create_backbone", "get_backbone_cfg", "list_backbones", "register_backbone"]
