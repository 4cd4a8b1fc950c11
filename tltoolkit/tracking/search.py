"""A `tltoolkit tune` search in MLflow: the search a parent run, every trial a child run, the summary on the parent.

`TrialTracker` is called from keras-tuner's own trial hooks (`RecipeTuner.on_trial_begin` / `on_trial_end`): it makes
the trial's run, hands the session `TrialHooks` that log every epoch of every stage and execution into it (keys
`head/loss`, `e1/head/loss`...), records the trial's result and ends the run with the trial's status. A trial that
runs again after its process died gets a new run; the interrupted one is kept, marked KILLED and no longer tagged as
the trial, so every trial id is tagged on exactly one run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from tltoolkit.errors import TrackingError
from tltoolkit.recipe import Recipe, dump_recipe, with_data
from tltoolkit.stages.hooks import TrainingHooks
from tltoolkit.stages.session import CLASSIFIER
from tltoolkit.tracking.plots import search_figure
from tltoolkit.tracking.processes import PROCESS_TAG, process_tag
from tltoolkit.tracking.reports import log_curves, log_evaluation
from tltoolkit.tracking.runs import CURVE_KEYS, global_step
from tltoolkit.tuning.space import describe, recipe_values

_logger = logging.getLogger(__name__)


def _now() -> int:
    return int(time.time() * 1000)


class TrialHooks(TrainingHooks):
    """One execution of a trial: every epoch into the trial's run, keys prefixed by execution and stage
    (`head/loss`, `e1/head/loss`), stage-local steps. The first execution also logs the curve keys unprefixed at the
    global step (`loss`, `val_accuracy`... over head then fine-tune), named as on a run's parent, so one picked
    column or chart serves runs and trials alike."""

    def __init__(self, client: MlflowClient, run_id: str, execution: int = 0):
        self.client, self.run_id, self.execution = client, run_id, execution
        self.prefix = f"e{execution}/" if execution else ""
        self.last_step = 0  # The highest global step logged: where the trial's final scores go.

    def on_epoch_end(self, stage, epoch, logs):
        now, prefix = _now(), f"{self.prefix}{stage.name}/"
        metrics = [Metric(prefix + key, value, now, epoch) for key, value in sorted(logs.items())]
        if self.execution == 0 and stage.kind == CLASSIFIER:
            step = global_step(stage, epoch)
            metrics += [Metric(key, logs[key], now, step) for key in CURVE_KEYS if key in logs]
            self.last_step = max(self.last_step, step)
        self.client.log_batch(self.run_id, metrics=metrics)


class TrialTracker:
    """The trials of one search, each a child run of the search's parent run.

    Args:
        client: On the tracking store.
        experiment_id: The search's experiment.
        recipe: The search's recipe (its values are logged by dotted path).
        data: The image folder and the unlabelled one (or `None`), recorded in every trial's saved recipe.
    """

    def __init__(self, client: MlflowClient, experiment_id: str, recipe: Recipe, data: tuple = (".", None)):
        self.client, self.experiment_id, self.recipe, self.data = client, experiment_id, recipe, data
        self.parent_id: str | None = None
        self.runs: dict[str, str] = {}  # Trial id -> its run, for the trials this process ran.
        self.open: str | None = None  # The run of the trial in progress.
        self.first: TrialHooks | None = None  # The hooks of its first execution.

    def begin(self, trial, resolved: Recipe | None) -> str:
        """Makes the trial's run with its values and resolved recipe (`None`: the values make no valid recipe)."""
        trial_id, values = trial.trial_id, trial.hyperparameters.values
        self._supersede(trial_id)
        tags = {
            "mlflow.parentRunId": self.parent_id,
            "tltoolkit.kind": "trial",
            "tltoolkit.trial": trial_id,
            "tltoolkit.recipe": self.recipe.name or "recipe",
            "tltoolkit.backbone": (resolved or self.recipe).backbone.name,
            "tltoolkit.tuner_id": os.environ.get("KERASTUNER_TUNER_ID", "tuner0"),
            PROCESS_TAG: process_tag(),
        }
        search = self.recipe.search.name or self.recipe.name or "search"
        name = f"{search} / trial {trial_id}"
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self.runs[trial_id] = self.open = run_id
        shown = recipe_values(self.recipe, values)
        shown.update({k: v for k, v in values.items() if k.startswith("tuner/")})
        params = [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in shown.items()]
        self.client.log_batch(run_id, params=params)
        if resolved is not None:
            self.client.log_text(run_id, dump_recipe(with_data(resolved, *self.data)), "recipe.yaml")
        return run_id

    def hooks(self, execution: int) -> TrialHooks:
        hooks = TrialHooks(self.client, self.open, execution)
        if execution == 0:
            self.first = hooks
        return hooks

    def record(self, trial_id: str, result, class_names: list[str]) -> None:
        """The trial's final scores, objective and wall time, the first execution's curves and evaluation."""
        run_id, step = self.runs[trial_id], self.first.last_step if self.first is not None else 0
        metrics = {**result.metrics, "objective": result.objective, "wall_s": result.wall_s}
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), _now(), step) for k, v in metrics.items()])
        first = result.history[result.history.execution == 0].drop(columns="execution")
        log_curves(self.client, run_id, first, f"trial {trial_id}", "curves.png")
        log_evaluation(self.client, run_id, result.evaluation, class_names, "final_val", step=step)

    def end(self, status: str) -> None:
        """Ends the trial in progress: FINISHED, FAILED, or KILLED (Ctrl-C)."""
        if self.open is not None:
            self.client.set_terminated(self.open, status)
            self.open = None

    def _supersede(self, trial_id: str) -> None:
        """Earlier child runs of this trial (its process died in them): KILLED, and no longer tagged as the trial."""
        earlier = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.`tltoolkit.trial` = '{trial_id}'",
        )
        for run in earlier:
            self.client.set_tag(run.info.run_id, "tltoolkit.interrupted_trial", trial_id)
            self.client.delete_tag(run.info.run_id, "tltoolkit.trial")
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")
            _logger.info(
                "Trial %s runs again; its interrupted run %s is kept, marked KILLED.", trial_id, run.info.run_id
            )


def start_search_run(client: MlflowClient, experiment_id: str, recipe: Recipe, data_dir, project: Path) -> str:
    """The search's parent run: its tags, the tuner settings and space as params, the recipe; returns its id."""
    name = project.name
    tags = {
        "tltoolkit.kind": "tune",
        "tltoolkit.search": name,
        "tltoolkit.recipe": recipe.name or "recipe",
        "tltoolkit.backbone": recipe.backbone.name,
        "tltoolkit.weights": recipe.backbone.weights,
        "tltoolkit.dataset": Path(data_dir).resolve().name,
        "tltoolkit.data_dir": str(Path(data_dir).resolve()),
        "tltoolkit.tuner_dir": str(project.resolve()),
        PROCESS_TAG: process_tag(),
        **recipe.tracking.tags,
    }
    run = client.create_run(experiment_id, run_name=recipe.tracking.run_name or f"tune-{name}", tags=tags)
    search = recipe.search
    params = {
        "search.tuner": search.tuner,
        "search.objective": search.objective,
        "search.direction": search.objective_direction,
        "search.max_trials": search.max_trials,
        "search.executions_per_trial": search.executions_per_trial,
    }
    params.update({f"space.{path}": describe(spec) for path, spec in search.space.items()})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_text(run.info.run_id, dump_recipe(recipe), "recipe.yaml")
    return run.info.run_id


def wait_for_search_run(client: MlflowClient, experiment_id: str, name: str, timeout: float = 300.0) -> str:
    """A worker's parent: the chief's running tune run for this search (the chief creates it before serving)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`tltoolkit.kind` = 'tune' and tags.`tltoolkit.search` = '{name}' "
            "and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            return runs[0].info.run_id
        if time.monotonic() > deadline:
            raise TrackingError(
                f"No running search {name!r} in the MLflow store after {timeout:.0f}s: start the chief first."
            )
        time.sleep(1.0)


def trials_table(client: MlflowClient, oracle, recipe: Recipe, experiment_id: str, parent_id: str) -> pd.DataFrame:
    """One row per trial: id, status, objective, values by dotted path, Hyperband's budget, wall time, run id."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=50_000
    )
    by_trial = {r.data.tags["tltoolkit.trial"]: r for r in runs if "tltoolkit.trial" in r.data.tags}
    rows = []
    for trial_id, trial in sorted(oracle.trials.items()):
        run = by_trial.get(trial_id)
        values = recipe_values(recipe, trial.hyperparameters.values)
        rows.append(
            {
                "trial": trial_id,
                "status": trial.status,
                recipe.search.objective: trial.score,
                **{path: json.dumps(v) if isinstance(v, list) else v for path, v in values.items()},
                **(
                    {"epochs_budget": trial.hyperparameters.values["tuner/epochs"]}
                    if "tuner/epochs" in trial.hyperparameters.values
                    else {}
                ),
                "wall_s": run.data.metrics.get("wall_s") if run else None,
                "run_id": run.info.run_id if run else None,
            }
        )
    return pd.DataFrame(rows)


def log_search_summary(
    client: MlflowClient, parent_id: str, recipe: Recipe, table: pd.DataFrame, best, best_recipe
) -> None:
    """On the parent: the trials table, the best trial's score, values and recipe, and the search figure."""
    search, completed = recipe.search, table[table.status == "COMPLETED"]
    client.log_text(parent_id, table.to_csv(index=False), "trials.csv")
    if best is None:
        return
    step = len(completed)
    client.log_batch(
        parent_id,
        metrics=[
            Metric(f"best_{search.objective}", float(best.score), _now(), step),
            Metric(search.objective, float(best.score), _now(), step),  # Under the name runs and trials use too.
            Metric("trials_completed", float(len(completed)), _now(), step),
            Metric("trials_failed", float((table.status == "FAILED").sum()), _now(), step),
        ],
    )
    client.set_tag(parent_id, "tltoolkit.best_trial", best.trial_id)
    best_runs = table.loc[table.trial == best.trial_id, "run_id"].dropna()
    for run_id in best_runs:  # Marked where the trials are listed: a tag to filter by, and its name.
        client.set_tag(run_id, "tltoolkit.best", "true")
        name = client.get_run(run_id).info.run_name
        if not name.endswith("(best)"):
            client.update_run(run_id, name=f"{name} (best)")
    values = recipe_values(recipe, best.hyperparameters.values)
    client.log_dict(
        parent_id, {"trial": best.trial_id, search.objective: best.score, "values": values}, "best_trial.json"
    )
    client.log_text(parent_id, dump_recipe(best_recipe), "best_recipe.yaml")
    figure = search_figure(completed, search.objective, search.objective_direction, list(search.space))
    client.log_figure(parent_id, figure, "search.png")
    plt.close(figure)
