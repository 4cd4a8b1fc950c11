"""`tltoolkit compare`: runs and searches side by side, one row each, stage metrics as columns."""

from __future__ import annotations

import pandas as pd

from tltoolkit.errors import TrackingError
from tltoolkit.tracking.store import require_existing_store, resolve_tracking_uri

_KIND = "tags.`tltoolkit.kind`"


def compare(experiment: str | None = None, tracking_uri: str | None = None) -> pd.DataFrame:
    """A table of the store's `tltoolkit run` runs and `tltoolkit tune` searches, newest first.

    Columns: `run_id`, `kind` (`run` or `search`), `experiment`, `run_name`, `status`, `start`, `recipe`, `backbone`,
    `dataset`, then each stage's final validation accuracy and epochs (`head val_accuracy`, `head epochs`, ...), then
    the final model's metrics (`val_accuracy`, `val_loss`, `test_accuracy` where measured; a search's best objective
    under its objective's name, and its `trials`) and `minutes`.

    Args:
        experiment: Only this experiment. Defaults to every experiment in the store.
        tracking_uri: The store. Defaults as for `run`; a SQLite store that does not exist is an error.

    Raises:
        TrackingError: The store or the experiment does not exist.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    require_existing_store(uri)
    mlflow.set_tracking_uri(uri)
    experiments = {e.experiment_id: e.name for e in mlflow.search_experiments()}
    if experiment is not None:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise TrackingError(
                f"No experiment {experiment!r} in {uri}; experiments there: {list(experiments.values())}."
            )
        experiments = {found.experiment_id: found.name}
    ids = list(experiments)
    found = [mlflow.search_runs(ids, filter_string=f"{_KIND} = '{kind}'") for kind in ("run", "tune")]
    found = [frame for frame in found if not frame.empty]
    if not found:
        return pd.DataFrame()
    parents = pd.concat(found, ignore_index=True).sort_values("start_time", ascending=False, ignore_index=True)
    table = _parents_table(parents, experiments)
    stages = mlflow.search_runs(ids, filter_string=f"{_KIND} = 'stage'")
    if not stages.empty:
        _add_stage_columns(table, stages)
    _add_final_metrics(table, parents)
    table["minutes"] = ((parents["end_time"] - parents["start_time"]).dt.total_seconds() / 60).round(1)
    return table.reset_index(drop=True)


def _parents_table(parents: pd.DataFrame, experiments: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "run_id": parents["run_id"],
            "kind": parents["tags.tltoolkit.kind"].map({"run": "run", "tune": "search"}),
            "experiment": parents["experiment_id"].map(experiments),
            "run_name": parents.get("tags.mlflow.runName"),
            "status": parents["status"],
            "start": parents["start_time"].dt.strftime("%Y-%m-%d %H:%M"),
            "recipe": parents.get("tags.tltoolkit.recipe"),
            "backbone": parents.get("tags.tltoolkit.backbone"),
            "dataset": parents.get("tags.tltoolkit.dataset"),
        }
    )


def _add_stage_columns(table: pd.DataFrame, stages: pd.DataFrame) -> None:
    stages = stages.sort_values("tags.tltoolkit.stage_index")
    for name in stages["tags.tltoolkit.stage"].drop_duplicates():
        of_stage = stages[stages["tags.tltoolkit.stage"] == name].set_index("tags.mlflow.parentRunId")
        for metric, label in (("metrics.final_val_accuracy", "val_accuracy"), ("metrics.epochs_run", "epochs")):
            if metric in of_stage:
                table[f"{name} {label}"] = table["run_id"].map(of_stage[metric])


def _add_final_metrics(table: pd.DataFrame, parents: pd.DataFrame) -> None:
    """The final model's scores; for a search, its best objective under the objective's own name."""
    for metric in ("val_accuracy", "val_loss", "test_accuracy", "test_loss"):
        values = parents[f"metrics.{metric}"] if f"metrics.{metric}" in parents else pd.Series(index=parents.index)
        if f"metrics.best_{metric}" in parents:
            values = values.fillna(parents[f"metrics.best_{metric}"])
        if values.notna().any():
            table[metric] = values
    if "metrics.trials_completed" in parents:
        table["trials"] = parents["metrics.trials_completed"]
