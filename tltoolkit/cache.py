"""The toolkit's cache folder: converted weights, downloaded wheels, scan verdicts, and the disk caches of decoded
images and features (`arrays/`). Safe to delete at any time; `tltoolkit cache clear` does it.

The disk caches are size-capped: before a new one is written, the least recently used ones that no running process
holds are removed until it fits under `TLTOOLKIT_CACHE_MAX_GB` (50 by default) and leaves the disk a margin free.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "TLTOOLKIT_CACHE_DIR"
MAX_GB_ENV = "TLTOOLKIT_CACHE_MAX_GB"
DEFAULT_MAX_GB = 50.0
# What `clear` removes by default: what runs make again by themselves (weights and wheels are fetched again).
KINDS = ("arrays", "scans", "weights", "wheels")
DEFAULT_CLEAR = ("arrays", "scans")
IN_USE = ".in-use-"  # `<entry>/.in-use-<pid>`: a process reads this entry; it is not evicted under it.


def cache_dir() -> Path:
    """`$TLTOOLKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/tltoolkit`, else `~/.cache/tltoolkit` (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tltoolkit"


def arrays_dir() -> Path:
    """Where the disk caches of decoded images and features live."""
    return cache_dir() / "arrays"


def max_bytes() -> int:
    """The disk caches' cap: `$TLTOOLKIT_CACHE_MAX_GB` gigabytes (50 by default)."""
    text = os.environ.get(MAX_GB_ENV, "")
    try:
        gigabytes = float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        gigabytes = DEFAULT_MAX_GB
    return int(max(gigabytes, 0.0) * 1e9)


def free_floor(folder: Path) -> int:
    """Bytes the disk caches leave free on `folder`'s disk: 5% of it, at least 1 GB."""
    return max(int(1e9), int(0.05 * shutil.disk_usage(folder).total))


@dataclass(frozen=True)
class CacheEntry:
    """One thing in the cache folder."""

    kind: str  # "arrays", "scans", "weights", "wheels".
    path: Path
    bytes: int
    last_used: float  # Seconds since the epoch.
    what: str  # For the listing: a disk cache's description, else the file name.

    @property
    def in_use(self) -> bool:
        """Whether a live process holds it (disk caches only)."""
        return self.path.is_dir() and any(_alive(p) for p in self.path.glob(f"{IN_USE}*"))


def entries(kinds: tuple[str, ...] = KINDS) -> list[CacheEntry]:
    """What the cache folder holds, least recently used first."""
    found = []
    for kind in kinds:
        folder = cache_dir() / kind
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith("."):
                continue
            try:
                found.append(_entry(kind, path))
            except OSError:  # Removed meanwhile.
                continue
    return sorted(found, key=lambda entry: entry.last_used)


def _entry(kind: str, path: Path) -> CacheEntry:
    if not path.is_dir():
        stat = path.stat()
        return CacheEntry(kind, path, stat.st_size, stat.st_mtime, path.name)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    meta = path / "meta.json"
    what, used = path.name, path.stat().st_mtime
    if meta.exists():
        used = meta.stat().st_mtime  # Touched each time the entry is opened.
        try:
            what = json.loads(meta.read_text()).get("what", what)
        except ValueError:
            pass
    return CacheEntry(kind, path, size, used, what)


def cannot_hold(nbytes: int) -> str | None:
    """Why a new disk cache of `nbytes` cannot be written (the folder is not writable, it exceeds the cap, the disk
    is too full even after removing the unused caches), or `None` if it can."""
    folder = arrays_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"the cache folder {folder} is not writable ({exc.strerror or type(exc).__name__}; set {CACHE_ENV})"
    cap = max_bytes()
    if nbytes > cap:
        return f"{nbytes / 1e9:.1f} GB exceed the disk cache's cap of {cap / 1e9:.1f} GB ({MAX_GB_ENV})"
    evictable = sum(e.bytes for e in entries(("arrays",)) if not e.in_use)
    room = shutil.disk_usage(folder).free - free_floor(folder) + evictable
    if nbytes > room:
        return f"{nbytes / 1e9:.1f} GB do not fit on the disk of {folder} ({max(room, 0) / 1e9:.1f} GB could be freed)"
    return None


def make_room(nbytes: int, keep: Path | None = None) -> None:
    """Removes the least recently used disk caches no process holds (never `keep`) until `nbytes` more fit under
    the cap and the disk's free margin.

    Raises:
        OSError: ENOSPC when they cannot be made to fit.
    """
    folder = arrays_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cached = entries(("arrays",))
    total = sum(e.bytes for e in cached)
    for entry in cached:
        fits_cap = total + nbytes <= max_bytes()
        fits_disk = shutil.disk_usage(folder).free - nbytes >= free_floor(folder)
        if fits_cap and fits_disk:
            return
        if entry.path == keep or entry.in_use:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        total -= entry.bytes
    if total + nbytes > max_bytes() or shutil.disk_usage(folder).free - nbytes < free_floor(folder):
        raise OSError(errno.ENOSPC, f"no room for {nbytes / 1e9:.2f} GB more in {folder}")


def hold(entry: Path) -> Path:
    """Marks `entry` in use by this process (see `IN_USE`) and its last use as now; returns the marker."""
    marker = entry / f"{IN_USE}{os.getpid()}"
    marker.touch()
    meta = entry / "meta.json"
    if meta.exists():
        os.utime(meta, (time.time(), time.time()))
    return marker


def clear(kinds: tuple[str, ...] = DEFAULT_CLEAR) -> tuple[int, int]:
    """Removes what the cache folder holds of `kinds` (disk caches a running process holds are kept); returns
    `(entries removed, bytes freed)`."""
    removed = freed = 0
    for entry in entries(kinds):
        if entry.in_use:
            continue
        if entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
        removed, freed = removed + 1, freed + entry.bytes
    return removed, freed


def _alive(marker: Path) -> bool:
    """Whether the process that wrote `marker` (its name ends in the pid) still runs on this machine."""
    try:
        pid = int(marker.name.rsplit("-", 1)[1])
        os.kill(pid, 0)
    except (ValueError, IndexError):
        return False
    except ProcessLookupError:
        return False
    except PermissionError:  # Another user's live process.
        return True
    return True
