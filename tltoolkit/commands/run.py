"""`tltoolkit run`: a recipe on an image folder, every stage an MLflow child run, the final model logged."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tltoolkit.commands.interrupts import interrupts_raise
from tltoolkit.data.scan import require_folder
from tltoolkit.errors import DivergedError, RecipeError, ResumeError
from tltoolkit.recipe import Recipe, as_recipe, dump_recipe, locate
from tltoolkit.tracking.store import checkpoint_root, connect, default_tracking_uri, resolve_tracking_uri

_logger = logging.getLogger(__name__)


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
    (for a server see `checkpoint_root`) and removed when the run finishes. SIGINT (Ctrl-C) or SIGTERM marks the
    runs KILLED and keeps the checkpoint; `resume` continues the same MLflow runs from it.

    Args:
        recipe: A recipe file, dict or `Recipe`.
        data: The image folder (class subfolders, or train/ + val/ [+ test/]). Defaults to the recipe's `data.dir`.
        overrides: `dotted.path=value` strings, applied before validation.
        tracking_uri: MLflow store. Defaults to `MLFLOW_TRACKING_URI`, the recipe's, or `./mlruns/mlflow.db`.
        experiment: MLflow experiment. Defaults to the recipe's `tracking.experiment`.
        verbose: Keras fit verbosity and progress bars: `0` shows none (messages go to the `tltoolkit` logger, which
            shows nothing unless configured). Defaults to a progress bar on a terminal, a line per epoch elsewhere.
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
    recipe = as_recipe(recipe, overrides, check_search=False)  # `run` ignores the search section.
    data_dir = data or recipe.data.dir
    if not data_dir:
        raise RecipeError("No image folder: pass --data DIR (or set data.dir in the recipe).")
    require_folder(data_dir)
    # Heavy imports only once the recipe and folder are known to be valid, so their errors come back at once.
    from mlflow import MlflowClient

    from tltoolkit.stages import SessionOptions, TrainingSession
    from tltoolkit.tracking.processes import mark_dead_runs_killed

    uri = resolve_tracking_uri(tracking_uri, recipe.tracking.uri)
    experiment_id = connect(uri, experiment or recipe.tracking.experiment)
    client = MlflowClient(uri)
    unlabeled = unlabeled or recipe.data.unlabeled
    key = _resume_key(recipe, data_dir, unlabeled)
    try:
        point = _resume_point(client, experiment_id, resume, key, recipe, data_dir, uri) if resume else None
    except ResumeError:
        mark_dead_runs_killed(client)  # A failed --resume still tidies runs whose process died.
        raise
    mark_dead_runs_killed(client, keep=point.run_ids() if point else set())

    session = TrainingSession(recipe, SessionOptions(verbose=verbose, unlabeled=unlabeled, progress=verbose != 0))
    session.check_points(lambda field: locate(source, field, overrides))
    _load_data(session, data_dir, point)
    with interrupts_raise():
        return _train(client, experiment_id, uri, session, key, point, tuple(overrides))


def _load_data(session, data_dir, point) -> None:
    """Scans and splits the folder (refusing a changed one when resuming), then builds the models on it."""
    from tltoolkit.quality.grouping import recipe_folder

    recipe = session.recipe
    folder = recipe_folder(recipe, data_dir, session.backbone, progress=session.options.progress)
    _logger.info(folder.summary())
    if point is not None and point.checkpoint.state.data not in (
        _data_digest(folder),
        _data_digest(folder, legacy=True),
    ):
        raise ResumeError(
            f"The images in {folder.root} changed since run {point.parent_id} was checkpointed (files added, removed "
            "or modified), so its split and batches would differ. Restore them, or start a new run without --resume."
        )
    session.load_data(folder)
    if session.pretraining is not None:
        pretraining = session.pretraining
        _logger.info(
            "Autoencoder images: %d train, %d held out (%d skipped)%s%s.",
            len(pretraining.train),
            len(pretraining.val),
            len(pretraining.skipped),
            f" from {pretraining.unlabeled_dir}" if pretraining.unlabeled_dir else "",
            ", labelled images' pixels included" if recipe.pretrain.autoencoder.use_labeled else "",
        )


def _resume_key(recipe: Recipe, data_dir, unlabeled=None) -> str:
    """Identifies "the same command": the resolved recipe (overrides applied) and the data folders."""
    text = f"{dump_recipe(recipe)}\0{Path(data_dir).resolve()}\0{Path(unlabeled).resolve() if unlabeled else ''}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _data_digest(folder, legacy: bool = False) -> str:
    """The images of every part, their paths relative to the data folder (`legacy`: as typed, as checkpoints made
    before that recorded them), so `--resume` works however the folder is typed."""
    from tltoolkit.data.scan import data_digest

    items = [item for part in sorted(folder.parts) for item in folder.parts[part]]
    return data_digest(items) if legacy else data_digest(items, folder.root)


def _resume_point(client, experiment_id: str, resume: bool | str, key: str, recipe: Recipe, data_dir, uri):
    """The run to continue, announced with where in the stage plan it stopped."""
    from tltoolkit.stages import plan_stages
    from tltoolkit.tracking.runs import find_resume_point

    what = f"recipe {recipe.name or 'recipe'!r} on {Path(data_dir).resolve()}"
    compatible = _learning_rates_changed(recipe, data_dir) if isinstance(resume, str) else None
    point = find_resume_point(client, experiment_id, resume, key, uri, what, compatible)
    plan, state = plan_stages(recipe), point.checkpoint.state
    if state.stage < len(plan) and state.epoch >= 0:
        where = f"stage {state.stage + 1} of {len(plan)} ({plan[state.stage].name!r}) after epoch {state.epoch + 1}"
    else:
        where = f"before stage {state.stage + 1} of {len(plan)}"
    _logger.info("Resuming run %s from %s: %s.", point.parent_id, point.checkpoint.path.name, where)
    return point


_LEARNING_RATE = re.compile(r"stages\.\d+\.optimizer\.learning_rate")


def _learning_rates_changed(recipe: Recipe, data_dir):
    """For `--resume RUN_ID`: a run on the same data whose recipe differs only in stage learning rates may be
    continued (after the loss diverged, say), announced with what changed; anything else must match exactly."""

    def compatible(run) -> bool:
        logged, flat = run.data.params, {k: str(v)[:6000] for k, v in recipe.flat().items()}
        changed = {k: (logged.get(k), v) for k, v in flat.items() if logged.get(k) != v}
        same_data = run.data.tags.get("tltoolkit.data_dir") == str(Path(data_dir).resolve())
        if not (changed and same_data and all(_LEARNING_RATE.fullmatch(k) for k in changed)):
            return False
        shown = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        _logger.warning(
            "Resuming run %s with changed learning rate(s): %s (no longer an exact replay).", run.info.run_id, shown
        )
        return True

    return compatible


def _train(client, experiment_id: str, uri: str, session, key: str, point, overrides=()) -> RunResult:
    """Runs (or resumes) the session under a `RunTracker`; the checkpoint is removed once all is logged."""
    from tltoolkit.stages.checkpoint import CheckpointStore, TrainingState
    from tltoolkit.tracking.processes import heartbeat
    from tltoolkit.tracking.runs import RunTracker

    tracker = RunTracker(client, experiment_id, session, key, point.parent_id if point else None, overrides)
    store = point.store if point else None
    try:
        parent_id = tracker.start()
        experiment = client.get_experiment(experiment_id).name
        _logger.info("MLflow run %s (%s) in experiment %r at %s", parent_id, tracker.run_name, experiment, uri)
        if store is None:
            store = CheckpointStore(checkpoint_root(uri) / parent_id)
            tracker.tag_checkpoints(store.folder)
        digest = point.checkpoint.state.data if point else _data_digest(session.folder)
        with heartbeat(store.folder):  # The lease other hosts check before resuming this run.
            result = session.run(tracker, store, TrainingState(key, digest), point.checkpoint if point else None)
    except BaseException as exc:
        tracker.fail(exc)
        if tracker.parent_id and store is not None and store.paths():
            how = (
                "with a smaller learning rate: the same command plus --resume {id} --set ...learning_rate=..."
                if isinstance(exc, DivergedError)
                else "with the same command plus --resume (or: tltoolkit run ... --resume {id})"
            )
            _logger.warning(
                "Run %s stopped (%s); marked %s. Its checkpoint is kept in %s.\nResume it %s.",
                tracker.parent_id,
                type(exc).__name__,
                "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                store.folder,
                how.format(id=tracker.parent_id),
            )
        raise
    store.remove()
    tracker.tag_checkpoints(None)
    _report_done(parent_id, experiment, uri, result.metrics)
    return RunResult(
        parent_id,
        experiment_id,
        uri,
        tracker.model_uri,
        session.folder.class_names,
        result.metrics,
        result.stage_runs,
        result.history,
        session.training.model,
    )


def _report_done(run_id: str, experiment: str, uri: str, metrics: dict[str, float]) -> None:
    scores = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.endswith(("accuracy", "loss")))
    ui = "tltoolkit ui" if uri == default_tracking_uri() else f"tltoolkit ui --tracking-uri {uri}"
    _logger.info(
        "\nDone. %s\nRun %s in experiment %r, store %s\nSee it in the MLflow UI: %s   (then open http://127.0.0.1:5000)\n"
        "Predict with it: tltoolkit predict %s <images or folders>",
        scores,
        run_id,
        experiment,
        uri,
        ui,
        run_id,
    )
