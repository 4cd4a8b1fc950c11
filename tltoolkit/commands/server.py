"""`tltoolkit server`: a team's tracking server (MLflow on PostgreSQL, artifacts served through it) until stopped."""

from __future__ import annotations

import logging
from pathlib import Path

from tltoolkit.commands.interrupts import interrupts_raise
from tltoolkit.tracking.server import TeamServer

_logger = logging.getLogger(__name__)


def server(
    folder: str | Path = "tltoolkit-server",
    backend_store_uri: str | None = None,
    artifacts: str | None = None,
    host: str = "127.0.0.1",
    port: int = 5000,
    allowed_hosts: str | None = None,
    workers: int | None = None,
) -> int:
    """Runs the team tracking server until interrupted (Ctrl-C or SIGTERM); returns the MLflow server's exit status.

    Args: as `tltoolkit.tracking.server.TeamServer`. PostgreSQL (the server's own) and MLflow are both stopped when
    this returns; runs, metrics, models and artifacts stay in `folder` (or the named database and artifact store).
    """
    team = TeamServer(Path(folder), backend_store_uri, artifacts, host, port, allowed_hosts, workers)
    try:
        with interrupts_raise():  # SIGTERM too, so neither server outlives the command.
            url = team.start()
            shown = f"http://{allowed_hosts.split(',')[0].strip()}:{port}" if allowed_hosts else url
            store = backend_store_uri or f"PostgreSQL in {Path(folder) / 'postgres'}"
            _logger.info(
                "Team tracking server at %s (runs in %s, artifacts behind the server in %s). Ctrl-C stops it.\n"
                "Each member points tltoolkit at it:\n  export MLFLOW_TRACKING_URI=%s",
                url,
                store,
                artifacts or Path(folder) / "artifacts",
                shown,
            )
            return team.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        team.stop()
