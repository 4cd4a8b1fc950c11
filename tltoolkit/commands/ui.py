"""`tltoolkit ui`: the MLflow UI on the toolkit's store, bound to 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import logging
import subprocess
import sys

from tltoolkit.commands.interrupts import interrupts_raise
from tltoolkit.errors import TltoolkitError
from tltoolkit.tracking.server import check_exposure, check_port_free, stop_group, wait_until_serving, with_ports
from tltoolkit.tracking.store import mark_training_experiment, require_existing_store, resolve_tracking_uri

_logger = logging.getLogger(__name__)


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
    check_exposure(host, allowed_hosts, "UI")
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if allowed_hosts:
        command += ["--allowed-hosts", with_ports(allowed_hosts, port)]
    return command


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
    check_port_free(host, port, "MLflow UI")
    # Its own process group: the server's workers are stopped with it, whatever ends this command.
    process = subprocess.Popen(command, start_new_session=True)
    try:
        with interrupts_raise():  # SIGTERM too, so the server never outlives the command.
            wait_until_serving(process, host, port, timeout, "The MLflow UI")
            _logger.info("MLflow UI for %s at %s (Ctrl-C stops it)", uri, page)
            return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(process)


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
