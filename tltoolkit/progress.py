"""Progress of a long loop (scanning, decoding into a cache, extracting features, predicting, auditing).

On a terminal Keras's own progress bar (`keras.utils.Progbar`); elsewhere (a log file, CI, a notebook's captured
output) a log line every 10 seconds and one at the end, with the rate, since a bar redrawn in a file is noise.
Either shows only where the `tltoolkit` log shows information (the CLI without `-q`, or a program that configured
logging): a library call stays silent by default.
"""

from __future__ import annotations

import logging
import sys
import time

_logger = logging.getLogger(__name__)

EVERY_S = 10.0


class Progress:
    """Counts `done` of `total` items and shows it.

    Args:
        total: Items in all.
        unit: What an item is, for the messages (`images`, `files`).
        verbose: Show anything at all. Defaults to `True`.
        logger: Where the lines go when there is no terminal. Defaults to this module's.

    Example:
        >>> progress = Progress(3, "files", verbose=False)
        >>> for _ in range(3):
        ...     progress.advance()
        >>> progress.done, progress.rate() > 0
        (3, True)
    """

    def __init__(self, total: int, unit: str = "images", verbose: bool = True, logger: logging.Logger = _logger):
        self.total, self.unit, self.logger = max(0, int(total)), unit, logger
        self.done = 0
        self.started = self._last = time.perf_counter()
        self._bar = None
        verbose = verbose and logger.isEnabledFor(logging.INFO)
        if verbose and self.total > 1 and sys.stdout.isatty():
            from keras.utils import Progbar

            self._bar = Progbar(self.total, unit_name=unit.rstrip("s") or unit)
        self._lines = verbose and self._bar is None

    def advance(self, count: int = 1) -> None:
        """`count` more items are done."""
        self.update(self.done + count)

    def update(self, done: int) -> None:
        """`done` items are done in all."""
        self.done = min(self.total, int(done)) if self.total else int(done)
        now = time.perf_counter()
        if self._bar is not None:
            if self.done == self.total or now - self._last > 0.2:  # Redrawing per item costs more than the item.
                self._bar.update(self.done)
                self._last = now
        elif self._lines and (now - self._last > EVERY_S or self.done == self.total):
            self._last = now
            self.logger.info(
                "  %s/%s %s, %.1f %s/s", f"{self.done:,}", f"{self.total:,}", self.unit, self.rate(), self.unit
            )

    def rate(self) -> float:
        """Items per second so far."""
        return self.done / max(time.perf_counter() - self.started, 1e-9)
