"""`tltoolkit run`: a recipe on an image folder, every stage an MLflow child run, the final model logged."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from tltoolkit.errors import RecipeError
from tltoolkit.recipe import Recipe, dump_recipe, load_recipe
from tltoolkit.tracking.store import connect, default_tracking_uri, resolve_tracking_uri


@dataclass
class RunResult:
    """What `run` produced: where it is tracked, the model, and its scores."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    model_uri: str | None
    class_names: list[str]
    metrics: dict[str, float]  # Final model: val_accuracy, val_loss, ... and test_* where a test/ part exists.
    stage_runs: dict[str, str] = field(default_factory=dict)  # Stage name -> child run id.
    history: pd.DataFrame | None = None  # Every epoch of every stage (column `stage`).
    model: object = None  # The trained keras.Model.


def _recipe(recipe: Recipe | str | Path | dict, overrides: Iterable[str]) -> Recipe:
    if isinstance(recipe, Recipe):
        return load_recipe(recipe.to_dict(), overrides) if overrides else recipe
    return load_recipe(recipe, overrides)


def run(
    recipe: Recipe | str | Path | dict,
    data: str | Path | None = None,
    overrides: Iterable[str] = (),
    tracking_uri: str | None = None,
    experiment: str | None = None,
    verbose: int | None = None,
) -> RunResult:
    """Trains a classifier as the recipe says and tracks it in MLflow.

    Order matters for users: the recipe, the tracking store, the backbone and every freeze point are checked before
    any image is read, and nothing is logged until the data is known to be usable.

    Args:
        recipe: A recipe file, dict or `Recipe`.
        data: The image folder (class subfolders, or train/ + val/ [+ test/]). Defaults to the recipe's `data.dir`.
        overrides: `dotted.path=value` strings, applied before validation.
        tracking_uri: MLflow store. Defaults to `MLFLOW_TRACKING_URI`, the recipe's, or `./mlruns/mlflow.db`.
        experiment: MLflow experiment. Defaults to the recipe's `tracking.experiment`.
        verbose: Keras fit verbosity (see `fit_stage`).

    Returns:
        A `RunResult` with the parent run id, final metrics and the trained model.
    """
    recipe = _recipe(recipe, overrides)
    data_dir = data or recipe.data.dir
    if not data_dir:
        raise RecipeError("No image folder: pass --data DIR (or set data.dir in the recipe).")
    # Heavy imports only once the recipe is known to be valid, so its errors come back at once.
    import keras
    import mlflow
    from mlflow import MlflowClient

    from tltoolkit.backbones import create_backbone
    from tltoolkit.data import prepare_data
    from tltoolkit.model import check_points
    from tltoolkit.stages import prepare_training
    from tltoolkit.tracking.models import log_classifier
    from tltoolkit.tracking.reports import log_curves, log_data_report, log_evaluation

    uri = resolve_tracking_uri(tracking_uri, recipe.tracking.uri)
    experiment_name = experiment or recipe.tracking.experiment
    experiment_id = connect(uri, experiment_name)

    keras.utils.set_random_seed(recipe.seed)
    backbone = create_backbone(recipe.backbone.name, recipe.backbone.weights, input_size=recipe.data.image_size)
    check_points(backbone, recipe.backbone.freeze, recipe.stages)

    folder = prepare_data(data_dir, recipe.data.val_split, recipe.seed)
    print(folder.summary())
    training = prepare_training(recipe, folder, backbone)
    model, eval_ds = training.model, training.eval

    dataset = folder.root.resolve().name
    recipe_name = recipe.name or "recipe"
    common_tags = {
        "tltoolkit.recipe": recipe_name,
        "tltoolkit.backbone": recipe.backbone.name,
        "tltoolkit.weights": recipe.backbone.weights,
        "tltoolkit.dataset": dataset,
        **recipe.tracking.tags,
    }
    run_name = recipe.tracking.run_name or f"{recipe_name}-{recipe.backbone.name}-{dataset}"
    client = MlflowClient()
    stage_runs: dict[str, str] = {}
    histories: list[pd.DataFrame] = []
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        tags={**common_tags, "tltoolkit.kind": "run", "tltoolkit.data_dir": str(folder.root.resolve())},
    ) as parent:
        parent_id = parent.info.run_id
        print(f"MLflow run {parent_id} ({run_name}) in experiment {experiment_name!r} at {uri}")
        mlflow.log_params(recipe.flat())
        mlflow.log_params({"data.classes": folder.num_classes, **{f"data.{p}_images": len(i) for p, i in folder.parts.items()}})
        mlflow.log_text(dump_recipe(recipe), "recipe.yaml")
        log_data_report(client, parent_id, folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MLflow's hints about inferring the manifest's schema.
            manifest = mlflow.data.from_pandas(folder.manifest(), source=str(folder.root.resolve()), name=dataset)
            mlflow.log_input(manifest, context="training")
        for index, stage in enumerate(recipe.stages):
            with mlflow.start_run(
                experiment_id=experiment_id,  # Else MLflow files the child under the Default experiment.
                run_name=stage.name,
                nested=True,
                tags={**common_tags, "tltoolkit.kind": "stage", "tltoolkit.stage": stage.name,
                      "tltoolkit.stage_index": str(index)},
            ) as child:
                stage_runs[stage.name] = child.info.run_id
                history, last_eval = _run_stage(
                    client, child.info.run_id, index, recipe, training, backbone, folder, f"{run_name} / {stage.name}",
                    verbose,
                )
                histories.append(history)
                mlflow.log_metric(f"{stage.name}_val_accuracy", last_eval.metrics["accuracy"], run_id=parent_id)

        all_history = pd.concat(histories, ignore_index=True)
        log_curves(client, parent_id, all_history, run_name, "curves.png")
        client.log_text(parent_id, all_history.to_csv(index=False), "history.csv")
        metrics: dict[str, float] = {}
        for part, ds in eval_ds.items():
            # The last stage already scored these very weights on val.
            evaluation = last_eval if part == "val" else _evaluate(model, ds, folder.parts[part], folder.class_names)
            log_evaluation(client, parent_id, evaluation, folder.class_names, part)
            metrics.update({f"{part}_{k}": v for k, v in evaluation.metrics.items()})
        model_uri = None
        if recipe.tracking.log_model:
            print("Logging the model to MLflow...")
            model_uri = log_classifier(model, folder.class_names, recipe.data.resize, dump_recipe(recipe),
                                       recipe.data.interpolation)  # fmt: skip

    _print_done(parent_id, experiment_name, uri, metrics)
    return RunResult(parent_id, experiment_id, uri, model_uri, folder.class_names, metrics, stage_runs, all_history, model)


def _run_stage(client, run_id, index, recipe, training, backbone, folder, title, verbose):
    """Fits stage `index` inside its (active) child run and logs its params, curves and final evaluation."""
    import mlflow

    from tltoolkit.stages import fit_stage
    from tltoolkit.model.metrics import evaluate_items
    from tltoolkit.tracking.callback import MlflowMetrics
    from tltoolkit.tracking.reports import log_curves, log_evaluation

    stage = recipe.stages[index]
    prefix = f"stages.{index}."
    mlflow.log_params({k.removeprefix(prefix): v for k, v in recipe.flat().items() if k.startswith(prefix)})
    started = time.perf_counter()
    outcome = fit_stage(
        training.model, backbone, recipe, stage, training.train, training.eval["val"], training.class_weight,
        callbacks=[MlflowMetrics(run_id, client)], verbose=verbose, features=training.features,
    )
    wall = time.perf_counter() - started
    mlflow.log_params({
        "frozen_layers": outcome.trainable.frozen_layers,
        "trainable_backbone_layers": outcome.trainable.trainable_layers,
        "trainable_params": outcome.trainable.trainable_params,
        "feature_cache": outcome.cached_above or "off",
    })
    summary = {"wall_s": wall, "epochs_run": len(outcome.history)}
    if outcome.best_epoch is not None:
        summary["best_epoch"] = outcome.best_epoch
    mlflow.log_metrics(summary)
    history = outcome.history.assign(stage=stage.name)
    log_curves(client, run_id, history, title, "curves.png")
    evaluation = evaluate_items(folder.parts["val"], outcome.predict_val(), folder.class_names)
    log_evaluation(client, run_id, evaluation, folder.class_names, "final_val")
    print(f"Stage {stage.name!r} done in {wall:.0f}s: val accuracy {evaluation.metrics['accuracy']:.4f}")
    return history, evaluation


def _evaluate(model, ds, items, class_names):
    from tltoolkit.model.metrics import evaluate_items

    return evaluate_items(items, model.predict(ds, verbose=0), class_names)


def _print_done(run_id: str, experiment: str, uri: str, metrics: dict[str, float]) -> None:
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("accuracy", "loss")))
    ui = "tltoolkit ui" if uri == default_tracking_uri() else f"tltoolkit ui --tracking-uri {uri}"
    print(
        f"\nDone. {scores}\n"
        f"Run {run_id} in experiment {experiment!r}, store {uri}\n"
        f"See it in the MLflow UI: {ui}   (then open http://127.0.0.1:5000)\n"
        f"Predict with it: tltoolkit predict {run_id} <images or folders>"
    )
