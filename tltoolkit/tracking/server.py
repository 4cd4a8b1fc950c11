"""A team tracking server: `mlflow server` with a PostgreSQL backend store, artifacts served through the server.

MLflow does the serving (`--serve-artifacts`: clients upload and download artifacts over HTTP, so they need no
shared disk); PostgreSQL keeps runs, metrics and the model registry, and takes many writers at once, which SQLite
does not. A team with a database names it (`backend_store_uri`); a team without one gets a PostgreSQL cluster of the
server's own in `<folder>/postgres`, made with PostgreSQL's `initdb` on first start and run with `pg_ctl`, listening on
127.0.0.1 only (so trust authentication is safe: only this machine's users reach it). PostgreSQL refuses to run as
root, so as root its programs run as the `postgres` user (`runuser`). Nothing here speaks a protocol by hand.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tltoolkit.errors import TltoolkitError

DATABASE = "mlflow"
USER = "mlflow"
PROGRAMS = ("initdb", "pg_ctl", "psql", "createdb")
_logger = logging.getLogger(__name__)


def postgres_binaries() -> Path:
    """The folder of PostgreSQL's server programs: `$TLTOOLKIT_POSTGRES_BIN`, `initdb` on the PATH, or the newest
    `/usr/lib/postgresql/<version>/bin` (where Debian and Ubuntu put them)."""
    named = os.environ.get("TLTOOLKIT_POSTGRES_BIN")
    if named:  # Named: that folder or an error, never another PostgreSQL behind the user's back.
        folders = [Path(named)]
    else:
        on_path = shutil.which("initdb")
        versions = Path("/usr/lib/postgresql").glob("*/bin")
        folders = [Path(on_path).parent] if on_path else []
        folders += sorted(versions, key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)], reverse=True)
    for folder in folders:
        if all((folder / program).exists() for program in PROGRAMS):
            return folder
    raise TltoolkitError(
        f"PostgreSQL's server programs ({', '.join(PROGRAMS)}) were not found"
        + (f" in TLTOOLKIT_POSTGRES_BIN={named}" if named else " (on the PATH or in /usr/lib/postgresql/*/bin)")
        + ". Install them (Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql@15`), set "
        "TLTOOLKIT_POSTGRES_BIN to their folder, or give the server an existing database with --backend-store-uri."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in `folder` for the server's runs, on 127.0.0.1:`port`, database `mlflow`."""

    folder: Path
    port: int = field(default_factory=free_port)

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def start(self) -> str:
        """Creates the cluster on first use, starts it unless it runs, makes the database; returns its URI."""
        binaries = postgres_binaries()
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            _logger.info("Creating a PostgreSQL cluster in %s...", self.data)
            self._run(binaries / "initdb", "-D", self.data, "-U", USER, "--auth=trust", "--encoding=UTF8")
        if self.pid() is None:
            options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
            log = self.folder / "postgres.log"
            self._run(binaries / "pg_ctl", "-D", self.data, "-l", log, "-w", "-o", options, "start")
        query = "SELECT datname FROM pg_database"
        if DATABASE not in self._run(binaries / "psql", *self._address(), "-d", "postgres", "-tAc", query).split():
            self._run(binaries / "createdb", *self._address(), DATABASE)
        return self.uri

    def stop(self) -> None:
        """Stops the cluster (fast shutdown: open connections are closed); its data stays for the next start."""
        if self.pid() is not None:
            self._run(postgres_binaries() / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def pid(self) -> int | None:
        """The running postmaster's process id (from its pid file), or `None`."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid

    def _address(self) -> list[str]:
        return ["-h", "127.0.0.1", "-p", str(self.port), "-U", USER]

    def _run(self, *command) -> str:
        command = [str(part) for part in command]
        program = Path(command[0]).name
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder)
        if done.returncode != 0:
            log = self.folder / "postgres.log"
            hint = f"\n{log.read_text()[-1500:]}" if log.exists() else ""
            raise TltoolkitError(
                f"PostgreSQL in {self.folder}: `{program}` failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-1500:]}{hint}"
            )
        return done.stdout


@dataclass
class TeamServer:
    """`mlflow server` on a PostgreSQL store with artifacts served through it; `start`, then `stop` (or `with`).

    Args:
        folder: Holds `postgres/` (without `backend_store_uri`) and `artifacts/` (without `artifacts`).
        backend_store_uri: An existing database (`postgresql+psycopg2://user:password@host/db`). Defaults to a
            PostgreSQL cluster of the server's own in `<folder>/postgres`.
        artifacts: Where the server keeps artifacts (a folder or an object store URI). Defaults to
            `<folder>/artifacts`.
        host, port: Where the server listens. Only loopback unless `allowed_hosts` names the hosts clients use.
        workers: MLflow's server workers (processes). Defaults to MLflow's.
    """

    folder: Path
    backend_store_uri: str | None = None
    artifacts: str | None = None
    host: str = "127.0.0.1"
    port: int = 5000
    allowed_hosts: str | None = None
    workers: int | None = None
    postgres: LocalPostgres | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{self.port}"

    def start(self, timeout: float = 180.0) -> str:
        """Starts PostgreSQL (if its own) and the MLflow server, whichever is not running; returns the server's URL
        once it answers."""
        check_exposure(self.host, self.allowed_hosts, "server")
        store = self.backend_store_uri
        if store is None:
            self.postgres = self.postgres or LocalPostgres(Path(self.folder) / "postgres")
            store = self.postgres.start()
        if store.startswith("postgresql") and importlib.util.find_spec("psycopg2") is None:
            raise TltoolkitError(
                "MLflow's server reaches PostgreSQL through psycopg2, which is not installed: "
                "pip install 'tltoolkit[server]' (or psycopg2-binary)."
            )
        if self.process is None or self.process.poll() is not None:
            check_port_free(self.host, self.port, "tracking server")
            log = Path(self.folder) / "mlflow-server.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            # Its own process group: the server's workers are stopped with it.
            self.process = subprocess.Popen(
                self.command(store), stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True
            )
            wait_until_serving(self.process, self.host, self.port, timeout, f"The tracking server (log: {log})")
        return self.url

    def command(self, store: str) -> list[str]:
        artifacts = self.artifacts or str((Path(self.folder) / "artifacts").resolve())
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store]
        command += ["--serve-artifacts", "--artifacts-destination", artifacts]
        command += ["--host", self.host, "--port", str(self.port)]
        if self.allowed_hosts:
            command += ["--allowed-hosts", with_ports(self.allowed_hosts, self.port)]
        if self.workers:
            command += ["--workers", str(self.workers)]
        return command

    def stop_mlflow(self) -> None:
        if self.process is not None:
            stop_group(self.process)

    def stop(self) -> None:
        """Stops the MLflow server, then PostgreSQL (if its own); runs, metrics and artifacts stay."""
        self.stop_mlflow()
        if self.postgres is not None:
            self.postgres.stop()

    def __enter__(self) -> TeamServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --- The server processes: exposure, ports, readiness, stopping (shared with `tltoolkit ui`). ---

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(host: str, allowed_hosts: str | None, what: str) -> None:
    """Binding beyond loopback must be deliberate: it needs the host names clients will use (MLflow checks them)."""
    if host not in LOOPBACK and not allowed_hosts:
        raise TltoolkitError(
            f"Binding the {what} to {host} exposes every run to the network; pass --allowed-hosts with the host "
            "names clients will use (e.g. --allowed-hosts myserver.example.com) to do it deliberately."
        )


def with_ports(allowed_hosts: str, port: int) -> str:
    """MLflow compares the whole Host header, port included: each plain name is allowed with and without `port`,
    and the loopback names stay allowed, so the page this command announces keeps working.

    Example:
        >>> with_ports("box.example.com, 10.0.0.5:8080", 5000)
        'box.example.com,box.example.com:5000,10.0.0.5:8080,localhost,localhost:5000,127.0.0.1,127.0.0.1:5000'
    """
    names = [name.strip() for name in allowed_hosts.split(",") if name.strip()]
    hosts = []
    for name in [*names, "localhost", "127.0.0.1"]:
        hosts += [name] if ":" in name or "*" in name else [name, f"{name}:{port}"]
    return ",".join(dict.fromkeys(hosts))


def stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
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


def check_port_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # As servers bind: closed connections don't count.
        try:
            probe.bind((host, port))
        except OSError:
            raise TltoolkitError(
                f"Port {port} on {host} is taken (another {what}?); pass --port {port + 1}, or stop what uses it."
            ) from None


def wait_until_serving(process: subprocess.Popen, host: str, port: int, timeout: float, what: str) -> None:
    """Polls the server's health endpoint until it answers; raises if the server stops or never answers."""
    deadline = time.monotonic() + timeout
    url = f"http://{'localhost' if host in ('0.0.0.0', '::') else host}:{port}/health"
    while True:
        if process.poll() is not None:
            raise TltoolkitError(f"{what} stopped (exit status {process.returncode}) before serving; see above.")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TltoolkitError(f"{what} did not answer at {url} within {timeout:.0f} s.")
        time.sleep(0.5)
