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


@benchmark
def quickstart(args) -> tuple[list[dict], dict]:
    """recipes/quickstart.yaml on the built-in digits, both stages, as `tltoolkit demo` runs it."""
    import tltoolkit
    from tltoolkit.data.demo import write_digits

    data = write_digits(Path(args.workdir) / "digits")
    started = time.perf_counter()
    result = tltoolkit.run(REPO / "recipes" / "quickstart.yaml", data, tracking_uri=args.tracking_uri,
                           experiment="bench-quickstart", verbose=0)
    wall = time.perf_counter() - started
    rows = [
        {"stage": stage, "val_accuracy": round(result.history[result.history.stage == stage]["val_accuracy"].iloc[-1], 4),
         "epochs": int((result.history.stage == stage).sum())}
        for stage in result.stage_runs
    ]
    figures = {
        "val_accuracy": round(result.metrics["val_accuracy"], 4),
        "test_accuracy": round(result.metrics["test_accuracy"], 4),
        "wall_s": round(wall, 1),
    }
    return rows, figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("--tracking-uri", help="MLflow store for the benchmark's runs (default: as for `tltoolkit run`)")
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
