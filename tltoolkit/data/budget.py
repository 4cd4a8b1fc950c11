"""The memory budget (`data.memory_budget`) and where each of a run's caches goes: memory, disk or none.

A run may keep decoded images and a frozen prefix's outputs in memory, on disk, or not at all. Before anything is
decoded, the session estimates what each cache would hold (images x size x versions x dtype) and `plan_caches`
places them in the order they are used: in memory while they fit in what the budget leaves for caches, else on
disk (the cache folder, size-capped) when it can hold them, else none (images decoded each time; a stage's
features not cached, so it trains through its frozen layers). Every choice carries its reason, for the log line
and the run's params.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tltoolkit.data.arrays import DISK, MEMORY, NONE

AUTO = "auto"
AUTO_FRACTION = 0.5  # `auto`: this share of the memory available when the run starts.
# What training needs besides its caches (activations kept for the backward pass, gradients, batches in flight),
# kept out of their share: this many times a batch's layer outputs (float32). Measured: MobileNetV2 at 64 px,
# batch 64, fine-tuning all layers took 0.7 GB over the process's resident size, 1.5x its 0.47 GB of outputs.
WORKING_FACTOR = 2.0
MIN_WORKING = 256 * 2**20

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)\s*$", re.IGNORECASE)


def parse_size(value) -> int | None:
    """`data.memory_budget` in bytes: `auto` is `None`; sizes carry a unit (`512MB`, `2GB`, `1.5GiB`, `800kB`).

    Raises:
        ValueError: A bare number or an unknown unit, with the field's accepted forms.

    Example:
        >>> parse_size("2GB"), parse_size("1.5 GiB"), parse_size("auto")
        (2000000000, 1610612736, None)
    """
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    found = _SIZE.match(value) if isinstance(value, str) else None
    if found is None:
        raise ValueError(
            f"data.memory_budget must be `auto` or a size with its unit, e.g. 2GB, 512MB or 1.5GiB; got {value!r}"
        )
    number, unit = float(found.group(1)), found.group(2).lower()
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".index(unit[0])
    return int(number * base**power) if unit[0] != "b" else int(number)


def available_memory() -> int:
    """Bytes this process could still take: the machine's available memory, or less where a container's memory
    limit (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`) leaves less."""
    import psutil

    available = psutil.virtual_memory().available
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < 2**60:
                available = min(available, int(limit) - int(Path(usage_file).read_text()))
        except (OSError, ValueError):
            continue
    return max(0, available)


def process_memory() -> int:
    """This process's resident memory now, in bytes."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def peak_memory() -> int:
    """This process's peak resident memory so far, in bytes (`resource.getrusage`; Linux counts kilobytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class MemoryBudget:
    """What a run's caches may take in memory.

    Attributes:
        total: The budget: the whole process is to stay within it.
        source: Where it came from, for the log (`data.memory_budget` or `auto: half of ... available`).
        resident: The process's memory when the caches were planned (models, libraries).
        working: Kept for training's own needs.
    """

    total: int
    source: str
    resident: int
    working: int

    @property
    def for_caches(self) -> int:
        return max(0, self.total - self.resident - self.working)

    @classmethod
    def resolve(
        cls, value: str, resident: int | None = None, available: int | None = None, outputs: int = 0
    ) -> MemoryBudget:
        """The budget `data.memory_budget` names (`auto`: `AUTO_FRACTION` of the memory available now), keeping
        `WORKING_FACTOR` x `outputs` (the bytes of a batch's layer outputs) for training itself."""
        size = parse_size(value)
        resident = process_memory() if resident is None else resident
        if size is None:
            available = available_memory() if available is None else available
            size = int(AUTO_FRACTION * (available + resident))
            source = f"auto: half of the {gb(available + resident)} this process could use"
        else:
            source = "data.memory_budget"
        return cls(size, source, resident, max(MIN_WORKING, int(WORKING_FACTOR * outputs)))

    def describe(self) -> str:
        return (
            f"memory budget {size_text(self.total)} ({self.source}): the process holds {size_text(self.resident)}, "
            f"{size_text(self.working)} kept for training, {size_text(self.for_caches)} for caches"
        )


@dataclass(frozen=True)
class CacheNeed:
    """A cache a run would use, in the order it is first used."""

    name: str  # "features below `head`", "train images"...
    nbytes: int
    reusable: bool = False  # A finished disk cache of it exists: reading it costs no extraction.


@dataclass(frozen=True)
class CacheChoice:
    """Where one cache goes, and why."""

    name: str
    where: str  # MEMORY, DISK or NONE.
    nbytes: int
    why: str

    def describe(self) -> str:
        return f"{self.name}: {self.where} ({self.why})"


def plan_caches(needs: list[CacheNeed], budget: MemoryBudget, disk_refusal) -> list[CacheChoice]:
    """Places each cache of `needs` (in order): memory while it fits the budget's share for caches, else disk unless
    `disk_refusal(nbytes)` gives a reason it cannot, else none.

    Example:
        >>> budget = MemoryBudget(total=2_000, source="test", resident=500, working=500)
        >>> needs = [CacheNeed("features", 600), CacheNeed("images", 900)]
        >>> [(c.name, c.where) for c in plan_caches(needs, budget, lambda n: None)]
        [('features', 'memory'), ('images', 'disk')]
        >>> [c.where for c in plan_caches(needs, budget, lambda n: "the disk is full")]
        ['memory', 'none']
    """
    left, choices, disk_total = budget.for_caches, [], 0
    for need in needs:
        if need.nbytes <= left:
            left -= need.nbytes
            choices.append(CacheChoice(need.name, MEMORY, need.nbytes, f"{size_text(need.nbytes)}, within the budget"))
            continue
        short = f"{size_text(need.nbytes)} exceed the {size_text(left)} the memory budget leaves"
        if need.reusable:
            choices.append(CacheChoice(need.name, DISK, need.nbytes, f"{short}; already on disk"))
            continue
        refusal = disk_refusal(disk_total + need.nbytes)
        if refusal is None:
            disk_total += need.nbytes
            choices.append(CacheChoice(need.name, DISK, need.nbytes, f"{short}; written to the disk cache"))
        else:
            choices.append(CacheChoice(need.name, NONE, need.nbytes, f"{short}, and {refusal}"))
    return choices


def gb(nbytes: int) -> str:
    """Bytes in gigabytes, for messages: `2.3 GB`."""
    return f"{nbytes / 1e9:.1f} GB"


def size_text(nbytes: int) -> str:
    """Bytes as GB, MB or kB, whichever reads best.

    Example:
        >>> size_text(2_500_000_000), size_text(59_900_000), size_text(4_000)
        ('2.5 GB', '59.9 MB', '4.0 kB')
    """
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


__all__ = [
    "AUTO",
    "CacheChoice",
    "CacheNeed",
    "DISK",
    "MEMORY",
    "MemoryBudget",
    "NONE",
    "available_memory",
    "parse_size",
    "peak_memory",
    "plan_caches",
    "process_memory",
]
