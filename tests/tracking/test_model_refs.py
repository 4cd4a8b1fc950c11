"""Every way to name a model works in every command: run id and prefix, runs:/, models:/ (version, alias, logged
model id), a model folder, a .keras file."""

import mlflow
import pytest
from conftest import train_in_own_store, use_store
from mlflow import MlflowClient

from tltoolkit.cli import main
from tltoolkit.errors import ModelLoadError
from tltoolkit.tracking.models import load_classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    result, uri, data, root = train_in_own_store(tmp_path_factory.mktemp("refs"))
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(result.model_uri, "tiny-colours")
    MlflowClient(uri).set_registered_model_alias("tiny-colours", "champion", version.version)
    return result, uri, data, root


@pytest.fixture
def store(trained, monkeypatch):
    result, uri, data, root = trained
    use_store(uri, monkeypatch)
    return result, uri, data, root


def references(result, root):
    folder = mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(root / "download"))
    keras_file = root / "classifier.keras"
    result.model.save(keras_file)
    return {
        "run id": result.run_id,
        "run id prefix": result.run_id[:8],
        "runs:/<run>/model": f"runs:/{result.run_id}/model",  # The generic name: the run's own model.
        "runs:/<run>/<model name>": f"runs:/{result.run_id}/tiny-test_tiny-photos",
        "models:/name/version": "models:/tiny-colours/1",
        "models:/name@alias": "models:/tiny-colours@champion",
        "models:/m-... (logged model id)": result.model_uri,
        "model folder": folder,
        ".keras file": str(keras_file),
    }


def test_every_kind_of_reference_loads_the_model(store):
    result, _, _, root = store
    assert result.model_uri.startswith("models:/m-"), "what MLflow 3 returns for a logged model"
    for kind, ref in references(result, root).items():
        loaded = load_classifier(ref)
        assert loaded.class_names == ["blue", "green", "red"], kind
        if kind not in ("model folder", ".keras file"):
            assert loaded.run_id == result.run_id, kind


def test_predict_and_evaluate_take_every_reference_from_the_cli(store, capsys):
    result, uri, data, root = store
    image = next((data / "red").iterdir())
    for kind, ref in references(result, root).items():
        assert main(["predict", ref, str(image), "--tracking-uri", uri]) == 0, kind
        assert capsys.readouterr().out.splitlines()[1].split(",")[1] in ("red", "green", "blue"), kind
    assert main(["evaluate", "models:/tiny-colours@champion", str(data), "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`tltoolkit.kind` = 'evaluate'"
    )
    assert [(r.data.tags["tltoolkit.source_run"], r.data.tags["mlflow.parentRunId"]) for r in runs] == [
        (result.run_id, result.run_id)
    ], "linked to, and nested under, the run that trained the model"


def test_unknown_and_ambiguous_prefixes_are_clear_errors(store):
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tltoolkit").experiment_id
    ids = [client.create_run(experiment).info.run_id for _ in range(20)]  # 20 ids: two share a first digit.
    shared = next(i[0] for i in ids if sum(j[0] == i[0] for j in ids) > 1)
    with pytest.raises(
        ModelLoadError, match=rf"prefix '{shared}' is ambiguous: {shared}[0-9a-f]{{31}} .*more of the id"
    ):
        load_classifier(shared)
    with pytest.raises(ModelLoadError, match="No run id starts with 'ffffffff'"):
        load_classifier("ffffffff")
    with pytest.raises(ModelLoadError, match="No model models:/nope@champion"):
        load_classifier("models:/nope@champion")


def test_a_wrong_reference_fails_before_tensorflow_loads(tmp_path):
    """A mistyped run id is answered in the time it takes to ask the store, not to start TensorFlow."""
    import subprocess
    import sys

    (tmp_path / "mlruns").mkdir()
    probe = (
        "import sys; from tltoolkit.tracking.models import load_classifier\n"
        "try:\n    load_classifier('ffffffff')\nexcept Exception as exc:\n    print(type(exc).__name__)\n"
        "print('tensorflow' in sys.modules)"
    )
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "MLFLOW_TRACKING_URI": uri},
    ).stdout.split()
    assert out == ["ModelLoadError", "False"], out


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda text: text + "\n  : [unclosed", "is damaged"),
        (lambda text: "just a string\n", "not a YAML mapping"),
        (lambda text: text.replace("resize: squash", "resize: sideways"), "resize='sideways' is none of"),
    ],
)
def test_a_tampered_mlmodel_is_one_clear_error(store, tmp_path, damage, message):
    import shutil

    result, _, _, root = store
    folder = tmp_path / "model"
    shutil.copytree(mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp_path / "dl")), folder)
    mlmodel = folder / "MLmodel"
    assert "resize: squash" in mlmodel.read_text()
    mlmodel.write_text(damage(mlmodel.read_text()))
    with pytest.raises(ModelLoadError, match=message) as raised:
        load_classifier(folder)
    assert str(mlmodel) in str(raised.value) and raised.value.__cause__ is None
