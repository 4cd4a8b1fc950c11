"""Minutes-long checks on real photos (`../shared/data/hymenoptera`): `python -m pytest -m slow`. Not run in CI."""

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cli, wait_until
from mlflow import MlflowClient

import tltoolkit
from tltoolkit.tracking.models import load_classifier

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"needs the real photo set at {HYMENOPTERA}"),
]


def test_mobilenet_v2_on_real_photos_killed_mid_finetune_resumes_to_the_same_weights(tmp_path):
    """MobileNetV2 with its offline ImageNet weights, 128 px: SIGKILL in fine-tune epoch 2, resume, same weights."""
    recipe = {
        "name": "real",
        "seed": 3,
        "data": {"image_size": 128, "batch_size": 16},
        "backbone": {"name": "mobilenet_v2", "weights": "torchvision", "freeze": "all"},
        "head": {"dropout": 0.2},
        "stages": [
            {"name": "head", "epochs": 2, "optimizer": {"learning_rate": 1e-3}},
            {"name": "finetune", "epochs": 3, "unfreeze": "block_13_expand", "optimizer": {"learning_rate": 1e-5}},
        ],
    }
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(recipe))
    client = MlflowClient()
    log = tmp_path / "run.log"
    command = ("run", str(path), "--data", str(HYMENOPTERA), "--experiment", "real")

    def finetune_epochs():
        experiment = client.get_experiment_by_name("real")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        tuned = [r for r in runs if r.data.tags.get("tltoolkit.stage") == "finetune"]
        return len(client.get_metric_history(tuned[0].info.run_id, "loss")) if tuned else 0

    process = cli(*command, log=log, slow=tmp_path / "slow")
    wait_until(lambda: finetune_epochs() >= 1, process, timeout=900, what="fine-tune's first epoch")
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = subprocess.run(
        [sys.executable, "-m", "tltoolkit", *command, "--resume"],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        timeout=1200,
    )
    assert done.returncode == 0, log.read_text()[-3000:]
    parent = next(
        r
        for r in client.search_runs([client.get_experiment_by_name("real").experiment_id])
        if r.data.tags["tltoolkit.kind"] == "run"
    )
    assert parent.info.status == "FINISHED" and finetune_epochs() == 3

    straight = tltoolkit.run(path, HYMENOPTERA, experiment="straight", verbose=0)
    resumed = load_classifier(parent.info.run_id).model
    for a, b in zip(straight.model.weights, resumed.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    assert straight.metrics["val_accuracy"] > 0.85
