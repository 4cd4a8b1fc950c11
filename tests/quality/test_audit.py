"""The audit on generated images whose truth is known: planted wrong labels ranked first, planted copies paired and
their leakage across the split reported, a planted oddity flagged; the CSVs and the MLflow run; clear errors; and
what `run` does with the findings (`data.exclude`, `data.split_by_duplicates`)."""

import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_recipe, write_images
from mlflow import MlflowClient
from PIL import Image

import tltoolkit
from tltoolkit.cli import main
from tltoolkit.errors import DataError

RECIPE = {"backbone": {"name": "test_tiny", "weights": "none"}, "data": {"image_size": 32, "batch_size": 8}}
COPIES = 0.99999  # Only copies of the same pixels count as duplicates among these look-alike generated images.


@pytest.fixture
def dirty(tmp_path):
    """train/ and val/ of three colours, with two red images filed as green (flips), two train images copied into
    val/ (leaks), and a black-and-white checkerboard filed as blue (an outlier)."""
    root = tmp_path / "dirty"
    write_images(root / "train", per_class=10, seed=1)
    write_images(root / "val", per_class=4, seed=2)
    flips = []
    for name in ("red_0.png", "red_1.png"):
        target = root / "train" / "green" / f"flipped_{name}"
        shutil.move(root / "train" / "red" / name, target)
        flips.append(str(target))
    copies = []
    for source in ("blue_3.png", "green_5.png"):
        colour = source.split("_")[0]
        target = root / "val" / colour / f"copy_of_{source}"
        shutil.copy(root / "train" / colour / source, target)
        copies.append((str(root / "train" / colour / source), str(target)))
    board = (np.indices((24, 24)).sum(axis=0) % 2 * 255).astype(np.uint8)
    odd = root / "train" / "blue" / "checkerboard.png"
    Image.fromarray(np.stack([board] * 3, axis=-1)).save(odd)
    return root, flips, copies, str(odd)


def test_planted_flips_come_first_copies_pair_across_the_split_and_the_oddity_stands_out(dirty, tmp_path):
    root, flips, copies, odd = dirty
    result = tltoolkit.audit(root, RECIPE, tmp_path / "out", duplicate_similarity=COPIES)
    top = result.label_issues.head(3).set_index("path")
    assert set(top.index) == {*flips, odd}, "the flips, and the checkerboard that is no colour at all"
    assert list(result.label_issues.columns) == ["path", "given", "suggested", "score"]
    assert set(top.loc[flips, "suggested"]) == {"red"} and set(top.loc[flips, "given"]) == {"green"}
    pairs = {frozenset(p) for p in result.duplicates[["path_a", "path_b"]].values}
    assert pairs == {frozenset(c) for c in copies}, "exactly the planted copies"
    assert list(result.duplicates.columns) == ["path_a", "path_b", "similarity", "split_a", "split_b"]
    assert len(result.leaks) == 2 and set(result.leaks.split_a) | set(result.leaks.split_b) == {"train", "val"}
    assert result.outliers.path.iloc[0] == odd
    assert result.summary["leaking_pairs"] == 2 and result.summary["images"] == 45
    for name in ("label_issues.csv", "duplicates.csv", "outliers.csv", "label_issues.jpg", "duplicates.jpg"):
        assert (tmp_path / "out" / name).exists(), name
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "out" / "label_issues.csv"), result.label_issues, atol=1e-6, check_dtype=False
    )
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["tltoolkit.kind"] == "audit" and run.data.metrics["leaking_pairs"] == 2
    logged = {f.path for f in MlflowClient().list_artifacts(result.run_id, "audit")}
    assert {"audit/label_issues.csv", "audit/duplicates.jpg", "audit/outliers.csv"} <= logged


def test_a_folder_with_one_class_or_a_class_of_one_image_is_told_so(tmp_path, capsys):
    one = write_images(tmp_path / "one", {"red": (220, 30, 30)}, per_class=4)
    assert (
        main(["audit", str(one), "--no-log", "--set", "backbone.name=test_tiny", "--set", "backbone.weights=none"]) == 2
    )
    assert "single class" in capsys.readouterr().err
    lonely = tmp_path / "lonely"
    write_images(lonely / "train", per_class=3)
    write_images(lonely / "val", per_class=2)
    (lonely / "train" / "grey").mkdir()
    Image.new("RGB", (24, 24), (128, 128, 128)).save(lonely / "train" / "grey" / "only.png")
    with pytest.raises(DataError, match="'grey' \\(1\\) has a single image: add images of it, or remove the class"):
        tltoolkit.audit(lonely, RECIPE, tmp_path / "out", log=False)


def test_run_leaves_out_what_the_audit_found_and_keeps_duplicates_on_one_side(dirty, tmp_path):
    root, flips, copies, _ = dirty
    found = tltoolkit.audit(root, RECIPE, tmp_path / "out", duplicate_similarity=COPIES, log=False)
    issues = tmp_path / "out" / "label_issues.csv"
    reviewed = found.label_issues[found.label_issues.path.isin(flips)]
    reviewed.to_csv(issues, index=False)  # The user kept the two rows to leave out.
    recipe = tiny_recipe(tracking={"log_model": False})
    recipe["data"]["exclude"] = str(issues)
    result = tltoolkit.run(recipe, root, verbose=0)
    params = MlflowClient().get_run(result.run_id).data.params
    assert params["data.exclude"] == str(issues) and params["data.train_images"] == str(31 - 2)
    skipped = MlflowClient().download_artifacts(result.run_id, "data/skipped_files.csv", str(tmp_path))
    reasons = pd.read_csv(skipped).set_index("path")["reason"]
    assert all(reasons[flip].startswith("left out by data.exclude") for flip in flips)

    flat = tmp_path / "flat"  # Class folders split here: the copies' groups stay on one side.
    for colour in ("red", "green", "blue"):
        shutil.copytree(root / "train" / colour, flat / colour)
    for a, _ in copies:
        shutil.copy(a, flat / a.split("/")[-2] / f"again_{a.split('/')[-1]}")
        shutil.copy(a, flat / a.split("/")[-2] / f"third_{a.split('/')[-1]}")
    grouped = tiny_recipe(tracking={"log_model": False})
    grouped["data"].update(split_by_duplicates=True, duplicate_similarity=COPIES)
    grouped["backbone"] = {"name": "test_tiny", "weights": "none", "freeze": "all"}
    result = tltoolkit.run(grouped, flat, verbose=0)
    params = MlflowClient().get_run(result.run_id).data.params
    assert params["data.duplicate_pairs"] == "6" and params["data.duplicate_groups"] == "2"
    from tltoolkit.data import prepare_data
    from tltoolkit.quality.grouping import recipe_folder
    from tltoolkit.recipe import load_recipe

    folder = recipe_folder(load_recipe(grouped), flat, progress=False)
    sides = {name: part for part, items in folder.parts.items() for name, _ in items}
    for a, _ in copies:
        stem = a.split("/")[-1]
        group = [p for p in sides if p.endswith(stem)]
        assert len(group) == 3 and len({sides[p] for p in group}) == 1, "copies on one side"
    assert sum(len(items) for items in prepare_data(flat, 0.25, 42, progress=False).parts.values()) == len(sides)


def test_a_re_encoded_copy_just_below_the_threshold_is_a_duplicate_where_its_pixels_agree(tmp_path):
    from tltoolkit.quality.neighbours import Neighbours, near_duplicates

    rng = np.random.default_rng(0)
    coarse = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]  # Shapes, not pixel noise.
    pictures = [Image.fromarray(c).resize((64, 64), Image.Resampling.BICUBIC) for c in coarse]
    paths = [str(tmp_path / f"{i}.png") for i in range(3)] + [str(tmp_path / "copy.jpg")]
    for picture, path in zip(pictures, paths):
        picture.save(path)
    pictures[0].resize((51, 51)).save(paths[3], quality=70)
    # 0-3 a resized JPEG copy, 0-1 strangers: both a little below the threshold; 1-2 strangers above it.
    neighbours = Neighbours(
        indices=np.array([[3, 1], [2, 0], [1, 0], [0, 1]]),
        similarities=np.array([[0.93, 0.93], [0.97, 0.93], [0.97, 0.5], [0.93, 0.2]], np.float32),
        exact=True,
    )
    pairs = near_duplicates(neighbours, paths, threshold=0.95)
    assert [(a, b) for a, b, _ in pairs] == [(1, 2), (0, 3)]
    assert near_duplicates(neighbours, paths[:3] + [str(tmp_path / "gone.jpg")], 0.95) == [(1, 2, pytest.approx(0.97))]
