"""`tltoolkit cache`: what the tltoolkit cache folder holds (disk caches of images and features, scan verdicts,
converted weights, wheels), and clearing it."""

from __future__ import annotations

import logging
import time

import pandas as pd

from tltoolkit import cache as cache_folder

_logger = logging.getLogger(__name__)


def cache_entries() -> pd.DataFrame:
    """One row per entry, least recently used first: `kind`, `what`, `size_mb`, `last_used`, `in_use`, `path`."""
    rows = [
        {
            "kind": entry.kind,
            "what": entry.what,
            "size_mb": round(entry.bytes / 1e6, 2),
            "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used)),
            "in_use": entry.in_use,
            "path": str(entry.path),
        }
        for entry in cache_folder.entries()
    ]
    return pd.DataFrame(rows, columns=["kind", "what", "size_mb", "last_used", "in_use", "path"])


def clear_cache(everything: bool = False) -> tuple[int, int]:
    """Removes the disk caches and scan verdicts (`everything`: converted weights and downloaded wheels too, which
    the next run fetches again); entries a running process holds stay. Returns `(entries, bytes)` removed."""
    kinds = cache_folder.KINDS if everything else cache_folder.DEFAULT_CLEAR
    removed, freed = cache_folder.clear(kinds)
    _logger.info(
        "Removed %d cache entr%s (%.1f MB) from %s.",
        removed,
        "y" if removed == 1 else "ies",
        freed / 1e6,
        cache_folder.cache_dir(),
    )
    return removed, freed
