"""The probe: linear classifiers on frozen features at each depth, the data-size rule's answer, and `auto`."""

import numpy as np
import pytest
import yaml
from conftest import tiny_recipe
from mlflow import MlflowClient

import tltoolkit
from tltoolkit.backbones import create_backbone
from tltoolkit.cli import main
from tltoolkit.data import prepare_data
from tltoolkit.errors import RecipeError
from tltoolkit.recipe import load_recipe
from tltoolkit.stages.probe import FINETUNE_ALL, HEAD_ONLY, UNFREEZE, ProbePoint, decide, probe_backbone


def test_the_probe_finds_the_depth_where_frozen_features_are_best(image_folder):
    recipe = load_recipe(tiny_recipe())
    backbone = create_backbone("test_tiny", "none", input_size=32)
    for weight in backbone.get_layer("block3_conv").weights:  # The last block now sees nothing: its output is flat.
        weight.assign(np.zeros(weight.shape))
    folder = prepare_data(image_folder, recipe.data.val_split, recipe.seed, progress=False)
    result = probe_backbone(backbone, folder.parts, recipe.data, verbose=False)
    table = result.table()
    assert list(table["layer"]) == ["block1_relu", "block2_relu", "block3_relu"]
    by_layer = table.set_index("layer")["val_accuracy"]
    assert by_layer["block2_relu"] == 1.0 and by_layer["block3_relu"] < 0.5, "colours are lost only at the top"
    assert result.chosen.layer == "block2_relu", "the deepest of the best"
    assert (result.suggestion, result.freeze, result.unfreeze) == (UNFREEZE, "block2_relu", "block3_conv")
    assert "block2_relu" in result.evidence and "block3_conv" in result.evidence


def point(layer, index, accuracy):
    return ProbePoint(layer, index, 8, 16, accuracy, 0.5, 1.0)


@pytest.mark.parametrize(
    "accuracies, per_class, expected",
    [
        ((0.70, 0.85, 0.90), 50, (HEAD_ONLY, "all", "none")),
        ((0.70, 0.88, 0.87), 50, (HEAD_ONLY, "all", "none")),  # Within one standard error: the output.
        ((0.70, 0.95, 0.80), 50, (UNFREEZE, "block2_relu", "block3_conv")),
        ((0.70, 0.95, 0.80), 1000, (FINETUNE_ALL, "all", "all")),  # Plenty of data: the rule fine-tunes all.
    ],
)
def test_the_rule_reads_the_curve_and_the_data_size(accuracies, per_class, expected):
    backbone = create_backbone("test_tiny", "none", input_size=32)
    points = [
        point(name, index, a)
        for (name, index), a in zip((("block1_relu", 4), ("block2_relu", 7), ("block3_relu", 10)), accuracies)
    ]
    result = decide(points, backbone, train=per_class * 2, val=100, per_class=per_class)
    assert (result.suggestion, result.freeze, result.unfreeze) == expected


def test_probe_command_prints_logs_and_plots_accuracy_by_depth(image_folder, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe()))
    assert main(["probe", str(recipe), "--data", str(image_folder)]) == 0
    out = capsys.readouterr().out
    assert "block2_relu" in out and "Suggestion:" in out
    client = MlflowClient()
    (run,) = client.search_runs(
        ["0", *[e.experiment_id for e in client.search_experiments()]][1:], "tags.`tltoolkit.kind` = 'probe'"
    )
    assert run.info.status == "FINISHED" and run.data.params["probe.suggestion"] in (HEAD_ONLY, UNFREEZE, FINETUNE_ALL)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "probe_val_accuracy")]
    assert sorted(steps) == [4, 7, 10], "one point per depth, at its layer index"
    files = {f.path for f in client.list_artifacts(run.info.run_id, "probe")}
    assert {"probe/accuracy_by_depth.png", "probe/probe.csv", "probe/suggestion.txt"} <= files


def test_auto_freeze_points_train_as_the_probe_says_and_are_logged(image_folder):
    recipe = tiny_recipe()
    recipe["backbone"]["freeze"] = "auto"
    recipe["stages"][1]["unfreeze"] = "auto"
    result = tltoolkit.run(recipe, image_folder, verbose=0)
    client = MlflowClient()
    params = client.get_run(result.run_id).data.params
    freeze, unfreeze = params["probe.freeze"], params["probe.unfreeze"]
    assert params["backbone.freeze"] == freeze, "the resolved recipe is what is logged"
    backbone = create_backbone("test_tiny", "none", input_size=32)
    names = [layer.name for layer in backbone.layers]
    expected = {"all": len(names), "none": None}.get(freeze, names.index(freeze) + 1 if freeze in names else None)
    head = client.get_run(result.stage_runs["head"]).data.params
    assert int(head["frozen_layers"]) == expected
    finetune = client.get_run(result.stage_runs["finetune"]).data.params
    after = {"all": 0, "none": expected}.get(unfreeze, names.index(unfreeze) if unfreeze in names else None)
    assert int(finetune["frozen_layers"]) == after
    assert "probe/accuracy_by_depth.png" in {f.path for f in client.list_artifacts(result.run_id, "probe")}


def test_auto_is_refused_where_there_is_no_pretrained_backbone_to_probe():
    recipe = tiny_recipe(pretrain={"autoencoder": {"widths": [8], "epochs": 1}})
    recipe["stages"][1]["unfreeze"] = "auto"
    with pytest.raises(RecipeError, match="`auto` freeze points come from probing a pretrained backbone"):
        load_recipe(recipe)
