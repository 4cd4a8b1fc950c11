"""`tltoolkit tune`: a keras-tuner search over recipe fields, the search a parent MLflow run, each trial a child run.

Resuming is the same command again: keras-tuner reloads its oracle from `<search.directory>/<search.name>/`, trials
that finished are not rerun and the one that was running when the process died runs once more; the search's MLflow
parent run (its id kept in `tltoolkit.json` beside the oracle) continues. The interrupted trial's child run is marked
KILLED and its `tltoolkit.trial` tag moved to `tltoolkit.interrupted_trial`, so every trial id is tagged on exactly
one run, whose metrics each appear once.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from tltoolkit.data.scan import require_folder
from tltoolkit.errors import RecipeError, TltoolkitError
from tltoolkit.recipe import Recipe, as_recipe, dump_recipe, with_data

STATE_FILE = "tltoolkit.json"
_logger = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """What `tune` produced."""

    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    best_values: dict  # The best trial's recipe values by dotted path.
    best_objective: float | None
    best_recipe: Recipe | None
    trials: pd.DataFrame  # One row per trial: trial, status, objective, values, run_id, wall_s.
    directory: Path  # keras-tuner's project folder (for resuming).
    final_run: object = None  # `RunResult` of --then-run.


@dataclass
class _Search:
    """One search as this process sees it: the recipe, where its state and runs live, and this process's role."""

    recipe: Recipe
    data_dir: str
    uri: str
    experiment_id: str
    project: Path  # keras-tuner's folder: <search.directory>/<search.name>.
    role: str  # "chief" (or alone) or "worker".
    distributed: bool
    client: object = None  # MlflowClient
    unlabeled: str | None = None  # Unlabelled images, for recipes with `pretrain.autoencoder`.

    @property
    def state_path(self) -> Path:
        return self.project / STATE_FILE


def _search_recipe(recipe, overrides: Iterable[str]) -> Recipe:
    recipe = as_recipe(recipe, overrides)
    if recipe.search is None:
        raise RecipeError(
            f"Recipe {recipe.name or ''!r} has no `search` section, so there is nothing to tune. Add one (see "
            "recipes/search_head.yaml), or train it as it is with `tltoolkit run`."
        )
    return recipe


@dataclass(frozen=True)
class Distributed:
    """keras-tuner's distributed search, as this process takes part in it.

    Args:
        role: `"chief"` (serves the oracle at `oracle_address` and logs the summary once all trials end) or
            `"worker"` (runs the trials the chief hands out, logging them under the chief's parent run).
        oracle_address: `HOST:PORT` of the chief. Defaults to `KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT`.
        worker_id: A name for this worker. Defaults to its process id.
    """

    role: str
    oracle_address: str | None = None
    worker_id: str | None = None

    def apply(self) -> None:
        """Sets keras-tuner's `KERASTUNER_*` variables (it reads them when the tuner is made)."""
        if self.role not in ("chief", "worker"):
            raise TltoolkitError(f"--distributed must be `chief` or `worker`, not {self.role!r}.")
        environ = os.environ
        address = self.oracle_address or environ.get("KERASTUNER_ORACLE_IP", "") + ":" + environ.get(
            "KERASTUNER_ORACLE_PORT", ""
        )
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise TltoolkitError(
                f"--distributed {self.role} needs the chief's address as --oracle-address HOST:PORT (got {address!r}); "
                "the chief listens there and every worker connects to it."
            )
        environ["KERASTUNER_ORACLE_IP"], environ["KERASTUNER_ORACLE_PORT"] = host, port
        name = "chief" if self.role == "chief" else f"worker-{self.worker_id or os.getpid()}"
        environ["KERASTUNER_TUNER_ID"] = name


def tune(
    recipe: Recipe | str | Path | dict,
    data: str | Path | None = None,
    overrides: Iterable[str] = (),
    tracking_uri: str | None = None,
    experiment: str | None = None,
    overwrite: bool = False,
    then_run: bool = False,
    verbose: int | None = None,
    distributed: Distributed | str | None = None,
    unlabeled: str | Path | None = None,
) -> TuneResult:
    """Searches the recipe's `search.space` with keras-tuner; every trial runs all the recipe's stages.

    Args:
        recipe: A recipe file, dict or `Recipe` with a `search` section.
        data: The image folder. Defaults to the recipe's `data.dir`.
        overrides: `dotted.path=value` strings, applied before validation.
        tracking_uri: MLflow store (as for `run`).
        experiment: MLflow experiment. Defaults to the recipe's `tracking.experiment`.
        overwrite: Start over even if `search.directory/search.name` holds a search (with another space, say).
        then_run: After the search, train and log the final model from the best recipe (`tltoolkit run`).
        verbose: Keras fit verbosity for each stage (`0`: no progress bars).
        distributed: keras-tuner's distributed mode (see `Distributed`); `"chief"` or `"worker"` alone take the
            chief's address from `KERASTUNER_ORACLE_IP` and `_PORT`.
        unlabeled: Unlabelled images for a recipe with `pretrain.autoencoder` (default: its `data.unlabeled`); every
            trial pretrains its own autoencoder, so its settings can be searched like any field.

    Returns:
        A `TuneResult`: the best values and recipe, and every trial with its run id.

    Raises:
        RecipeError: No `search` section, a searched freeze point a searched backbone lacks, or a search folder
            that holds another search (unless `overwrite`).
    """
    recipe = _search_recipe(recipe, overrides)
    data_dir = data or recipe.data.dir
    if not data_dir:
        raise RecipeError("No image folder: pass --data DIR (or set data.dir in the recipe).")
    require_folder(data_dir)
    distributed = Distributed(distributed) if isinstance(distributed, str) else distributed
    if distributed is not None:
        distributed.apply()
    search = _open_search(recipe, str(data_dir), tracking_uri, experiment, distributed)
    search.unlabeled = str(unlabeled) if unlabeled else recipe.data.unlabeled
    tuner, tracker = _tuner(search, overwrite, verbose)
    _run_search(search, tuner)
    if search.role == "worker":
        ran = pd.DataFrame({"trial": list(tracker.runs), "run_id": list(tracker.runs.values())})
        return TuneResult(tracker.parent_id, search.experiment_id, search.uri, {}, None, None, ran, search.project)
    result = _summarise(search, tuner, tracker.parent_id)
    if then_run and result.best_recipe is not None:
        result.final_run = _then_run(search, result, experiment, verbose, unlabeled)
    search.client.set_terminated(tracker.parent_id, "FINISHED")
    return result


def _open_search(recipe: Recipe, data_dir: str, tracking_uri, experiment, distributed) -> _Search:
    """Connects to the store and checks everything that can fail before any trial: freeze points, the folder."""
    import tensorflow as tf
    from mlflow import MlflowClient

    from tltoolkit.tracking.store import connect, resolve_tracking_uri

    tf.get_logger().setLevel("ERROR")  # Each trial's new model retraces `predict`; TF warns about it every time.
    uri = resolve_tracking_uri(tracking_uri, recipe.tracking.uri)
    experiment_id = connect(uri, experiment or recipe.tracking.experiment)
    _check_freeze_points(recipe)
    project = Path(recipe.search.directory) / (recipe.search.name or recipe.name or "search")
    role = "worker" if distributed is not None and distributed.role == "worker" else "chief"
    return _Search(recipe, data_dir, uri, experiment_id, project, role, bool(distributed), MlflowClient(uri))


def _tuner(search: _Search, overwrite: bool, verbose):
    """keras-tuner's tuner (reloading an earlier search's oracle, or removing it with `overwrite`) and the tracker
    with the search's parent run: new, continued, or (a worker) the chief's."""
    from tltoolkit.tracking.processes import mark_dead_runs_killed
    from tltoolkit.tracking.search import TrialTracker
    from tltoolkit.tuning.tuner import RecipeTuner, TrialRunner

    state = _search_state(search, overwrite)
    mark_dead_runs_killed(search.client, keep={state["parent_run_id"]} if state.get("parent_run_id") else set())
    runner = TrialRunner(search.data_dir, verbose, search.unlabeled)
    if search.role == "chief" and not search.distributed:
        folder = runner.folder(_base_trial_recipe(search.recipe))  # Scanned before the first trial: errors first.
        _check_objective(search.recipe, folder.num_classes)
    tracker = TrialTracker(search.client, search.experiment_id, search.recipe, (search.data_dir, search.unlabeled))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tuner = RecipeTuner(
            search.recipe,
            runner,
            tracker,
            directory=str(search.project.parent),
            project_name=search.project.name,
            overwrite=overwrite and search.role == "chief",
        )
    tracker.parent_id = _parent_run(search, state)
    return tuner, tracker


def _search_state(search: _Search, overwrite: bool) -> dict:
    """The search's saved state (`tltoolkit.json`), checked against this command; `{}` for a new search."""
    from tltoolkit.tuning.space import recipe_fingerprint, space_fingerprint

    project, path = search.project, search.state_path
    if (
        overwrite
        and search.role == "chief"
        and project.exists()
        and not (path.exists() or (project / "oracle.json").exists())
    ):
        raise RecipeError(
            f"--overwrite would delete {project}, which does not hold a search (no {STATE_FILE} or oracle.json). "
            "Set search.directory or search.name to a folder of its own."
        )
    state = {} if overwrite or search.role == "worker" else _read_state(path)
    fingerprints = {
        "space": space_fingerprint(search.recipe),
        "recipe": recipe_fingerprint(search.recipe),
        "data": str(Path(search.data_dir).resolve()),
    }
    if state and search.role == "chief":
        _check_resumable(state, fingerprints, path, search.uri, search.experiment_id)
    return {**fingerprints, **state}


def _parent_run(search: _Search, state: dict) -> str:
    from tltoolkit.tracking.processes import PROCESS_TAG, process_tag
    from tltoolkit.tracking.search import start_search_run, wait_for_search_run

    client, name = search.client, search.project.name
    if search.role == "worker":
        parent_id = wait_for_search_run(client, search.experiment_id, name)
    elif state.get("parent_run_id"):
        parent_id = state["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        client.set_tag(parent_id, PROCESS_TAG, process_tag())
        _logger.info("Resuming search %r from %s: MLflow parent run %s continues.", name, search.project, parent_id)
    else:
        parent_id = start_search_run(client, search.experiment_id, search.recipe, search.data_dir, search.project)
        fingerprints = {key: state[key] for key in ("space", "recipe", "data")}
        _write_state(
            search.state_path,
            {
                **fingerprints,
                "parent_run_id": parent_id,
                "tracking_uri": search.uri,
                "experiment_id": search.experiment_id,
            },
        )
    experiment = client.get_experiment(search.experiment_id).name
    _logger.info("MLflow parent run %s (search %r) in experiment %r at %s", parent_id, name, experiment, search.uri)
    return parent_id


def _run_search(search: _Search, tuner) -> None:
    """keras-tuner's search; Ctrl-C or a fatal error marks the open trial's run and (the chief) the parent."""
    try:
        tuner.search(verbose=0)  # Our own lines name trials by their ids; keras-tuner counts from 1.
    except BaseException as exc:
        status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        tuner.tracker.end(status)
        if search.role == "chief":
            search.client.set_terminated(tuner.tracker.parent_id, status)
            _logger.warning(
                "Search stopped (%s). Run the same command again to resume it from %s; MLflow parent run "
                "%s will continue.",
                type(exc).__name__,
                search.project,
                tuner.tracker.parent_id,
            )
        raise


def _summarise(search: _Search, tuner, parent_id: str) -> TuneResult:
    """Logs the best trial, its values and resolved recipe, the trials table and the plots on the parent run."""
    from tltoolkit.tracking.search import log_search_summary, trials_table
    from tltoolkit.tuning.space import recipe_values
    from tltoolkit.tuning.tuner import resolve_trial

    recipe, uri, project = search.recipe, search.uri, search.project
    table = trials_table(search.client, tuner.oracle, recipe, search.experiment_id, parent_id)
    completed = table[table.status == "COMPLETED"] if not table.empty else table
    best_trials = tuner.oracle.get_best_trials(1)
    if completed.empty or not best_trials:
        log_search_summary(search.client, parent_id, recipe, table, None, None)
        _logger.info("No trial completed; nothing to summarise.")
        return TuneResult(parent_id, search.experiment_id, uri, {}, None, None, table, project)
    best = best_trials[0]
    best_values = recipe_values(recipe, best.hyperparameters.values)
    best_recipe = resolve_trial(recipe, best.hyperparameters.values)
    best_recipe = with_data(
        best_recipe.model_copy(update={"name": f"{recipe.name or 'recipe'}-best"}), search.data_dir, search.unlabeled
    )
    log_search_summary(search.client, parent_id, recipe, table, best, best_recipe)
    saved = project / "best_recipe.yaml"
    saved.write_text(dump_recipe(best_recipe))
    objective = recipe.search.objective
    shown = table.drop(columns=["run_id"]).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    _logger.info(
        "\nSearch done: %d trial(s) completed in %s.\n%s\n\nBest: trial %s, %s %.4f, with\n%s\nIts recipe is %s "
        "(and best_recipe.yaml on run %s); train and log its model with:\n  tltoolkit run %s",
        len(completed),
        project,
        shown,
        best.trial_id,
        objective,
        best.score,
        yaml.safe_dump(best_values, sort_keys=False).rstrip(),
        saved,
        parent_id,
        saved,
    )
    ordered = table.sort_values(objective, ascending=recipe.search.objective_direction == "min", na_position="last")
    return TuneResult(
        parent_id,
        search.experiment_id,
        uri,
        best_values,
        float(best.score),
        best_recipe,
        ordered.reset_index(drop=True),
        project,
    )


def _then_run(search: _Search, result: TuneResult, experiment, verbose, unlabeled):
    """Trains and logs the final model from the best recipe, tagged with the search's run."""
    from tltoolkit.commands.run import run

    _logger.info("\nTraining the final model from the best recipe (trial %s)...", result.trials.iloc[0]["trial"])
    best = result.best_recipe
    final = best.model_copy(
        update={
            "tracking": best.tracking.model_copy(
                update={"tags": {**best.tracking.tags, "tltoolkit.tune_run": result.parent_run_id}}
            )
        }
    )
    experiment_name = experiment or search.recipe.tracking.experiment
    final_run = run(
        final,
        search.data_dir,
        tracking_uri=search.uri,
        experiment=experiment_name,
        verbose=verbose,
        unlabeled=unlabeled,
    )
    search.client.set_tag(result.parent_run_id, "tltoolkit.final_run", final_run.run_id)
    return final_run


def _base_trial_recipe(recipe: Recipe) -> Recipe:
    from tltoolkit.recipe.space import trial_recipe

    return trial_recipe(recipe, {})


def _check_objective(recipe: Recipe, num_classes: int) -> None:
    if recipe.search.objective == "val_top5_accuracy" and num_classes <= 5:
        raise RecipeError(
            f"search.objective val_top5_accuracy needs more than 5 classes; the data has {num_classes}. "
            "Use val_accuracy."
        )


def _check_freeze_points(recipe: Recipe) -> None:
    """Every searched freeze/unfreeze point exists in every searched backbone: checked on weightless builds."""
    from tltoolkit.backbones import create_backbone
    from tltoolkit.model import check_points
    from tltoolkit.recipe.space import base_tree, candidates, lookup, set_values

    space = recipe.search.space
    tree = base_tree(recipe)
    names = candidates(space["backbone.name"]) if "backbone.name" in space else [recipe.backbone.name]
    sizes = candidates(space["data.image_size"]) if "data.image_size" in space else [recipe.data.image_size]
    points = {
        path: candidates(spec)
        for path, spec in space.items()
        if path == "backbone.freeze" or (path.startswith("stages.") and path.endswith(".unfreeze"))
    }
    named = {path: [v for v in values if isinstance(v, str)] for path, values in points.items()}
    if not any(named.values()) and not any(isinstance(lookup(tree, p), str) for p in points):
        return  # Counts, fractions and keywords are checked against each backbone's depth when the trial builds it.
    for name in names:
        backbone = create_backbone(name, "none", input_size=int(min(sizes)))
        for path, values in points.items():
            for value in values:
                trial = Recipe.model_validate(set_values(tree, {"backbone.name": name, path: value}))
                try:
                    check_points(backbone, trial.backbone.freeze, trial.stages)
                except TltoolkitError as exc:
                    raise RecipeError(
                        f"search.space.{path}: the value {value!r} does not fit backbone {name}: {exc}"
                    ) from None


def _read_state(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{path} is unreadable ({exc}); pass --overwrite to start the search over.") from None


def _write_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2))
    os.replace(temporary, path)


def _check_resumable(state: dict, fingerprints: dict, path: Path, uri: str, experiment_id: str) -> None:
    what = {
        "space": "search space (paths, ranges, tuner or objective)",
        "recipe": "recipe outside `search`",
        "data": "image folder",
    }
    changed = [what[key] for key in what if state.get(key) != fingerprints[key]]
    if changed:
        raise RecipeError(
            f"The search in {path.parent} was started with a different {' and '.join(changed)}, so its trials "
            "cannot be continued. Pass --overwrite to start it over, or set search.name to keep both searches."
        )
    if state.get("tracking_uri") != uri or state.get("experiment_id") != experiment_id:
        raise RecipeError(
            f"The search in {path.parent} logs to {state.get('tracking_uri')} (experiment id "
            f"{state.get('experiment_id')}); resume it with the same --tracking-uri and --experiment, or pass "
            "--overwrite."
        )
