"""`tltoolkit probe`: how deep a recipe's pretrained backbone still fits an image folder, and how much to unfreeze.

See `tltoolkit.stages.probe` for the measurement and the rule. The answer is what `backbone.freeze: auto` and a
stage's `unfreeze: auto` use in `tltoolkit run`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tltoolkit.data.scan import require_folder
from tltoolkit.errors import RecipeError
from tltoolkit.recipe import Recipe, as_recipe

_logger = logging.getLogger(__name__)


@dataclass
class ProbeOutcome:
    """What `probe` measured, and where it is tracked."""

    probe: object  # `tltoolkit.stages.probe.ProbeResult`: the curve, the chosen depth, the suggestion.
    run_id: str | None  # The MLflow run (`tltoolkit.kind=probe`), unless `log=False`.
    tracking_uri: str | None


def probe(
    recipe: Recipe | str | Path | dict,
    data: str | Path | None = None,
    overrides: Iterable[str] = (),
    tracking_uri: str | None = None,
    experiment: str | None = None,
    verbose: int | None = None,
    log: bool = True,
) -> ProbeOutcome:
    """Probes the recipe's backbone on `data`: a linear classifier on the frozen features at each depth.

    Args:
        recipe: A recipe file, dict or `Recipe` (its backbone, weights, image size and split are used).
        data: The labelled image folder. Defaults to the recipe's `data.dir`.
        overrides: `dotted.path=value` strings, applied before validation.
        tracking_uri: MLflow store. Defaults as for `run`.
        experiment: MLflow experiment. Defaults to the recipe's `tracking.experiment`.
        verbose: `0` hides progress. Defaults to showing it.
        log: Log an MLflow run (`tltoolkit.kind=probe`): metrics by depth, the suggestion, table and plot under
            `probe/`. Defaults to `True`.
    """
    recipe = as_recipe(recipe, overrides, check_search=False)
    if recipe.pretrain is not None:
        raise RecipeError(
            "This recipe pretrains an autoencoder, whose encoder only exists after its pretraining: the probe measures "
            "a pretrained backbone's features. Probe a recipe with a registered backbone instead."
        )
    data_dir = data or recipe.data.dir
    if not data_dir:
        raise RecipeError("No image folder: pass --data DIR (or set data.dir in the recipe).")
    require_folder(data_dir)
    from tltoolkit.quality.grouping import recipe_folder
    from tltoolkit.stages.probe import probe_backbone
    from tltoolkit.stages.session import backbone_for

    backbone = backbone_for(recipe)
    folder = recipe_folder(recipe, data_dir, backbone, progress=verbose != 0)
    _logger.info(folder.summary())
    result = probe_backbone(backbone, folder.parts, recipe.data, verbose != 0)
    _logger.info(
        "\n%s\n\nSuggestion: %s (backbone.freeze: %s; unfreeze: %s).\n%s",
        result.table().to_string(index=False, float_format=lambda v: f"{v:.4f}"),
        result.suggestion,
        result.freeze,
        result.unfreeze,
        result.evidence,
    )
    if not log:
        return ProbeOutcome(result, None, None)
    uri, run_id = _log(recipe, folder, result, tracking_uri, experiment)
    _logger.info("Logged as MLflow run %s (probe/accuracy_by_depth.png).", run_id)
    return ProbeOutcome(result, run_id, uri)


def _log(recipe: Recipe, folder, result, tracking_uri: str | None, experiment: str | None) -> tuple[str, str]:
    from tltoolkit.tracking.reports import folder_run, log_data_report, log_probe

    dataset = folder.root.resolve().name
    tags = {
        "tltoolkit.recipe": recipe.name or "recipe",
        "tltoolkit.backbone": recipe.backbone.name,
        "tltoolkit.weights": recipe.backbone.weights,
    }
    name = f"probe-{recipe.backbone.name}-{dataset}"
    with folder_run(recipe, folder, tracking_uri, experiment, "probe", name, tags) as (uri, client, run_id):
        log_data_report(client, run_id, folder)
        log_probe(client, run_id, result, f"{recipe.backbone.name} on {dataset}")
        client.set_tag(run_id, "mlflow.note.content", f"{result.suggestion}: {result.evidence}")
    return uri, run_id
