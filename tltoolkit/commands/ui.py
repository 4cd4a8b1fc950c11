"""`tltoolkit ui`: the MLflow UI on the toolkit's store, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from tltoolkit.commands.interrupts import interrupts_raise
from tltoolkit.errors import TltoolkitError
from tltoolkit.tracking.store import mark_training_experiment, require_existing_store, resolve_tracking_uri

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
        command += ["--allowed-hosts", _with_ports(allowed_hosts, port)]
    return command


def _with_ports(allowed_hosts: str, port: int) -> str:
    """MLflow compares the whole Host header, port included: each plain name is allowed with and without `port`,
    and the loopback names stay allowed, so the page this command announces keeps working.

    Example:
        >>> _with_ports("box.example.com, 10.0.0.5:8080", 5000)
        'box.example.com,box.example.com:5000,10.0.0.5:8080,localhost,localhost:5000,127.0.0.1,127.0.0.1:5000'
    """
    names = [name.strip() for name in allowed_hosts.split(",") if name.strip()]
    hosts = []
    for name in [*names, "localhost", "127.0.0.1"]:
        hosts += [name] if ":" in name or "*" in name else [name, f"{name}:{port}"]
    return ",".join(dict.fromkeys(hosts))


def ui(
    tracking_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int = 5000,
    allowed_hosts: str | None = None,
    timeout: float = 300.0,
) -> int:
    """Runs the MLflow UI until interrupted; returns its exit status.

    The address is announced only once the server answers, on the page of the newest training's experiment, which
    opens in MLflow's classic (model training) view, not its GenAI welcome.

    Raises:
        TltoolkitError: The port is taken, or the server stopped (or did not answer within `timeout` seconds)
            before it served.
    """
    command = ui_command(tracking_uri, host, port, allowed_hosts)
    uri = command[5]
    require_existing_store(uri)
    page = f"http://{host}:{port}/" + _training_page(uri)
    _check_port_free(host, port)
    # Its own process group: the server's workers are stopped with it, whatever ends this command.
    process = subprocess.Popen(command, start_new_session=True)
    try:
        with interrupts_raise():  # SIGTERM too, so the server never outlives the command.
            _wait_until_serving(process, host, port, timeout)
            _logger.info("MLflow UI for %s at %s (Ctrl-C stops it)", uri, page)
            return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_group(process)


def _stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after `grace` seconds if it is still there."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _training_page(uri: str) -> str:
    """The runs page of the experiment of the newest tltoolkit run or search, after marking every experiment with
    such runs as a model-training experiment (`mlflow.experimentKind`), so the UI shows runs, not its GenAI welcome."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [
        run
        for kind in ("run", "tune")
        for run in client.search_runs(experiments, filter_string=f"tags.`tltoolkit.kind` = '{kind}'", max_results=5000)
    ]
    runs.sort(key=lambda run: run.info.start_time, reverse=True)
    for experiment_id in {run.info.experiment_id for run in runs}:
        mark_training_experiment(client, experiment_id)
    return f"#/experiments/{runs[0].info.experiment_id}/runs" if runs else ""


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            raise TltoolkitError(
                f"Port {port} on {host} is taken (another MLflow UI?); pass --port {port + 1}, or stop what uses it."
            ) from None


def _wait_until_serving(process: subprocess.Popen, host: str, port: int, timeout: float) -> None:
    """Polls the server's health endpoint until it answers; raises if the server stops or never answers."""
    deadline = time.monotonic() + timeout
    url = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}/health"
    while True:
        if process.poll() is not None:
            raise TltoolkitError(f"The MLflow UI stopped (exit status {process.returncode}) before serving; see above.")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TltoolkitError(f"The MLflow UI did not answer at {url} within {timeout:.0f} s.")
        time.sleep(0.5)
