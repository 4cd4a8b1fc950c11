"""`tltoolkit register`: a run's model in the MLflow model registry, under a name and optional aliases, so
`models:/NAME@ALIAS` names it in every command (and in `mlflow models serve`)."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable

from tltoolkit.errors import RegistryError

_logger = logging.getLogger(__name__)


def check_model_name(name: str, aliases: Iterable[str] = ()) -> None:
    """Refuses a name or alias the registry (or a `models:/NAME@ALIAS` URI) could not hold, before any work.

    Example:
        >>> check_model_name("ants-vs-bees", ["champion"])
        >>> check_model_name("team/ants")
        Traceback (most recent call last):
        ...
        tltoolkit.errors.RegistryError: Invalid registered model name 'team/ants': Names cannot contain '/' or ':'.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
        _validate_model_name,
    )

    if "@" in name:
        raise RegistryError(f"Invalid registered model name {name!r}: '@' separates the alias in models:/NAME@ALIAS.")
    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise RegistryError(f"Invalid registered model name {name!r}: {_reason(exc)}") from None
    for alias in aliases:
        try:
            _validate_model_alias_name(alias)
            _validate_model_alias_name_reserved(alias)
        except MlflowException as exc:
            raise RegistryError(f"Invalid alias {alias!r} for {name!r}: {_reason(exc)}") from None


def _reason(exc) -> str:
    message = str(exc.message if hasattr(exc, "message") else exc)
    return message.split(". ", 1)[-1] if message.startswith("Invalid model name") else message


def register(model: str, name: str, aliases: Iterable[str] = (), tracking_uri: str | None = None) -> int:
    """Registers the model of a run (or a logged model) as a new version of `name`; returns the version number.

    Args:
        model: A run id (or unique prefix), `runs:/<run>/<model>` or `models:/...` URI.
        name: The registered model; created on first use.
        aliases: Aliases to point at the new version (`champion`, `staging`, ...), moved from older versions.
        tracking_uri: MLflow store. Defaults as for `run`.

    Raises:
        RegistryError: A bad name or alias, or a model folder or `.keras` file (only logged models register).
    """
    if isinstance(aliases, str):
        aliases = [aliases]
    aliases = list(aliases)
    check_model_name(name, aliases)
    import mlflow
    from mlflow import MlflowClient

    from tltoolkit.tracking.models import resolve_model_ref
    from tltoolkit.tracking.store import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    if not _is_reference(model):
        raise RegistryError(
            f"{model} is not a run id or a runs:/ or models:/ URI; only models logged in MLflow can be registered "
            "(a .keras file or folder has no run to point to)."
        )
    client = MlflowClient(uri)
    source = _logged_model_uri(client, resolve_model_ref(model)[0])
    with contextlib.redirect_stderr(io.StringIO()):  # MLflow prints "Created version ..."; we log it once below.
        version = mlflow.register_model(source, name).version
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version)
    shown = "".join(f"\n  models:/{name}@{alias}" for alias in aliases)
    _logger.info("Registered %s as models:/%s/%s%s", source, name, version, shown)
    return int(version)


def _logged_model_uri(client, uri: str) -> str:
    """`models:/m-...` for a `runs:/<run>/<name>` URI: MLflow 3 registers logged models (and warns on run paths)."""
    if not uri.startswith("runs:/"):
        return uri
    run_id, _, name = uri.removeprefix("runs:/").partition("/")
    for output in client.get_run(run_id).outputs.model_outputs:
        if client.get_logged_model(output.model_id).name == name:
            return f"models:/{output.model_id}"
    return uri


def _is_reference(model: str) -> bool:
    from pathlib import Path

    from tltoolkit.tracking.models import is_model_reference

    return is_model_reference(str(model)) and not Path(str(model)).expanduser().exists()
