"""Scanning image folders: find classes and files, check every file once, report what is skipped and why."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tltoolkit.data.images import UnreadableImage, read_image, skip_reason
from tltoolkit.errors import DataError

SPLITS = ("train", "val", "test")

_logger = logging.getLogger(__name__)


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


# Bump when what `check_files` accepts or rejects changes, so cached verdicts from older rules are not reused.
SCAN_VERSION = 1


class ScanCache:
    """Verdicts of earlier scans, keyed by path, size and modification time: an unchanged file is not decoded again.

    One JSON file per scanned folder in `<cache dir>/scans/`. A file whose size or mtime changed is checked again;
    a damaged or foreign cache file is ignored (and rewritten).

    Args:
        root: The folder the files are under (names the cache file).
        folder: Where cache files go. Defaults to `<tltoolkit cache>/scans`.
    """

    def __init__(self, root: Path, folder: Path | None = None):
        from tltoolkit.cache import cache_dir

        key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
        self.path = (folder or cache_dir() / "scans") / f"{key}.json"
        self.entries: dict[str, list] = {}
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("version") == SCAN_VERSION:
                self.entries = saved["files"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass

    @staticmethod
    def signature(path: Path) -> list:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def get(self, path: Path) -> tuple[bool, str | None]:
        """`(known, reason)`: whether an unchanged verdict exists, and the skip reason it holds (`None`: usable)."""
        entry = self.entries.get(str(path))
        try:
            if entry is not None and entry[:2] == self.signature(path):
                return True, entry[2]
        except OSError:
            pass
        return False, None

    def put(self, path: Path, reason: str | None) -> None:
        try:
            self.entries[str(path)] = [*self.signature(path), reason]
        except OSError:  # Vanished since: nothing to remember.
            pass

    def save(self) -> None:
        """Writes atomically; a cache that cannot be written (read-only home) only costs the next scan's time."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temporary.write_text(json.dumps({"version": SCAN_VERSION, "files": self.entries}))
            os.replace(temporary, self.path)
        except OSError:
            pass


def check_files(
    files: list[Path], progress: bool = True, workers: int | None = None, cache: ScanCache | None = None
) -> ScanResult:
    """Decodes every file once, in parallel (Pillow releases the GIL), keeping order.

    Args:
        files: The candidate files.
        progress: Show a progress bar. Defaults to `True`.
        workers: Threads. Defaults to twice the CPU count, at most 16.
        cache: Earlier verdicts; files unchanged since (same size and mtime) are not decoded again, and the new
            verdicts are saved to it.

    Returns:
        The files that decode as images, and the others with the reason each was skipped.
    """
    result = ScanResult()
    if not files:
        return result
    known = {f: cache.get(f) for f in files} if cache is not None else {}
    todo = [f for f in files if not known.get(f, (False, None))[0]]
    bar = None
    if progress and len(todo) > 1:
        from keras.utils import Progbar

        reused = len(files) - len(todo)
        _logger.info(
            "Checking %d files%s", len(todo), f" ({reused} unchanged since the last scan)..." if reused else "..."
        )
        bar = Progbar(len(todo), unit_name="file")

    def check(path: Path) -> str | None:
        reason = skip_reason(path)
        if reason is None:
            try:
                read_image(path)
            except UnreadableImage as exc:
                reason = exc.reason
        return reason

    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    verdicts: dict[Path, str | None] = {f: known[f][1] for f in files if known.get(f, (False, None))[0]}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, (path, reason) in enumerate(zip(todo, pool.map(check, todo)), start=1):
            verdicts[path] = reason
            if cache is not None:
                cache.put(path, reason)
            if bar is not None and (done % 32 == 0 or done == len(todo)):
                bar.update(done)
    if cache is not None and todo:
        cache.save()
    for path in files:
        if verdicts[path] is None:
            result.images.append(str(path))
        else:
            result.skipped.append(SkippedFile(str(path), verdicts[path]))
    return result


def _class_dirs(root: Path) -> tuple[list[Path], list[SkippedFile]]:
    """Class folders directly under `root`; stray files at the top and linked class folders are reported as skipped."""
    dirs, stray = [], []
    for entry in sorted(_entries(root)):
        if entry.is_symlink() and entry.is_dir():
            stray.append(
                SkippedFile(
                    str(entry),
                    f"a link to the folder {entry.resolve()}, not a class folder: its images could belong to other "
                    "classes (`ln -s . x` would make a class of every image); move the folder here instead",
                )
            )
        elif entry.is_dir():
            if entry.name.startswith(".") or entry.name == "__MACOSX":
                stray.extend(SkippedFile(str(f), skip_reason(f) or "hidden folder") for f in list_files(entry))
            else:
                dirs.append(entry)
        elif entry.is_file():
            stray.append(SkippedFile(str(entry), skip_reason(entry) or "not inside a class folder"))
    return dirs, stray


def _entries(folder: Path) -> list[Path]:
    """The entries of `folder`; one that cannot be listed is a `DataError` naming it."""
    try:
        return list(folder.iterdir())
    except OSError as exc:
        raise DataError(
            f"Cannot read the folder {folder} ({exc.strerror or type(exc).__name__}); fix its permissions (e.g. "
            f"chmod u+rx '{folder}') or move it out of the data folder."
        ) from None


def class_files(folder: Path, root: Path) -> tuple[list[Path], list[SkippedFile]]:
    """Every file under a class folder, at any depth, sorted; links are followed only where they stay inside `root`.

    A link that leaves `root`, is broken, or leads back to a folder already walked (a loop) is reported, never
    silently dropped: the files used plus the entries skipped account for everything in the folder.
    """
    base, files, skipped, walked = root.resolve(), [], [], set()

    def walk(directory: Path) -> None:
        real = directory.resolve()
        if real in walked:
            skipped.append(SkippedFile(str(directory), f"a link back to {real}, already scanned (a loop)"))
            return
        walked.add(real)
        for entry in sorted(_entries(directory), key=lambda e: e.name):
            if entry.is_symlink():
                target = entry.resolve()
                if not target.exists():
                    skipped.append(SkippedFile(str(entry), f"a broken link (to {target})"))
                    continue
                if not target.is_relative_to(base):
                    skipped.append(
                        SkippedFile(str(entry), f"a link to {target}, outside {root}: copy or move it inside")
                    )
                    continue
            if entry.is_dir():
                walk(entry)
            elif entry.is_file():
                files.append(entry)

    walk(folder)
    return files, skipped


def _distinct_files(
    files: list[tuple[Path, int]], root: Path, names: list[str]
) -> tuple[list[tuple[Path, int]], list[SkippedFile]]:
    """Each file once: a second path to the same file (through a link) is skipped, naming the first; files reached
    without a link come first, so the link is the one skipped. The same image never carries two labels."""
    base = root.resolve()

    def through_link(path: Path) -> bool:
        return path.resolve().relative_to(base) != path.relative_to(root)

    first: dict[Path, tuple[Path, int]] = {}
    skipped: dict[int, SkippedFile] = {}
    for index in sorted(range(len(files)), key=lambda i: through_link(files[i][0])):
        path, label = files[index]
        real = path.resolve()
        if real not in first:
            first[real] = (path, label)
            continue
        other, other_label = first[real]
        clash = (
            f", which is class {names[other_label]!r}: one image cannot carry two labels"
            if other_label != label
            else ""
        )
        skipped[index] = SkippedFile(str(path), f"the same file as {other} (through a link){clash}")
    kept = [item for index, item in enumerate(files) if index not in skipped]
    return kept, [skipped[index] for index in sorted(skipped)]


def require_folder(root: str | Path) -> Path:
    """`root` as a path, checked to be a folder (before anything slow starts).

    Raises:
        DataError: It is missing or a file.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"Image folder {root} does not exist or is not a folder; pass --data with a folder of class subfolders."
        )
    return root


def scan_class_folders(root: Path, progress: bool = True) -> tuple[list[str], list[tuple[str, int]], list[SkippedFile]]:
    """Scans a class-per-subfolder tree.

    Returns:
        Class names (sorted folder names), `(path, label index)` pairs, and the skipped files.

    Raises:
        DataError: `root` is missing or has no class folders, or a class folder holds no usable image.
    """
    require_folder(root)
    dirs, skipped = _class_dirs(root)
    if not dirs:
        raise DataError(
            f"Image folder {root} has no class subfolders; put each class's images in its own subfolder "
            f"({root}/cats/*.jpg, {root}/dogs/*.jpg)."
        )
    names = [d.name for d in dirs]
    files = []
    for label, folder in enumerate(dirs):
        found, refused = class_files(folder, root)
        files.extend((f, label) for f in found)
        skipped.extend(refused)
    files, duplicates = _distinct_files(files, root, names)
    skipped.extend(duplicates)
    checked = check_files([f for f, _ in files], progress=progress, cache=ScanCache(root))
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
