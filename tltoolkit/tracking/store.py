"""Which MLflow store to use, and making sure it answers before any work starts."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

from tltoolkit.errors import TrackingError

# A SQLite store inside ./mlruns: works in a fresh clone with no server and no environment variable.
DEFAULT_STORE = Path("mlruns") / "mlflow.db"


def default_tracking_uri() -> str:
    """`sqlite:///<cwd>/mlruns/mlflow.db`, the store used when nothing else is named."""
    return f"sqlite:///{DEFAULT_STORE.resolve()}"


def resolve_tracking_uri(cli_uri: str | None = None, recipe_uri: str | None = None) -> str:
    """The tracking URI: `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the recipe's, else `./mlruns/mlflow.db`.

    Relative SQLite paths are made absolute, so the store does not move with the working directory later.
    """
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or recipe_uri
    if not uri:
        return default_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def artifact_root_for(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite file (`mlruns/artifacts`); else the server decides."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def require_existing_store(uri: str) -> None:
    """For commands that only read: a SQLite store that does not exist yet is a mistake (the wrong folder, say), not
    something to create empty.

    Raises:
        TrackingError: Naming the missing file and how to point at the right store.
    """
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise TrackingError(
            f"No MLflow store at {uri.removeprefix('sqlite:///')}: nothing was tracked from this folder. Run the "
            "command where you trained (the store is ./mlruns/mlflow.db there), or pass --tracking-uri (or "
            "MLFLOW_TRACKING_URI)."
        )


def checkpoint_root(uri: str) -> Path:
    """Where runs keep their checkpoints: beside a SQLite store (`mlruns/checkpoints`), else `./checkpoints`."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "checkpoints"
    return Path("checkpoints").resolve()


@contextlib.contextmanager
def _store_lock(uri: str):
    """Serialises the first touch of a SQLite store across processes (MLflow creates and migrates its tables then,
    and two processes doing it at once fail), and the creation of an experiment. Other stores need no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks here; concurrent first use there is the user's to avoid.
        yield
        return
    path = Path(uri.removeprefix("sqlite:///")).with_suffix(".lock")
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_store_setup():
    """MLflow announces creating and migrating a new store's tables on stderr, at INFO; that is its business, not
    the user's, so those loggers say only warnings while the store is first touched."""
    loggers = [logging.getLogger(name) for name in ("mlflow.store.db.utils", "alembic.runtime.migration")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# The MLflow UI opens an experiment in the view its kind names; without the tag it guesses, and guesses GenAI.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def mark_training_experiment(client, experiment_id: str) -> None:
    """Tags the experiment as model training, so the MLflow UI shows its runs and charts (not the GenAI view)."""
    key, value = EXPERIMENT_KIND
    if client.get_experiment(experiment_id).tags.get(key) != value:
        client.set_experiment_tag(experiment_id, key, value)


def connect(uri: str, experiment: str) -> str:
    """Points MLflow at `uri`, checks that it answers, and returns the id of `experiment` (created if needed).

    Raises:
        TrackingError: The store is unreachable or not writable. Raised before any data is read.
    """
    import mlflow

    scheme = urlparse(uri).scheme
    if uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"Cannot create the MLflow store folder {folder}: {exc.strerror}.") from None
        if not os.access(folder, os.W_OK):
            raise TrackingError(
                f"The MLflow store folder {folder} is not writable; fix its permissions or pass --tracking-uri."
            )
    if scheme in ("http", "https"):
        # Fail in seconds, not after MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri), _quiet_store_setup():
            found = mlflow.get_experiment_by_name(experiment)
            if found is not None:
                experiment_id = found.experiment_id
            else:
                experiment_id = mlflow.create_experiment(experiment, artifact_location=artifact_root_for(uri))
            mark_training_experiment(mlflow.MlflowClient(uri), experiment_id)
            return experiment_id
    except Exception as exc:  # MLflow raises many types (MlflowException, requests, sqlalchemy) for one cause.
        raise TrackingError(
            f"The MLflow tracking store {uri} cannot be used ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). "
            "Check that the server is running and reachable, or pass another --tracking-uri."
        ) from exc
