"""The toolkit's cache folder: converted weights, downloaded wheels, scan results. Safe to delete at any time."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TLTOOLKIT_CACHE_DIR"


def cache_dir() -> Path:
    """`$TLTOOLKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/tltoolkit`, else `~/.cache/tltoolkit` (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tltoolkit"
