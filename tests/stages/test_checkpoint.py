import numpy as np
import pytest

from tltoolkit.stages.checkpoint import CheckpointStore


def save(store, epoch):
    return store.save({"epoch": epoch}, {"model": [np.full((3, 2), epoch, np.float32), np.arange(epoch + 1)]})


def test_checkpoints_round_trip_and_only_the_newest_two_are_kept(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    for epoch in range(4):
        save(store, epoch)
    assert [p.name for p in store.paths()] == ["checkpoint-000002.npz", "checkpoint-000003.npz"]
    latest = store.latest()
    assert latest.state == {"epoch": 3}
    np.testing.assert_array_equal(latest.arrays["model"][0], np.full((3, 2), 3, np.float32))
    np.testing.assert_array_equal(latest.arrays["model"][1], np.arange(4))
    assert not list((tmp_path / "ckpt").glob(".*"))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    save(store, 0)
    newest = save(store, 1)
    data = newest.read_bytes()
    if damage == "truncated":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        middle = len(data) // 3
        newest.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:
        newest.write_bytes(b"")
    with pytest.warns(UserWarning, match=rf"{newest.name} cannot be read.*falling back"):
        latest = store.latest()
    assert latest.state == {"epoch": 0}


def test_a_crash_while_writing_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    save(store, 0)

    def crash(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # Killed mid-write.

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save(store, 1)
    assert [p.name for p in store.paths()] == ["checkpoint-000000.npz"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temporary file left behind"
    assert store.latest().state == {"epoch": 0}
    monkeypatch.undo()
    assert save(store, 1).name == "checkpoint-000001.npz"
