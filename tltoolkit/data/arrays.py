"""Rows of one shape (decoded images, a frozen prefix's outputs) kept in memory or on disk: filled once, in order,
then read by index in any order, from tf.data through `tf.numpy_function`.

`MemoryRows` is a NumPy array. `DiskRows` is a folder of `.npy` shards under the cache folder's `arrays/`: each
shard is written under a temporary name, flushed to disk and renamed, so a shard exists whole or not at all; a
killed writer leaves only its temporary file (removed by the next writer), and the next process on the same key
keeps every finished shard and fills only the rest. Reads use `os.pread`, not a memory map: mapped pages count as
the process's resident memory, while read ones stay in the kernel's page cache, which gives them back under
pressure. Both read exactly the bytes that were written, so a training on either gets the same numbers.

Written here because tf.data's `cache(filename)` reads back only in order (shuffled epochs would need a shuffle
buffer the size of the data), and leaves a lock file behind a killed writer that refuses the next run ("cache
lockfile already exists"); NumPy's `.npy` format keeps each shard readable by any tool.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tltoolkit import cache as cache_folder

_logger = logging.getLogger(__name__)

# Bump when what a disk cache holds for a key changes (decoder, layout), so older entries are never read.
LAYOUT = 1
SHARD_BYTES = 64 * 2**20  # Rows per shard: about this many bytes (a kill loses at most one shard's work).
MEMORY, DISK, NONE = "memory", "disk", "none"


def cache_key(*parts) -> str:
    """A short, stable name for a cache entry from the `repr` of what determines its content."""
    return hashlib.blake2b(repr((LAYOUT, *parts)).encode(), digest_size=12).hexdigest()


class Rows:
    """`count` rows of `shape` and `dtype`, appended in order (`append`, from `start`) and read by index (`read`)."""

    count: int
    shape: tuple[int, ...]
    dtype: np.dtype
    where: str

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.count * self.row_bytes

    @property
    def start(self) -> int:
        """The first row not yet stored: `append` continues from here; `count` when the rows are complete."""
        raise NotImplementedError

    @property
    def complete(self) -> bool:
        return self.start >= self.count

    def append(self, rows: np.ndarray) -> None:
        raise NotImplementedError

    def read(self, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Stores what `append` still holds (the last, partial shard)."""


class MemoryRows(Rows):
    """Rows in a NumPy array (allocated at once, its pages taken as they are filled)."""

    where = MEMORY

    def __init__(self, count: int, shape: tuple[int, ...], dtype, source: Rows | None = None):
        self.count, self.shape, self.dtype = count, tuple(shape), np.dtype(dtype)
        self.array = np.empty((count, *self.shape), self.dtype)
        self._filled = 0
        if source is not None and source.complete:  # A finished disk cache: read it back instead of recomputing.
            for first in range(0, count, max(1, SHARD_BYTES // max(1, self.row_bytes))):
                last = min(count, first + max(1, SHARD_BYTES // max(1, self.row_bytes)))
                self.array[first:last] = source.read(np.arange(first, last))
            self._filled = count

    @property
    def start(self) -> int:
        return self._filled

    def append(self, rows: np.ndarray) -> None:
        self.array[self._filled : self._filled + len(rows)] = rows
        self._filled += len(rows)

    def read(self, indices: np.ndarray) -> np.ndarray:
        return self.array[np.asarray(indices)]


class DiskRows(Rows):
    """Rows in `.npy` shards of `rows_per_shard` rows in `folder` (see the module docstring).

    Args:
        folder: The entry's folder (`cache.arrays_dir() / name`).
        count, shape, dtype: What it holds.
        what: A description, for `tltoolkit cache` and the logs.
        multiple: Shards hold a multiple of this many rows (a batch size), so a filling resumed at a shard's start
            sees the same batches an uninterrupted one saw.
    """

    where = DISK

    def __init__(self, folder: Path, count: int, shape: tuple[int, ...], dtype, what: str = "", multiple: int = 1):
        self.folder, self.count, self.shape, self.dtype = Path(folder), count, tuple(shape), np.dtype(dtype)
        self.what, self.multiple = what, multiple
        per_shard = max(1, SHARD_BYTES // max(1, self.row_bytes))
        self.rows_per_shard = max(multiple, per_shard - per_shard % multiple)
        self.shards = max(1, -(-count // self.rows_per_shard))
        self._lock = threading.Lock()
        self._files: dict[int, tuple[int, int]] = {}  # shard -> (file descriptor, data offset)
        self._buffer: np.ndarray | None = None
        self._buffered = 0
        self._open(what)
        self._start = self._first_missing()
        self._marker = cache_folder.hold(self.folder)

    def _meta(self, what: str) -> dict:
        return {
            "layout": LAYOUT,
            "rows": self.count,
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "rows_per_shard": self.rows_per_shard,
            "what": what,
        }

    def _open(self, what: str) -> None:
        """Creates the folder and its `meta.json`, or checks an existing one describes these rows (else starts it
        over: a foreign or older layout is never read). Shards keep the size they were started with."""
        meta = self.folder / "meta.json"
        try:
            found = json.loads(meta.read_text())
        except (OSError, ValueError):
            found = None
        if found is not None:
            same = {k: found.get(k) for k in ("layout", "rows", "shape", "dtype")} == {
                k: v for k, v in self._meta(what).items() if k in ("layout", "rows", "shape", "dtype")
            }
            per_shard = found.get("rows_per_shard")
            if same and isinstance(per_shard, int) and per_shard > 0 and per_shard % self.multiple == 0:
                self.rows_per_shard = per_shard
                self.shards = max(1, -(-self.count // per_shard))
            else:
                shutil.rmtree(self.folder, ignore_errors=True)
                found = None
        self.folder.mkdir(parents=True, exist_ok=True)
        if found is None:
            _write_atomically(meta, json.dumps(self._meta(what)).encode())
        for stale in self.folder.glob(".*.tmp"):  # A killed writer's half shard.
            if not _writer_alive(stale):
                stale.unlink(missing_ok=True)

    def _path(self, shard: int) -> Path:
        return self.folder / f"{shard:05d}.npy"

    def _rows_in(self, shard: int) -> int:
        return min(self.count, (shard + 1) * self.rows_per_shard) - shard * self.rows_per_shard

    def _first_missing(self) -> int:
        for shard in range(self.shards):
            if not self._valid(shard):
                return shard * self.rows_per_shard
        return self.count

    def _valid(self, shard: int) -> bool:
        """Whether shard `shard` exists whole with the expected header (a damaged one is removed)."""
        path = self._path(shard)
        if not path.exists():
            return False
        try:
            shape, fortran, dtype, offset = _header(path)
            good = shape == (self._rows_in(shard), *self.shape) and not fortran and dtype == self.dtype
            if good and path.stat().st_size == offset + self._rows_in(shard) * self.row_bytes:
                return True
        except (OSError, ValueError):
            pass
        path.unlink(missing_ok=True)
        return False

    @property
    def start(self) -> int:
        return self._start

    def append(self, rows: np.ndarray) -> None:
        """Adds rows at `start`; each shard that fills up is written (atomically) and counted done."""
        rows = np.asarray(rows, self.dtype)
        while len(rows):
            if self._buffer is None:
                shard = self._start // self.rows_per_shard
                self._buffer, self._buffered = np.empty((self._rows_in(shard), *self.shape), self.dtype), 0
            take = min(len(rows), len(self._buffer) - self._buffered)
            self._buffer[self._buffered : self._buffered + take] = rows[:take]
            self._buffered, rows = self._buffered + take, rows[take:]
            if self._buffered == len(self._buffer):
                self._commit()

    def _commit(self) -> None:
        shard = self._start // self.rows_per_shard
        path = self._path(shard)
        temporary = self.folder / f".{path.name}.{os.getpid()}.tmp"
        try:
            with temporary.open("wb") as handle:
                np.lib.format.write_array(handle, self._buffer, allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        self._start += len(self._buffer)
        self._buffer, self._buffered = None, 0

    def close(self) -> None:
        """Closes its files and lets other processes evict it; rows of an unfinished shard are dropped (a shard is
        stored whole or not at all)."""
        for descriptor, _ in self._files.values():
            os.close(descriptor)
        self._files.clear()
        self._buffer, self._buffered = None, 0
        self._marker.unlink(missing_ok=True)

    def __del__(self):  # A store nobody closed (an interrupted session): its files and marker.
        try:
            self.close()
        except (OSError, AttributeError):  # Interpreter shutdown, or a store whose folder could not be made.
            pass

    def _file(self, shard: int) -> tuple[int, int]:
        with self._lock:
            if shard not in self._files:
                path = self._path(shard)
                self._files[shard] = (os.open(path, os.O_RDONLY), _header(path)[3])
            return self._files[shard]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The rows at `indices` (any order, repeats allowed): one `pread` per run of consecutive rows."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        out = np.empty((len(indices), *self.shape), self.dtype)
        if not len(indices):
            return out
        order = np.argsort(indices, kind="stable")
        wanted = indices[order]
        # Runs of consecutive rows within one shard.
        breaks = np.flatnonzero(
            (np.diff(wanted) != 1) | (wanted[1:] // self.rows_per_shard != wanted[:-1] // self.rows_per_shard)
        )
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks + 1, [len(wanted)]])
        for first, last in zip(starts, ends):
            row = int(wanted[first])
            shard, within = divmod(row, self.rows_per_shard)
            descriptor, offset = self._file(shard)
            length = int(wanted[last - 1]) - row + 1
            data = os.pread(descriptor, length * self.row_bytes, offset + within * self.row_bytes)
            block = np.frombuffer(data, self.dtype).reshape(length, *self.shape)
            out[order[first:last]] = block[wanted[first:last] - row]
        return out


@dataclass
class MemoryCache:
    """Rows in memory, shared by every stage, trial and session of this process (least recently used first out).

    Args:
        max_entries: How many entries to keep.
        max_bytes: When set (by a session's memory budget), entries beyond it are dropped, oldest first.
    """

    max_entries: int = 4
    max_bytes: int | None = None
    entries: dict[tuple, object] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def get(self, key: tuple, compute: Callable[[], object]) -> object:
        if key in self.entries:
            self.hits += 1
            self.entries[key] = self.entries.pop(key)  # Most recently used last.
            return self.entries[key]
        self.misses += 1
        value = compute()
        self.put(key, value)
        return value

    def put(self, key: tuple, value: object) -> None:
        self.entries.pop(key, None)
        self.entries[key] = value
        while len(self.entries) > self.max_entries or (
            self.max_bytes is not None and len(self.entries) > 1 and self.nbytes > self.max_bytes
        ):
            self.entries.pop(next(iter(self.entries)))

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(value) for value in self.entries.values())

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = 0


# Rows in memory (decoded images, features), shared by every session and trial of this process; a session's memory
# budget sets its `max_bytes`.
MEMORY_CACHE = MemoryCache(max_entries=8)


def _nbytes(value) -> int:
    if isinstance(value, Rows):
        return value.nbytes if value.where == MEMORY else 0
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def _header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """A `.npy` file's `(shape, fortran_order, dtype, offset of the data)`."""
    with path.open("rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(handle)
        return shape, fortran, dtype, handle.tell()


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _writer_alive(temporary: Path) -> bool:
    """Whether the process named in a temporary file's name (`.<shard>.<pid>.tmp`) still runs."""
    try:
        pid = int(temporary.name.split(".")[-2])
        if pid == os.getpid():
            return True
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True
