"""SIGTERM handled like Ctrl-C, so `kill PID` (or a scheduler's stop) ends a run cleanly: runs marked KILLED,
checkpoint kept, and a message saying how to resume. Without this, SIGTERM ends Python at once and MLflow's runs
stay RUNNING."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupts_raise():
    """Within the block, SIGTERM raises `KeyboardInterrupt` in the main thread (as SIGINT already does)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Signal handlers can only be set from the main thread; elsewhere the caller's handling stands.
        return

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
