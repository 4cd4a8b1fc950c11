"""Benchmarks: `python bench/run.py NAME` runs one, prints a readable table, and its figures as JSON on the last line.

Benchmarks hold the speed and accuracy targets that tests must not: they take minutes and real data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS: dict[str, Callable[[argparse.Namespace], tuple[list[dict], dict]]] = {}


def benchmark(fn):
    BENCHMARKS[fn.__name__.replace("_", "-")] = fn
    return fn


HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera"


def _run_recipe(args, recipe: str, data: Path, experiment: str) -> tuple[list[dict], dict]:
    """Runs a shipped recipe as a user would; one row per stage (val accuracy, epochs, wall time) and the figures."""
    from mlflow import MlflowClient

    import tltoolkit

    if not data.is_dir():
        raise SystemExit(f"No data at {data}: pass --data DIR.")
    started = time.perf_counter()
    result = tltoolkit.run(
        REPO / "recipes" / recipe, data, tracking_uri=args.tracking_uri, experiment=experiment, verbose=args.verbose
    )
    wall = time.perf_counter() - started
    client = MlflowClient(result.tracking_uri)
    rows = []
    for stage, run_id in result.stage_runs.items():
        history = result.history[result.history.stage == stage]
        rows.append(
            {
                "stage": stage,
                "val_accuracy": round(client.get_run(run_id).data.metrics["final_val_accuracy"], 4),
                "epochs": len(history),
                "wall_s": round(client.get_run(run_id).data.metrics["wall_s"], 1),
            }
        )
    figures = {"val_accuracy": round(result.metrics["val_accuracy"], 4)}
    figures.update({f"val_accuracy_{row['stage']}": row["val_accuracy"] for row in rows[:-1]})
    figures.update({key: round(v, 4) for key, v in result.metrics.items() if key == "test_accuracy"})
    figures.update({f"wall_s_{row['stage']}": row["wall_s"] for row in rows})
    figures["wall_s"] = round(wall, 1)
    return rows, figures


@benchmark
def quickstart(args) -> tuple[list[dict], dict]:
    """recipes/quickstart.yaml on the built-in digits, both stages, as `tltoolkit demo` runs it."""
    from tltoolkit.data.demo import write_digits

    data = Path(args.data) if args.data else write_digits(Path(args.workdir) / "digits")
    return _run_recipe(args, "quickstart.yaml", data, "bench-quickstart")


@benchmark
def hymenoptera(args) -> tuple[list[dict], dict]:
    """recipes/mobilenet_v2.yaml (torchvision ImageNet weights) on ants vs bees, its own train/val split.

    Anchor: PyTorch's transfer-learning tutorial reports 0.94-0.95 val accuracy with an ImageNet ResNet-18.
    """
    return _run_recipe(args, "mobilenet_v2.yaml", Path(args.data or HYMENOPTERA), "bench-hymenoptera")


@benchmark
def hymenoptera_efficientnet_lite0(args) -> tuple[list[dict], dict]:
    """recipes/efficientnet_lite0.yaml on ants vs bees, as `hymenoptera`."""
    return _run_recipe(args, "efficientnet_lite0.yaml", Path(args.data or HYMENOPTERA), "bench-hymenoptera")


@benchmark
def hymenoptera_efficientnet_lite2(args) -> tuple[list[dict], dict]:
    """recipes/efficientnet_lite2.yaml (260 px, the strongest offline backbone) on ants vs bees, as `hymenoptera`."""
    return _run_recipe(args, "efficientnet_lite2.yaml", Path(args.data or HYMENOPTERA), "bench-hymenoptera")


SEEDS = (42, 43, 44)


@benchmark
def tta(args) -> tuple[list[dict], dict]:
    """recipes/mobilenet_v2.yaml on ants vs bees at seeds 42-44, both stages: the final model's val accuracy and
    log loss plain, with `flip` TTA and with `flip_crops` TTA; and what calibration did (ECE before and after, the
    temperature fitted on that same val split, so its ECE is optimistic)."""
    import numpy as np

    import tltoolkit
    from tltoolkit.commands.evaluate import evaluate

    data = Path(args.data or HYMENOPTERA)
    rows = []
    for seed in SEEDS:
        overrides = [f"seed={seed}", "evaluation.tta=flip", "evaluation.top_losses=0"]
        result = tltoolkit.run(
            REPO / "recipes" / "mobilenet_v2.yaml", data, overrides, args.tracking_uri, "bench-tta", args.verbose
        )
        crops = evaluate(result.run_id, data, result.tracking_uri, log=False, tta="flip_crops").tta
        m = result.metrics
        rows.append(
            {
                "seed": seed,
                "val_accuracy": round(m["val_accuracy"], 4),
                "flip_accuracy": round(m["val_tta_accuracy"], 4),
                "flip_crops_accuracy": round(crops.metrics["accuracy"], 4),
                "val_loss": round(m["val_loss"], 4),
                "flip_loss": round(m["val_tta_loss"], 4),
                "flip_crops_loss": round(crops.metrics["loss"], 4),
                "ece_uncalibrated": round(m.get("val_ece_uncalibrated", float("nan")), 4),
                "ece": round(m["val_ece"], 4),
                "temperature": round(m.get("temperature", 1.0), 3),
            }
        )
    figures = {}
    for key in rows[0]:
        if key != "seed":
            values = np.array([row[key] for row in rows], dtype=float)
            figures[f"{key}_mean"], figures[f"{key}_std"] = round(values.mean(), 4), round(values.std(), 4)
    for mode in ("flip", "flip_crops"):
        deltas = [row[f"{mode}_accuracy"] - row["val_accuracy"] for row in rows]
        figures[f"{mode}_accuracy_delta_mean"] = round(float(np.mean(deltas)), 4)
    return rows, figures


# GoogLeNet's auxiliary classifiers: weight 0.3 on two middle blocks; here MobileNetV2's stride-8 and -16 stage ends.
AUXILIARY = "[{at: block_6_expand_relu, weight: 0.3}, {at: block_13_expand_relu, weight: 0.3}]"


@benchmark
def deep_supervision(args) -> tuple[list[dict], dict]:
    """Deep supervision on the shipped MobileNetV2 recipes, main head only vs with two auxiliary heads (`AUXILIARY`,
    decaying linearly to zero over the fine-tune, warmed up on the frozen backbone in the head stage), same epochs:
    `mobilenet_v2.yaml` on ants vs bees and `quickstart.yaml` on the digits demo (its test split too), seeds 42-44.
    """
    import numpy as np

    import tltoolkit
    from tltoolkit.data.demo import write_digits

    sets = {
        "hymenoptera": ("mobilenet_v2.yaml", Path(args.data or HYMENOPTERA)),
        "digits": ("quickstart.yaml", write_digits(Path(args.workdir) / "digits")),
    }
    rows = []
    for name, (recipe, data) in sets.items():
        for seed in SEEDS:
            for arm, extra in (("main only", []), ("auxiliary", [f"head.auxiliary={AUXILIARY}"])):
                started = time.perf_counter()
                result = tltoolkit.run(
                    REPO / "recipes" / recipe,
                    data,
                    [f"seed={seed}", "evaluation.top_losses=0", *extra],
                    args.tracking_uri,
                    "bench-deep-supervision",
                    args.verbose,
                )
                m = result.metrics
                rows.append(
                    {
                        "data": name,
                        "seed": seed,
                        "arm": arm,
                        "val_accuracy": round(m["val_accuracy"], 4),
                        "val_loss": round(m["val_loss"], 4),
                        "test_accuracy": round(m.get("test_accuracy", float("nan")), 4),
                        "wall_s": round(time.perf_counter() - started, 1),
                    }
                )
    figures = {}
    for name in sets:
        for key in ("val_accuracy", "test_accuracy", "val_loss", "wall_s"):
            by_arm = {
                arm: np.array([r[key] for r in rows if r["data"] == name and r["arm"] == arm])
                for arm in ("main only", "auxiliary")
            }
            if np.isnan(by_arm["auxiliary"]).all():
                continue
            for arm, label in (("main only", "main"), ("auxiliary", "auxiliary")):
                figures[f"{name}_{label}_{key}_mean"] = round(float(by_arm[arm].mean()), 4)
                figures[f"{name}_{label}_{key}_std"] = round(float(by_arm[arm].std()), 4)
            delta = by_arm["auxiliary"] - by_arm["main only"]
            figures[f"{name}_{key}_delta_mean"] = round(float(delta.mean()), 4)
            figures[f"{name}_{key}_deltas"] = [round(float(d), 4) for d in delta]
    return rows, figures


@benchmark
def probe(args) -> tuple[list[dict], dict]:
    """The probe's answer against the shipped recipes' fine-tune (which unfreezes all), same epochs: `tltoolkit probe`
    on ants vs bees (`mobilenet_v2.yaml`) and on the digits demo (`quickstart.yaml`), then each recipe as shipped
    and with `stages.1.unfreeze=auto` (the probe's suggestion; the head stage is the same), seeds 42-44.
    """
    import numpy as np
    from mlflow import MlflowClient

    import tltoolkit
    from tltoolkit.data.demo import write_digits

    sets = {
        "hymenoptera": ("mobilenet_v2.yaml", Path(args.data or HYMENOPTERA)),
        "digits": ("quickstart.yaml", write_digits(Path(args.workdir) / "digits")),
    }
    rows, figures = [], {}
    for name, (recipe, data) in sets.items():
        started = time.perf_counter()
        outcome = tltoolkit.probe(REPO / "recipes" / recipe, data, [], args.tracking_uri, "bench-probe", args.verbose)
        found = outcome.probe
        figures[f"{name}_probe_s"] = round(time.perf_counter() - started, 1)
        figures[f"{name}_probe_curve"] = {p.layer: round(p.val_accuracy, 4) for p in found.points}
        figures[f"{name}_suggestion"] = f"{found.suggestion} (unfreeze: {found.unfreeze})"
        for seed in SEEDS:
            for arm, extra in (("shipped", []), ("probe", ["stages.1.unfreeze=auto"])):
                overrides = [f"seed={seed}", "evaluation.top_losses=0", *extra]
                started = time.perf_counter()
                result = tltoolkit.run(
                    REPO / "recipes" / recipe, data, overrides, args.tracking_uri, "bench-probe", args.verbose
                )
                params = MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
                m = result.metrics
                rows.append(
                    {
                        "data": name,
                        "seed": seed,
                        "arm": arm,
                        "unfreeze": params.get("stages.1.unfreeze"),
                        "val_accuracy": round(m["val_accuracy"], 4),
                        "test_accuracy": round(m.get("test_accuracy", float("nan")), 4),
                        "wall_s": round(time.perf_counter() - started, 1),
                    }
                )
        for key in ("val_accuracy", "test_accuracy", "wall_s"):
            by_arm = {
                arm: np.array([r[key] for r in rows if r["data"] == name and r["arm"] == arm])
                for arm in ("shipped", "probe")
            }
            if np.isnan(by_arm["probe"]).all():
                continue
            for arm in by_arm:
                figures[f"{name}_{arm}_{key}_mean"] = round(float(by_arm[arm].mean()), 4)
                figures[f"{name}_{arm}_{key}_std"] = round(float(by_arm[arm].std()), 4)
            figures[f"{name}_{key}_delta_mean"] = round(float((by_arm["probe"] - by_arm["shipped"]).mean()), 4)
    return rows, figures


@benchmark
def resize_filter(args) -> tuple[list[dict], dict]:
    """Which resize filter should be the default: the head stage of recipes/mobilenet_v2.yaml (no flips, so on the
    feature cache) with images resized `antialiased` (Pillow, the default) vs `bilinear` (tf.image.resize), on the
    digits demo (96 px, as quickstart) and on ants vs bees (224 px), seeds 42-44: val accuracy."""
    import numpy as np
    import yaml

    import tltoolkit
    from tltoolkit.data.demo import write_digits

    base = yaml.safe_load((REPO / "recipes" / "mobilenet_v2.yaml").read_text())
    base["stages"] = base["stages"][:1]
    base["data"]["augment"] = {"flip": "none"}
    base["evaluation"] = {"top_losses": 0}
    sets = {"digits": (write_digits(Path(args.workdir) / "digits"), 96), "hymenoptera": (HYMENOPTERA, 224)}
    rows, figures = [], {}
    for name, (data, size) in sets.items():
        for interpolation in ("antialiased", "bilinear"):
            scores = []
            for seed in SEEDS:
                recipe = {
                    **base,
                    "seed": seed,
                    "data": {**base["data"], "image_size": size, "interpolation": interpolation},
                }
                result = tltoolkit.run(
                    recipe, data, tracking_uri=args.tracking_uri, experiment="bench-resize-filter", verbose=args.verbose
                )
                scores.append(result.metrics["val_accuracy"])
            rows.append(
                {
                    "data": name,
                    "interpolation": interpolation,
                    "val_accuracy_mean": round(np.mean(scores), 4),
                    "val_accuracy_std": round(np.std(scores), 4),
                    "seeds": len(scores),
                }
            )
            figures[f"{name}_{interpolation}"] = round(float(np.mean(scores)), 4)
        figures[f"{name}_bilinear_minus_antialiased"] = round(
            figures[f"{name}_bilinear"] - figures[f"{name}_antialiased"], 4
        )
    return rows, figures


def _warm_imports(tracking_uri: str | None = None) -> None:
    """One-time costs of a process, paid before either clock starts: imports, and opening the MLflow store (SQLAlchemy
    checks the schema once per process, ~2 s; only the tltoolkit side tracks, so this is kinder to neither)."""
    import keras  # noqa: F401
    import keras_tuner  # noqa: F401
    import mlflow  # noqa: F401
    import tensorflow  # noqa: F401

    import tltoolkit.stages  # noqa: F401
    import tltoolkit.tracking.reports  # noqa: F401
    import tltoolkit.tuning  # noqa: F401
    from tltoolkit.tracking.store import connect, resolve_tracking_uri

    connect(resolve_tracking_uri(tracking_uri), "Default")


def _plain_keras_head(data: Path, epochs: int, verbose: int) -> dict:
    """The Keras guide's way: `image_dataset_from_directory`, the frozen base inside the model, every epoch through it.

    The head is the one `recipes/search_head.yaml` builds (same layers, dropout, L2, optimizer and learning rate), and
    the datasets are cached in memory after the first epoch (kinder to this baseline than the guide, which is not).
    """
    import keras
    import tensorflow as tf

    from tltoolkit.backbones import create_backbone
    from tltoolkit.model import build_classifier
    from tltoolkit.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "search_head.yaml")
    keras.utils.set_random_seed(recipe.seed)
    started = time.perf_counter()
    size = (recipe.data.image_size, recipe.data.image_size)
    load = dict(image_size=size, batch_size=recipe.data.batch_size, label_mode="categorical", seed=recipe.seed)
    train = keras.utils.image_dataset_from_directory(data / "train", shuffle=True, **load)
    val = keras.utils.image_dataset_from_directory(data / "val", shuffle=False, **load)
    class_names = train.class_names
    train, val = train.cache().prefetch(tf.data.AUTOTUNE), val.cache().prefetch(tf.data.AUTOTUNE)
    base = create_backbone(recipe.backbone.name, recipe.backbone.weights, input_size=recipe.data.image_size)
    base.trainable = False
    model = build_classifier(base, class_names, recipe.head)
    model.compile(
        optimizer=keras.optimizers.Adam(recipe.stages[0].optimizer.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(train, validation_data=val, epochs=epochs, verbose=verbose)
    return {"wall_s": time.perf_counter() - started, "val_accuracy": float(history.history["val_accuracy"][-1])}


@benchmark
def head_cache(args) -> tuple[list[dict], dict]:
    """The head-only stage on ants vs bees, MobileNetV2 at 224 px, 20 epochs: feature cache vs the plain Keras way.

    Goal: speedup >= 15 in the median of 3 at the same accuracy (within noise). Both are timed from the image folder
    to a trained head; the cached side is a whole `tltoolkit run` (scan, MLflow logging, feature extraction,
    training, evaluation, calibration, interpretation report and plots). The sides alternate, 3 pairs, each pair's
    ratio measured side by side (this host's speed drifts up to 2x within a run); the in-memory feature cache is
    emptied before every timed run. Each pair also reports the extraction alone (the stage run's
    `feature_extraction_s`: one pass over the 398 images, decoding and tracing included) and `limit`, the plain
    time over it: the speedup if nothing but the extraction were paid.
    """
    import numpy as np
    from mlflow import MlflowClient

    import tltoolkit
    from tltoolkit.stages.features import CACHE
    from tltoolkit.tracking.store import resolve_tracking_uri

    data = Path(args.data or HYMENOPTERA)
    recipe = REPO / "recipes" / "search_head.yaml"
    overrides = ["search=null", "stages.0.epochs=20", "tracking.log_model=false"]
    _warm_imports(args.tracking_uri)
    client = MlflowClient(resolve_tracking_uri(args.tracking_uri))
    pairs = []
    for _ in range(3):
        CACHE.clear()
        started = time.perf_counter()
        cached = tltoolkit.run(recipe, data, overrides, args.tracking_uri, "bench-head-cache", verbose=args.verbose)
        wall = time.perf_counter() - started
        extraction = client.get_run(cached.stage_runs["head"]).data.metrics["feature_extraction_s"]
        plain = _plain_keras_head(data, 20, args.verbose)
        pairs.append(
            {
                "cached_s": wall,
                "plain_s": plain["wall_s"],
                "extraction_s": extraction,
                "speedup": plain["wall_s"] / wall,
            }
        )
    plain_accuracy = plain["val_accuracy"]  # Each side trains the same way in every pair (seed 42).
    # One run per side is one draw of shuffling and initialisation; on 153 val images one image is 0.0065. The cache
    # makes more seeds nearly free, so the cached side's spread over seeds is measured too (not timed).
    seeds = [cached.metrics["val_accuracy"]] + [
        tltoolkit.run(
            recipe, data, [*overrides, f"seed={seed}"], args.tracking_uri, "bench-head-cache", verbose=0
        ).metrics["val_accuracy"]
        for seed in range(43, 47)
    ]
    middle = sorted(pairs, key=lambda pair: pair["speedup"])[1]
    rows = [
        {
            "run": f"pair {i + 1}",
            "cached_s": round(pair["cached_s"], 1),
            "of_which_extraction_s": round(pair["extraction_s"], 1),
            "plain_s": round(pair["plain_s"], 1),
            "speedup": round(pair["speedup"], 2),
            "limit": round(pair["plain_s"] / pair["extraction_s"], 2),
        }
        for i, pair in enumerate(pairs)
    ]
    figures = {
        "speedup": round(middle["speedup"], 2),
        "speedups": [round(pair["speedup"], 2) for pair in pairs],
        "limit": round(middle["plain_s"] / middle["extraction_s"], 2),
        "overhead_s": round(middle["cached_s"] - middle["extraction_s"], 1),
        "extraction_s": round(middle["extraction_s"], 1),
        "wall_s": round(middle["cached_s"], 1),
        "plain_wall_s": round(middle["plain_s"], 1),
        "accuracy_delta": round(cached.metrics["val_accuracy"] - plain_accuracy, 4),
        "val_accuracy": round(cached.metrics["val_accuracy"], 4),
        "plain_val_accuracy": round(plain_accuracy, 4),
        "val_accuracy_5_seeds_mean": round(float(np.mean(seeds)), 4),
        "val_accuracy_5_seeds_std": round(float(np.std(seeds)), 4),
        "accuracy_delta_5_seeds_mean": round(float(np.mean(seeds)) - plain_accuracy, 4),
    }
    return rows, figures


@benchmark
def search(args) -> tuple[list[dict], dict]:
    """recipes/search_head.yaml on ants vs bees: 20 trials of a 20-epoch head, against one plain 20-epoch head training.

    Goal: ratio_to_one_plain_head <= 1 (the whole search costs less than one plain training, measured in this run).
    """
    import tltoolkit

    data = Path(args.data or HYMENOPTERA)
    overrides = [
        f"search.directory={Path(args.workdir) / 'tuning'}",
        "search.max_trials=20",
        "stages.0.epochs=20",
        "tracking.log_model=false",
    ]
    _warm_imports(args.tracking_uri)
    started = time.perf_counter()
    result = tltoolkit.tune(
        REPO / "recipes" / "search_head.yaml", data, overrides, args.tracking_uri, "bench-search", verbose=0
    )
    search_wall = time.perf_counter() - started
    plain = _plain_keras_head(data, 20, args.verbose)
    completed = result.trials[result.trials.status == "COMPLETED"]
    rows = [
        {
            "what": f"search: {len(completed)} trials x 20 epochs",
            "val_accuracy": round(result.best_objective, 4),
            "wall_s": round(search_wall, 1),
        },
        {
            "what": "one plain Keras head training, 20 epochs",
            "val_accuracy": round(plain["val_accuracy"], 4),
            "wall_s": round(plain["wall_s"], 1),
        },
    ]
    figures = {
        "trials": int(len(completed)),
        "ratio_to_one_plain_head": round(search_wall / plain["wall_s"], 3),
        "best_val_accuracy": round(result.best_objective, 4),
        "plain_val_accuracy": round(plain["val_accuracy"], 4),
        "search_wall_s": round(search_wall, 1),
        "plain_wall_s": round(plain["wall_s"], 1),
    }
    return rows, figures


def _few_label_split(digits: Path, out: Path, per_class: int, seed: int) -> tuple[Path, Path]:
    """From the demo digits: `per_class` labelled training and validation images per class (seeded), the demo's own
    test split held out, and every other image (labelled ones with their labels dropped) unlabelled. Symlinks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labelled, unlabelled = out / "labelled", out / "unlabelled"
    for folder in sorted((digits / "train").iterdir()):
        files = sorted(folder.iterdir())
        chosen = rng.permutation(len(files))
        for part, picks in (("train", chosen[:per_class]), ("val", chosen[per_class : 2 * per_class])):
            (labelled / part / folder.name).mkdir(parents=True, exist_ok=True)
            for i in picks:
                (labelled / part / folder.name / files[i].name).symlink_to(files[i])
        (unlabelled / folder.name).mkdir(parents=True, exist_ok=True)
        for i in chosen[2 * per_class :]:
            (unlabelled / folder.name / files[i].name).symlink_to(files[i])
    (labelled / "test").symlink_to(digits / "test")
    (unlabelled / "extra").mkdir()
    for file in sorted((digits.parent / "unlabeled").iterdir()):  # Scans do not follow linked folders: link files.
        (unlabelled / "extra" / file.name).symlink_to(file)
    return labelled, unlabelled


@benchmark
def semi_supervised(args) -> tuple[list[dict], dict]:
    """Few labels, many unlabelled images: autoencoder-pretrained classifier vs the same encoder from scratch.

    The demo digits (32 px): 5 labelled images per class to train on and 5 to validate with, the demo's 360 test
    images held out, the other 1387 unlabelled. `recipes/autoencoder_semisupervised.yaml` pretrains its denoising
    autoencoder on them, then trains the head (frozen encoder, 30 epochs) and fine-tunes (15 epochs). The baseline
    is the same encoder architecture (backbone `autoencoder`, `weights: none`), same head, trained from scratch on
    the labels alone for the same 45 labelled epochs, everything trainable. For context, `recipes/quickstart.yaml`
    (MobileNetV2 with ImageNet weights, 96 px) on the same labels. Three seeds (the labelled picks and the seed):
    10, 11, 12, kept apart from seeds 0-2, on which the recipe's noise level was chosen.
    """
    import numpy as np

    import tltoolkit
    from tltoolkit.data.demo import write_digits

    digits = write_digits(Path(args.workdir) / "digits")
    seeds = [10, 11, 12]
    scratch_stages = [
        "stages=[{name: train, epochs: 45, unfreeze: all, optimizer: {name: adam, learning_rate: 0.001}}]",
        "backbone.name=autoencoder",
        "backbone.weights=none",
        "backbone.freeze=none",
    ]
    rows, scores = [], {"ae": [], "scratch": [], "imagenet": []}
    for seed in seeds:
        labelled, unlabelled = _few_label_split(digits, Path(args.workdir) / f"seed{seed}", 5, seed)
        for kind, recipe, extra, unlabeled in (
            ("ae", "autoencoder_semisupervised.yaml", [], unlabelled),
            ("scratch", "autoencoder_semisupervised.yaml", ["pretrain=null", *scratch_stages], None),
            ("imagenet", "quickstart.yaml", [], None),
        ):
            started = time.perf_counter()
            result = tltoolkit.run(
                REPO / "recipes" / recipe,
                labelled,
                [f"seed={seed}", *extra],
                args.tracking_uri,
                f"bench-semi-supervised-{kind}",
                args.verbose,
                unlabeled=unlabeled,
            )
            scores[kind].append(result.metrics["test_accuracy"])
            rows.append(
                {
                    "seed": seed,
                    "model": kind,
                    "test_accuracy": round(result.metrics["test_accuracy"], 4),
                    "val_accuracy": round(result.metrics["val_accuracy"], 4),
                    "wall_s": round(time.perf_counter() - started, 1),
                }
            )
    figures = {"seeds": seeds, "labels_per_class": 5, "test_images": 360}
    for kind, name in (("ae", "ae"), ("scratch", "scratch"), ("imagenet", "imagenet")):
        figures[f"{name}_mean_accuracy"] = round(float(np.mean(scores[kind])), 4)
        figures[f"{name}_std"] = round(float(np.std(scores[kind], ddof=1)), 4)
    return rows, figures


def _timed(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """A command from a cold start: seconds to its first output line, seconds in all, and everything it printed."""
    import subprocess

    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = process.stdout.readline()
    first_at = time.perf_counter() - started
    rest = process.stdout.read()
    process.wait()
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{first}{rest}")
    return first_at, time.perf_counter() - started, first + rest


def _load_only(keras_file: Path) -> list[str]:
    """The start-up floor: a process that imports TensorFlow, loads the `.keras` file and prints one line."""
    layers = "import keras, tltoolkit.model.layers, tltoolkit.backbones.preprocessing"
    loads = f"{layers}; keras.saving.load_model({str(keras_file)!r}, compile=False)"
    return [sys.executable, "-c", f"import tensorflow; {loads}; print('loaded')"]


@benchmark
def cold_start(args) -> tuple[list[dict], dict]:
    """`tltoolkit predict` on one image from a cold start (a new process), by run id and by `.keras` file, against
    the floor: a process that only imports TensorFlow and loads the `.keras` file. Time to the first output line and
    in all; `noise_lines` counts TensorFlow's start-up notices among the lines printed."""
    import tltoolkit
    from tltoolkit.data.demo import write_digits
    from tltoolkit.startup import is_notice

    work = Path(args.workdir)
    data = write_digits(work / "digits") / "train"
    uri = args.tracking_uri or f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    recipe = {
        "data": {"image_size": 32},
        "backbone": {"name": "convnet_small", "weights": "none"},
        "stages": [{"name": "head", "epochs": 1, "unfreeze": "all"}],
    }
    result = tltoolkit.run(recipe, data, tracking_uri=uri, experiment="bench-cold-start", verbose=0)
    keras_file = work / "model.keras"
    result.model.save(keras_file)
    image = str(next((data / "3").iterdir()))
    python = sys.executable
    commands = {
        "floor: import tensorflow + load .keras": _load_only(keras_file),
        "tltoolkit predict RUN_ID IMAGE": [
            python,
            "-m",
            "tltoolkit",
            "predict",
            result.run_id,
            image,
            "--tracking-uri",
            uri,
        ],
        "tltoolkit predict MODEL.keras IMAGE": [python, "-m", "tltoolkit", "predict", str(keras_file), image],
    }
    rows = []
    for what, command in commands.items():
        first, total, printed = _timed(command, work)
        noise = sum(is_notice(line, driver=False) for line in printed.splitlines())
        rows.append({"command": what, "first_line_s": round(first, 1), "wall_s": round(total, 1), "noise_lines": noise})
    floor = rows[0]["wall_s"]
    figures = {
        f"{key}_{i}": row[key] for i, row in enumerate(rows) for key in ("first_line_s", "wall_s", "noise_lines")
    }
    figures.update(
        {
            "predict_run_id_over_floor": round(rows[1]["wall_s"] / floor, 2),
            "predict_keras_over_floor": round(rows[2]["wall_s"] / floor, 2),
        }
    )
    return rows, figures


EXPORTS = [
    ("saved_model", "none", False),
    ("tflite", "none", False),
    ("tflite", "float16", False),
    ("tflite", "dynamic", False),
    ("tflite", "int8", False),
    ("onnx", "none", False),
    ("tflite", "none", True),
]


@benchmark
def export(args) -> tuple[list[dict], dict]:
    """recipes/mobilenet_v2.yaml trained on ants vs bees, then exported to every format and quantization (and TFLite
    with resizing in the graph): size, val accuracy, top-1 agreement and largest probability difference against
    the Keras model, and latency per image at batch 1, Keras's beside each (measured in the same pass)."""
    import tltoolkit
    from tltoolkit.commands.export import ExportOptions

    data = Path(args.data) if args.data else HYMENOPTERA
    args.tracking_uri = args.tracking_uri or f"sqlite:///{Path(args.workdir) / 'mlruns' / 'mlflow.db'}"
    _, trained = _run_recipe(args, "mobilenet_v2.yaml", data, "bench-export")
    from mlflow import MlflowClient

    client = MlflowClient(args.tracking_uri)
    experiment = client.get_experiment_by_name("bench-export")
    run = client.search_runs([experiment.experiment_id], "tags.`tltoolkit.kind` = 'run'", max_results=1)[0]
    rows, figures = [], {"keras_val_accuracy": trained["val_accuracy"]}
    for fmt, quantize, in_graph in EXPORTS:
        started = time.perf_counter()
        done = tltoolkit.export(
            run.info.run_id,
            fmt,
            quantize,
            Path(args.workdir) / "exports" / f"{fmt}-{quantize}-{in_graph}",
            tracking_uri=args.tracking_uri,
            options=ExportOptions(resize_in_graph=in_graph),
        )
        report, val = done.report, done.report["splits"]["val"]
        row = {
            "artifact": report["artifact"],
            "size_mb": round(report["size_bytes"] / 1e6, 2),
            "val_accuracy": round(val["accuracy"], 4),
            "accuracy_drop": round(val["accuracy_drop"], 4),
            "top1_agreement": round(val["top1_agreement"], 4),
            "max_abs_diff": float(f"{val['max_abs_diff']:.2e}"),
            "ms_per_image": report["latency_ms"]["artifact"],
            "keras_ms_per_image": report["latency_ms"]["keras"],
            "export_s": round(time.perf_counter() - started, 1),
        }
        rows.append(row)
        for key in ("size_mb", "val_accuracy", "top1_agreement", "max_abs_diff", "ms_per_image"):
            figures[f"{row['artifact']}_{key}"] = row[key]
    return rows, figures


def _scale_recipe(workdir: Path, digits: Path) -> Path:
    """The search both sides of `search-scale` run: the demo's recipe on its digits at 64 px, a 1-epoch head and a
    1-epoch fine-tune per trial (so trials train through the backbone, as most searches with a fine-tune do)."""
    import yaml

    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    recipe["data"].update(image_size=64, dir=str(digits))
    recipe["stages"][0]["epochs"], recipe["stages"][1]["epochs"] = 1, 1
    recipe["stages"][1].pop("schedule", None)
    recipe["tracking"] = {"experiment": "bench-search-scale", "log_model": False}
    recipe["evaluation"] = {"top_losses": 0}
    recipe["search"] = {
        "tuner": "random",
        "max_trials": 8,
        "name": "scale",
        "directory": str(workdir / "tuning"),
        "space": {
            "head.dropout": {"type": "float", "min": 0.0, "max": 0.5},
            "stages.1.optimizer.learning_rate": {"type": "float", "min": 1e-5, "max": 1e-3, "sampling": "log"},
        },
    }
    path = workdir / "scale.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _distributed_search(recipe: Path, name: str, workers: int, uri: str, workdir: Path) -> float:
    """A chief and `workers` workers (separate processes, one thread each) of one search; seconds from their start
    to the last one's end."""
    import os
    import subprocess

    from tltoolkit.tracking.server import free_port

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    env["OMP_NUM_THREADS"] = "1"
    base = [sys.executable, "-m", "tltoolkit", "tune", str(recipe), "--set", f"search.name={name}"]
    base += ["--oracle-address", f"127.0.0.1:{free_port()}", "--distributed"]
    roles = [["chief"]] + [["worker", "--worker-id", f"w{i}"] for i in range(1, workers + 1)]
    started = time.perf_counter()
    logs = [workdir / f"{name}-{i}.log" for i in range(len(roles))]
    processes = [
        subprocess.Popen(base + role, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        for role, log in zip(roles, logs)
    ]
    for process, log in zip(processes, logs):
        if process.wait() != 0:
            raise SystemExit(f"{' '.join(process.args)} failed:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


@benchmark
def search_scale(args) -> tuple[list[dict], dict]:
    """One 8-trial search by a chief and 1 worker, then by a chief and 2 workers, each worker one thread
    (`TF_NUM_INTRAOP_THREADS=1`), all logging to one team tracking server (`tltoolkit server`: MLflow on PostgreSQL)
    on this machine: trials per hour and the ratio. Wall time runs from the processes' start to the last one's end.
    """
    from mlflow import MlflowClient

    from tltoolkit.data.demo import write_digits
    from tltoolkit.tracking.server import TeamServer, free_port

    workdir = Path(args.workdir)
    digits = Path(args.data) if args.data else write_digits(workdir / "digits")
    recipe = _scale_recipe(workdir, digits)
    server_dir = Path(tempfile.mkdtemp(prefix="tltoolkit-bench-server-"))  # Reachable by PostgreSQL's own user.
    server_dir.chmod(0o755)
    rows, figures = [], {}
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, server_dir, ignore_errors=True)
        server = cleanup.enter_context(TeamServer(server_dir, port=free_port()))
        client = MlflowClient(server.url)
        for workers in (1, 2):
            name = f"scale-{workers}"
            wall = _distributed_search(recipe, name, workers, server.url, workdir)
            experiment = client.get_experiment_by_name("bench-search-scale").experiment_id
            parent = client.search_runs([experiment], filter_string=f"tags.`tltoolkit.search` = '{name}'")[0]
            done = client.search_runs(
                [experiment],
                filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
            )
            rows.append(
                {
                    "setup": f"1 chief + {workers} worker(s), 1 thread each",
                    "trials": len(done),
                    "wall_s": round(wall, 1),
                    "trials_per_hour": round(len(done) * 3600 / wall, 1),
                }
            )
            figures[f"trials_per_hour_{workers}_worker"] = rows[-1]["trials_per_hour"]
    figures["ratio_2_to_1_workers"] = round(
        figures["trials_per_hour_2_worker"] / figures["trials_per_hour_1_worker"], 3
    )
    return rows, figures


def _head_stage(recipe_file: str, data: Path, seed: int, overrides: list[str], uri: str) -> dict:
    """The head stage of a shipped recipe alone at `seed`, with `overrides`: its wall time (feature extraction
    included), val accuracy and what it trained on (`input_path`)."""
    import tltoolkit
    from tltoolkit.recipe import load_recipe
    from tltoolkit.stages.features import CACHE

    recipe = load_recipe(REPO / "recipes" / recipe_file, [f"seed={seed}", "tracking.log_model=false", *overrides])
    recipe = recipe.model_copy(update={"stages": recipe.stages[:1]})
    CACHE.clear()  # Each run extracts its features, as a user's single run does (seeds do not change them).
    result = tltoolkit.run(recipe, data, tracking_uri=uri, experiment="bench-speed", verbose=0)
    from mlflow import MlflowClient

    stage = MlflowClient(uri).get_run(result.stage_runs["head"])
    return {
        "wall_s": stage.data.metrics["wall_s"],
        "val_accuracy": stage.data.metrics["final_val_accuracy"],
        "input_path": stage.data.params["input_path"],
    }


def _paired(label: str, sides: dict[str, list[str]], recipe_file: str, data: Path, uri: str):
    """Each side's head stage at seeds 42-44 (sides alternate, so drifting machine load hits both): rows, and per
    side the wall times and val accuracies."""
    rows, by_side = [], {side: [] for side in sides}
    for seed in (42, 43, 44):
        for side, overrides in sides.items():
            row = _head_stage(recipe_file, data, seed, overrides, uri)
            by_side[side].append(row)
            rows.append(
                {
                    "what": f"{label}, {side}",
                    "seed": seed,
                    "wall_s": round(row["wall_s"], 1),
                    "val_accuracy": round(row["val_accuracy"], 4),
                }
            )
    return rows, by_side


def _speed_heads(data: Path, uri: str) -> tuple[list[dict], dict]:
    import numpy as np

    sides = {"flip-aware cache": [], "through the backbone": ["data.feature_cache=false"]}
    rows, by = _paired("mobilenet_v2.yaml head", sides, "mobilenet_v2.yaml", data, uri)
    cached, plain = by["flip-aware cache"], by["through the backbone"]
    speedups = [p["wall_s"] / c["wall_s"] for c, p in zip(cached, plain)]
    figures = {
        "head_flip_cache_speedup": round(float(np.median(speedups)), 2),
        "head_flip_cache_speedups": [round(x, 2) for x in speedups],
        "head_accuracy_delta": round(
            float(np.mean([c["val_accuracy"] - p["val_accuracy"] for c, p in zip(cached, plain)])), 4
        ),
        "head_val_accuracy_cached": round(float(np.mean([c["val_accuracy"] for c in cached])), 4),
        "head_val_accuracy_plain": round(float(np.mean([p["val_accuracy"] for p in plain])), 4),
    }
    return rows, figures


@benchmark
def cache_copies(args) -> tuple[list[dict], dict]:
    """`data.feature_cache_copies` (K augmented copies cached) against training through the backbone, on the head
    stage of recipes/quickstart.yaml (rotation 0.03, translation 0.05) on the digits, seeds 42-44: the approximation's
    accuracy cost and its speed."""
    import numpy as np

    from tltoolkit.data.demo import write_digits

    data = Path(args.data) if args.data else write_digits(Path(args.workdir) / "digits")
    uri = args.tracking_uri or f"sqlite:///{Path(args.workdir) / 'mlruns' / 'mlflow.db'}"
    _warm_imports(uri)
    sides = {"through the backbone": [], "4 cached copies": ["data.feature_cache_copies=4"]}
    rows, by = _paired("quickstart.yaml head", sides, "quickstart.yaml", data, uri)
    plain, copies = by["through the backbone"], by["4 cached copies"]
    figures = {
        "copies_accuracy_delta": round(
            float(np.mean([c["val_accuracy"] - p["val_accuracy"] for c, p in zip(copies, plain)])), 4
        ),
        "copies_val_accuracy": round(float(np.mean([c["val_accuracy"] for c in copies])), 4),
        "plain_val_accuracy": round(float(np.mean([p["val_accuracy"] for p in plain])), 4),
        "copies_speedup": round(float(np.median([p["wall_s"] / c["wall_s"] for c, p in zip(copies, plain)])), 2),
    }
    return rows, figures


def _speed_finetune(data: Path, uri: str) -> tuple[list[dict], dict]:
    """The shipped recipe's fine-tune stage against the limit, the same model's train step on one batch already in
    memory: its training throughput (`train_images_per_s`: epochs after the first, validation left out; the figure
    compared) and, for the whole picture, images/s over the stage's wall time (tracing, validation, checkpoints)."""
    import keras
    import numpy as np

    import tltoolkit
    from tltoolkit.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "mobilenet_v2.yaml", ["tracking.log_model=false"])
    result = tltoolkit.run(recipe, data, tracking_uri=uri, experiment="bench-speed", verbose=0)
    from mlflow import MlflowClient

    stage = MlflowClient(uri).get_run(result.stage_runs["finetune"])
    epochs = int(stage.data.metrics["epochs_run"])
    train_images = int(MlflowClient(uri).get_run(result.run_id).data.params["data.train_images"])
    whole = epochs * train_images / stage.data.metrics["wall_s"]
    fed = stage.data.metrics["train_images_per_s"]
    model = result.model
    keras.utils.set_random_seed(0)
    size, batch = recipe.data.image_size, recipe.data.batch_size
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 2, batch), 2)
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="categorical_crossentropy")
    limit = _train_rate(model, images, labels, steps=10)
    rows = [
        {"what": "fine-tune training (train_images_per_s)", "images_per_s": round(fed, 1)},
        {"what": f"  the whole stage ({epochs} epochs: tracing, validation...)", "images_per_s": round(whole, 1)},
        {"what": "limit: train step on a batch in memory", "images_per_s": round(limit, 1)},
    ]
    figures = {
        "finetune_images_per_s": round(fed, 1),
        "finetune_stage_images_per_s": round(whole, 1),
        "finetune_limit_images_per_s": round(limit, 1),
        "finetune_fraction_of_limit": round(fed / limit, 3),
    }
    return rows, figures, result


def _speed_predict(data: Path, result, workdir: Path) -> tuple[list[dict], dict]:
    """`tltoolkit.predict` on the image folder with start-up excluded (the model loaded once; its first pass, which
    traces it, reported apart; then the median of 3) against the raw forward pass of the same model on the same
    images in memory (a traced call per batch), side by side. Decoding alone is timed too: where it shares the CPU
    with inference, the most any reader can reach is 1 / (1/decode + 1/forward), the `shared-CPU ceiling`. Start-up:
    `tltoolkit predict MODEL.keras IMAGE` in a new process against one that only imports TensorFlow and loads it."""
    import numpy as np
    import tensorflow as tf

    from tltoolkit.commands.predict import predict
    from tltoolkit.data import image_files
    from tltoolkit.data.pipeline import image_batches, resized_images
    from tltoolkit.tracking.models import load_classifier

    keras_file = workdir / "speed.keras"
    result.model.save(keras_file)
    paths = image_files([data], progress=False).images
    loaded = load_classifier(keras_file)
    config = loaded.data_config(32)

    def rate(work) -> float:
        started = time.perf_counter()
        work()
        return len(paths) / (time.perf_counter() - started)

    first = rate(lambda: predict(loaded, [data], output=workdir / "predictions.csv"))
    images = resized_images(paths, config).astype("float32")
    batches = [tf.constant(images[i : i + config.batch_size]) for i in range(0, len(images), config.batch_size)]
    spec = tf.TensorSpec((None, *images.shape[1:]), tf.float32)
    forward_pass = tf.function(lambda x: loaded.model(x, training=False), input_signature=[spec])
    for x in batches:  # Traced once for every batch size, not timed.
        forward_pass(x)
    steady, forward, decode = [], [], []
    for _ in range(3):  # Interleaved, so drifting machine load hits each side alike.
        steady.append(rate(lambda: predict(loaded, [data], output=workdir / "predictions.csv")))
        forward.append(rate(lambda: [forward_pass(x).numpy() for x in batches]))
        decode.append(rate(lambda: [None for _ in image_batches(paths, config)]))
    steady, forward, decode = (float(np.median(v)) for v in (steady, forward, decode))
    ceiling = 1 / (1 / decode + 1 / forward)
    _, startup, _ = _timed([sys.executable, "-m", "tltoolkit", "predict", str(keras_file), paths[0]], workdir)
    _, floor, _ = _timed(_load_only(keras_file), workdir)
    n = len(paths)
    rows = [
        {"what": f"tltoolkit.predict on {n} image files, model loaded", "images_per_s": round(steady, 1)},
        {"what": "  its first pass (traces the model)", "images_per_s": round(first, 1)},
        {"what": "forward pass on the same images in memory", "images_per_s": round(forward, 1)},
        {"what": "decoding and resizing alone", "images_per_s": round(decode, 1)},
        {"what": "shared-CPU ceiling 1/(1/decode + 1/forward)", "images_per_s": round(ceiling, 1)},
        {"what": "start-up: tltoolkit predict MODEL.keras IMAGE, new process", "wall_s": round(startup, 1)},
        {"what": "start-up floor: import tensorflow + load .keras", "wall_s": round(floor, 1)},
    ]
    return rows, {
        "predict_images_per_s": round(steady, 1),
        "predict_first_pass_images_per_s": round(first, 1),
        "forward_images_per_s": round(forward, 1),
        "decode_images_per_s": round(decode, 1),
        "predict_fraction_of_forward": round(steady / forward, 3),
        "predict_fraction_of_shared_cpu_ceiling": round(steady / ceiling, 3),
        "predict_startup_s": round(startup, 2),
        "startup_floor_s": round(floor, 2),
    }


@benchmark
def speed(args) -> tuple[list[dict], dict]:
    """recipes/mobilenet_v2.yaml on ants vs bees: the head stage (horizontal flips) on the flip-aware feature cache
    vs through the backbone, seeds 42-44 (speedup: median of the three); the fine-tune stage's images/s against the
    train-step limit; `tltoolkit.predict` on the folder (start-up excluded) against the forward pass on the same
    images in memory and against the shared-CPU ceiling; the start-up of `tltoolkit predict` on one image."""
    data = Path(args.data or HYMENOPTERA)
    workdir = Path(args.workdir)
    uri = args.tracking_uri or f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    _warm_imports(uri)
    rows, figures = _speed_heads(data, uri)
    more, numbers, result = _speed_finetune(data, uri)
    rows += more
    figures.update(numbers)
    more, numbers = _speed_predict(data / "val", result, workdir)
    rows += more
    figures.update(numbers)
    return rows, figures


def _train_rate(model, images, labels, steps: int, repeats: int = 3) -> float:
    """Images per second of `model.fit` on batches in memory: the median of `repeats` timed epochs of `steps`
    steps, after one warm-up epoch (tracing, autotuning). One short sample is not enough on a host whose speed drifts
    by up to 2x."""
    import numpy as np
    import tensorflow as tf

    batches = tf.data.Dataset.from_tensors((images, labels)).repeat().prefetch(2)
    model.fit(batches, epochs=1, steps_per_epoch=2, verbose=0)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
        rates.append(steps * len(images) / (time.perf_counter() - started))
    return float(np.median(rates))


@benchmark
def gpu(args) -> tuple[list[dict], dict]:
    """On a machine with a GPU: images per second of recipes/mobilenet_v2.yaml's head and fine-tune train steps
    (224 px, batch 32, in memory), in float32 and in mixed precision (the recipe's `runtime.mixed_precision`).
    Without a GPU it says so and measures nothing."""
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        message = "no GPU on this machine (tf.config.list_physical_devices('GPU') is empty): nothing to measure"
        return [{"skipped": message}], {"skipped": message}
    return _gpu_rates(steps=50)


def _gpu_rates(steps: int) -> tuple[list[dict], dict]:
    import keras
    import numpy as np

    from tltoolkit.backbones import create_backbone
    from tltoolkit.model import build_classifier
    from tltoolkit.recipe import load_recipe
    from tltoolkit.stages.devices import runtime_scope

    recipe = load_recipe(REPO / "recipes" / "mobilenet_v2.yaml")
    size, batch = recipe.data.image_size, recipe.data.batch_size
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 2, batch), 2)
    rows, figures = [], {}
    for policy in ("float32", "mixed_float16"):
        with runtime_scope(None, policy):
            backbone = create_backbone(recipe.backbone.name, recipe.backbone.weights, input_size=size)
            model = build_classifier(backbone, ["a", "b"], recipe.head)
        for stage, trainable in (("head", False), ("finetune", True)):
            backbone.trainable = trainable
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="categorical_crossentropy")
            rate = _train_rate(model, images, labels, steps)
            rows.append({"policy": policy, "stage": stage, "images_per_s": round(rate, 1)})
            figures[f"{stage}_images_per_s_{policy}"] = round(rate, 1)
    for stage in ("head", "finetune"):
        figures[f"{stage}_mixed_speedup"] = round(
            figures[f"{stage}_images_per_s_mixed_float16"] / figures[f"{stage}_images_per_s_float32"], 3
        )
    return rows, figures


# Benchmarks in modules of their own: folders at scale, and the data audit.
from audit import audit_bench  # noqa: E402
from scale import data_scale, scan_scale  # noqa: E402

benchmark(data_scale)
benchmark(scan_scale)
BENCHMARKS["audit"] = audit_bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument(
        "--tracking-uri", help="MLflow store for the benchmark's runs (default: as for `tltoolkit run`)"
    )
    parser.add_argument("--data", help="image folder to use instead of the benchmark's own")
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity: 0 silent, 1 bar, 2 a line/epoch")
    args = parser.parse_args(argv)
    import pandas as pd

    from tltoolkit.cli import configure_logging

    configure_logging(0 if args.verbose else -1)  # An application: it shows the library's log, as the CLI does.

    with tempfile.TemporaryDirectory(prefix="tltoolkit-bench-") as workdir:
        args.workdir = workdir
        rows, figures = BENCHMARKS[args.name](args)
    print(f"\n== {args.name} ==")
    print(pd.DataFrame(rows).to_string(index=False))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
