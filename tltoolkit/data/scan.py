"""Scanning image folders: find classes and files, check every file once, report what is skipped and why."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tltoolkit.data.images import UnreadableImage, read_image, skip_reason
from tltoolkit.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class ScanResult:
    """Checked image files and the files skipped on the way."""

    images: list[str] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


def skipped_frame(skipped: list[SkippedFile]) -> pd.DataFrame:
    """The skipped-files report as a table (columns `path`, `reason`)."""
    return pd.DataFrame([(s.path, s.reason) for s in skipped], columns=["path", "reason"])


def list_files(folder: Path) -> list[Path]:
    """Every file under `folder`, at any depth, sorted so scans are reproducible."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        files.extend(Path(dirpath) / name for name in sorted(filenames))
    return files


def check_files(files: list[Path], progress: bool = True, workers: int | None = None) -> ScanResult:
    """Decodes every file once, in parallel (Pillow releases the GIL), keeping order.

    Args:
        files: The candidate files.
        progress: Show a progress bar. Defaults to `True`.
        workers: Threads. Defaults to twice the CPU count, at most 16.

    Returns:
        The files that decode as images, and the others with the reason each was skipped.
    """
    result = ScanResult()
    if not files:
        return result
    bar = None
    if progress and len(files) > 1:
        from keras.utils import Progbar

        print(f"Checking {len(files)} files...")
        bar = Progbar(len(files), unit_name="file")

    def check(path: Path) -> str | None:
        reason = skip_reason(path)
        if reason is None:
            try:
                read_image(path)
            except UnreadableImage as exc:
                reason = exc.reason
        return reason

    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (path, reason) in enumerate(zip(files, pool.map(check, files)), start=1):
            if reason is None:
                result.images.append(str(path))
            else:
                result.skipped.append(SkippedFile(str(path), reason))
            if bar is not None and (done % 32 == 0 or done == len(files)):
                bar.update(done)
    return result


def _class_dirs(root: Path) -> tuple[list[Path], list[SkippedFile]]:
    """Class folders directly under `root`; stray files at the top are reported as skipped."""
    dirs, stray = [], []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            if entry.name.startswith(".") or entry.name == "__MACOSX":
                stray.extend(SkippedFile(str(f), skip_reason(f) or "hidden folder") for f in list_files(entry))
            else:
                dirs.append(entry)
        elif entry.is_file():
            stray.append(SkippedFile(str(entry), skip_reason(entry) or "not inside a class folder"))
    return dirs, stray


def scan_class_folders(root: Path, progress: bool = True) -> tuple[list[str], list[tuple[str, int]], list[SkippedFile]]:
    """Scans a class-per-subfolder tree.

    Returns:
        Class names (sorted folder names), `(path, label index)` pairs, and the skipped files.

    Raises:
        DataError: `root` is missing or has no class folders, or a class folder holds no usable image.
    """
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist or is not a folder; pass --data with a folder of class subfolders.")
    dirs, skipped = _class_dirs(root)
    if not dirs:
        raise DataError(
            f"Image folder {root} has no class subfolders; put each class's images in its own subfolder "
            f"({root}/cats/*.jpg, {root}/dogs/*.jpg)."
        )
    names = [d.name for d in dirs]
    files = [(f, label) for label, d in enumerate(dirs) for f in list_files(d)]
    checked = check_files([f for f, _ in files], progress=progress)
    skipped.extend(checked.skipped)
    good = set(checked.images)
    items = [(str(f), label) for f, label in files if str(f) in good]
    empty = [str(d) for label, d in enumerate(dirs) if not any(lab == label for _, lab in items)]
    if empty:
        raise DataError(
            f"Class folder(s) {', '.join(empty)} hold no usable image ({len(skipped)} file(s) skipped in {root}); "
            "add images or remove the folder."
        )
    return names, items, skipped
