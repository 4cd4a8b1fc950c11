"""Which MLflow store to use, and making sure it answers before any work starts."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
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
    """Where runs keep their checkpoints: beside a SQLite store (`mlruns/checkpoints`); for any other store (a
    server) in one fixed place whatever the working directory, a folder per store: `$TLTOOLKIT_CHECKPOINT_DIR`, else
    `$XDG_DATA_HOME/tltoolkit/checkpoints`, else `~/.local/share/tltoolkit/checkpoints`, then `<host>_<port>`."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent / "checkpoints"
    root = os.environ.get("TLTOOLKIT_CHECKPOINT_DIR")
    if not root:
        data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        root = Path(data_home) / "tltoolkit" / "checkpoints"
    parsed = urlparse(uri)
    store = "".join(c if c.isalnum() or c in "-." else "_" for c in (parsed.netloc or parsed.path or uri))
    return Path(root).expanduser().resolve() / store


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
    if uri.startswith("sqlite:///"):
        _wait_for_another_creator(Path(uri.removeprefix("sqlite:///")))
    deadline = time.monotonic() + INIT_RACE_S
    for attempt in itertools.count(1):
        try:
            with _store_lock(uri), _quiet_store_setup():
                return _experiment_id(mlflow, uri, experiment)
        except Exception as exc:  # MLflow raises many types (MlflowException, requests, sqlalchemy) for one cause.
            text = str(exc)
            if _init_race(uri, text) and time.monotonic() < deadline:
                time.sleep(min(0.2 * attempt, 2.0))  # Another client is creating the store's tables: let it finish.
                continue
            raise TrackingError(_unusable(uri, exc)) from exc


# How long a SQLite store that another MLflow client (`mlflow ui`, a script) is creating at the same moment is waited
# for: their table creation and migrations collide with ours, and every collision but the last one's fails.
INIT_RACE_S = 30.0
_RACE = (
    "already exists",
    "duplicate column",
    "Online migration expected",
    "database is locked",
    "no such table",
    "no such column",
    "out-of-date database schema",
)


def _wait_for_another_creator(path: Path) -> None:
    """Waits while another MLflow client (`mlflow ui`, a script) creates this SQLite store: a file written in the last
    minute whose schema is not yet MLflow's newest. MLflow's tracking store creates and migrates its tables without
    a lock, so opening it meanwhile would break that client's migrations, and ours."""
    if not path.is_file() or time.time() - path.stat().st_mtime > 60:
        return
    try:
        from mlflow.store.db.utils import _get_latest_schema_revision

        head = _get_latest_schema_revision()
    except Exception:  # A private helper of MLflow's: without it, the retries in `connect` still apply.
        return
    deadline = time.monotonic() + INIT_RACE_S
    while _schema_version(path) != head and time.monotonic() < deadline:
        if time.time() - path.stat().st_mtime > 5:
            return  # Nobody is writing it: a half-made store of a process that died; MLflow will say what is wrong.
        time.sleep(0.1)


def _schema_version(path: Path) -> str | None:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)) as connection:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _init_race(uri: str, message: str) -> bool:
    return uri.startswith("sqlite:///") and any(sign in message for sign in _RACE)


def _experiment_id(mlflow, uri: str, experiment: str) -> str:
    """The experiment's id (created if needed), with one write (the experiment's kind tag), so a store that can be
    read but not written fails here, before any work, not at the first metric."""
    found = mlflow.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        try:
            experiment_id = mlflow.create_experiment(experiment, artifact_location=artifact_root_for(uri))
        except Exception:
            # Another client created it since we looked (a search's chief and workers start at once): join it. On a
            # tracking server this is RESOURCE_ALREADY_EXISTS, which no retry of the creation would get past.
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    key, value = EXPERIMENT_KIND
    mlflow.MlflowClient(uri).set_experiment_tag(experiment_id, key, value)
    return experiment_id


def _unusable(uri: str, exc: Exception) -> str:
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    if "readonly" in str(exc) or "read-only" in str(exc):
        where = uri.removeprefix("sqlite:///")
        return (
            f"The MLflow tracking store {where} can be read but not written ({first}). Make it writable "
            f"(chmod u+w {where}, and its folder), or pass another --tracking-uri."
        )
    return (
        f"The MLflow tracking store {uri} cannot be used ({type(exc).__name__}: {first}). "
        "Check that the server is running and reachable, or pass another --tracking-uri."
    )
