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
