"""Riding out a tracking store that stops answering for a while (a server restart, a full disk) during training.

MLflow's client either retries for minutes inside one call (blocking the training) or, as `connect` sets it up for a
server, fails at once. Neither fits an epoch's metrics: the checkpoint already holds them, so training can go on and
they can be sent later. `EpochSender` queues what could not be sent, tries again at every epoch's end, and gives
up with one clear `TrackingError` once the store has not answered for `patience_s` (the checkpoint keeps every
epoch, and `--resume` logs the missing ones). Nothing here retries inside MLflow; each send is one `log_batch` call
to one run, so a retried epoch is logged once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tltoolkit.errors import TrackingError

_logger = logging.getLogger(__name__)

# How long the store may stay unreachable while training goes on; TLTOOLKIT_TRACKING_PATIENCE_S sets it.
PATIENCE_S = 300.0
_SIGNS = (
    "connection",
    "connect",
    "timed out",
    "timeout",
    "max retries",
    "temporarily unavailable",
    "service unavailable",
    "bad gateway",
    "database is locked",
    "disk is full",
    "disk i/o error",
    "no space left",
    "unable to open database",
)


def unreachable(error: BaseException) -> bool:
    """Whether `error` says the store did not answer (network, server down, locked or full disk), not that the
    request was wrong."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(error).__name__}: {error}".lower()
    return any(sign in text for sign in _SIGNS)


def gave_up(where: str, seconds: float, error: str) -> TrackingError:
    """The one message a run stops with when the store stayed away too long."""
    return TrackingError(
        f"The tracking store {where} has not answered for {seconds:.0f} s ({error}), so training stopped; every "
        "finished epoch is in the checkpoint. When the store is back, run the same command plus --resume: what it "
        "missed is logged from the checkpoint."
    )


def patience_s() -> float:
    return float(os.environ.get("TLTOOLKIT_TRACKING_PATIENCE_S", PATIENCE_S))


@dataclass
class EpochSender:
    """Sends `(run id, what)` items in order through `send`, keeping the ones the store did not take.

    Args:
        send: Logs one item to one run (one MLflow call).
        where: Names the store in messages.
        patience_s: How long the store may stay unreachable before `flush` raises. Defaults to `patience_s()`.
    """

    send: Callable[[str, object], None]
    where: str
    patience: float = field(default_factory=patience_s)
    pending: list[tuple[str, object]] = field(default_factory=list)
    down_since: float | None = None
    last_error: str = ""

    def add(self, run_id: str, item: object) -> None:
        self.pending.append((run_id, item))

    def flush(self, wait: bool = False) -> None:
        """Sends what is pending, oldest first. While the store does not answer, returns (training goes on) or, with
        `wait` (a stage's end, where the next calls need the store), retries with backoff; past the patience,
        raises `TrackingError`."""
        delay = 1.0
        while self.pending:
            run_id, item = self.pending[0]
            try:
                self.send(run_id, item)
            except Exception as exc:
                if not unreachable(exc):
                    raise
                self._note_outage(exc)
                if not wait:
                    return
                time.sleep(min(delay, max(0.0, self.down_since + self.patience - time.monotonic()) + 0.01))
                delay = min(delay * 2, 30.0)
                continue
            self.pending.pop(0)
        if self.down_since is not None:
            _logger.warning("The tracking store %s answers again; what it missed has been sent.", self.where)
            self.down_since = None

    def _note_outage(self, exc: Exception) -> None:
        now = time.monotonic()
        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if self.down_since is None:
            self.down_since = now
            _logger.warning(
                "The tracking store %s does not answer (%s). Training goes on; every epoch is in the checkpoint and "
                "is sent once the store answers (waiting up to %.0f s; TLTOOLKIT_TRACKING_PATIENCE_S).",
                self.where,
                self.last_error,
                self.patience,
            )
        if now - self.down_since >= self.patience:
            raise gave_up(self.where, now - self.down_since, self.last_error)


class PatientClient:
    """An `MlflowClient` whose calls wait for a store that does not answer (retrying with backoff) for up to the
    patience, then raise one `TrackingError`: for what a run logs outside its epochs (a stage's end, the final
    scores), where training cannot go on without the answer. A call the store refused for another reason raises at
    once. `raw` is the client itself (for calls that must not wait, as marking a failing run)."""

    def __init__(self, client, where: str, patience: float | None = None):
        self.raw, self.where = client, where
        self.patience = patience_s() if patience is None else patience

    def __getattr__(self, name: str):
        method = getattr(self.raw, name)
        if not callable(method):
            return method

        def call(*args, **kwargs):
            started, delay = None, 0.5
            while True:
                try:
                    return method(*args, **kwargs)
                except Exception as exc:
                    if not unreachable(exc):
                        raise
                    now = time.monotonic()
                    if started is None:
                        started = now
                        _logger.warning(
                            "The tracking store %s does not answer (%s: %s); waiting up to %.0f s.",
                            self.where,
                            type(exc).__name__,
                            str(exc).splitlines()[0][:200] if str(exc) else "",
                            self.patience,
                        )
                    if now - started >= self.patience:
                        raise gave_up(self.where, now - started, type(exc).__name__) from None
                    time.sleep(min(delay, max(0.0, started + self.patience - now) + 0.01))
                    delay = min(delay * 2, 30.0)

        return call
