"""Benchmarks of folders at scale (registered in `run.py`): `data-scale` (memory and cost per image as a folder grows
from 2,000 to 100,000 images) and `scan-scale` (a million files scanned twice).

Each measured size runs in a process of its own, so its peak resident memory is its own (`resource.getrusage`), with
a cache folder of its own, so nothing one size computed is reused by the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (2_000, 20_000, 100_000)
BACKBONES = {"convnet_small": "none", "mobilenet_v2": "torchvision"}
IMAGE_SIZE, BATCH = 64, 64
BUDGET = "2GB"
TIMED_STEPS = 150  # Training steps timed through the backbone (head and fine-tune), at every size.
REPEATS = 3  # Those steps are timed as the median of this many fits of TIMED_STEPS.
PHASES = ("scan", "prepare", "extraction", "head_epoch", "head_through_backbone", "finetune", "predict")


def synthetic_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs in 10 class folders, made from the demo's digits: each a random 64-96 px crop of an upscaled
    digit, tinted, with noise, saved at quality 90 (skipped if already complete)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    marker = root.parent / f".{root.name}.complete"
    if marker.exists() and marker.read_text() == str(count):
        return root
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    bases = [Image.fromarray((d / 16 * 255).astype(np.uint8)).resize((112, 112)) for d in digits.images]
    for i in range(count):
        index = int(rng.integers(len(bases)))
        side = int(rng.integers(64, 97))
        left, top = rng.integers(0, 112 - side + 1, 2)
        crop = np.asarray(bases[index].crop((left, top, left + side, top + side)), np.float32)
        tint = rng.uniform(0.4, 1.0, 3)
        pixels = crop[..., None] * tint + rng.normal(0, 12, (side, side, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(root / str(digits.target[index]) / f"{i:07d}.jpg", quality=90)
    marker.write_text(str(count))
    return root


class _BatchTimes:
    """Seconds of the training batches after the first two (tracing, pipeline start), and how many images."""

    def __init__(self):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_train_batch_end(inner, batch, logs=None):  # noqa: N805
                self.ends.append(time.perf_counter())

        self.callback, self.ends = Callback(), []

    def seconds_per_1000(self, batch_size: int) -> float:
        timed = self.ends[2:]
        return (timed[-1] - timed[0]) / ((len(timed) - 1) * batch_size) * 1000


def _timed_steps(model, training, stream: int, steps: int) -> float:
    """Seconds per 1,000 images of `steps` training steps of `model` (compiled) through the image pipeline, over as
    many epochs as that takes (the same count at every size: a short epoch's last batch is smaller); the median of
    `REPEATS` fits, as this host's speed drifts by up to 2x over a minute."""
    epochs = -(-steps // training.train.steps_per_epoch)
    measured = []
    for _ in range(REPEATS):
        times = _BatchTimes()
        model.fit(
            training.train.epochs(stream, 0, epochs).take(steps),
            steps_per_epoch=steps,
            epochs=1,
            verbose=0,
            shuffle=False,  # The stream's order (Keras would only warn that it ignores shuffling a dataset).
            callbacks=[times.callback],
        )
        measured.append(times.seconds_per_1000(training.recipe.data.batch_size))
    return float(np.median(measured))


def child(folder: Path, backbone: str, out: Path) -> None:
    """One size in its own process: every phase's seconds per 1,000 images, the plan, the peak memory."""
    import tltoolkit  # noqa: F401  (imports, before any clock)
    from tltoolkit import cache as cache_folder
    from tltoolkit.commands.predict import predict
    from tltoolkit.data import prepare_data
    from tltoolkit.data.budget import peak_memory
    from tltoolkit.model import set_trainable
    from tltoolkit.recipe import Recipe
    from tltoolkit.stages import SessionOptions, StageRun, TrainingSession, compile_for_stage, fit_stage
    from tltoolkit.tracking.models import LoadedClassifier

    recipe = Recipe.model_validate(
        {
            "data": {"image_size": IMAGE_SIZE, "batch_size": BATCH, "memory_budget": BUDGET},
            "backbone": {"name": backbone, "weights": BACKBONES[backbone], "freeze": "all"},
            "stages": [
                {"name": "head", "epochs": 1, "optimizer": {"learning_rate": 1e-3}},
                {"name": "finetune", "epochs": 1, "unfreeze": "all", "optimizer": {"learning_rate": 1e-5}},
            ],
            "evaluation": {"calibrate": False, "top_losses": 0},
        }
    )
    seconds, started = {}, time.perf_counter()
    data = prepare_data(folder, recipe.data.val_split, recipe.seed, progress=False)
    seconds["scan"] = time.perf_counter() - started
    count = sum(len(items) for items in data.parts.values())
    session = TrainingSession(recipe, SessionOptions(verbose=0, progress=False))
    started = time.perf_counter()
    session.load_data(data)
    seconds["prepare"] = time.perf_counter() - started  # The plan, and decoding into the image caches it chose.
    training = session.training
    head = fit_stage(training, StageRun(recipe.stages[0], verbose=0))
    train_n = len(data.parts["train"])
    per_1000 = {
        "scan": seconds["scan"] / count * 1000,
        "prepare": seconds["prepare"] / count * 1000,
        "extraction": head.feature_extraction_s / (train_n + len(data.parts["val"])) * 1000,
        "head_epoch": 1000 / head.train_images_per_s,
    }
    steps = TIMED_STEPS
    model = training.model
    set_trainable(model, training.backbone, len(training.backbone.layers))
    compile_for_stage(model, recipe, recipe.stages[0], steps)
    per_1000["head_through_backbone"] = _timed_steps(model, training, 0, steps)
    set_trainable(model, training.backbone, 0)
    compile_for_stage(model, recipe, recipe.stages[1], steps)
    per_1000["finetune"] = _timed_steps(model, training, 1, steps)
    loaded = LoadedClassifier(model, data.class_names, IMAGE_SIZE, recipe.data.resize, "bench")
    started = time.perf_counter()
    predict(loaded, [folder], output=out.with_suffix(".csv"), batch_size=BATCH)
    per_1000["predict"] = (time.perf_counter() - started) / count * 1000
    disk = sum(e.bytes for e in cache_folder.entries(("arrays",)))
    figures = {
        "images": count,
        "s_per_1000": {k: round(v, 3) for k, v in per_1000.items()},
        "peak_rss_mb": round(peak_memory() / 1e6),
        "disk_cache_mb": round(disk / 1e6, 1),
        "caches": {choice.name: choice.where for choice in training.caches},
        "memory_budget_mb": round(training.budget.total / 1e6),
        "head_input": head.input_path,
        "timed_steps": steps,
        "timed_repeats": REPEATS,
    }
    out.write_text(json.dumps(figures))


def data_scale(args) -> tuple[list[dict], dict]:
    """Folders of 2,000, 20,000 and 100,000 synthetic JPEGs (`synthetic_folder`), a fast ConvNet and MobileNetV2 at
    64 px, the memory budget at 2 GB: per size, seconds per 1,000 images of each phase (scan; preparing the image
    caches; extraction; the head's epoch on the feature cache; the head and fine-tune steps through the backbone,
    `TIMED_STEPS` of them, the median of `REPEATS` fits; predict over the whole folder), peak RSS, disk cache size.

    Goals: peak RSS at 100,000 at most 1.5x that at 2,000; seconds per 1,000 images at 100,000 within 1.3x of 2,000
    in every phase; the head epoch on the disk feature cache at least 5x faster than through the backbone.
    """
    sizes = [int(n) for n in os.environ.get("TLTOOLKIT_BENCH_SIZES", ",".join(map(str, SIZES))).split(",")]
    backbones = os.environ.get("TLTOOLKIT_BENCH_BACKBONES", ",".join(BACKBONES)).split(",")
    workdir = Path(os.environ.get("TLTOOLKIT_BENCH_DATA", args.workdir))
    rows, results = [], {}
    for n in sizes:
        started = time.perf_counter()
        folder = synthetic_folder(workdir / f"synthetic-{n}", n)
        print(f"{n} images at {folder} ({time.perf_counter() - started:.0f} s to make)", flush=True)
        for backbone in backbones:
            out = Path(args.workdir) / f"{backbone}-{n}.json"
            env = {**os.environ, "TLTOOLKIT_CACHE_DIR": str(Path(args.workdir) / f"cache-{backbone}-{n}")}
            command = [sys.executable, __file__, "child", str(folder), backbone, str(out)]
            subprocess.run(command, check=True, env=env)
            result = json.loads(out.read_text())
            results.setdefault(backbone, {})[n] = result
            rows.append(
                {
                    "backbone": backbone,
                    "images": n,
                    **{f"{p}_s/1k": result["s_per_1000"][p] for p in PHASES},
                    "peak_rss_mb": result["peak_rss_mb"],
                    "disk_mb": result["disk_cache_mb"],
                    "features": result["caches"].get("features below `head`"),
                    "images_cache": result["caches"].get("train images"),
                }
            )
            print(rows[-1], flush=True)
    return rows, _scale_figures(results, sizes)


def _scale_figures(results: dict, sizes: list[int]) -> dict:
    """`peak_rss_mb` (N -> MB) and `s_per_1000_images` (phase -> N -> s) as the issue asks, each the worst over the
    backbones; the same per backbone under `by_backbone`, with the ratios the goals are about."""
    small, large = min(sizes), max(sizes)
    figures: dict = {"memory_budget_mb": int(float(BUDGET[:-2]) * 1000), "by_backbone": {}}
    for backbone, by_size in results.items():
        figures["by_backbone"][backbone] = {
            "peak_rss_mb": {n: r["peak_rss_mb"] for n, r in by_size.items()},
            "s_per_1000_images": {phase: {n: r["s_per_1000"][phase] for n, r in by_size.items()} for phase in PHASES},
        }
        figures.setdefault("rss_ratio", {})[backbone] = round(
            by_size[large]["peak_rss_mb"] / by_size[small]["peak_rss_mb"], 3
        )
        figures.setdefault("cost_ratio", {})[backbone] = {
            phase: round(by_size[large]["s_per_1000"][phase] / by_size[small]["s_per_1000"][phase], 3)
            for phase in PHASES
        }
        at_large = by_size[large]["s_per_1000"]
        figures.setdefault("head_cache_speedup", {})[backbone] = round(
            at_large["head_through_backbone"] / at_large["head_epoch"], 1
        )
        figures.setdefault("disk_cache_mb", {})[backbone] = {n: r["disk_cache_mb"] for n, r in by_size.items()}
        figures.setdefault("caches", {})[backbone] = {n: r["caches"] for n, r in by_size.items()}
    per_backbone = figures["by_backbone"].values()
    figures["peak_rss_mb"] = {n: max(b["peak_rss_mb"][n] for b in per_backbone) for n in sizes}
    figures["s_per_1000_images"] = {
        phase: {n: max(b["s_per_1000_images"][phase][n] for b in per_backbone) for n in sizes} for phase in PHASES
    }
    return figures


def scan_child(folder: Path, out: Path) -> None:
    from tltoolkit.data import prepare_data
    from tltoolkit.data.budget import peak_memory

    started = time.perf_counter()
    data = prepare_data(folder, progress=True)
    seconds = time.perf_counter() - started
    files = sum(len(items) for items in data.parts.values()) + len(data.skipped)
    out.write_text(
        json.dumps({"files": files, "seconds": round(seconds, 1), "peak_rss_mb": round(peak_memory() / 1e6)})
    )


def tiny_files(root: Path, count: int, classes: int = 10) -> Path:
    """`count` tiny JPEGs (16 px, a few hundred bytes each) in `classes` folders (skipped if already complete)."""
    from io import BytesIO

    from PIL import Image

    marker = root.parent / f".{root.name}.complete"
    if marker.exists() and marker.read_text() == str(count):
        return root
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(64):
        buffer = BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
        blobs.append(buffer.getvalue())
    for label in range(classes):
        (root / f"class{label}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (root / f"class{i % classes}" / f"{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    marker.write_text(str(count))
    return root


def scan_scale(args) -> tuple[list[dict], dict]:
    """`prepare_data` (what `tltoolkit scan` and `run` do first) on 1,000,000 tiny JPEGs, twice, each in its own
    process: the first decodes every file, the second finds the verdicts in the scan cache. Seconds, files per
    second and peak RSS of each."""
    count = int(os.environ.get("TLTOOLKIT_BENCH_FILES", "1000000"))
    workdir = Path(os.environ.get("TLTOOLKIT_BENCH_DATA", args.workdir))
    started = time.perf_counter()
    folder = tiny_files(workdir / f"tiny-{count}", count)
    print(f"{count} files at {folder} ({time.perf_counter() - started:.0f} s to make)", flush=True)
    env = {**os.environ, "TLTOOLKIT_CACHE_DIR": str(Path(args.workdir) / "scan-cache")}
    rows = []
    for name in ("first", "second"):
        out = Path(args.workdir) / f"scan-{name}.json"
        subprocess.run([sys.executable, __file__, "scan", str(folder), str(out)], check=True, env=env)
        result = json.loads(out.read_text())
        rows.append({"scan": name, **result, "files_per_s": round(result["files"] / max(result["seconds"], 1e-9))})
    figures = {
        "files": count,
        "first_s": rows[0]["seconds"],
        "second_s": rows[1]["seconds"],
        "second_speedup": round(rows[0]["seconds"] / max(rows[1]["seconds"], 1e-9), 1),
        "peak_rss_mb": {row["scan"]: row["peak_rss_mb"] for row in rows},
    }
    return rows, figures


if __name__ == "__main__":
    from tltoolkit.cli import configure_logging

    configure_logging(0)
    if sys.argv[1] == "child":
        child(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    elif sys.argv[1] == "scan":
        scan_child(Path(sys.argv[2]), Path(sys.argv[3]))
