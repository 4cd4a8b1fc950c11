"""Rows in memory and on disk (shards written atomically, resumed, read back exactly), the disk cache's cap and
eviction, and the memory budget's plan."""

import os

import numpy as np
import pytest

from tltoolkit import cache as cache_folder
from tltoolkit.data import arrays
from tltoolkit.data.arrays import DiskRows, MemoryCache, MemoryRows
from tltoolkit.data.budget import CacheNeed, MemoryBudget, parse_size, plan_caches


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TLTOOLKIT_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(arrays, "SHARD_BYTES", 5 * 4 * 6)  # Rows of (4, 6) uint8 = 24 bytes: 5 rows a shard.


def test_disk_rows_read_back_exactly_what_was_written_in_any_order(cache_dir, small_shards):
    data = np.random.default_rng(0).integers(0, 255, (23, 4, 6), dtype=np.uint8)
    rows = DiskRows(cache_dir / "arrays" / "x", 23, (4, 6), np.uint8, "test rows")
    assert rows.rows_per_shard == 5 and rows.shards == 5 and rows.start == 0
    for first in range(0, 23, 7):  # Appends that do not line up with shards.
        rows.append(data[first : first + 7])
    assert rows.complete
    order = np.random.default_rng(1).permutation(23)
    np.testing.assert_array_equal(rows.read(order), data[order])
    np.testing.assert_array_equal(rows.read(np.array([3, 3, 22, 0])), data[[3, 3, 22, 0]])
    np.testing.assert_array_equal(np.load(rows.folder / "00004.npy"), data[20:23], "plain .npy shards")
    memory = MemoryRows(23, (4, 6), np.uint8, source=rows)  # A finished disk cache read back into memory.
    np.testing.assert_array_equal(memory.array, data)
    rows.close()


def test_a_killed_writer_leaves_whole_shards_only_and_the_next_one_continues(cache_dir, small_shards):
    data = np.arange(23 * 24, dtype=np.uint8).reshape(23, 4, 6)
    folder = cache_dir / "arrays" / "x"
    rows = DiskRows(folder, 23, (4, 6), np.uint8)
    rows.append(data[:12])  # Shards 0 and 1 written, two rows of shard 2 in memory only.
    (folder / ".00002.npy.999999999.tmp").write_bytes(b"half a shard")  # What a killed process leaves.
    rows.close()
    assert sorted(p.name for p in folder.glob("*.npy")) == ["00000.npy", "00001.npy"]

    again = DiskRows(folder, 23, (4, 6), np.uint8)
    assert again.start == 10 and not list(folder.glob(".*.tmp")), "the dead writer's file is gone"
    again.append(data[10:])
    np.testing.assert_array_equal(again.read(np.arange(23)), data)
    again.close()

    with (folder / "00001.npy").open("r+b") as handle:  # A damaged shard is redone, never read.
        handle.truncate(100)
    third = DiskRows(folder, 23, (4, 6), np.uint8)
    assert third.start == 5 and not (folder / "00001.npy").exists()
    third.close()
    other = DiskRows(folder, 23, (4, 7), np.uint8)  # Other rows under the same name: started over.
    assert other.start == 0 and not list(folder.glob("0*.npy"))
    other.close()


def test_a_failed_shard_write_leaves_nothing_half_written(cache_dir, small_shards, monkeypatch):
    rows = DiskRows(cache_dir / "arrays" / "x", 10, (4, 6), np.uint8)

    def full(handle, array, allow_pickle=False):
        handle.write(b"x" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np.lib.format, "write_array", full)
    with pytest.raises(OSError, match="No space"):
        rows.append(np.zeros((5, 4, 6), np.uint8))
    assert not list(rows.folder.glob("*.npy")) and not list(rows.folder.glob(".*.tmp"))
    rows.close()


def test_the_disk_cache_evicts_the_least_recently_used_entry_no_process_holds(cache_dir, monkeypatch):
    monkeypatch.setenv("TLTOOLKIT_CACHE_MAX_GB", str(4500 / 1e9))  # A 4500-byte cap: three entries of about 1.3 kB fit.
    made = []
    for name in ("old", "held", "new"):
        rows = DiskRows(cache_dir / "arrays" / name, 10, (100,), np.uint8, name)
        rows.append(np.zeros((10, 100), np.uint8))
        made.append(rows)
        os.utime(rows.folder / "meta.json", (len(made), len(made)))  # Last used in this order.
    made[0].close()
    made[2].close()  # "held" stays open: this process holds it.
    assert [e.what for e in cache_folder.entries(("arrays",))] == ["old", "held", "new"]
    assert cache_folder.cannot_hold(1500) is None, "the unused entries can make room"
    cache_folder.make_room(1500)
    assert [e.what for e in cache_folder.entries(("arrays",))] == ["held", "new"], "the oldest unused one went"
    assert "cap" in cache_folder.cannot_hold(5000)
    removed, _ = cache_folder.clear()
    assert removed == 1 and [e.what for e in cache_folder.entries(("arrays",))] == ["held"], "held entries stay"
    made[1].close()


def test_an_unwritable_cache_folder_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TLTOOLKIT_CACHE_DIR", str(blocker / "cache"))
    assert "is not writable" in cache_folder.cannot_hold(10) and "TLTOOLKIT_CACHE_DIR" in cache_folder.cannot_hold(10)


def test_memory_cache_keeps_within_its_bytes_oldest_out():
    cache = MemoryCache(max_entries=8, max_bytes=250)
    for key in "abc":
        cache.put(key, MemoryRows(100, (1,), np.uint8))
    assert list(cache.entries) == ["b", "c"] and cache.nbytes == 200
    assert cache.get("b", lambda: None) is cache.entries["b"] and list(cache.entries) == ["c", "b"]


def test_memory_budget_forms_and_plan():
    assert parse_size("512MB") == 512_000_000 and parse_size("2 GiB") == 2 * 2**30 and parse_size("AUTO") is None
    for bad in ("2048", 2048, "2 parsecs", ""):
        with pytest.raises(ValueError, match="data.memory_budget must be `auto` or a size with its unit"):
            parse_size(bad)
    auto = MemoryBudget.resolve("auto", resident=1_000, available=9_000)
    assert auto.total == 5_000 and "auto: half of" in auto.source
    budget = MemoryBudget.resolve("4GB", resident=10**9, outputs=5 * 10**8)
    assert budget.total == 4 * 10**9 and budget.working == 10**9 and budget.for_caches == 2 * 10**9
    needs = [CacheNeed("features", 10**9), CacheNeed("val images", 3 * 10**9), CacheNeed("train images", 10**9)]
    plan = plan_caches(needs, budget, lambda n: None if n < 4 * 10**9 else "too big")
    assert [(c.name, c.where) for c in plan] == [
        ("features", "memory"),
        ("val images", "disk"),
        ("train images", "memory"),
    ]
    assert "exceed the" in plan[1].why and "written to the disk cache" in plan[1].why
    assert (
        plan_caches([CacheNeed("x", 10)], MemoryBudget.resolve("1MB", resident=10**9), lambda n: None)[0].where
        == "disk"
    )
    refused = plan_caches([CacheNeed("x", 10**10)], budget, lambda n: "the disk is full")
    assert refused[0].where == "none" and refused[0].why.endswith("and the disk is full")
    reused = plan_caches([CacheNeed("x", 10**10, reusable=True)], budget, lambda n: "never asked")
    assert reused[0].where == "disk" and "already on disk" in reused[0].why
