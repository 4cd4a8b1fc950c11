import numpy as np
import pytest

from tltoolkit.stages.checkpoint import CheckpointLayoutError, CheckpointStore, TrainingState


def save(store, epoch):
    return store.save(
        TrainingState(key="k", data="d", epoch=epoch),
        {"model": [np.full((3, 2), epoch, np.float32), np.arange(epoch + 1)]},
    )


def test_checkpoints_round_trip_and_only_the_newest_two_are_kept(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    for epoch in range(4):
        save(store, epoch)
    assert [p.name for p in store.paths()] == ["checkpoint-000002.npz", "checkpoint-000003.npz"]
    latest = store.latest()
    assert latest.state.epoch == 3
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
    assert latest.state.epoch == 0


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
    assert store.latest().state.epoch == 0
    monkeypatch.undo()
    assert save(store, 1).name == "checkpoint-000001.npz"


def test_the_state_round_trips_with_its_types(tmp_path):
    from tltoolkit.stages.checkpoint import StopperState

    store = CheckpointStore(tmp_path)
    state = TrainingState(
        key="k",
        data="d",
        stage=2,
        epoch=1,
        rows=[{"epoch": 0, "loss": 0.5}],
        stage_runs={"0": "r"},
        histories=[[{"epoch": 0}]],
        stopper=StopperState(1, 0.25, 0, 0),
    )
    store.save(state, {})
    assert store.latest().state == state


def test_a_checkpoint_of_an_older_layout_is_refused_not_misread(tmp_path):
    """Layout 1 was an untyped dict (stage -1 meant pretraining); reading it as today's state would resume wrongly."""
    import json

    old = {"key": "k", "data": "d", "stage": -1, "epoch": 0, "rows": [], "stage_runs": {}, "histories": []}
    np.savez(tmp_path / "checkpoint-000000.npz", state=np.frombuffer(json.dumps(old).encode(), dtype=np.uint8))
    with pytest.raises(
        CheckpointLayoutError,
        match=r"checkpoint-000000.npz was written by another version.*layout 1.*"
        r"start a new run without --resume",
    ):
        CheckpointStore(tmp_path).latest()


def test_saving_removes_temporary_files_of_dead_writers_only(tmp_path):
    """A temporary file of a process killed mid-write goes; one that a live process is writing now stays."""
    import subprocess
    import sys

    store = CheckpointStore(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        writing = tmp_path / f".checkpoint-000003.npz.{live.pid}.tmp"
        abandoned = tmp_path / f".checkpoint-000003.npz.{dead.pid}.tmp"
        for path in (writing, abandoned):
            path.write_bytes(b"partial")
        save(store, 0)
        assert writing.exists(), "another live process's in-flight file is not ours to delete"
        assert not abandoned.exists()
    finally:
        live.kill()
        live.wait()


def test_variables_the_fit_cannot_change_are_read_once_yet_saved_in_every_checkpoint(tmp_path, monkeypatch):
    """A head fitted on cached features: the frozen layers below are not in the fitted model, so the checkpoint
    callback reads them at the start of the fit, not every epoch; every file still holds every variable, in order."""
    import keras

    from tltoolkit.stages import checkpoint

    keras.utils.set_random_seed(0)
    below = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])  # The frozen backbone.
    head = keras.layers.Dense(2, activation="softmax")
    classifier = keras.Model(below.inputs, head(below.outputs[0]))
    features = keras.Input((3,))
    top = keras.Model(features, head(features))  # What the stage fits, on the features `below` computed.
    top.compile(optimizer="adam", loss="categorical_crossentropy")
    read, real = [], checkpoint.variable_values
    monkeypatch.setattr(checkpoint, "variable_values", lambda variables: read.append(len(variables)) or real(variables))
    store = CheckpointStore(tmp_path)
    callback = checkpoint.CheckpointCallback(store, classifier, TrainingState(key="k", data="d"), [])
    x, y = np.random.default_rng(0).normal(size=(8, 3)), np.eye(2)[[0, 1] * 4]
    top.fit(x, y, epochs=3, verbose=0, callbacks=[callback])

    assert read[0] == 2  # `below`'s kernel and bias, once.
    assert read[1::2] == [2, 2, 2]  # Each epoch: the head's kernel and bias only (then the optimizer's variables).
    saved = store.latest()
    assert saved.state.epoch == 2
    assert len(saved.arrays["model"]) == len(classifier.variables) == 4
    for variable, value in zip(classifier.variables, saved.arrays["model"]):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)
