"""Which process owns a run, so runs whose process died (SIGKILL, a crash, a power cut) do not stay RUNNING forever.

Every run tltoolkit starts is tagged `tltoolkit.process` = `host:pid:start`, where `start` is the process's start
time as the kernel counts it (so a pid reused by a later process is not mistaken for the owner). When the toolkit
next connects to the store, RUNNING runs tagged with this host whose process is gone are marked KILLED. Runs of other
hosts are left alone: from here their pid cannot be checked; their lease (a heartbeat file in the run's checkpoint
folder, see `heartbeat`) says whether they still train.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

_logger = logging.getLogger(__name__)

PROCESS_TAG = "tltoolkit.process"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or "" where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()  # Field 22 of stat(5), counted after the command name.
    except (OSError, IndexError):
        return ""


def process_tag() -> str:
    """`host:pid:start` of this process."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def is_alive(tag: str) -> bool | None:
    """Whether the process a tag names still runs: `None` when it ran on another host (unknowable from here)."""
    host, _, rest = tag.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Someone else's live process.
        pass
    return not start or _start_time(pid) in ("", start)


def mark_dead_runs_killed(client, keep: set[str] = frozenset()) -> list[str]:
    """Marks KILLED every RUNNING run this host started whose process is gone; returns their ids.

    Args:
        client: An `MlflowClient` on the store.
        keep: Run ids to leave alone (the runs about to be resumed).
    """
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        experiments,
        filter_string=f"attributes.status = 'RUNNING' and tags.`{PROCESS_TAG}` LIKE '{host}:%'",
        max_results=5000,
    )
    killed = []
    for run in runs:
        if run.info.run_id in keep or is_alive(run.data.tags.get(PROCESS_TAG, "")) is not False:
            continue
        client.set_terminated(run.info.run_id, "KILLED")
        killed.append(run.info.run_id)
    if killed:
        _logger.info(
            "Marked %d run(s) KILLED whose process had died: %s.", len(killed), ", ".join(r[:8] for r in killed)
        )
    return killed


# A run's lease: its process rewrites `lease.json` in the run's checkpoint folder every LEASE_BEAT_S seconds while it
# trains, so a process on another host (which cannot see the owner's pid) can tell a live run from a dead one.
LEASE_FILE = "lease.json"
LEASE_BEAT_S = 20.0


def lease_timeout_s() -> float:
    """How old a lease may be and still mean a live owner: TLTOOLKIT_LEASE_TIMEOUT_S, default 90 s (4 beats)."""
    return float(os.environ.get("TLTOOLKIT_LEASE_TIMEOUT_S", 90))


@contextlib.contextmanager
def heartbeat(folder: Path, interval: float = LEASE_BEAT_S):
    """Holds the lease in `folder` while the block runs: written now and every `interval` seconds by a daemon
    thread (atomically), dropped at the end."""
    path, stop = Path(folder) / LEASE_FILE, threading.Event()

    def beat() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{LEASE_FILE}.{os.getpid()}")
            temporary.write_text(json.dumps({"owner": process_tag(), "heartbeat": time.time()}))
            os.replace(temporary, path)
        except OSError as exc:  # A full disk must not stop training; the lease just ages.
            _logger.debug("Could not renew the lease in %s: %s", folder, exc)

    def loop() -> None:
        while not stop.wait(interval):
            beat()

    beat()
    thread = threading.Thread(target=loop, name="tltoolkit-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        path.unlink(missing_ok=True)


def live_lease(folder: Path) -> tuple[str, float] | None:
    """`(owner, seconds since its last beat)` when the lease in `folder` is younger than `lease_timeout_s()`."""
    try:
        lease = json.loads((Path(folder) / LEASE_FILE).read_text())
        owner, age = str(lease["owner"]), time.time() - float(lease["heartbeat"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (owner, age) if age < lease_timeout_s() else None
