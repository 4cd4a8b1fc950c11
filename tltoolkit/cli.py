"""The `tltoolkit` command line: thin subcommands over the Python functions of the same names."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from pathlib import Path

from tltoolkit.errors import TltoolkitError
from tltoolkit.startup import quiet_tensorflow_startup

_REPO = Path(__file__).resolve().parents[1]


def _find_recipe(name: str) -> str:
    """A recipe path as given; else, from another directory, the same path or name in this checkout's recipes/."""
    if Path(name).exists():
        return name
    for candidate in (_REPO / name, _REPO / "recipes" / Path(name).name):
        if candidate.is_file():
            return str(candidate)
    return name


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file, e.g. recipes/mobilenet_v2.yaml")
    parser.add_argument("--data", help="image folder: class subfolders, or train/ + val/ [+ test/] subfolders")
    parser.add_argument(
        "--unlabeled",
        metavar="DIR",
        help="folder of unlabelled images (any depth) for a recipe's autoencoder pretraining (default: data.unlabeled)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a recipe field before validation, e.g. --set stages.0.epochs=5 (repeatable)",
    )
    _add_tracking_flag(parser)
    parser.add_argument("--experiment", help="MLflow experiment (default: the recipe's tracking.experiment)")


_KERAS_MODEL_HELP = (
    "run id or a unique prefix of one, runs:/ or models:/ URI (name/version, name@alias, m-...), MLflow model folder, "
    "or .keras file"
)
_MODEL_HELP = f"{_KERAS_MODEL_HELP}; or a folder of `tltoolkit export` (its .tflite, .onnx or saved_model/)"


def _add_tracking_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the recipe's, else sqlite:///mlruns/mlflow.db)",
    )


def _add_tta_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--tta", default="none", choices=["none", "flip", "flip_crops"], help=what)


class _Console(logging.Handler):
    """The `tltoolkit` logger's messages on the terminal: information on stdout (on stderr where stdout carries
    data, as `predict`'s CSV), warnings and errors on stderr.

    The streams are looked up at each message, so a redirected `sys.stdout` (a test's capture, say) gets them.
    """

    def __init__(self, data_on_stdout: bool = False):
        super().__init__()
        self.data_on_stdout = data_on_stdout

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.WARNING:
                print(f"warning: {message}", file=sys.stderr, flush=True)
            else:
                print(message, file=sys.stderr if self.data_on_stdout else sys.stdout, flush=True)
        except Exception:
            self.handleError(record)


def configure_logging(verbosity: int = 0, data_on_stdout: bool = False) -> None:
    """Shows the library's `tltoolkit` log on the terminal: `-1` warnings only, `0` information, `1` debug too."""
    logger = logging.getLogger("tltoolkit")
    for handler in [h for h in logger.handlers if isinstance(h, _Console)]:
        logger.removeHandler(handler)
    logger.addHandler(_Console(data_on_stdout))
    # Shown once: some libraries (tf2onnx, absl) put a handler on the root logger, which would repeat every line.
    logger.propagate = False
    logger.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tltoolkit",
        description="Transfer learning for image classifiers: a recipe and an image folder in, "
        "a trained model tracked in MLflow out.",
    )
    common = argparse.ArgumentParser(add_help=False)
    loudness = common.add_mutually_exclusive_group()
    loudness.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug messages too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = functools.partial(sub.add_parser, parents=[common])  # Every command takes -q and -v.

    run = command("run", help="train a classifier as a recipe says (head stage, then fine-tune)")
    _add_run_flags(run)
    run.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_ID",
        help="continue the newest unfinished run of this same command (recipe, --set, --data) from its checkpoint, "
        "in the same MLflow runs; or the run RUN_ID",
    )
    run.add_argument("--register", metavar="NAME", help="then put the model in the MLflow model registry as NAME")

    tune = command(
        "tune", help="keras-tuner search over the recipe's `search.space`; every trial an MLflow child run; resumable"
    )
    _add_run_flags(tune)
    tune.add_argument("--overwrite", action="store_true", help="start the search over instead of resuming it")
    tune.add_argument("--then-run", action="store_true", help="then train and log the final model from the best recipe")
    tune.add_argument(
        "--distributed",
        choices=["chief", "worker"],
        help="keras-tuner's distributed search: one chief serves the oracle, workers run the trials",
    )
    tune.add_argument("--oracle-address", metavar="HOST:PORT", help="the chief's address (with --distributed)")
    tune.add_argument("--worker-id", help="a name for this worker (default: its process id)")

    probe = command(
        "probe",
        help="how well the recipe's frozen backbone fits the data at each depth, and how much to unfreeze "
        "(what `freeze: auto` and `unfreeze: auto` use)",
    )
    _add_run_flags(probe)
    probe.add_argument("--no-log", action="store_true", help="do not log an MLflow run")

    demo = command("demo", help="write the built-in digits dataset and run recipes/quickstart.yaml on it")
    demo.add_argument("--out", default="data/digits", help="where the demo images go (default: data/digits)")
    demo.add_argument("--recipe", default="recipes/quickstart.yaml")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    _add_tracking_flag(demo)

    evaluate = command("evaluate", help="score a model on a labelled folder; logged to MLflow")
    evaluate.add_argument("model", help=_MODEL_HELP)
    evaluate.add_argument("data", help="class-per-subfolder folder (its test/ or val/ if it has train/)")
    evaluate.add_argument("--experiment")
    evaluate.add_argument("--no-log", action="store_true", help="do not log an MLflow run")
    _add_tta_flag(
        evaluate, "also score with test-time augmentation (image + mirror; + 4 corner crops) beside the plain scores"
    )
    _add_tracking_flag(evaluate)

    explain = command(
        "explain", help="most confused classes, top-loss images and Grad-CAM heat maps of a model on a labelled folder"
    )
    explain.add_argument("model", help=_KERAS_MODEL_HELP)
    explain.add_argument("data", help="class-per-subfolder folder (its test/ or val/ if it has train/)")
    explain.add_argument("-o", "--output", metavar="DIR", help="where the files go (default: explain-<folder name>)")
    explain.add_argument("--top", type=int, default=8, metavar="N", help="top-loss images to show (default: 8)")
    explain.add_argument("--experiment")
    explain.add_argument("--no-log", action="store_true", help="do not log an MLflow run")
    _add_tracking_flag(explain)

    predict = command(
        "predict",
        help="predict classes of images; CSV of path, top-k classes, probabilities",
        usage="tltoolkit predict MODEL PATH [PATH ...] | tltoolkit predict --imagenet PATH [PATH ...]",
    )
    predict.add_argument(
        "items",
        nargs="+",
        metavar="MODEL PATH",
        help="the model (run id or a unique prefix, runs:/ or models:/ URI, MLflow model folder, .keras file, or a "
        "folder of `tltoolkit export`), then image files or folders; with --imagenet only images",
    )
    predict.add_argument(
        "--imagenet",
        action="store_true",
        help="label the images with a pretrained backbone's original ImageNet classifier (no trained model needed)",
    )
    predict.add_argument("--backbone", default="mobilenet_v2", help="for --imagenet (default: mobilenet_v2)")
    predict.add_argument("--weights", help="for --imagenet: the weight source (default: one usable offline)")
    predict.add_argument("--top-k", type=int, help="classes per image (default: 3, or 5 with --imagenet)")
    predict.add_argument("--output", "-o", help="CSV file to write, batch by batch (default: stdout, at the end)")
    predict.add_argument(
        "--resume",
        action="store_true",
        help="continue the --output an interrupted predict left: only the images it lacks",
    )
    _add_tta_flag(predict, "average each image's prediction over its mirror (and 4 corner crops)")
    _add_tracking_flag(predict)

    export = command(
        "export", help="export a model as SavedModel, TFLite or ONNX; verified against the Keras model; logged"
    )
    export.add_argument("model", help=_KERAS_MODEL_HELP)
    export.add_argument("--format", required=True, choices=["saved_model", "tflite", "onnx"])
    export.add_argument(
        "--quantize",
        default="none",
        choices=["none", "float16", "dynamic", "int8"],
        help="TFLite only: float16 weights, dynamic-range int8 weights, or int8 calibrated on training images",
    )
    export.add_argument("-o", "--output", metavar="DIR", help="folder to write (default: exports/<run>-<format>...)")
    export.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    export.add_argument("--data", help="the training image folder (default: the one in the model's recipe)")
    export.add_argument(
        "--resize-in-graph",
        action="store_true",
        help="the graph takes any image size and resizes (bilinear) itself, instead of already-resized pixels",
    )
    export.add_argument(
        "--calibration-images", type=int, default=200, metavar="N", help="int8: training images to calibrate on"
    )
    _add_tracking_flag(export)

    register = command("register", help="put a run's model in the MLflow model registry, optionally with an alias")
    register.add_argument("model", help="run id or a unique prefix of one, or a runs:/ or models:/ URI")
    register.add_argument("name", help="registered model name")
    register.add_argument("--alias", action="append", default=[], help="alias to point at this version (repeatable)")
    _add_tracking_flag(register)

    compare = command("compare", help="table of the store's runs and searches, stage metrics side by side")
    compare.add_argument("--experiment", help="only this experiment (default: every experiment in the store)")
    compare.add_argument("--csv", help="also write the table to this CSV file")
    _add_tracking_flag(compare)

    ui = command("ui", help="open the MLflow UI on this store (bound to 127.0.0.1)")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--allowed-hosts", help="required to bind beyond loopback: Host names clients will use")
    _add_tracking_flag(ui)

    server = command(
        "server", help="run a team tracking server: MLflow on PostgreSQL, artifacts served through it (127.0.0.1)"
    )
    server.add_argument(
        "--dir", default="tltoolkit-server", help="holds postgres/ and artifacts/ (default: ./tltoolkit-server)"
    )
    server.add_argument(
        "--backend-store-uri",
        metavar="URI",
        help="an existing database, e.g. postgresql+psycopg2://user:password@dbhost/mlflow (default: a PostgreSQL "
        "of the server's own in DIR/postgres)",
    )
    server.add_argument("--artifacts", metavar="URI", help="where artifacts are kept (default: DIR/artifacts)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--allowed-hosts", help="required to bind beyond loopback: Host names clients will use")
    server.add_argument("--workers", type=int, help="MLflow server worker processes (default: MLflow's)")

    audit = command(
        "audit", help="find likely wrong labels, near-duplicates (leaking across the split) and outliers in a folder"
    )
    audit.add_argument("data", help="image folder: class subfolders, or train/ + val/ [+ test/] subfolders")
    audit.add_argument("--recipe", help="whose backbone, image size and split to use (default: MobileNetV2, offline)")
    audit.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    audit.add_argument(
        "-o", "--output", metavar="DIR", help="where the CSVs and galleries go (default: audit-<folder>)"
    )
    audit.add_argument(
        "--duplicate-similarity", type=float, metavar="S", help="cosine similarity of near-duplicates (default: 0.95)"
    )
    audit.add_argument("--experiment")
    audit.add_argument("--no-log", action="store_true", help="do not log an MLflow run")
    _add_tracking_flag(audit)

    scan = command("scan", help="check an image folder as training would: classes, split, every file, what is skipped")
    scan.add_argument("data", help="image folder: class subfolders, or train/ + val/ [+ test/] subfolders")
    scan.add_argument("--val-split", type=float, default=0.2, help="as the recipe's data.val_split (default: 0.2)")
    scan.add_argument("--seed", type=int, default=42, help="as the recipe's seed (default: 42)")
    scan.add_argument("--manifest", metavar="CSV", help="write every used file with its class and part")
    scan.add_argument("--skipped", metavar="CSV", help="write the skipped files with the reason")

    cache = command(
        "cache", help="list the tltoolkit cache folder (disk caches of images and features...), or clear it"
    )
    cache.add_argument("action", nargs="?", default="list", choices=["list", "clear"])
    cache.add_argument("--all", action="store_true", help="clear: also converted weights and downloaded wheels")

    listing = command(
        "backbones", help="list backbones and their weight sources, or the layers of one (to choose freeze points)"
    )
    listing.add_argument("--layers", metavar="NAME", help="print the layers of this backbone, in freeze order")
    listing.add_argument(
        "--weights", action="store_true", help="print every pretrained weight source: where from, offline now or not"
    )
    listing.add_argument("--image-size", type=int, help="input size for --layers (default: the backbone's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tltoolkit` console script and `python -m tltoolkit`."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    quiet_tensorflow_startup()
    configure_logging(-1 if args.quiet else 1 if args.verbose else 0, data_on_stdout=args.command == "predict")
    try:
        return _dispatch(args)
    except TltoolkitError as exc:
        print(f"tltoolkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM during run/tune: the command said how to resume.
        print(f"tltoolkit {args.command}: interrupted{f' ({exc})' if str(exc) else ''}.", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    import pandas as pd

    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 40)
    verbose = 0 if args.quiet else None  # Keras progress: none, or a bar on a terminal and a line per epoch elsewhere.
    if args.command == "run":
        from tltoolkit.commands.register import check_model_name, register
        from tltoolkit.commands.run import run

        if args.register:
            check_model_name(args.register)  # Before training, not after.
        result = run(
            _find_recipe(args.recipe),
            args.data,
            args.overrides,
            args.tracking_uri,
            args.experiment,
            verbose=verbose,
            resume=args.resume,
            unlabeled=args.unlabeled,
        )
        if args.register:
            register(result.run_id, args.register, tracking_uri=result.tracking_uri)
    elif args.command == "tune":
        from tltoolkit.commands.tune import Distributed, tune

        distributed = Distributed(args.distributed, args.oracle_address, args.worker_id) if args.distributed else None
        tune(
            _find_recipe(args.recipe),
            args.data,
            args.overrides,
            args.tracking_uri,
            args.experiment,
            overwrite=args.overwrite,
            then_run=args.then_run,
            verbose=verbose,
            distributed=distributed,
            unlabeled=args.unlabeled,
        )
    elif args.command == "probe":
        from tltoolkit.commands.probe import probe

        probe(
            _find_recipe(args.recipe),
            args.data,
            args.overrides,
            args.tracking_uri,
            args.experiment,
            verbose=verbose,
            log=not args.no_log,
        )
    elif args.command == "demo":
        from tltoolkit.commands.run import run
        from tltoolkit.data.demo import write_digits

        data = write_digits(args.out)
        run(_find_recipe(args.recipe), data, args.overrides, args.tracking_uri, verbose=verbose)
    elif args.command == "evaluate":
        from tltoolkit.commands.evaluate import evaluate

        evaluate(args.model, args.data, args.tracking_uri, args.experiment, log=not args.no_log, tta=args.tta)
    elif args.command == "explain":
        from tltoolkit.commands.explain import explain

        explain(args.model, args.data, args.output, args.top, args.tracking_uri, args.experiment, not args.no_log)
    elif args.command == "predict":
        from tltoolkit.commands.predict import predict, predict_imagenet

        if args.imagenet:
            table = predict_imagenet(
                args.items,
                args.backbone,
                args.weights,
                args.top_k or 5,
                args.output,
                resume=args.resume,
            )
        elif len(args.items) < 2:
            raise TltoolkitError("give the model, then image files or folders (or --imagenet and images only)")
        else:
            table = predict(
                args.items[0],
                args.items[1:],
                args.top_k or 3,
                args.output,
                args.tracking_uri,
                tta=args.tta,
                resume=args.resume,
            )
        if not args.output:
            table.to_csv(sys.stdout, index=False, float_format="%.6f")
    elif args.command == "export":
        from tltoolkit.commands.export import ExportOptions, export

        options = ExportOptions(args.resize_in_graph, args.calibration_images)
        where = (args.output, args.data, args.tracking_uri, args.overwrite)
        export(args.model, args.format, args.quantize, *where, options)
    elif args.command == "register":
        from tltoolkit.commands.register import register

        register(args.model, args.name, args.alias, args.tracking_uri)
    elif args.command == "compare":
        from tltoolkit.commands.compare import compare
        from tltoolkit.tracking.store import resolve_tracking_uri

        table = compare(args.experiment, args.tracking_uri)
        print(f"Store: {resolve_tracking_uri(args.tracking_uri)}")
        if table.empty:
            where = f"experiment {args.experiment!r}" if args.experiment else "any experiment"
            print(f"No `tltoolkit run` runs or `tltoolkit tune` searches in {where} yet.")
        else:
            shown = table.assign(run_id=table["run_id"].str[:8])
            print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        if args.csv:
            table.to_csv(args.csv, index=False)
    elif args.command == "ui":
        from tltoolkit.commands.ui import ui

        return ui(args.tracking_uri, args.host, args.port, args.allowed_hosts)
    elif args.command == "server":
        from tltoolkit.commands.server import server

        return server(
            args.dir, args.backend_store_uri, args.artifacts, args.host, args.port, args.allowed_hosts, args.workers
        )
    elif args.command == "audit":
        from tltoolkit.commands.audit import audit

        audit(
            args.data,
            _find_recipe(args.recipe) if args.recipe else None,
            args.output,
            args.tracking_uri,
            args.experiment,
            args.overrides,
            log=not args.no_log,
            duplicate_similarity=args.duplicate_similarity,
        )
    elif args.command == "scan":
        from tltoolkit.commands.scan import scan

        scan(args.data, args.val_split, args.seed, args.manifest, args.skipped, progress=not args.quiet)
    elif args.command == "cache":
        from tltoolkit.cache import cache_dir
        from tltoolkit.commands.cache import cache_entries, clear_cache

        if args.action == "clear":
            clear_cache(args.all)
            return 0
        table = cache_entries()
        print(f"Cache folder: {cache_dir()} ({table['size_mb'].sum():.1f} MB)")
        print(table.drop(columns="path").to_string(index=False) if len(table) else "(empty)")
    elif args.command == "backbones":
        from tltoolkit.commands.backbones import backbone_layers, backbones, weight_sources

        if args.layers:
            table = backbone_layers(args.layers, args.image_size)
        else:
            table = weight_sources() if args.weights else backbones()
        if args.weights:  # Left-aligned text reads better than pandas' right-aligned default.
            width = int(table["source"].str.len().max())
            print(table.to_string(index=False, formatters={"source": lambda v: f"{v:<{width}}"}, justify="left"))
            return 0
        print(table.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
