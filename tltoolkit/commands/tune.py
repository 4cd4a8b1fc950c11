"""`tltoolkit tune`: a keras-tuner search over recipe fields, the search a parent MLflow run, each trial a child run.

Resuming is the same command again: keras-tuner reloads its oracle from `<search.directory>/<search.name>/`, trials
that finished are not rerun and the one that was running when the process died runs once more; the search's MLflow
parent run (its id kept in `tltoolkit.json` beside the oracle) continues. The interrupted trial's child run is marked
KILLED and its `tltoolkit.trial` tag moved to `tltoolkit.interrupted_trial`, so every trial id is tagged on exactly
one run, whose metrics each appear once.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from tltoolkit.errors import RecipeError, TltoolkitError
from tltoolkit.recipe import Recipe, dump_recipe
from tltoolkit.tracking.processes import PROCESS_TAG, mark_dead_runs_killed, process_tag

STATE_FILE = "tltoolkit.json"


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


def _search_recipe(recipe, overrides: Iterable[str]) -> Recipe:
    from tltoolkit.commands.run import _recipe

    recipe = _recipe(recipe, overrides)
    if recipe.search is None:
        raise RecipeError(
            f"Recipe {recipe.name or ''!r} has no `search` section, so there is nothing to tune. Add one (see "
            "recipes/search_head.yaml), or train it as it is with `tltoolkit run`."
        )
    return recipe


def _distribution(distributed: str | None, oracle_address: str | None, worker_id: str | None) -> None:
    """Sets keras-tuner's `KERASTUNER_*` variables for `--distributed chief|worker` (they win if already set)."""
    if distributed is None:
        return
    if distributed not in ("chief", "worker"):
        raise TltoolkitError(f"--distributed must be `chief` or `worker`, not {distributed!r}.")
    address = oracle_address or os.environ.get("KERASTUNER_ORACLE_IP", "") + ":" + os.environ.get("KERASTUNER_ORACLE_PORT", "")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise TltoolkitError(
            f"--distributed {distributed} needs the chief's address as --oracle-address HOST:PORT (got {address!r}); "
            "the chief listens there and every worker connects to it."
        )
    os.environ["KERASTUNER_ORACLE_IP"] = host
    os.environ["KERASTUNER_ORACLE_PORT"] = port
    if distributed == "chief":
        os.environ["KERASTUNER_TUNER_ID"] = "chief"
    else:
        os.environ["KERASTUNER_TUNER_ID"] = f"worker-{worker_id or os.getpid()}"


def tune(
    recipe: Recipe | str | Path | dict,
    data: str | Path | None = None,
    overrides: Iterable[str] = (),
    tracking_uri: str | None = None,
    experiment: str | None = None,
    overwrite: bool = False,
    then_run: bool = False,
    verbose: int | None = None,
    distributed: str | None = None,
    oracle_address: str | None = None,
    worker_id: str | None = None,
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
        verbose: Keras fit verbosity for each stage.
        distributed: `"chief"` (serves the oracle at `oracle_address` and logs the summary once all trials end)
            or `"worker"` (runs trials the chief hands out). Workers log their trials under the chief's parent run.
        oracle_address: `HOST:PORT` of the chief (keras-tuner's `KERASTUNER_ORACLE_IP`/`_PORT`).
        worker_id: A name for this worker (default: its process id).
        unlabeled: Unlabelled images for a recipe with `pretrain.autoencoder` (default: its `data.unlabeled`); every
            trial pretrains its own autoencoder, so its settings can be searched like any field.

    Returns:
        A `TuneResult` (for a worker: its trials so far; the chief's result has the summary).

    Raises:
        RecipeError: No `search` section, a path or range that does not fit the recipe, a freeze point that no
            searched backbone has, or a resumed search whose space or recipe changed (unless `overwrite`).
    """
    recipe = _search_recipe(recipe, overrides)
    data_dir = data or recipe.data.dir
    if not data_dir:
        raise RecipeError("No image folder: pass --data DIR (or set data.dir in the recipe).")
    _distribution(distributed, oracle_address, worker_id)
    import tensorflow as tf
    from mlflow import MlflowClient

    tf.get_logger().setLevel("ERROR")  # Each trial's new model retraces `predict`; TF warns about it every time.

    from tltoolkit.tracking.store import connect, resolve_tracking_uri
    from tltoolkit.tuning.space import recipe_fingerprint, space_fingerprint

    uri = resolve_tracking_uri(tracking_uri, recipe.tracking.uri)
    experiment_name = experiment or recipe.tracking.experiment
    experiment_id = connect(uri, experiment_name)
    _check_freeze_points(recipe)
    if not Path(data_dir).is_dir():
        from tltoolkit.errors import DataError

        raise DataError(f"The image folder {data_dir} does not exist; pass --data DIR.")

    search = recipe.search
    name = search.name or recipe.name or "search"
    directory = Path(search.directory)
    project = directory / name
    role = "worker" if distributed == "worker" else "chief"
    fingerprints = {"space": space_fingerprint(recipe), "recipe": recipe_fingerprint(recipe),
                    "data": str(Path(data_dir).resolve())}  # fmt: skip
    client = MlflowClient(uri)
    state_path = project / STATE_FILE
    if overwrite and role == "chief" and project.exists() and not (state_path.exists() or (project / "oracle.json").exists()):
        raise RecipeError(
            f"--overwrite would delete {project}, which does not hold a search (no {STATE_FILE} or oracle.json). "
            "Set search.directory or search.name to a folder of its own."
        )
    state = {} if overwrite or role == "worker" else _read_state(state_path)
    if state and role == "chief":
        _check_resumable(state, fingerprints, state_path, uri, experiment_id)
    mark_dead_runs_killed(client, keep={state["parent_run_id"]} if state.get("parent_run_id") else set())

    from tltoolkit.tuning.tuner import RecipeTuner, TrialRunner

    runner = TrialRunner(str(data_dir), verbose, str(unlabeled) if unlabeled else recipe.data.unlabeled)
    if role == "chief" and not distributed:
        folder = runner.folder(_base_trial_recipe(recipe))  # Scanned before the first trial, so errors come first.
        _check_objective(recipe, folder.num_classes)
    trial_runs: dict[str, str] = {}

    def run_trial(trial) -> dict[str, float]:
        return _run_trial(client, experiment_id, parent_id, recipe, runner, trial, trial_runs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # Reloads the oracle of an earlier search here, or (overwrite) removes its folder.
        tuner = RecipeTuner(recipe, run_trial, directory=str(directory), project_name=name,
                            overwrite=overwrite and role == "chief")  # fmt: skip
    if role == "worker":
        parent_id = _wait_for_parent(client, experiment_id, name)
    elif state.get("parent_run_id"):
        parent_id = state["parent_run_id"]
        client.update_run(parent_id, status="RUNNING")
        client.set_tag(parent_id, PROCESS_TAG, process_tag())
        print(f"Resuming search {name!r} from {project}: MLflow parent run {parent_id} continues.")
    else:
        parent_id = _start_parent(client, experiment_id, recipe, name, data_dir, project)
        _write_state(state_path, {**fingerprints, "parent_run_id": parent_id, "tracking_uri": uri,
                                  "experiment_id": experiment_id})  # fmt: skip
    print(f"MLflow parent run {parent_id} (search {name!r}) in experiment {experiment_name!r} at {uri}")
    try:
        tuner.search(verbose=1)
    except BaseException as exc:
        if role == "chief":
            client.set_terminated(parent_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            print(f"\nSearch stopped ({type(exc).__name__}). Run the same command again to resume it from {project}; "
                  f"MLflow parent run {parent_id} will continue.")  # fmt: skip
        raise
    if role == "worker":
        ran = pd.DataFrame({"trial": list(trial_runs), "run_id": list(trial_runs.values())})
        return TuneResult(parent_id, experiment_id, uri, {}, None, None, ran, project)
    result = _summarise(client, tuner, recipe, parent_id, experiment_id, uri, project)
    if then_run and result.best_recipe is not None:
        from tltoolkit.commands.run import run

        print(f"\nTraining the final model from the best recipe (trial {result.trials.iloc[0]['trial']})...")
        final = result.best_recipe.model_copy(update={
            "tracking": result.best_recipe.tracking.model_copy(update={
                "tags": {**result.best_recipe.tracking.tags, "tltoolkit.tune_run": parent_id}}),
        })  # fmt: skip
        result.final_run = run(final, data_dir, tracking_uri=uri, experiment=experiment_name, verbose=verbose,
                               unlabeled=unlabeled)  # fmt: skip
        client.set_tag(parent_id, "tltoolkit.final_run", result.final_run.run_id)
    client.set_terminated(parent_id, "FINISHED")
    return result


def _base_trial_recipe(recipe: Recipe) -> Recipe:
    from tltoolkit.recipe.space import trial_recipe

    return trial_recipe(recipe, {})


def _check_objective(recipe: Recipe, num_classes: int) -> None:
    if recipe.search.objective == "val_top5_accuracy" and num_classes <= 5:
        raise RecipeError(
            f"search.objective val_top5_accuracy needs more than 5 classes; the data has {num_classes}. Use val_accuracy."
        )


def _check_freeze_points(recipe: Recipe) -> None:
    """Every searched freeze/unfreeze point exists in every searched backbone: checked on weightless builds."""
    from tltoolkit.backbones import create_backbone
    from tltoolkit.model import check_points
    from tltoolkit.recipe.space import candidates, lookup, set_values, base_tree

    space = recipe.search.space
    tree = base_tree(recipe)
    names = candidates(space["backbone.name"]) if "backbone.name" in space else [recipe.backbone.name]
    sizes = candidates(space["data.image_size"]) if "data.image_size" in space else [recipe.data.image_size]
    points = {path: candidates(spec) for path, spec in space.items()
              if path == "backbone.freeze" or (path.startswith("stages.") and path.endswith(".unfreeze"))}  # fmt: skip
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
                    raise RecipeError(f"search.space.{path}: the value {value!r} does not fit backbone {name}: {exc}") from None


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
    what = {"space": "search space (paths, ranges, tuner or objective)", "recipe": "recipe outside `search`",
            "data": "image folder"}  # fmt: skip
    changed = [what[key] for key in what if state.get(key) != fingerprints[key]]
    if changed:
        raise RecipeError(
            f"The search in {path.parent} was started with a different {' and '.join(changed)}, so its trials "
            "cannot be continued. Pass --overwrite to start it over, or set search.name to keep both searches."
        )
    if state.get("tracking_uri") != uri or state.get("experiment_id") != experiment_id:
        raise RecipeError(
            f"The search in {path.parent} logs to {state.get('tracking_uri')} (experiment id "
            f"{state.get('experiment_id')}); resume it with the same --tracking-uri and --experiment, or pass --overwrite."
        )


def _start_parent(client, experiment_id: str, recipe: Recipe, name: str, data_dir, project: Path) -> str:
    from tltoolkit.tuning.space import describe

    tags = {
        "tltoolkit.kind": "tune", "tltoolkit.search": name, "tltoolkit.recipe": recipe.name or "recipe",
        "tltoolkit.backbone": recipe.backbone.name, "tltoolkit.weights": recipe.backbone.weights,
        "tltoolkit.dataset": Path(data_dir).resolve().name, "tltoolkit.data_dir": str(Path(data_dir).resolve()),
        "tltoolkit.tuner_dir": str(project.resolve()), PROCESS_TAG: process_tag(), **recipe.tracking.tags,
    }  # fmt: skip
    run = client.create_run(experiment_id, run_name=recipe.tracking.run_name or f"tune-{name}", tags=tags)
    search = recipe.search
    params = {"search.tuner": search.tuner, "search.objective": search.objective,
              "search.direction": search.objective_direction, "search.max_trials": search.max_trials,
              "search.executions_per_trial": search.executions_per_trial}  # fmt: skip
    params.update({f"space.{path}": describe(spec) for path, spec in search.space.items()})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, dump_recipe(recipe), "recipe.yaml")
    return run.info.run_id


def _wait_for_parent(client, experiment_id: str, name: str, timeout: float = 300.0) -> str:
    """A worker's parent: the chief's running tune run for this search (the chief creates it before serving)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`tltoolkit.kind` = 'tune' and tags.`tltoolkit.search` = '{name}' "
            "and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )  # fmt: skip
        if runs:
            return runs[0].info.run_id
        if time.monotonic() > deadline:
            raise TltoolkitError(f"No running search {name!r} in the MLflow store after {timeout:.0f}s: start the chief first.")
        time.sleep(1.0)


def _supersede(client, experiment_id: str, parent_id: str, trial_id: str) -> None:
    """Earlier child runs of this trial (its process died in them): KILLED, and no longer tagged as the trial."""
    earlier = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`tltoolkit.trial` = '{trial_id}'",
    )
    for run in earlier:
        client.set_tag(run.info.run_id, "tltoolkit.interrupted_trial", trial_id)
        client.delete_tag(run.info.run_id, "tltoolkit.trial")
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
        print(f"Trial {trial_id} runs again; its interrupted run {run.info.run_id} is kept, marked KILLED.")


def _run_trial(client, experiment_id, parent_id, recipe: Recipe, runner, trial, trial_runs: dict) -> dict[str, float]:
    from mlflow.entities import Metric, Param

    from tltoolkit.tracking.callback import MlflowMetrics
    from tltoolkit.tracking.reports import log_curves, log_evaluation
    from tltoolkit.tuning.space import recipe_values
    from tltoolkit.tuning.tuner import resolve_trial

    trial_id = trial.trial_id
    values = trial.hyperparameters.values
    resolved = resolve_trial(recipe, values)
    _supersede(client, experiment_id, parent_id, trial_id)
    tags = {"mlflow.parentRunId": parent_id, "tltoolkit.kind": "trial", "tltoolkit.trial": trial_id,
            "tltoolkit.recipe": recipe.name or "recipe", "tltoolkit.backbone": resolved.backbone.name,
            "tltoolkit.tuner_id": os.environ.get("KERASTUNER_TUNER_ID", "tuner0"), PROCESS_TAG: process_tag()}  # fmt: skip
    run = client.create_run(experiment_id, run_name=f"trial-{trial_id}", tags=tags)
    run_id = run.info.run_id
    trial_runs[trial_id] = run_id
    try:
        shown = recipe_values(recipe, values)
        shown.update({k: v for k, v in values.items() if k.startswith("tuner/")})
        client.log_batch(run_id, params=[Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in shown.items()])
        client.log_text(run_id, dump_recipe(resolved), "recipe.yaml")
        result = runner.run(resolved, recipe.search.executions_per_trial, recipe.search.objective,
                            lambda prefix: [MlflowMetrics(run_id, client, prefix=prefix)])  # fmt: skip
        now = int(time.time() * 1000)
        metrics = {**result.metrics, "objective": result.objective, "wall_s": result.wall_s}
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        first = result.history[result.history.execution == 0].drop(columns="execution")
        log_curves(client, run_id, first, f"trial {trial_id}", "curves.png")
        folder = runner.folder(resolved)
        log_evaluation(client, run_id, result.evaluation, folder.class_names, "final_val")
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if not isinstance(exc, Exception):
            raise
        print(f"Trial {trial_id} failed: {type(exc).__name__}: {exc}")
        raise
    print(f"Trial {trial_id}: {recipe.search.objective} {result.objective:.4f} in {result.wall_s:.1f}s (run {run_id})")
    return {recipe.search.objective: result.objective}


def _trials_table(oracle, recipe: Recipe, client, experiment_id: str, parent_id: str) -> pd.DataFrame:
    from tltoolkit.tuning.space import recipe_values

    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50_000)
    by_trial = {r.data.tags["tltoolkit.trial"]: r for r in runs if "tltoolkit.trial" in r.data.tags}
    rows = []
    for trial_id, trial in sorted(oracle.trials.items()):
        run = by_trial.get(trial_id)
        values = recipe_values(recipe, trial.hyperparameters.values)
        rows.append({
            "trial": trial_id, "status": trial.status, recipe.search.objective: trial.score,
            **{path: json.dumps(v) if isinstance(v, list) else v for path, v in values.items()},
            **({"epochs_budget": trial.hyperparameters.values["tuner/epochs"]}
               if "tuner/epochs" in trial.hyperparameters.values else {}),
            "wall_s": run.data.metrics.get("wall_s") if run else None,
            "run_id": run.info.run_id if run else None,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _summarise(client, tuner, recipe: Recipe, parent_id: str, experiment_id: str, uri: str, project: Path) -> TuneResult:
    """Logs the best trial, its values and resolved recipe, the trials table and the plots on the parent run."""
    from mlflow.entities import Metric

    from tltoolkit.tracking.plots import search_figure
    from tltoolkit.tuning.space import recipe_values
    from tltoolkit.tuning.tuner import resolve_trial

    search = recipe.search
    table = _trials_table(tuner.oracle, recipe, client, experiment_id, parent_id)
    completed = table[table.status == "COMPLETED"] if not table.empty else table
    client.log_text(parent_id, table.to_csv(index=False), "trials.csv")
    best_trials = tuner.oracle.get_best_trials(1)
    if completed.empty or not best_trials:
        print("No trial completed; nothing to summarise.")
        return TuneResult(parent_id, experiment_id, uri, {}, None, None, table, project)
    best = best_trials[0]
    best_values = recipe_values(recipe, best.hyperparameters.values)
    best_recipe = resolve_trial(recipe, best.hyperparameters.values)
    best_recipe = best_recipe.model_copy(update={"name": f"{recipe.name or 'recipe'}-best"})
    now = int(time.time() * 1000)
    step = len(completed)
    client.log_batch(parent_id, metrics=[
        Metric(f"best_{search.objective}", float(best.score), now, step),
        Metric("trials_completed", float(len(completed)), now, step),
        Metric("trials_failed", float((table.status == "FAILED").sum()), now, step),
    ])  # fmt: skip
    client.set_tag(parent_id, "tltoolkit.best_trial", best.trial_id)
    client.log_dict(parent_id, {"trial": best.trial_id, search.objective: best.score, "values": best_values},
                    "best_trial.json")  # fmt: skip
    client.log_text(parent_id, dump_recipe(best_recipe), "best_recipe.yaml")
    figure = search_figure(completed, search.objective, search.objective_direction, list(search.space))
    client.log_figure(parent_id, figure, "search.png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    shown = table.drop(columns=["run_id"]).assign(trial=table.trial)
    print(f"\nSearch done: {len(completed)} trial(s) completed in {project}.")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"Best: trial {best.trial_id}, {search.objective} {best.score:.4f}, values {best_values}")
    print(f"Best recipe logged as best_recipe.yaml on run {parent_id}; train it with `tltoolkit tune ... --then-run`, "
          f"or save it and `tltoolkit run` it.")  # fmt: skip
    ordered = table.sort_values(search.objective, ascending=search.objective_direction == "min", na_position="last")
    return TuneResult(parent_id, experiment_id, uri, best_values, float(best.score), best_recipe,
                      ordered.reset_index(drop=True), project)  # fmt: skip
