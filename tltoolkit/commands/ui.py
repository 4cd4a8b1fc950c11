"""`tltoolkit ui`: the MLflow UI on the toolkit's store, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import logging
import subprocess
import sys

from tltoolkit.errors import TltoolkitError
from tltoolkit.tracking.store import resolve_tracking_uri

_logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def ui_command(
    tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000, allowed_hosts: str | None = None
) -> list[str]:
    """The `mlflow ui` command line for this store.

    Raises:
        TltoolkitError: `host` is not a loopback address and no `allowed_hosts` were given: exposing the UI beyond
            this machine must be a deliberate choice (MLflow checks Host headers against them).
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise TltoolkitError(f"The tracking store {uri} is already a server: open it in a browser instead.")
    if host not in LOOPBACK and not allowed_hosts:
        raise TltoolkitError(
            f"Binding the UI to {host} exposes every run to the network; pass --allowed-hosts with the host names "
            "clients will use (e.g. --allowed-hosts myserver.example.com) to do it deliberately."
        )
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    return command


def ui(
    tracking_uri: str | None = None, host: str = "127.0.0.1", port: int = 5000, allowed_hosts: str | None = None
) -> int:
    """Runs the MLflow UI until interrupted; returns its exit status."""
    command = ui_command(tracking_uri, host, port, allowed_hosts)
    _logger.info("MLflow UI for %s at http://%s:%s (Ctrl-C stops it)", command[5], host, port)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0
