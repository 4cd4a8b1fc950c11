import pytest

from tltoolkit.errors import TrackingError
from tltoolkit.tracking.store import artifact_root_for, connect, resolve_tracking_uri


def test_precedence_flag_then_environment_then_recipe_then_default(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("http://flag:5000", "http://recipe:5000") == "http://flag:5000"
    assert resolve_tracking_uri(None, "http://recipe:5000") == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, "http://recipe:5000") == "http://recipe:5000"
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def test_relative_sqlite_paths_become_absolute(tmp_path):
    assert resolve_tracking_uri("sqlite:///store/x.db") == f"sqlite:///{tmp_path / 'store' / 'x.db'}"
    assert artifact_root_for(f"sqlite:///{tmp_path}/s/x.db") == (tmp_path / "s" / "artifacts").as_uri()


def test_default_store_works_in_a_fresh_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    experiment_id = connect(resolve_tracking_uri(), "fresh")
    assert experiment_id and (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert connect(resolve_tracking_uri(), "fresh") == experiment_id


def test_unusable_store_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingError, match="Cannot create the MLflow store folder"):
        connect(f"sqlite:///{blocker}/mlruns/mlflow.db", "x")


def test_two_runs_writing_one_sqlite_store_at_once_both_finish(image_folder, tmp_path):
    import yaml
    from conftest import cli, tiny_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tracking={"log_model": False})))
    store = tmp_path / "shared" / "mlflow.db"  # A fresh store: both processes create its tables at once, too.
    uri = f"sqlite:///{store}"
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    processes = [
        cli("run", str(path), "--data", str(image_folder), "--tracking-uri", uri, "--experiment", "both", log=log)
        for log in logs
    ]
    for process, log in zip(processes, logs):
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
        assert "database is locked" not in log.read_text()
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("both").experiment_id])
    parents = [r for r in runs if r.data.tags["tltoolkit.kind"] == "run"]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in runs) and len(runs) == 6
    for run in runs:
        if run.data.tags["tltoolkit.kind"] == "stage":
            steps = [0, 1] if run.data.tags["tltoolkit.stage"] == "head" else [2]  # Global: after the head's epochs.
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
                assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == steps
    for parent in parents:
        assert {"val_accuracy", "val_loss", "head_val_accuracy", "finetune_val_accuracy"} <= set(parent.data.metrics)


def test_a_store_that_can_be_read_but_not_written_fails_before_the_data_is_scanned(image_folder, tmp_path, capsys):
    import sqlite3

    import yaml
    from conftest import tiny_recipe

    from tltoolkit.cli import main

    db = tmp_path / "ro" / "mlflow.db"
    connect(f"sqlite:///{db}", "tltoolkit")
    with sqlite3.connect(db) as con:  # What a read-only file does to a non-root writer (root ignores file modes).
        for table in ("experiment_tags", "runs", "tags", "params"):
            for event in ("INSERT", "UPDATE"):
                con.execute(
                    f"CREATE TRIGGER ro_{table}_{event} BEFORE {event} ON {table} "
                    "BEGIN SELECT RAISE(ABORT, 'attempt to write a readonly database'); END"
                )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    assert main(["run", str(recipe), "--data", str(image_folder), "--tracking-uri", f"sqlite:///{db}"]) == 2
    out, err = capsys.readouterr()
    assert f"The MLflow tracking store {db} can be read but not written" in err and "chmod u+w" in err
    assert "Data " not in out, "refused before the folder was scanned"


RAW_CLIENT = """
import sys
import mlflow
print("creating", flush=True)
mlflow.MlflowClient(sys.argv[1]).search_experiments()  # Creates and migrates the store's tables, as `mlflow ui` does.
"""


def test_another_mlflow_client_creating_the_store_at_the_same_moment_is_waited_for(tmp_path, delay=0.3):
    import subprocess
    import sys
    import time

    # MLflow creates a fresh SQLite store's tables and then runs its ~50 migrations (a second or two); a client that
    # opens the store meanwhile sees a half-built schema ("no such column", "table ... already exists").
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = subprocess.Popen([sys.executable, "-c", RAW_CLIENT, uri], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "creating"
    deadline = time.monotonic() + 60
    while not (tmp_path / "mlflow.db").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)  # Into its table creation and migrations.
    experiment_id = connect(uri, "race")
    assert other.wait(timeout=120) == 0
    assert experiment_id == connect(uri, "race")


def test_checkpoints_of_runs_on_a_server_live_in_one_fixed_place(tmp_path, monkeypatch):
    from tltoolkit.tracking.store import checkpoint_root

    assert checkpoint_root(f"sqlite:///{tmp_path}/m/mlflow.db") == tmp_path / "m" / "checkpoints"
    monkeypatch.delenv("TLTOOLKIT_CHECKPOINT_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    first = checkpoint_root("http://tracking.example:5000")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # Wherever the command runs.
    assert (
        checkpoint_root("http://tracking.example:5000")
        == first
        == tmp_path / "data" / "tltoolkit" / "checkpoints" / "tracking.example_5000"
    )
    monkeypatch.setenv("TLTOOLKIT_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    assert checkpoint_root("https://team/mlflow") == tmp_path / "ckpt" / "team"
