"""`tltoolkit scan`: check an image folder as training would (classes, every file decoded once, the split), without
training: what is used, what is skipped and why."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tltoolkit.data import ImageFolder, prepare_data

_logger = logging.getLogger(__name__)


def scan(
    data: str | Path,
    val_split: float = 0.2,
    seed: int = 42,
    manifest: str | Path | None = None,
    skipped: str | Path | None = None,
    progress: bool = True,
) -> ImageFolder:
    """Scans `data` as `run` would: class folders (or train/ + val/ [+ test/]), each file checked once (verdicts
    cached: a second scan decodes only new or changed files), the seeded split.

    Args:
        data: The image folder.
        val_split: As the recipe's `data.val_split`. Defaults to 0.2.
        seed: As the recipe's `seed`. Defaults to 42.
        manifest: Also write every used file with its class and part here (CSV: `path,label,class,split`).
        skipped: Also write the skipped files with the reason here (CSV: `path,reason`).
        progress: Show the check's progress. Defaults to `True`.

    Returns:
        The `ImageFolder`: classes, parts, skipped files.
    """
    started = time.perf_counter()
    folder = prepare_data(data, val_split, seed, progress=progress)
    seconds = time.perf_counter() - started
    files = sum(len(items) for items in folder.parts.values()) + len(folder.skipped)
    _logger.info("%s\nScanned %s files in %.1f s.", folder.summary(), f"{files:,}", seconds)
    if manifest:
        folder.manifest().to_csv(manifest, index=False)
        _logger.info("Wrote the manifest of %s used files to %s.", f"{files - len(folder.skipped):,}", manifest)
    if skipped:
        folder.skipped_frame().to_csv(skipped, index=False)
        _logger.info("Wrote the %d skipped file(s) to %s.", len(folder.skipped), skipped)
    return folder
