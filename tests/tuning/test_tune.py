import json
import signal
from pathlib import Path

import pytest
import yaml
from conftest import cli, tiny_recipe, wait_until, wait_until_paused
from mlflow import MlflowClient

import tltoolkit
from tltoolkit.errors import RecipeError
from tltoolkit.recipe import load_recipe

SPACE = {
    "head.dropout": {"type": "float", "min": 0.0, "max": 0.5},
    "stages.0.optimizer.learning_rate": {"type": "float", "min": 1e-3, "max": 1e-1, "sampling": "log"},
    "head.dense": [[], [16]],
}


def search_recipe(max_trials=3, space=SPACE, **search) -> dict:
    recipe = tiny_recipe(tracking={"log_model": False})
    recipe["search"] = {"tuner": "random", "max_trials": max_trials, "space": space, **search}
    return recipe


def runs_of(client, parent_id):
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_tune_logs_a_parent_run_and_one_child_per_trial(image_folder, caplog):
    caplog.set_level("INFO", logger="tltoolkit")
    result = tltoolkit.tune(search_recipe(), image_folder, verbose=0, then_run=True)
    client = MlflowClient()
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["tltoolkit.kind"] == "tune" and parent.info.status == "FINISHED"
    assert parent.data.params["space.head.dropout"] == "float [0, 0.5]"
    children = [r for r in runs_of(client, result.parent_run_id) if r.data.tags.get("tltoolkit.kind") == "trial"]
    assert sorted(r.data.tags["tltoolkit.trial"] for r in children) == ["0", "1", "2"]
    first = next(c for c in children if c.data.tags["tltoolkit.trial"] == "0")
    assert json.loads(first.data.params["head.dropout"]) == 0.0 and first.data.params["head.dense"] == "[]"
    assert json.loads(first.data.params["stages.0.optimizer.learning_rate"]) == pytest.approx(1e-2), (
        "trial 0: as written"
    )
    others = {(c.data.params["head.dropout"], c.data.params["head.dense"]) for c in children}
    assert len(others) == 3, "later trials are the oracle's own"
    for child in children:
        assert child.info.status == "FINISHED"
        assert set(SPACE) <= set(child.data.params)
        assert "val_accuracy" in child.data.metrics and "objective" in child.data.metrics
        for stage, epochs in (("head", 2), ("finetune", 1)):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, f"{stage}/val_accuracy")]
            assert steps == list(range(epochs)), "every stage's every epoch, once"
        curve = [m.step for m in client.get_metric_history(child.info.run_id, "loss")]
        assert curve == [0, 1, 2], "named as on a run's parent, on one axis across stages"
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"curves.png", "recipe.yaml", "evaluation"} <= artifacts

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"trials.csv", "search.png", "best_recipe.yaml", "best_trial.json", "recipe.yaml"} <= artifacts
    best_trial = parent.data.tags["tltoolkit.best_trial"]
    best_child = next(c for c in children if c.data.tags["tltoolkit.trial"] == best_trial)
    assert best_child.info.run_name == f"tiny / trial {best_trial} (best)" and best_child.data.tags["tltoolkit.best"]
    assert sum("tltoolkit.best" in c.data.tags for c in children) == 1
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(
        max(c.data.metrics["val_accuracy"] for c in children)
    )
    assert best_child.data.metrics["val_accuracy"] == pytest.approx(result.best_objective)
    assert parent.data.metrics["val_accuracy"] == pytest.approx(result.best_objective), "one column for all runs"
    best_yaml = Path(client.download_artifacts(result.parent_run_id, "best_recipe.yaml"))
    best = load_recipe(best_yaml)
    assert best.search is None and best.head.dropout == pytest.approx(result.best_values["head.dropout"])
    assert best.data.dir == str(image_folder.resolve()), "the best recipe runs on its own"
    saved = Path("tuning/tiny/best_recipe.yaml")
    assert load_recipe(saved) == best and f"tltoolkit run {saved}" in caplog.text
    assert "Trial 0: head.dropout: 0.0" in caplog.text and "Trial 1:" in caplog.text, "trials counted one way"
    assert "\nhead.dropout: " in caplog.text, "best values as YAML"
    assert best.head.dense == result.best_values["head.dense"]
    assert len(result.trials) == 3 and result.trials["run_id"].notna().all()

    final = client.get_run(result.final_run.run_id)
    assert final.data.tags["tltoolkit.tune_run"] == result.parent_run_id
    assert parent.data.tags["tltoolkit.final_run"] == result.final_run.run_id


def test_a_changed_space_on_resume_is_an_error_unless_overwrite(image_folder):
    first = tltoolkit.tune(search_recipe(max_trials=1), image_folder, verbose=0)
    again = tltoolkit.tune(search_recipe(max_trials=2), image_folder, verbose=0)  # more trials: resumes
    assert again.parent_run_id == first.parent_run_id and len(again.trials) == 2
    changed = search_recipe(max_trials=2, space={**SPACE, "head.dropout": {"type": "float", "min": 0.0, "max": 0.4}})
    with pytest.raises(RecipeError, match=r"different search space.*--overwrite"):
        tltoolkit.tune(changed, image_folder, verbose=0)
    fresh = tltoolkit.tune(changed, image_folder, verbose=0, overwrite=True)
    assert fresh.parent_run_id != first.parent_run_id and len(fresh.trials) == 2


def test_bad_freeze_point_in_the_space_fails_before_any_trial(image_folder):
    recipe = search_recipe(space={"stages.1.unfreeze": ["all", "block9_conv"]})
    with pytest.raises(RecipeError, match=r"block9_conv.*does not fit backbone test_tiny"):
        tltoolkit.tune(recipe, image_folder, verbose=0)
    assert not MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    with pytest.raises(RecipeError, match="no `search` section"):
        tltoolkit.tune(tiny_recipe(), image_folder)


def test_hyperband_and_grid_run_through_the_same_machinery(image_folder):
    grid = search_recipe(space={"head.dense": [[], [16]], "head.pooling": ["avg", "max"]}, tuner="grid", max_trials=10)
    grid["stages"] = grid["stages"][:1]  # The head alone: what is tested is which trials the grid makes.
    result = tltoolkit.tune(grid, image_folder, verbose=0)
    assert len(result.trials) == 4, "a grid of 2 x 2 ends after 4 trials"
    hyper = search_recipe(space={"head.dense": [[], [16]]}, tuner="hyperband", factor=3, max_trials=2)
    hyper["search"]["name"] = "hyper"
    result = tltoolkit.tune(hyper, image_folder, verbose=0)
    assert len(result.trials) == 2 and "epochs_budget" in result.trials


# --- Processes: a real SIGKILL, then the same command resumes (chief and workers: tests/tracking/test_server.py). ---


def trial_runs(client, name):
    experiments = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiments, filter_string=f"tags.`tltoolkit.search` = '{name}'")
    runs = [r for p in parents for r in runs_of(client, p.info.run_id)]
    return parents, runs


def test_search_killed_in_trial_0_and_in_a_later_trial_resumes_with_the_same_command(image_folder, tmp_path):
    recipe = search_recipe(max_trials=3)
    recipe["stages"] = [{**recipe["stages"][0], "epochs": 3}]  # The head alone: 3 epochs a trial.
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    log = tmp_path / "tune.log"
    command = ("tune", str(path), "--data", str(image_folder))
    client = MlflowClient()
    project = tmp_path / "tuning" / "tiny"

    process = cli(*command, log=log)  # Killed as soon as trial 0 starts.
    wait_until(lambda: (project / "trial_0" / "trial.json").exists(), process, what="trial 0 to start")
    process.send_signal(signal.SIGKILL)
    process.wait()

    # Trial 0 again (3 epochs), then killed in trial 1, after its first epoch was logged.
    process = cli(*command, log=log, paused=tmp_path / "paused", after=4)
    wait_until_paused(tmp_path / "paused", process, what="trial 1's first epoch")
    _, runs = trial_runs(client, "tiny")
    live = [r for r in runs if r.info.status == "RUNNING" and "tltoolkit.trial" in r.data.tags]
    assert [r.data.tags["tltoolkit.trial"] for r in live] == ["1"]
    assert [m.step for m in client.get_metric_history(live[0].info.run_id, "head/loss")] == [0]
    process.send_signal(signal.SIGKILL)
    process.wait()

    process = cli(*command, log=log)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    parents, runs = trial_runs(client, "tiny")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", "one parent run, continued each time"
    tagged = [r for r in runs if "tltoolkit.trial" in r.data.tags]
    assert sorted(r.data.tags["tltoolkit.trial"] for r in tagged) == ["0", "1", "2"]
    for run in tagged:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "head/loss")]
        assert steps == [0, 1, 2], f"trial {run.data.tags['tltoolkit.trial']} logged epochs {steps}"
    interrupted = [r for r in runs if "tltoolkit.interrupted_trial" in r.data.tags]
    assert "1" in {r.data.tags["tltoolkit.interrupted_trial"] for r in interrupted}
    assert all(r.info.status == "KILLED" for r in interrupted)
    oracle = json.loads((project / "oracle.json").read_text())
    assert sorted(oracle["end_order"]) == ["0", "1", "2"] and not oracle["ongoing_trials"]
    assert "Resuming search 'tiny'" in log.read_text()


def test_ctrl_c_marks_the_runs_killed_and_the_same_call_resumes(image_folder, monkeypatch):
    from tltoolkit.tuning.tuner import TrialRunner

    original = TrialRunner.run
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tltoolkit.tune(search_recipe(max_trials=2), image_folder, verbose=0)
    client = MlflowClient()
    parents, runs = trial_runs(client, "tiny")
    assert [p.info.status for p in parents] == ["KILLED"]
    assert sorted((r.data.tags.get("tltoolkit.trial"), r.info.status) for r in runs) == [
        ("0", "FINISHED"),
        ("1", "KILLED"),
    ]

    result = tltoolkit.tune(search_recipe(max_trials=2), image_folder, verbose=0)
    assert result.parent_run_id == parents[0].info.run_id
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    _, runs = trial_runs(client, "tiny")
    assert sorted(r.data.tags["tltoolkit.trial"] for r in runs if "tltoolkit.trial" in r.data.tags) == ["0", "1"]
    assert [r.info.status for r in runs if "tltoolkit.interrupted_trial" in r.data.tags] == ["KILLED"]


def test_overwrite_never_deletes_a_folder_that_holds_no_search(image_folder, tmp_path):
    precious = tmp_path / "tuning" / "tiny" / "thesis.tex"
    precious.parent.mkdir(parents=True)
    precious.write_text("years of work")
    with pytest.raises(RecipeError, match=r"would delete .*tiny.*does not hold a search"):
        tltoolkit.tune(search_recipe(max_trials=1), image_folder, overwrite=True, verbose=0)
    assert precious.read_text() == "years of work"


def test_a_trial_whose_values_clash_is_skipped_and_a_dead_store_stops_the_search(image_folder, monkeypatch):
    """Our errors map onto keras-tuner's: an invalid recipe fails that trial only (`FailedTrialError`); a tracking
    store that stopped answering stops the whole search (`FatalError`)."""
    import keras_tuner as kt

    from tltoolkit.errors import TrackingError
    from tltoolkit.tuning.tuner import TrialRunner

    original, calls = TrialRunner.run, []

    def clashing_second_trial(self, recipe, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RecipeError("The trial values do not make a valid recipe: these two clash.")
        return original(self, recipe, *args, **kwargs)

    monkeypatch.setattr(TrialRunner, "run", clashing_second_trial)
    result = tltoolkit.tune(search_recipe(max_trials=3), image_folder, verbose=0)
    client = MlflowClient()
    statuses = dict(zip(result.trials["trial"], result.trials["status"]))
    assert statuses["1"] == "FAILED" and list(statuses.values()).count("COMPLETED") >= 2, statuses
    runs = {r.data.tags["tltoolkit.trial"]: r.info.status for r in runs_of(client, result.parent_run_id)}
    assert runs["1"] == "FAILED" and runs["0"] == runs["2"] == "FINISHED"
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"

    def dead_store(self, recipe, *args, **kwargs):
        raise TrackingError("The MLflow store at http://127.0.0.1:1 does not answer.")

    monkeypatch.setattr(TrialRunner, "run", dead_store)
    recipe = search_recipe(max_trials=3)
    recipe["search"]["name"] = "dead-store"
    with pytest.raises(kt.errors.FatalError, match="tracking store stopped answering"):
        tltoolkit.tune(recipe, image_folder, verbose=0)
    parents, runs = trial_runs(client, "dead-store")
    assert [p.info.status for p in parents] == ["FAILED"] and [r.info.status for r in runs] == ["FAILED"]


def test_trials_score_the_model_as_trained_without_calibration_or_tta(tmp_path, monkeypatch):
    """Enough val images to calibrate, and a recipe asking for it and for TTA: a trial does neither."""
    from conftest import write_images

    from tltoolkit.tuning.tuner import TrialRunner

    data = write_images(tmp_path / "many", per_class=40)

    def refuse(*args):
        raise AssertionError("a trial calibrated")

    monkeypatch.setattr("tltoolkit.stages.session.calibrate", refuse)
    recipe = load_recipe(
        tiny_recipe(evaluation={"calibrate": True, "tta": "flip"}, stages=[{"name": "head", "epochs": 1}])
    )
    result = TrialRunner(str(data), verbose=0).run(recipe, 1, "val_accuracy")
    assert "val_accuracy" in result.metrics and not any("tta" in key for key in result.metrics)
