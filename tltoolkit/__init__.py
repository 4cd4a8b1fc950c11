"""tltoolkit: transfer learning for image classifiers, from a recipe to a trained, MLflow-tracked Keras model.

Example:
    >>> import tltoolkit
    >>> "mobilenet_v2" in tltoolkit.list_backbones()
    True
"""

from tltoolkit.backbones import (
    BackboneCfg,
    WeightSource,
    create_backbone,
    get_backbone_cfg,
    list_backbones,
    register_backbone,
    register_weight_source,
)
from tltoolkit.commands.audit import AuditResult, audit
from tltoolkit.commands.export import ExportOptions, ExportResult, export
from tltoolkit.commands.probe import ProbeOutcome, probe
from tltoolkit.commands.register import register
from tltoolkit.commands.run import RunResult, run
from tltoolkit.commands.scan import scan
from tltoolkit.commands.tune import Distributed, TuneResult, tune
from tltoolkit.errors import TltoolkitError
from tltoolkit.recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "AuditResult",
    "BackboneCfg",
    "Distributed",
    "ExportOptions",
    "ExportResult",
    "ProbeOutcome",
    "Recipe",
    "RunResult",
    "TltoolkitError",
    "TuneResult",
    "WeightSource",
    "audit",
    "create_backbone",
    "get_backbone_cfg",
    "export",
    "list_backbones",
    "load_recipe",
    "probe",
    "register",
    "register_backbone",
    "register_weight_source",
    "run",
    "scan",
    "tune",
]
