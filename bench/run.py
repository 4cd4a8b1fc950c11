"""Benchmarks: `python bench/run.py NAME` runs one, prints a readable table, and its figures as JSON on the last line.

Benchmarks hold the speed and accuracy targets that tests must not: they take minutes and real data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

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
    result = tltoolkit.run(REPO / "recipes" / recipe, data, tracking_uri=args.tracking_uri, experiment=experiment,
                           verbose=args.verbose)  # fmt: skip
    wall = time.perf_counter() - started
    client = MlflowClient(result.tracking_uri)
    rows = []
    for stage, run_id in result.stage_runs.items():
        history = result.history[result.history.stage == stage]
        rows.append({
            "stage": stage,
            "val_accuracy": round(client.get_run(run_id).data.metrics["final_val_accuracy"], 4),
            "epochs": len(history),
            "wall_s": round(client.get_run(run_id).data.metrics["wall_s"], 1),
        })  # fmt: skip
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--tracking-uri", help="MLflow store for the benchmark's runs (default: as for `tltoolkit run`)")
    parser.add_argument("--data", help="image folder to use instead of the benchmark's own")
    parser.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity: 0 silent, 1 bar, 2 a line/epoch")
    args = parser.parse_args(argv)
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="tltoolkit-bench-") as workdir:
        args.workdir = workdir
        rows, figures = BENCHMARKS[args.name](args)
    print(f"\n== {args.name} ==")
    print(pd.DataFrame(rows).to_string(index=False))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
