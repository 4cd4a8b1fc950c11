"""The model registry (`register`, `run --register`, `models:/NAME@ALIAS` everywhere) and serving images: the
logged MLflow model takes base64 images or paths as well as pixel tensors, in-process and behind `mlflow models
serve`."""

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import free_port, tiny_recipe, train_in_own_store, use_store, wait_until
from mlflow import MlflowClient

from tltoolkit.cli import main
from tltoolkit.commands.predict import predict
from tltoolkit.commands.register import check_model_name, register
from tltoolkit.errors import RegistryError
from tltoolkit.tracking.models import load_classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_in_own_store(tmp_path_factory.mktemp("serving"))


@pytest.fixture
def store(trained, monkeypatch):
    _, uri, _, _ = trained
    use_store(uri, monkeypatch)
    return trained


def test_register_makes_a_version_with_aliases_that_every_command_takes(store):
    result, uri, data, _ = store
    assert register(result.run_id[:8], "colours", ["champion", "staging"]) == 1
    assert register(result.run_id, "colours", "champion") == 2, "an alias moves to the newest version"
    client = MlflowClient(uri)
    assert int(client.get_model_version_by_alias("colours", "champion").version) == 2
    assert int(client.get_model_version_by_alias("colours", "staging").version) == 1
    loaded = load_classifier("models:/colours@champion")
    assert loaded.run_id == result.run_id and loaded.class_names == result.class_names
    table = predict("models:/colours@staging", [data])
    assert len(table) == 18


def test_bad_names_and_unloggable_models_are_refused(store, tmp_path):
    result, *_ = store
    for name, message in [("team/ants", "cannot contain '/'"), ("a@b", "'@' separates the alias"), ("", "name")]:
        with pytest.raises(RegistryError, match=message):
            check_model_name(name)
    with pytest.raises(RegistryError, match="reserved"):
        check_model_name("ok", ["latest"])
    keras_file = tmp_path / "model.keras"
    result.model.save(keras_file)
    with pytest.raises(RegistryError, match="only models logged in MLflow can be registered"):
        register(str(keras_file), "colours")


def test_run_register_checks_the_name_before_training_and_registers_after(store, tmp_path, capsys):
    _, uri, data, _ = store
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(tiny_recipe()))
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    assert main(["run", str(recipe), "--data", str(data), "--register", "bad/name", "-q"]) == 2
    assert "cannot contain '/'" in capsys.readouterr().err
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before, "refused before any run started"
    assert main(["run", str(recipe), "--data", str(data), "--register", "from-run", "-q"]) == 0
    version = MlflowClient(uri).get_registered_model("from-run").latest_versions[0]
    assert int(version.version) == 1 and load_classifier("models:/from-run/1").class_names == ["blue", "green", "red"]


def _encoded(paths) -> list[str]:
    return [base64.b64encode(path.read_bytes()).decode() for path in paths]


def test_the_logged_model_takes_image_bytes_paths_and_tensors(store):
    result, _, data, _ = store
    images = sorted(data.rglob("*.png"))[::5]
    expected = predict(result.run_id, [str(p) for p in images])
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    for frame in (pd.DataFrame({"image": _encoded(images)}), pd.DataFrame({"path": [str(p) for p in images]})):
        out = pyfunc.predict(frame)
        assert list(out["class"]) == list(expected["class_1"])
        np.testing.assert_allclose(out["probability"], expected["probability_1"], atol=1e-5)
        assert set(out["probabilities"][0]) == {"blue", "green", "red"}
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    assert pyfunc.predict(pixels).shape == (2, 3), "raw tensors still work"
    with pytest.raises(Exception, match="Row 0: cannot read its base64 `image`"):
        pyfunc.predict(pd.DataFrame({"image": ["bm90IGFuIGltYWdl"]}))  # "not an image"
    with pytest.raises(Exception, match="send images in a column `image`"):
        pyfunc.predict(pd.DataFrame({"picture": ["x"]}))


def _post(port: int, payload: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_mlflow_models_serve_answers_images_posted_over_http(store, tmp_path):
    result, _, data, _ = store
    folder = mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path / "model"))
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", folder, "--env-manager", "local"]
    # MLflow execs `uvicorn` by name: the environment's scripts must be on PATH, as in an activated venv.
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    server = subprocess.Popen(
        [*command, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PATH": path},
    )
    try:
        wait_until(lambda: _serving(port), server, timeout=180, what=f"the model server on port {port}")
        images = [sorted((data / "red").glob("*.png"))[0], sorted((data / "blue").glob("*.png"))[0]]
        expected = predict(result.run_id, [str(p) for p in images])
        answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[b] for b in _encoded(images)]}})
        rows = answer["predictions"]
        assert [row["class"] for row in rows] == list(expected["class_1"])
        np.testing.assert_allclose([row["probability"] for row in rows], expected["probability_1"], atol=1e-5)
        assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5
        pixels = np.zeros((1, 32, 32, 3)).tolist()
        assert np.asarray(_post(port, {"inputs": pixels})["predictions"]).shape == (1, 3), "tensors too"
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
    # uvicorn, a child in the same process group, finishes its graceful shutdown after MLflow's own process ends.
    wait_until(lambda: not _serving(port), None, timeout=30, what="the model server to stop")
