"""`tltoolkit compare`: the runs of an experiment side by side, one row per run, stage metrics as columns."""

from __future__ import annotations

import pandas as pd

from tltoolkit.errors import TrackingError
from tltoolkit.tracking.store import resolve_tracking_uri

_KIND = "tags.`tltoolkit.kind`"


def compare(experiment: str = "tltoolkit", tracking_uri: str | None = None) -> pd.DataFrame:
    """A table of the experiment's `tltoolkit run` runs, newest first.

    Columns: `run_id`, `run_name`, `status`, `start`, `recipe`, `backbone`, `dataset`, then each stage's final
    validation accuracy and epochs (`head val_accuracy`, `head epochs`, ...), then the final model's metrics
    (`val_accuracy`, `val_loss`, `test_accuracy` where measured) and `minutes`.

    Raises:
        TrackingError: The experiment does not exist in the store.
    """
    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        names = [e.name for e in mlflow.search_experiments()]
        raise TrackingError(f"No experiment {experiment!r} in {mlflow.get_tracking_uri()}; experiments there: {names}.")
    ids = [found.experiment_id]
    parents = mlflow.search_runs(ids, filter_string=f"{_KIND} = 'run'", order_by=["start_time DESC"])
    if parents.empty:
        return pd.DataFrame()
    stages = mlflow.search_runs(ids, filter_string=f"{_KIND} = 'stage'")
    table = pd.DataFrame(
        {
            "run_id": parents["run_id"],
            "run_name": parents.get("tags.mlflow.runName"),
            "status": parents["status"],
            "start": parents["start_time"].dt.strftime("%Y-%m-%d %H:%M"),
            "recipe": parents.get("tags.tltoolkit.recipe"),
            "backbone": parents.get("tags.tltoolkit.backbone"),
            "dataset": parents.get("tags.tltoolkit.dataset"),
        }
    )
    if not stages.empty:
        stages = stages.sort_values("tags.tltoolkit.stage_index")
        for name in stages["tags.tltoolkit.stage"].drop_duplicates():
            of_stage = stages[stages["tags.tltoolkit.stage"] == name].set_index("tags.mlflow.parentRunId")
            for metric, label in (("metrics.final_val_accuracy", "val_accuracy"), ("metrics.epochs_run", "epochs")):
                if metric in of_stage:
                    table[f"{name} {label}"] = table["run_id"].map(of_stage[metric])
    for metric in ("val_accuracy", "val_loss", "test_accuracy", "test_loss"):
        if f"metrics.{metric}" in parents:
            table[metric] = parents[f"metrics.{metric}"]
    table["minutes"] = ((parents["end_time"] - parents["start_time"]).dt.total_seconds() / 60).round(1)
    return table.reset_index(drop=True)
