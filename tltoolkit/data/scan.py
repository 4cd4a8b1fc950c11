"""Scanning image folders: find classes and files, check every file once, report what is skipped and why."""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from tltoolkit.data.images import UnreadableImage, read_image, skip_reason
from tltoolkit.errors import DataError
from tltoolkit.progress import Progress

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
CHUNK = 4096  # Files checked per round: what is in flight (paths, futures, verdicts) stays this small.


class ScanCache:
    """Verdicts of earlier scans, keyed by path, size and modification time: an unchanged file is not decoded again.

    One SQLite database per scanned folder in `<cache dir>/scans/` (the standard library's `sqlite3`: a million
    verdicts are looked up and written in chunks, never loaded whole). A file whose size or mtime changed is checked
    again; a damaged or foreign database is ignored (and replaced); one that cannot be written (a read-only home)
    only costs the next scan's time.

    Args:
        root: The folder the files are under (names the database).
        folder: Where databases go. Defaults to `<tltoolkit cache>/scans`.
    """

    def __init__(self, root: Path, folder: Path | None = None):
        import sqlite3

        from tltoolkit.cache import cache_dir

        key = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:24]
        self.path = (folder or cache_dir() / "scans") / f"{key}.sqlite"
        self._db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS verdicts (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, reason TEXT)"
            )
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (version INTEGER)")
            version = self._db.execute("SELECT version FROM meta").fetchone()
            if version is None or version[0] != SCAN_VERSION:
                self._db.execute("DELETE FROM verdicts")
                self._db.execute("DELETE FROM meta")
                self._db.execute("INSERT INTO meta VALUES (?)", (SCAN_VERSION,))
            self._db.commit()
        except (OSError, sqlite3.Error):
            self._db = None  # No cache: every file is checked.

    def known(self, files: list[str], signatures: list) -> list[tuple[bool, str | None]]:
        """For each file (with its `[size, mtime_ns]`, or `None` where it cannot be stat'ed): `(known, reason)`,
        whether an unchanged verdict exists and the skip reason it holds (`None`: usable)."""
        import sqlite3

        found: dict[str, tuple] = {}
        if self._db is not None:
            try:
                for first in range(0, len(files), 900):  # SQLite's parameter limit.
                    chunk = files[first : first + 900]
                    marks = ",".join("?" * len(chunk))
                    query = f"SELECT path, size, mtime, reason FROM verdicts WHERE path IN ({marks})"
                    found.update((row[0], row[1:]) for row in self._db.execute(query, chunk))
            except sqlite3.Error:
                found = {}
        answers = []
        for path, signature in zip(files, signatures):
            entry = found.get(path)
            answers.append((True, entry[2]) if entry and signature and list(entry[:2]) == signature else (False, None))
        return answers

    def put(self, rows: list[tuple[str, list, str | None]]) -> None:
        """Records `(path, [size, mtime_ns], reason)` verdicts (files that vanished meanwhile have no signature)."""
        import sqlite3

        if self._db is None:
            return
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?)",
                [(path, sig[0], sig[1], reason) for path, sig, reason in rows if sig],
            )
        except sqlite3.Error:
            self._db = None

    def save(self) -> None:
        import sqlite3

        if self._db is None:
            return
        try:
            self._db.commit()
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._db is not None:
            self.save()
            self._db.close()
            self._db = None


def signature(path: str) -> list | None:
    """`[size, mtime_ns]` of a file, or `None` if it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _check(path: str) -> str | None:
    """Why `path` is not a usable image (decoded in full), or `None`."""
    path = Path(path)
    reason = skip_reason(path)
    if reason is None:
        try:
            read_image(path)
        except UnreadableImage as exc:
            reason = exc.reason
    return reason


def check_files(
    files: list, progress: bool = True, workers: int | None = None, cache: ScanCache | None = None
) -> ScanResult:
    """Decodes every file once, in parallel (Pillow releases the GIL), keeping order; in chunks, so the paths,
    tasks and verdicts in flight stay few however many files there are.

    Args:
        files: The candidate files (paths or strings).
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
    if progress and len(files) > 1:
        _logger.info("Checking %s files...", f"{len(files):,}")
    bar = Progress(len(files), "files", progress and len(files) > 1)
    workers = workers or min(16, 2 * (os.cpu_count() or 1))
    reused = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for first in range(0, len(files), CHUNK):
            chunk = [str(f) for f in files[first : first + CHUNK]]
            signatures = list(pool.map(signature, chunk))
            known = cache.known(chunk, signatures) if cache is not None else [(False, None)] * len(chunk)
            todo = [path for path, (seen, _) in zip(chunk, known) if not seen]
            verdicts = dict(zip(todo, pool.map(_check, todo)))
            if cache is not None and todo:
                cache.put([(p, sig, verdicts[p]) for p, sig, (seen, _) in zip(chunk, signatures, known) if not seen])
            reused += len(chunk) - len(todo)
            for path, (seen, reason) in zip(chunk, known):
                reason = reason if seen else verdicts[path]
                if reason is None:
                    result.images.append(path)
                else:
                    result.skipped.append(SkippedFile(path, reason))
            bar.update(first + len(chunk))
    if cache is not None:
        cache.save()
    if progress and reused:
        _logger.info("  %s of them unchanged since the last scan: not decoded again.", f"{reused:,}")
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


def class_files(folder: Path, root: Path) -> tuple[list[str], list[SkippedFile], bool]:
    """Every file under a class folder, at any depth, sorted; links are followed only where they stay inside `root`.

    A link that leaves `root`, is broken, or leads back to a folder already walked (a loop) is reported, never
    silently dropped: the files used plus the entries skipped account for everything in the folder. Returns the
    files (as strings: a million `Path` objects would take gigabytes), the skipped entries, and whether any link was
    followed (without one, no file can be reached twice).
    """
    base, files, skipped, walked, linked = root.resolve(), [], [], set(), []

    def walk(directory: str) -> None:
        real = os.path.realpath(directory)
        if real in walked:
            skipped.append(SkippedFile(directory, f"a link back to {real}, already scanned (a loop)"))
            return
        walked.add(real)
        for entry in sorted(_scandir(Path(directory)), key=lambda e: e.name):
            if entry.is_symlink():
                linked.append(entry.path)
                target = Path(entry.path).resolve()
                if not target.exists():
                    skipped.append(SkippedFile(entry.path, f"a broken link (to {target})"))
                    continue
                if not target.is_relative_to(base):
                    skipped.append(
                        SkippedFile(entry.path, f"a link to {target}, outside {root}: copy or move it inside")
                    )
                    continue
            if entry.is_dir():
                walk(entry.path)
            elif entry.is_file():
                files.append(entry.path)

    walk(str(folder))
    return files, skipped, bool(linked)


def _scandir(folder: Path) -> list[os.DirEntry]:
    """The entries of `folder`; one that cannot be listed is a `DataError` naming it."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as exc:
        raise DataError(
            f"Cannot read the folder {folder} ({exc.strerror or type(exc).__name__}); fix its permissions (e.g. "
            f"chmod u+rx '{folder}') or move it out of the data folder."
        ) from None


def _distinct_files(
    files: list[tuple[str, int]], root: Path, names: list[str]
) -> tuple[list[tuple[str, int]], list[SkippedFile]]:
    """Each file once: a second path to the same file (through a link) is skipped, naming the first; files reached
    without a link come first, so the link is the one skipped. The same image never carries two labels."""
    base = root.resolve()

    def through_link(path: str) -> bool:
        return Path(path).resolve().relative_to(base) != Path(path).relative_to(root)

    first: dict[Path, tuple[str, int]] = {}
    skipped: dict[int, SkippedFile] = {}
    for index in sorted(range(len(files)), key=lambda i: through_link(files[i][0])):
        path, label = files[index]
        real = Path(path).resolve()
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


def data_digest(items: list[tuple[str, int]], root: str | Path | None = None) -> str:
    """Paths, labels, sizes and modification times: a changed, added or removed file changes the key.

    With `root`, paths count relative to it (resolved), so the same folder typed another way (absolute, relative,
    from another working directory) gives the same key.
    """
    base = Path(root).resolve() if root is not None else None
    digest = hashlib.blake2b(digest_size=16)
    for path, label in items:
        stat = os.stat(path)
        name = path
        if base is not None:
            resolved = Path(path).resolve()
            name = resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(resolved)
        digest.update(f"{name}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def content_digest(items: list[tuple[str, int]], labels: bool = False) -> str:
    """Absolute paths, sizes and modification times (and labels, with `labels`): what a cache of the files' decoded
    pixels, or of features computed from them, is keyed by, so any change to a file, or another folder, is another
    key.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path, label in items:
        stat = os.stat(path)
        digest.update(
            f"{os.path.abspath(path)}\0{label if labels else ''}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return digest.hexdigest()


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
    files, linked = [], False
    for label, folder in enumerate(dirs):
        found, refused, through = class_files(folder, root)
        files.extend((f, label) for f in found)
        skipped.extend(refused)
        linked = linked or through
    if linked:
        files, duplicates = _distinct_files(files, root, names)
        skipped.extend(duplicates)
    cache = ScanCache(root)
    try:
        checked = check_files([f for f, _ in files], progress=progress, cache=cache)
    finally:
        cache.close()
    skipped.extend(checked.skipped)
    good = set(checked.images)
    items = [(f, label) for f, label in files if f in good]
    used = {label for _, label in items}
    empty = [str(d) for label, d in enumerate(dirs) if label not in used]
    if empty:
        raise DataError(
            f"Class folder(s) {', '.join(empty)} hold no usable image ({len(skipped)} file(s) skipped in {root}); "
            "add images or remove the folder."
        )
    return names, items, skipped
