"""`tltoolkit run`: a recipe on an image folder, every stage an MLflow child run, the final model logged."""

from __future__ import annotations

import hashlib
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from tltoolkit.commands.interrupts import interrupts_raise
from tltoolkit.errors import RecipeError, ResumeError
from tltoolkit.recipe import Recipe, dump_recipe, load_recipe, locate
from tltoolkit.tracking.store import checkpoint_root, connect, default_tracking_uri, resolve_tracking_uri


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
    resume: bool | str = False,
    unlabeled: str | Path | None = None,
) -> RunResult:
    """Trains a classifier as the recipe says and tracks it in MLflow; resumable after a kill.

    Order matters for users: the recipe, the tracking store, the backbone and every freeze point are checked before
    any image is read, and nothing is logged until the data is known to be usable.

    Every epoch ends with a checkpoint (see `CheckpointStore`: model, optimizer, early stopping, the epoch's logs),
    written before the epoch's metrics reach MLflow, in `<store folder>/checkpoints/<run id>/` for a SQLite store
    (`./checkpoints/<run id>/` otherwise) and removed when the run finishes. SIGINT (Ctrl-C) or SIGTERM marks the
    runs KILLED and keeps the checkpoint; `resume` continues the same MLflow runs from it.

    Args:
        recipe: A recipe file, dict or `Recipe`.
        data: The image folder (class subfolders, or train/ + val/ [+ test/]). Defaults to the recipe's `data.dir`.
        overrides: `dotted.path=value` strings, applied before validation.
        tracking_uri: MLflow store. Defaults to `MLFLOW_TRACKING_URI`, the recipe's, or `./mlruns/mlflow.db`.
        experiment: MLflow experiment. Defaults to the recipe's `tracking.experiment`.
        verbose: Keras fit verbosity (see `fit_stage`).
        resume: `True`: continue the newest unfinished run of this very recipe (overrides included) on this data
            folder, in the same stage and epoch, with the same MLflow run ids. A run id: continue that run.
        unlabeled: Unlabelled images for a recipe's `pretrain.autoencoder`. Defaults to the recipe's
            `data.unlabeled`.

    Returns:
        A `RunResult` with the parent run id, final metrics and the trained model.

    Raises:
        ResumeError: Nothing to resume, or the recipe or data changed since the checkpoint.
    """
    source, overrides = recipe, list(overrides)
    recipe = _recipe(recipe, overrides)
    data_dir = data or recipe.data.dir
    if not data_dir:
        raise RecipeError("No image folder: pass --data DIR (or set data.dir in the recipe).")
    # Heavy imports only once the recipe is known to be valid, so its errors come back at once.
    import keras
    from mlflow import MlflowClient

    from tltoolkit.backbones import create_backbone
    from tltoolkit.data import prepare_data
    from tltoolkit.model import check_points
    from tltoolkit.stages import prepare_training
    from tltoolkit.tracking.processes import mark_dead_runs_killed

    uri = resolve_tracking_uri(tracking_uri, recipe.tracking.uri)
    experiment_name = experiment or recipe.tracking.experiment
    experiment_id = connect(uri, experiment_name)
    client = MlflowClient(uri)
    unlabeled = unlabeled or recipe.data.unlabeled
    key = _resume_key(recipe, data_dir, unlabeled)
    point = _resume_point(client, experiment_id, resume, key, recipe, data_dir, uri) if resume else None
    mark_dead_runs_killed(client, keep=point.run_ids() if point else set())

    keras.utils.set_random_seed(recipe.seed)
    if recipe.pretrain is not None:
        from tltoolkit.backbones.encoder import architecture_of, build_encoder

        backbone = build_encoder(architecture_of(recipe.pretrain.autoencoder), recipe.data.image_size)
    else:
        backbone = create_backbone(recipe.backbone.name, recipe.backbone.weights, input_size=recipe.data.image_size)
    check_points(backbone, recipe.backbone.freeze, recipe.stages, lambda field: locate(source, field, overrides))

    folder = prepare_data(data_dir, recipe.data.val_split, recipe.seed)
    print(folder.summary())
    digest = _data_digest(folder)
    if point is not None and point.checkpoint.state["data"] != digest:
        raise ResumeError(
            f"The images in {folder.root} changed since run {point.parent_id} was checkpointed (files added, removed "
            "or modified), so its split and batches would differ. Restore them, or start a new run without --resume."
        )
    pretraining = None
    if recipe.pretrain is not None:
        from tltoolkit.stages.pretrain import prepare_pretraining

        pretraining = prepare_pretraining(recipe, backbone, folder.parts["train"], unlabeled, recipe.seed)
        print(f"Autoencoder images: {len(pretraining.train)} train, {len(pretraining.val)} held out "
              f"({len(pretraining.skipped)} skipped)"
              + (f" from {unlabeled}" if unlabeled else "") + (", labelled images' pixels included" if
              recipe.pretrain.autoencoder.use_labeled else "") + ".")  # fmt: skip
    training = prepare_training(recipe, folder, backbone, autoencoder=pretraining.autoencoder if pretraining else None,
                                unlabeled=pretraining.train if pretraining else None)  # fmt: skip
    with interrupts_raise():
        return _train(client, experiment_id, experiment_name, uri, recipe, folder, backbone, training, verbose, key,
                      digest, point, pretraining)  # fmt: skip


@dataclass
class _ResumePoint:
    parent_id: str
    store: object  # CheckpointStore
    checkpoint: object  # Checkpoint

    def run_ids(self) -> set[str]:
        return {self.parent_id, *self.checkpoint.state["stage_runs"].values()}


def _resume_key(recipe: Recipe, data_dir, unlabeled=None) -> str:
    """Identifies "the same command": the resolved recipe (overrides applied) and the data folders."""
    text = f"{dump_recipe(recipe)}\0{Path(data_dir).resolve()}\0{Path(unlabeled).resolve() if unlabeled else ''}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _data_digest(folder) -> str:
    from tltoolkit.stages.features import data_digest

    return data_digest([item for part in sorted(folder.parts) for item in folder.parts[part]])


def _resume_point(client, experiment_id: str, resume: bool | str, key: str, recipe: Recipe, data_dir, uri) -> _ResumePoint:
    from tltoolkit.stages.checkpoint import CheckpointStore

    if isinstance(resume, str):
        try:
            candidates = [client.get_run(resume)]
        except Exception:
            raise ResumeError(f"--resume {resume}: no such run in the MLflow store {uri}.") from None
        if candidates[0].data.tags.get("tltoolkit.kind") != "run":
            raise ResumeError(f"--resume {resume}: that run is not a `tltoolkit run` parent run (its stages resume with it).")
    else:
        candidates = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`tltoolkit.kind` = 'run' and tags.`tltoolkit.resume_key` = '{key}' "
            "and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )  # fmt: skip
    for candidate in candidates:
        run_id = candidate.info.run_id
        if candidate.info.status == "FINISHED":
            raise ResumeError(f"Run {run_id} already finished; there is nothing to resume. Start a new run without --resume.")
        folder = candidate.data.tags.get("tltoolkit.checkpoints") or str(checkpoint_root(uri) / run_id)
        store = CheckpointStore(folder)
        checkpoint = store.latest()
        if checkpoint is None:
            if isinstance(resume, str):
                raise ResumeError(f"Run {run_id} has no readable checkpoint in {folder}; it cannot be resumed.")
            continue
        if checkpoint.state.get("key") != key:
            raise ResumeError(
                f"Run {run_id} was started with a different recipe (or --set overrides) or data folder; resume it with "
                "exactly the same command plus --resume, or start a new run without --resume."
            )
        stage, epoch = checkpoint.state["stage"], checkpoint.state["epoch"]
        where = (f"stage {stage + 1} of {len(recipe.stages)} ({recipe.stages[stage].name!r}) after epoch {epoch + 1}"
                 if stage < len(recipe.stages) and epoch >= 0 else f"before stage {stage + 1} of {len(recipe.stages)}")
        print(f"Resuming run {run_id} from {checkpoint.path.name}: {where}.")
        return _ResumePoint(run_id, store, checkpoint)
    raise ResumeError(
        f"Nothing to resume: no unfinished run of recipe {recipe.name or 'recipe'!r} on {Path(data_dir).resolve()} "
        f"with a checkpoint in experiment {client.get_experiment(experiment_id).name!r} at {uri}. "
        "Run the command without --resume to start one."
    )


def _train(client, experiment_id, experiment_name, uri, recipe, folder, backbone, training, verbose, key, digest,
           point: _ResumePoint | None, pretraining=None) -> RunResult:  # fmt: skip
    """Logs the parent run, runs (or resumes) every stage as a child run, then scores and logs the final model.

    Stage index -1 is the autoencoder's `pretrain` stage, when the recipe has one (not in `joint` mode).
    """
    import mlflow

    from tltoolkit.stages.checkpoint import CheckpointStore, StageResume, restore_variables, variable_values
    from tltoolkit.tracking.models import log_classifier
    from tltoolkit.tracking.processes import PROCESS_TAG, process_tag
    from tltoolkit.tracking.reports import log_curves, log_evaluation

    model, eval_ds = training.model, training.eval
    dataset = folder.root.resolve().name
    recipe_name = recipe.name or "recipe"
    backbone_label = _backbone_label(recipe)
    common_tags = {
        "tltoolkit.recipe": recipe_name,
        "tltoolkit.backbone": backbone_label,
        "tltoolkit.weights": "autoencoder" if recipe.pretrain else recipe.backbone.weights,
        "tltoolkit.dataset": dataset,
        PROCESS_TAG: process_tag(),
        **recipe.tracking.tags,
    }
    run_name = recipe.tracking.run_name or f"{recipe_name}-{backbone_label.split(' ')[0]}-{dataset}"
    separate_pretrain = pretraining is not None and not recipe.pretrain.autoencoder.joint
    state = dict(point.checkpoint.state) if point else None
    parent_id = point.parent_id if point else None
    child_id = last_eval = None
    store = point.store if point else None
    try:
        with mlflow.start_run(
            run_id=parent_id,
            experiment_id=experiment_id,
            run_name=None if point else run_name,
            tags={**common_tags, "tltoolkit.kind": "run", "tltoolkit.data_dir": str(folder.root.resolve()),
                  "tltoolkit.resume_key": key},
        ) as parent:  # fmt: skip
            parent_id = parent.info.run_id
            print(f"MLflow run {parent_id} ({run_name}) in experiment {experiment_name!r} at {uri}")
            if point is None:
                store = CheckpointStore(checkpoint_root(uri) / parent_id)
                mlflow.set_tag("tltoolkit.checkpoints", str(store.folder))
                _log_parent_inputs(client, parent_id, recipe, folder, dataset)
                state = {"key": key, "data": digest, "stage": -1 if separate_pretrain else 0, "epoch": -1, "rows": [],
                         "stage_runs": {}, "histories": []}  # fmt: skip
            else:
                in_pretrain = state["stage"] == -1 and state["epoch"] >= 0
                target = pretraining.autoencoder.trainer if in_pretrain else training.checkpoint_model
                restore_variables(target.variables, point.checkpoint.arrays["model"], "model", point.checkpoint.path)
            for index in range(state["stage"], len(recipe.stages)):
                name = "pretrain" if index == -1 else recipe.stages[index].name
                resume_stage = None
                if point is not None and index == point.checkpoint.state["stage"] and state["epoch"] >= 0:
                    resume_stage = StageResume(state["epoch"] + 1, state["rows"], point.checkpoint.arrays.get("optimizer", []),
                                               state.get("stopper"), point.checkpoint.arrays.get("best"),
                                               state.get("stopped", False), point.checkpoint.path)  # fmt: skip
                child_id = _stage_run_id(client, experiment_id, parent_id, index, state)
                with mlflow.start_run(
                    run_id=child_id,
                    experiment_id=experiment_id,  # Else MLflow files the child under the Default experiment.
                    run_name=None if child_id else name,
                    nested=True,
                    tags={**common_tags, "tltoolkit.kind": "stage", "tltoolkit.stage": name,
                          "tltoolkit.stage_index": str(index)},
                ) as child:  # fmt: skip
                    child_id = child.info.run_id
                    state["stage_runs"][str(index)] = child_id
                    if resume_stage is not None:
                        _log_missing_epochs(client, child_id, resume_stage.rows)
                    checkpoint_state = {k: state[k] for k in ("key", "data", "stage_runs", "histories")} | {"stage": index}
                    if index == -1:
                        history = _pretrain_stage(client, child_id, recipe, pretraining, f"{run_name} / pretrain",
                                                  verbose, resume_stage, store, checkpoint_state)  # fmt: skip
                    else:
                        history, last_eval = _run_stage(
                            client, child_id, index, recipe, training, backbone, folder, f"{run_name} / {name}",
                            verbose, resume_stage, store, checkpoint_state,
                        )
                        if not _has_metric(client, parent_id, f"{name}_val_accuracy"):
                            mlflow.log_metric(f"{name}_val_accuracy", last_eval.metrics["accuracy"], run_id=parent_id)
                state = {**state, "stage": index + 1, "epoch": -1, "rows": [], "stopped": False, "stopper": None,
                         "histories": state["histories"] + [history.to_dict("records")] if index >= 0 else state["histories"]}  # fmt: skip
                store.save(state, {"model": variable_values(training.checkpoint_model.variables)})
                child_id = None

            all_history = pd.concat(
                [pd.DataFrame(rows).assign(stage=recipe.stages[i].name) for i, rows in enumerate(state["histories"])],
                ignore_index=True,
            )
            log_curves(client, parent_id, all_history, run_name, "curves.png")
            client.log_text(parent_id, all_history.to_csv(index=False), "history.csv")
            metrics: dict[str, float] = {}
            for part, ds in eval_ds.items():
                if part == "val" and last_eval is not None:
                    evaluation = last_eval  # The last stage already scored these very weights on val.
                else:
                    evaluation = _evaluate(model, ds, folder.parts[part], folder.class_names)
                log_evaluation(client, parent_id, evaluation, folder.class_names, part)
                metrics.update({f"{part}_{k}": v for k, v in evaluation.metrics.items()})
            anomaly = None
            if pretraining is not None:
                anomaly = _final_autoencoder(client, parent_id, recipe, pretraining, state, separate_pretrain)
            model_uri = None
            if recipe.tracking.log_model:
                print("Logging the model to MLflow...")
                model_uri = log_classifier(model, folder.class_names, recipe.data.resize, dump_recipe(recipe),
                                           recipe.data.interpolation, anomaly)  # fmt: skip
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        for run_id in (child_id, parent_id):
            if run_id:
                client.set_terminated(run_id, status)
        if parent_id and store is not None and store.paths():
            print(f"\nRun {parent_id} stopped ({type(exc).__name__}); marked {status}. Its checkpoint is kept in "
                  f"{store.folder}.\nResume it with the same command plus --resume "
                  f"(or: tltoolkit run ... --resume {parent_id}).", file=sys.stderr)  # fmt: skip
        raise
    store.remove()
    _print_done(parent_id, experiment_name, uri, metrics)
    stage_runs = {("pretrain" if int(i) < 0 else recipe.stages[int(i)].name): run_id
                  for i, run_id in state["stage_runs"].items()}  # fmt: skip
    return RunResult(parent_id, experiment_id, uri, model_uri, folder.class_names, metrics, stage_runs, all_history, model)


def _backbone_label(recipe: Recipe) -> str:
    if recipe.pretrain is None:
        return recipe.backbone.name
    return f"autoencoder ({recipe.pretrain.autoencoder.encoder} encoder)"


def _pretrain_stage(client, run_id, recipe, pretraining, title, verbose, resume, store, state):
    """Trains the autoencoder inside its (active) child run; logs its curves, reconstructions, encoder, threshold."""
    import tempfile

    import matplotlib.pyplot as plt
    import mlflow

    from tltoolkit.backbones.encoder import architecture_of, save_encoder
    from tltoolkit.recipe.schema import flatten
    from tltoolkit.stages.pretrain import autoencoder_data, fit_autoencoder, reconstruction_errors, samples
    from tltoolkit.tracking.callback import MlflowMetrics
    from tltoolkit.tracking.plots import error_histogram, reconstruction_figure
    from tltoolkit.tracking.reports import log_curves, log_skipped_files

    ae, config = pretraining.autoencoder, recipe.pretrain.autoencoder
    mlflow.log_params({**flatten(config.model_dump(mode="json")), "unlabeled_dir": pretraining.unlabeled_dir,
                       "train_images": len(pretraining.train), "val_images": len(pretraining.val)})  # fmt: skip
    log_skipped_files(client, run_id, pretraining.skipped)
    started = time.perf_counter()
    history = fit_autoencoder(ae, config, recipe.data, pretraining.train, pretraining.val, recipe.seed,
                              [MlflowMetrics(run_id, client)], verbose, resume, store, state)  # fmt: skip
    data = autoencoder_data(config, recipe.data)
    val_error = float(reconstruction_errors(ae.scorer, pretraining.val, data, config.loss).mean())
    errors = reconstruction_errors(ae.scorer, pretraining.train, data, config.loss)
    threshold = float(np.percentile(errors, config.anomaly_percentile))
    mlflow.log_metrics({"wall_s": time.perf_counter() - started, "epochs_run": len(history),
                        "anomaly_threshold": threshold, "train_reconstruction_error": float(errors.mean()),
                        "val_reconstruction_error": val_error})  # fmt: skip
    log_curves(client, run_id, history.assign(stage="pretrain"), title, "curves.png")
    for figure, name in (
        (reconstruction_figure(*samples(ae, pretraining.val, data), title=f"{title}: held-out images"), "reconstructions.png"),
        (error_histogram(errors, threshold, f"training images; threshold = {config.anomaly_percentile:g}th percentile"),
         "reconstruction_errors.png"),
    ):  # fmt: skip
        client.log_figure(run_id, figure, name)
        plt.close(figure)
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifacts(run_id, str(save_encoder(ae.encoder, Path(tmp) / "encoder", architecture_of(config))),
                             "encoder")  # fmt: skip
        ae.scorer.save(Path(tmp) / "autoencoder.keras")  # A snapshot: fine-tuning will move the encoder on.
        client.log_artifact(run_id, str(Path(tmp) / "autoencoder.keras"), "autoencoder")
    print(f"Stage 'pretrain' done: reconstruction {config.loss} {val_error:.5f} on held-out "
          f"images; anomaly threshold {threshold:.5f} ({config.anomaly_percentile:g}th percentile of training images).")  # fmt: skip
    return history


def _final_autoencoder(client, parent_id, recipe, pretraining, state, separate: bool) -> dict:
    """Logs the final encoder to the parent run; returns the anomaly scorer and threshold to log with the model.

    After a separate pretraining, the scorer is the autoencoder as pretrained (a snapshot in the pretrain run: the
    fine-tuned encoder no longer matches its decoder); in `joint` mode it is the autoencoder as trained, calibrated now.
    """
    import tempfile

    from tltoolkit.backbones.encoder import architecture_of, save_encoder
    from tltoolkit.stages.pretrain import autoencoder_data, reconstruction_errors

    config = recipe.pretrain.autoencoder
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifacts(parent_id, str(save_encoder(pretraining.autoencoder.encoder, Path(tmp) / "encoder",
                                                         architecture_of(config))), "encoder")  # fmt: skip
    if separate:
        pretrain_run = state["stage_runs"]["-1"]
        path = client.download_artifacts(pretrain_run, "autoencoder/autoencoder.keras")
        threshold = client.get_run(pretrain_run).data.metrics["anomaly_threshold"]
    else:
        errors = reconstruction_errors(pretraining.autoencoder.scorer, pretraining.train,
                                       autoencoder_data(config, recipe.data), config.loss)  # fmt: skip
        threshold = float(np.percentile(errors, config.anomaly_percentile))
        client.log_metric(parent_id, "anomaly_threshold", threshold)
        path = str(Path(tempfile.mkdtemp(prefix="tltoolkit-ae-")) / "autoencoder.keras")
        pretraining.autoencoder.scorer.save(path)
    return {"autoencoder": path, "threshold": threshold, "loss": config.loss, "percentile": config.anomaly_percentile}


def _log_parent_inputs(client, parent_id: str, recipe: Recipe, folder, dataset: str) -> None:
    """What a new run logs once: the flattened recipe, image counts, the resolved recipe and the data report."""
    import mlflow

    from tltoolkit.tracking.reports import log_data_report

    mlflow.log_params(recipe.flat())
    mlflow.log_params({"data.classes": folder.num_classes, **{f"data.{p}_images": len(i) for p, i in folder.parts.items()}})
    mlflow.log_text(dump_recipe(recipe), "recipe.yaml")
    log_data_report(client, parent_id, folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow's hints about inferring the manifest's schema.
        manifest = mlflow.data.from_pandas(folder.manifest(), source=str(folder.root.resolve()), name=dataset)
        mlflow.log_input(manifest, context="training")


def _stage_run_id(client, experiment_id: str, parent_id: str, index: int, state: dict) -> str | None:
    """The child run of stage `index` when resuming into it (from the checkpoint, or one made just before a kill)."""
    if str(index) in state["stage_runs"]:
        return state["stage_runs"][str(index)]
    earlier = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`tltoolkit.stage_index` = '{index}'",
    )
    return earlier[0].info.run_id if earlier else None


def _has_metric(client, run_id: str, key: str) -> bool:
    return key in client.get_run(run_id).data.metrics


def _log_missing_epochs(client, run_id: str, rows: list[dict]) -> None:
    """Epochs the checkpoint holds whose metrics did not reach MLflow before the kill (it is written first)."""
    from mlflow.entities import Metric

    logged = {m.step for m in client.get_metric_history(run_id, "loss")}
    now = int(time.time() * 1000)
    missing = [
        Metric(key, float(value), now, int(row["epoch"]))
        for row in rows
        if int(row["epoch"]) not in logged
        for key, value in sorted(row.items())
        if key != "epoch"
    ]
    if missing:
        client.log_batch(run_id, metrics=missing)


def _run_stage(client, run_id, index, recipe, training, backbone, folder, title, verbose, resume, store, state):
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
        callbacks=[MlflowMetrics(run_id, client)], verbose=verbose, features=training.features, stream=index,
        resume=resume, checkpoints=store, checkpoint_state=state, joint=training.joint,
        epoch_offset=sum(s.epochs for s in recipe.stages[:index]),
    )  # fmt: skip
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
    return outcome.history, evaluation


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
