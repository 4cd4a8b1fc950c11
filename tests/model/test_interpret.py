"""The interpretation report: most confused classes, the top-loss gallery naming the right files, Grad-CAM heat maps
at the image's size through the backbone wrapper (keras.applications and offline ports alike); `tltoolkit explain`."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_recipe, use_store, write_images
from mlflow import MlflowClient
from PIL import Image

import tltoolkit
from tltoolkit.cli import main
from tltoolkit.commands.explain import explain
from tltoolkit.commands.predict import predict
from tltoolkit.errors import ModelLoadError
from tltoolkit.model import build_classifier
from tltoolkit.model.interpret import gradcam
from tltoolkit.recipe import HeadConfig

# Odd class names on purpose: `$x$` would be mathtext in a matplotlib title.
CLASSES = {"red": (220, 30, 30), "$x$": (200, 60, 40), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("interpret")
    data = write_images(root / "photos", CLASSES, per_class=8)
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    recipe = tiny_recipe(evaluation={"top_losses": 4}, stages=[{"name": "head", "epochs": 4}])
    return tltoolkit.run(recipe, data, tracking_uri=uri, verbose=0), data, uri


def test_every_run_logs_its_interpretation(trained):
    result, _, uri = trained
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(result.run_id, "interpretation")}
    assert {f"interpretation/{n}" for n in ("most_confused.csv", "top_losses.csv", "top_losses.jpg")} <= logged
    assert len(client.list_artifacts(result.run_id, "interpretation/gradcam")) == 4


def test_explain_names_the_highest_loss_files_and_maps_them(trained, tmp_path, monkeypatch):
    result, data, uri = trained
    use_store(uri, monkeypatch)
    found = explain(result.run_id, data, tmp_path / "out", top_losses=5)
    table = predict(result.run_id, [data], top_k=3)  # Independently: every image's loss from its probabilities.
    names = sorted(CLASSES)
    probabilities = table.apply(lambda row: {row[f"class_{k}"]: row[f"probability_{k}"] for k in (1, 2, 3)}, axis=1)
    truth = table["path"].map(lambda p: pd.Series(p).str.split("/").str[-2].iloc[0])
    losses = -np.log(np.clip([probs[t] for probs, t in zip(probabilities, truth)], 1e-7, 1))
    expected = list(table["path"].iloc[np.argsort(-losses, kind="stable")[:5]])
    assert sorted(found.top_losses["path"]) == sorted(expected)
    assert list(found.top_losses["true"]) == [p.split("/")[-2] for p in found.top_losses["path"]]
    assert set(found.top_losses["predicted"]) <= set(names)
    assert found.heatmaps.shape == (5, 32, 32) and found.images.shape == (5, 32, 32, 3)
    assert found.heatmaps.max() <= 1.0 and found.heatmaps.min() >= 0.0
    assert any(heatmap.std() > 0.01 for heatmap in found.heatmaps), "heat maps are not constant"
    assert found.most_confused["count"].is_monotonic_decreasing
    files = sorted(p.name for p in (tmp_path / "out" / "gradcam").iterdir())
    assert len(files) == 5 and files[0].startswith("01_")
    assert (tmp_path / "out" / "top_losses.jpg").stat().st_size > 1000
    for name in ["top_losses.jpg", *(f"gradcam/{f}" for f in files)]:  # Photographs: JPEG, whatever else changes.
        with Image.open(tmp_path / "out" / name) as image:
            assert image.format == "JPEG" and image.size[0] > 200, name
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`tltoolkit.kind` = 'explain'")
    assert len(runs) == 1 and runs["tags.tltoolkit.source_run"][0] == result.run_id


def test_explain_from_the_cli_and_its_refusals(trained, tmp_path, monkeypatch, capsys):
    result, data, uri = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["explain", result.run_id[:8], str(data), "-o", str(tmp_path / "cli"), "--top", "2", "--no-log"]) == 0
    assert "Top losses" in capsys.readouterr().out
    assert len(list((tmp_path / "cli" / "gradcam").iterdir())) == 2
    exported = tltoolkit.export(result.run_id, "tflite", output=tmp_path / "exported")
    with pytest.raises(ModelLoadError, match="Grad-CAM needs the Keras model"):
        explain(exported.folder, data, log=False)


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])  # keras.applications, offline port
def test_gradcam_reaches_through_the_backbone_wrapper(backbone):
    model = build_classifier(
        tltoolkit.create_backbone(backbone, weights="none", input_size=64), ["a", "b"], HeadConfig()
    )
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    heatmaps = gradcam(model, images, np.array([0, 1]))
    assert heatmaps.shape == (2, 64, 64) and np.isfinite(heatmaps).all()
