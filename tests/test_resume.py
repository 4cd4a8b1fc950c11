"""Kill and resume: a real SIGKILL in each stage, SIGTERM, Ctrl-C between checkpoint and MLflow, dead runs swept."""

import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from conftest import cli, tiny_recipe, wait_until_paused
from mlflow import MlflowClient

import tltoolkit
from tltoolkit.errors import ResumeError
from tltoolkit.tracking.models import load_classifier
from tltoolkit.tracking.processes import PROCESS_TAG, mark_dead_runs_killed, process_tag


def resumable_recipe(**changes) -> dict:
    return tiny_recipe(
        head={"dense": [8], "dropout": 0.3},  # Dropout: its seed state must resume too.
        stages=[
            {"name": "head", "epochs": 3, "optimizer": {"learning_rate": 1e-2}, "schedule": {"name": "cosine"}},
            {
                "name": "finetune",
                "epochs": 3,
                "unfreeze": "all",
                "optimizer": {"learning_rate": 1e-3},
                "early_stopping": {"monitor": "val_loss", "patience": 5},
            },
        ],
        **changes,
    )


def all_runs(client):
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def runs_of(client, experiment):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def stage_run(client, experiment, name):
    return next(r for r in runs_of(client, experiment) if r.data.tags.get("tltoolkit.stage") == name)


def epochs_logged(client, run_id, key="loss"):
    return [m.step for m in client.get_metric_history(run_id, key)]


def test_killed_in_each_stage_resumes_the_same_runs_to_the_same_weights(image_folder, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(resumable_recipe()))
    client = MlflowClient()
    log = tmp_path / "run.log"
    command = ("run", str(path), "--data", str(image_folder), "--experiment", "resumed")

    process = cli(*command, log=log, paused=tmp_path / "first")  # Killed after the head's first epoch.
    wait_until_paused(tmp_path / "first", process, what="the head stage's first epoch")
    assert epochs_logged(client, stage_run(client, "resumed", "head").info.run_id) == [0]
    process.send_signal(signal.SIGKILL)
    process.wait()
    parent = next(r for r in runs_of(client, "resumed") if r.data.tags.get("tltoolkit.kind") == "run")
    assert parent.info.status == "RUNNING", "SIGKILL leaves it RUNNING until the toolkit next starts"

    # Resumed: the head's epochs 1 and 2, then killed after the fine-tune's first epoch.
    process = cli(*command, "--resume", log=log, paused=tmp_path / "second", after=3)
    wait_until_paused(tmp_path / "second", process, what="the fine-tune stage's first epoch")
    assert epochs_logged(client, stage_run(client, "resumed", "finetune").info.run_id) == [3]
    process.send_signal(signal.SIGKILL)
    process.wait()

    assert (
        subprocess.run(
            [sys.executable, "-m", "tltoolkit", *command, "--resume"], stdout=log.open("a"), stderr=subprocess.STDOUT
        ).returncode
        == 0
    ), log.read_text()[-3000:]
    text = log.read_text()
    assert "Resuming run" in text and "resuming at epoch 2" in text

    runs = runs_of(client, "resumed")
    parents = [r for r in runs if r.data.tags.get("tltoolkit.kind") == "run"]
    assert [p.info.run_id for p in parents] == [parent.info.run_id], "the same parent run, continued"
    stages = {r.data.tags["tltoolkit.stage"]: r for r in runs if r.data.tags.get("tltoolkit.kind") == "stage"}
    assert sorted(stages) == ["finetune", "head"] and len(runs) == 3, "one child run per stage, continued"
    assert all(r.info.status == "FINISHED" for r in runs)
    for name, steps in (("head", [0, 1, 2]), ("finetune", [3, 4, 5])):  # One axis: fine-tune continues the head's.
        for key in ("loss", "val_accuracy", "learning_rate"):
            assert epochs_logged(client, stages[name].info.run_id, key) == steps, f"{key}: each epoch exactly once"
    for key in ("loss", "accuracy", "learning_rate"):
        assert epochs_logged(client, parent.info.run_id, key) == list(range(6)), f"parent {key}: the whole training"
    final = epochs_logged(client, parent.info.run_id, "val_loss")
    assert final == [0, 1, 2, 3, 4, 5, 5], "every epoch once, then the final model's score at the last step"
    assert stages["finetune"].data.params["trainable_backbone_layers"] == "3", "fine-tune resumed unfrozen"
    head_lr = [m.value for m in client.get_metric_history(stages["head"].info.run_id, "learning_rate")]
    assert head_lr[0] > head_lr[1] > head_lr[2], "the cosine schedule went on from the restored step"
    assert not (tmp_path / "mlruns" / "checkpoints" / parent.info.run_id).exists(), "removed once finished"

    reference = tltoolkit.run(path, image_folder, experiment="straight", verbose=0)
    resumed = load_classifier(parent.info.run_id).model
    assert len(reference.model.weights) == len(resumed.weights)
    for a, b in zip(reference.model.weights, resumed.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    assert client.get_run(parent.info.run_id).data.metrics["val_loss"] == reference.metrics["val_loss"]


def test_sigterm_marks_runs_killed_keeps_the_checkpoint_and_says_how_to_resume(image_folder, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(resumable_recipe()))
    client = MlflowClient()
    log = tmp_path / "run.log"
    process = cli("run", str(path), "--data", str(image_folder), log=log, paused=tmp_path / "paused")
    wait_until_paused(tmp_path / "paused", process, what="the first epoch")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 130
    runs = all_runs(client)
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 2
    parent = next(r for r in runs if r.data.tags["tltoolkit.kind"] == "run")
    assert list((tmp_path / "mlruns" / "checkpoints" / parent.info.run_id).glob("checkpoint-*.npz"))
    text = log.read_text()
    assert "marked KILLED" in text and f"--resume {parent.info.run_id}" in text and "Traceback" not in text

    result = tltoolkit.run(path, image_folder, resume=parent.info.run_id, verbose=0)
    assert result.run_id == parent.info.run_id
    assert {r.info.status for r in all_runs(client)} == {"FINISHED"}


def test_ctrl_c_after_a_checkpoint_before_mlflow_logs_each_epoch_once(image_folder, monkeypatch):
    from tltoolkit.tracking.runs import RunTracker

    original = RunTracker.on_epoch_end

    def interrupted(self, stage, epoch, logs):
        state.setdefault("head", self.child_id)
        if self.child_id == state["head"] and epoch == 1:
            raise KeyboardInterrupt  # The checkpoint of epoch 1 is written; MLflow has not seen the epoch.
        original(self, stage, epoch, logs)

    state = {}
    monkeypatch.setattr(RunTracker, "on_epoch_end", interrupted)
    recipe = resumable_recipe()
    with pytest.raises(KeyboardInterrupt):
        tltoolkit.run(recipe, image_folder, verbose=0)
    client = MlflowClient()
    assert epochs_logged(client, state["head"]) == [0]
    assert client.get_run(state["head"]).info.status == "KILLED"
    monkeypatch.setattr(RunTracker, "on_epoch_end", original)

    result = tltoolkit.run(recipe, image_folder, resume=True, verbose=0)
    assert result.stage_runs["head"] == state["head"]
    assert epochs_logged(client, state["head"]) == [0, 1, 2], "epoch 1 logged from the checkpoint, once"
    assert list(result.history[result.history.stage == "head"]["epoch"]) == [0, 1, 2]


def test_resume_refuses_what_it_cannot_continue(image_folder):
    recipe = resumable_recipe()
    client = MlflowClient()
    orphan = client.create_run(client.create_experiment("orphans"), tags={PROCESS_TAG: "x:1:1"}).info.run_id
    client.set_tag(orphan, PROCESS_TAG, f"{process_tag().split(':')[0]}:{process_tag().split(':')[1]}:1")  # Dead.
    with pytest.raises(ResumeError, match="Nothing to resume.*without --resume"):
        tltoolkit.run(recipe, image_folder, resume=True, verbose=0)
    assert client.get_run(orphan).info.status == "KILLED", "a failed --resume still marks dead runs KILLED"
    done = tltoolkit.run(recipe, image_folder, verbose=0)
    with pytest.raises(ResumeError, match="already finished"):
        tltoolkit.run(recipe, image_folder, resume=done.run_id, verbose=0)
    with pytest.raises(ResumeError, match="no such run"):
        tltoolkit.run(recipe, image_folder, resume="0123456789abcdef", verbose=0)


def test_runs_of_dead_processes_are_marked_killed_and_live_ones_kept(tmp_path):
    client = MlflowClient()
    experiment = client.create_experiment("sweep")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    host = process_tag().split(":")[0]
    tags = {
        "dead": f"{host}:{dead_pid}:",
        "reused_pid": f"{host}:{process_tag().split(':')[1]}:1",  # Our pid, another start time: a dead owner.
        "alive": process_tag(),
        "elsewhere": "another-host:1:1",
        "resumed": f"{host}:{dead_pid}:",
    }
    ids = {name: client.create_run(experiment, tags={PROCESS_TAG: tag}).info.run_id for name, tag in tags.items()}
    killed = mark_dead_runs_killed(client, keep={ids["resumed"]})
    assert sorted(killed) == sorted([ids["dead"], ids["reused_pid"]])
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {
        "dead": "KILLED",
        "reused_pid": "KILLED",
        "alive": "RUNNING",
        "elsewhere": "RUNNING",
        "resumed": "RUNNING",
    }


def _interrupted_after_epoch_1(recipe, data, monkeypatch) -> None:
    """Runs `recipe` until Ctrl-C lands at the end of epoch 1 (its checkpoint written), as a user would stop it."""
    from tltoolkit.tracking.runs import RunTracker

    original = RunTracker.on_epoch_end

    def interrupted(self, stage, epoch, logs):
        if epoch == 1:
            raise KeyboardInterrupt
        original(self, stage, epoch, logs)

    monkeypatch.setattr(RunTracker, "on_epoch_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tltoolkit.run(recipe, data, verbose=0)
    monkeypatch.setattr(RunTracker, "on_epoch_end", original)


def test_resume_does_not_depend_on_how_the_data_folder_was_typed(image_folder, tmp_path, monkeypatch):
    """Started as `images` from its parent folder, resumed as an absolute path from another directory."""
    import os

    recipe = resumable_recipe()
    monkeypatch.chdir(image_folder.parent)
    _interrupted_after_epoch_1(recipe, image_folder.name, monkeypatch)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = tltoolkit.run(recipe, os.path.abspath(image_folder), resume=True, verbose=0)
    assert list(result.history[result.history.stage == "head"]["epoch"]) == [0, 1, 2]


def test_a_run_whose_process_is_alive_is_not_resumed_twice(image_folder, monkeypatch):
    import subprocess
    import sys

    from tltoolkit.tracking.processes import PROCESS_TAG, _start_time

    recipe = resumable_recipe()
    _interrupted_after_epoch_1(recipe, image_folder, monkeypatch)
    client = MlflowClient()
    (run,) = client.search_runs(["1"], "tags.`tltoolkit.kind` = 'run'")
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # As if that process were still training the run.
        host = client.get_run(run.info.run_id).data.tags[PROCESS_TAG].partition(":")[0]
        client.set_tag(run.info.run_id, PROCESS_TAG, f"{host}:{owner.pid}:{_start_time(owner.pid)}")
        with pytest.raises(
            ResumeError, match=f"still being trained by process {owner.pid} on {host}.*kill {owner.pid}"
        ):
            tltoolkit.run(recipe, image_folder, resume=True, verbose=0)
    finally:
        owner.kill()
        owner.wait()
    result = tltoolkit.run(recipe, image_folder, resume=True, verbose=0)
    assert result.run_id == run.info.run_id, "once its process is gone, the run resumes"


def test_a_run_trained_on_another_host_is_not_resumed_while_its_lease_is_fresh(image_folder, monkeypatch):
    import json
    import time

    from tltoolkit.tracking.processes import LEASE_FILE, PROCESS_TAG, heartbeat

    recipe = resumable_recipe()
    _interrupted_after_epoch_1(recipe, image_folder, monkeypatch)
    client = MlflowClient()
    (run,) = client.search_runs(["1"], "tags.`tltoolkit.kind` = 'run'")
    folder = Path(run.data.tags["tltoolkit.checkpoints"])
    assert not (folder / LEASE_FILE).exists(), "the interrupted process gave its lease up"

    client.set_tag(run.info.run_id, PROCESS_TAG, "gpu-box-7:4242:99")  # Its pid cannot be checked from here...
    lease = {"owner": "gpu-box-7:4242:99", "heartbeat": time.time() - 30}  # ... its lease says it is alive.
    (folder / LEASE_FILE).write_text(json.dumps(lease))
    with pytest.raises(ResumeError, match=r"process 4242 on gpu-box-7 \(its lease was renewed 3\d s ago\).*wait"):
        tltoolkit.run(recipe, image_folder, resume=True, verbose=0)

    (folder / LEASE_FILE).write_text(json.dumps({**lease, "heartbeat": time.time() - 600}))  # That host died.
    result = tltoolkit.run(recipe, image_folder, resume=True, verbose=0)
    assert result.run_id == run.info.run_id

    with heartbeat(folder, interval=0.05):  # While a run trains, its lease is renewed.
        first = json.loads((folder / LEASE_FILE).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((folder / LEASE_FILE).read_text())["heartbeat"] > first
    assert not (folder / LEASE_FILE).exists()


def test_a_diverging_loss_stops_keeps_the_last_finite_checkpoint_and_resumes_with_a_smaller_rate(
    image_folder, monkeypatch
):
    from tltoolkit.data.pipeline import TrainingBatches
    from tltoolkit.errors import DivergedError

    original = TrainingBatches.epochs

    def diverging(self, stream=0, first_epoch=0, last_epoch=1):
        """Fine-tune batches from its third epoch on make the loss NaN, as diverged weights would."""
        ds = original(self, stream, first_epoch, last_epoch)
        if stream != 1:
            return ds
        finite = max(0, 2 - first_epoch) * self.steps_per_epoch
        return ds.take(finite).concatenate(ds.skip(finite).map(lambda x, y: (x * np.nan, y)))

    monkeypatch.setattr(TrainingBatches, "epochs", diverging)
    recipe = tiny_recipe(tracking={"log_model": False})
    recipe["stages"][1].update(epochs=4, optimizer={"name": "sgd", "learning_rate": 0.01})
    with pytest.raises(DivergedError, match=r"Stage 'finetune', epoch 3, batch 1: the training loss became nan"):
        tltoolkit.run(recipe, image_folder, verbose=0)
    monkeypatch.setattr(TrainingBatches, "epochs", original)
    client = MlflowClient()
    (parent,) = [r for r in all_runs(client) if r.data.tags.get("tltoolkit.kind") == "run"]
    assert parent.info.status == "FAILED"
    finetune = stage_run(client, "tltoolkit", "finetune")
    assert epochs_logged(client, finetune.info.run_id) == [2, 3], "the two finite epochs, then the stop"

    with pytest.raises(ResumeError, match="different recipe"):  # Anything but a learning rate must match.
        tltoolkit.run(recipe, image_folder, ["stages.1.epochs=5"], verbose=0, resume=parent.info.run_id)
    result = tltoolkit.run(
        recipe, image_folder, ["stages.1.optimizer.learning_rate=0.001"], verbose=0, resume=parent.info.run_id
    )
    assert result.run_id == parent.info.run_id and result.stage_runs["finetune"] == finetune.info.run_id
    assert epochs_logged(client, finetune.info.run_id) == [2, 3, 4, 5], "each fine-tune epoch once, continued"
    assert np.isfinite(result.history["loss"]).all()
    params = client.get_run(parent.info.run_id).data.params
    assert params["stages.1.optimizer.learning_rate"] == "0.01", "what it started with stays"
    assert params["resumed.stages.1.optimizer.learning_rate"] == "0.001"
    assert client.get_run(finetune.info.run_id).data.params["resumed.optimizer.learning_rate"] == "0.001"


def test_an_image_that_vanishes_mid_training_is_one_clear_error_with_the_checkpoint_kept(image_folder, monkeypatch):
    from tltoolkit.errors import DataError
    from tltoolkit.tracking.runs import RunTracker

    original = RunTracker.on_epoch_end
    victim = image_folder / "green" / "green_3.png"

    def deleting(self, stage, epoch, logs):
        original(self, stage, epoch, logs)
        victim.unlink(missing_ok=True)  # Gone after the scan and the first epoch (nothing is cached in memory).

    monkeypatch.setattr(RunTracker, "on_epoch_end", deleting)
    recipe = tiny_recipe(data={**tiny_recipe()["data"], "cache": False, "feature_cache": False})
    with pytest.raises(DataError, match=r"became unreadable .*FileNotFoundError.*green_3\.png.*--resume"):
        tltoolkit.run(recipe, image_folder, verbose=0)
    client = MlflowClient()
    (parent,) = [r for r in all_runs(client) if r.data.tags.get("tltoolkit.kind") == "run"]
    assert parent.info.status == "FAILED"
    assert any(Path(parent.data.tags["tltoolkit.checkpoints"]).iterdir()), "the first epoch's checkpoint is kept"


def test_a_kill_while_the_model_is_logged_leaves_one_model_after_resuming(image_folder, monkeypatch):
    import tltoolkit.tracking.runs as runs

    def killed_while_logging(*args, **kwargs):
        run = mlflow.active_run()
        MlflowClient().create_logged_model(run.info.experiment_id, name="half", source_run_id=run.info.run_id)
        raise KeyboardInterrupt  # The model's files were being uploaded.

    original = runs.log_classifier
    monkeypatch.setattr(runs, "log_classifier", killed_while_logging)
    recipe = resumable_recipe()
    with pytest.raises(KeyboardInterrupt):
        tltoolkit.run(recipe, image_folder, verbose=0)
    monkeypatch.setattr(runs, "log_classifier", original)
    result = tltoolkit.run(recipe, image_folder, resume=True, verbose=0)
    client = MlflowClient()
    models = client.search_logged_models(["1"], filter_string=f"source_run_id = '{result.run_id}'")
    assert [str(m.status) for m in models] == ["READY"], "the half-logged one is gone"
    assert len(client.get_metric_history(result.run_id, "val_ece")) == 1, "the final scores logged once"
    assert load_classifier(result.run_id).class_names == ["blue", "green", "red"]
