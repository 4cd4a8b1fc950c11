"""The team tracking server for real: `tltoolkit server` starts PostgreSQL from its own binaries in a temp folder and
`mlflow server` with artifacts served through it on a free loopback port; tltoolkit processes log to it at once, are
killed and resumed; the server is stopped by pid and started again on the same folder."""

import os
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import cli, free_port, tiny_recipe, use_store, wait_until, wait_until_paused
from mlflow import MlflowClient

from tltoolkit.errors import TltoolkitError
from tltoolkit.tracking.models import load_classifier
from tltoolkit.tracking.server import postgres_binaries

pytestmark = pytest.mark.service


class Server:
    """`tltoolkit server` in its own process, as a team runs it; stopped by pid (SIGTERM), started again on the same
    folder and port."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.process = folder, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = ("server", "--dir", str(self.folder), "--port", str(self.port), "--workers", "2")
        log = self.folder / "server.log"
        announced = f"export MLFLOW_TRACKING_URI={self.url}"  # Said once the server answers.
        before = log.read_text().count(announced) if log.exists() else 0
        self.process = cli(*command, log=log)
        wait_until(lambda: log.read_text().count(announced) > before, self.process, 180, "the server to answer")
        assert self.answers()

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, (self.folder / "server.log").read_text()[-3000:]
        assert not self.answers()
        assert not (self.folder / "postgres" / "data" / "postmaster.pid").exists(), "PostgreSQL stopped with it"


@pytest.fixture(scope="module")
def team():
    try:
        postgres_binaries()
    except TltoolkitError as exc:
        pytest.skip(f"no PostgreSQL server programs on this machine: {exc}")
    # Not under pytest's tmp folder (private to its user): as root, PostgreSQL runs as `postgres` and must reach it.
    folder = Path(tempfile.mkdtemp(prefix="tltoolkit-team-"))
    folder.chmod(0o755)
    server = Server(folder)
    try:
        server.start()
        yield server
    finally:  # Stopped by pid whatever happened, so no server outlives the tests.
        if server.process is not None and server.process.poll() is None:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def on_server(team, monkeypatch, tmp_path):
    """Every command of the test logs to the team server; checkpoints go under the test's folder."""
    use_store(team.url, monkeypatch)
    monkeypatch.setenv("TLTOOLKIT_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    return MlflowClient(team.url)


def experiment_runs(client, name):
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []


def steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def write(path: Path, recipe: dict) -> str:
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_an_experiment_another_client_creates_meanwhile_is_joined(on_server, monkeypatch):
    """A search's chief and workers start at once: one creates the experiment between another's lookup and its own
    creation, which the server refuses (RESOURCE_ALREADY_EXISTS); that process joins the experiment."""
    import mlflow

    from tltoolkit.tracking.store import connect

    real = mlflow.create_experiment

    def raced(name, **kwargs):
        on_server.create_experiment(name)  # The other process wins...
        return real(name, **kwargs)  # ...and this one is refused.

    monkeypatch.setattr(mlflow, "create_experiment", raced)
    assert connect(mlflow.get_tracking_uri(), "raced") == on_server.get_experiment_by_name("raced").experiment_id


def test_a_run_and_a_distributed_search_write_to_the_server_at_once_and_lose_nothing(on_server, image_folder, tmp_path):
    """Four processes at once (a run, a search's chief and two workers); one worker SIGKILLed mid-trial comes back."""
    client = on_server
    run_recipe = write(tmp_path / "run.yaml", tiny_recipe())
    search = tiny_recipe(tracking={"log_model": False})
    search["search"] = {
        "tuner": "random",
        "max_trials": 4,
        "space": {"head.dropout": {"type": "float", "min": 0.0, "max": 0.5}},
    }
    search["stages"][0]["epochs"] = 3
    search_recipe = write(tmp_path / "search.yaml", search)
    address = f"127.0.0.1:{free_port()}"
    tune = ("tune", search_recipe, "--data", str(image_folder), "--experiment", "team-search", "--oracle-address")
    logs = {name: tmp_path / f"{name}.log" for name in ("run", "chief", "w1", "w2")}
    w1_paused = tmp_path / "w1-paused"
    processes = {
        "run": cli("run", run_recipe, "--data", str(image_folder), "--experiment", "team-run", log=logs["run"]),
        "chief": cli(*tune, address, "--distributed", "chief", log=logs["chief"]),
        "w1": cli(*tune, address, "--distributed", "worker", "--worker-id", "w1", log=logs["w1"], paused=w1_paused),
    }
    try:
        # w1 stops inside its first trial once an epoch is on the server; w2 then takes the other trials, so w1 has
        # a trial to lose whatever the machine's speed.
        def w1_paused_while_the_chief_serves():
            if processes["chief"].poll() is not None:  # Else w1 would wait minutes for a search that never comes.
                raise AssertionError("the chief ended early: " + logs["chief"].read_text()[-3000:])
            return (w1_paused / "logged").exists()

        wait_until(w1_paused_while_the_chief_serves, processes["w1"], timeout=600, what="worker w1's first epoch")
        processes["w2"] = cli(*tune, address, "--distributed", "worker", "--worker-id", "w2", log=logs["w2"])
        runs = experiment_runs(client, "team-search")
        mine = [r for r in runs if r.data.tags.get("tltoolkit.tuner_id") == "worker-w1"]
        assert [r.info.status for r in mine] == ["RUNNING"] and steps(client, mine[0].info.run_id, "head/loss")
        processes["w1"].send_signal(signal.SIGKILL)
        processes["w1"].wait()
        processes["w1"] = cli(*tune, address, "--distributed", "worker", "--worker-id", "w1", log=logs["w1"])
        for name in ("run", "w1", "w2", "chief"):
            assert processes[name].wait(timeout=600) == 0, f"{name}: " + logs[name].read_text()[-3000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()

    runs = experiment_runs(client, "team-run")
    parent = next(r for r in runs if r.data.tags.get("tltoolkit.kind") == "run")
    assert all(r.info.status == "FINISHED" for r in runs) and len(runs) == 3, "the run and its two stages"
    assert steps(client, parent.info.run_id, "loss") == [0, 1, 2], "every epoch once"
    logged = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"recipe.yaml", "curves.png", "history.csv", "evaluation"} <= logged, logged
    assert client.get_run(parent.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:"), "served artifacts"
    model = load_classifier(parent.info.run_id)  # Downloaded through the server.
    assert model.class_names == ["blue", "green", "red"]

    runs = experiment_runs(client, "team-search")
    search_parent = next(r for r in runs if r.data.tags.get("tltoolkit.kind") == "tune")
    assert search_parent.info.status == "FINISHED" and search_parent.data.metrics["trials_completed"] == 4
    trials = [r for r in runs if "tltoolkit.trial" in r.data.tags]
    assert sorted(r.data.tags["tltoolkit.trial"] for r in trials) == ["0", "1", "2", "3"], "each trial once"
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert steps(client, trial.info.run_id, "head/loss") == [0, 1, 2]
    interrupted = [r for r in runs if "tltoolkit.interrupted_trial" in r.data.tags]
    assert [r.info.status for r in interrupted] == ["KILLED"], "the killed worker's run, kept and marked"
    assert interrupted[0].data.tags["tltoolkit.tuner_id"] == "worker-w1"


def test_a_server_killed_mid_run_fails_the_run_and_resume_continues_it(team, on_server, image_folder, tmp_path):
    client = on_server
    recipe = tiny_recipe(stages=[{"name": "head", "epochs": 4}, {"name": "finetune", "epochs": 2, "unfreeze": "all"}])
    command = ("run", write(tmp_path / "run.yaml", recipe), "--data", str(image_folder), "--experiment", "outage")
    log = tmp_path / "run.log"
    os.environ["TLTOOLKIT_TRACKING_PATIENCE_S"] = "3"  # The default waits 5 minutes for a restart.
    try:
        paused = tmp_path / "paused"
        process = cli(*command, log=log, paused=paused)
        wait_until_paused(paused, process, what="the first epoch on the server")
        head = [r for r in experiment_runs(client, "outage") if r.data.tags.get("tltoolkit.stage") == "head"]
        assert steps(client, head[0].info.run_id, "loss") == [0]
        team.stop()  # MLflow and its PostgreSQL, as a server restart does.
        (paused / "go").touch()  # The run goes on to its next record, with no server to take it.
        stopped = time.monotonic()
        assert process.wait(timeout=60) != 0
        assert time.monotonic() - stopped < 30, "failed within seconds of the patience"
        text = log.read_text()
        assert "has not answered for" in text and "--resume" in text, text[-3000:]
        assert "Traceback" not in text, "one clear message"
        assert list((tmp_path / "checkpoints").rglob("*.npz")), "the checkpoint is kept"
    finally:
        del os.environ["TLTOOLKIT_TRACKING_PATIENCE_S"]
        team.start()

    resumed = cli(*command, "--resume", log=log)
    assert resumed.wait(timeout=300) == 0, log.read_text()[-3000:]
    runs = experiment_runs(client, "outage")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs), "the same three runs, finished"
    stages = {r.data.tags["tltoolkit.stage"]: r for r in runs if "tltoolkit.stage" in r.data.tags}
    assert steps(client, stages["head"].info.run_id, "loss") == [0, 1, 2, 3], "every epoch once"
    assert steps(client, stages["finetune"].info.run_id, "loss") == [4, 5]
