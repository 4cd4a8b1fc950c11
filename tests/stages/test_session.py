"""The training session: one loop over the stage plan, hooks around it, the distribution scope around models."""

import pytest
import tensorflow as tf
from conftest import tiny_recipe

from tltoolkit.data import prepare_data
from tltoolkit.recipe import load_recipe
from tltoolkit.stages import SessionOptions, TrainingHooks, TrainingSession


class Recording(TrainingHooks):
    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def on_stage_begin(self, session, stage, run_id, resume):
        self.calls.append(("begin", stage.name))
        return f"run-{stage.index}"

    def on_epoch_end(self, stage, epoch, logs):
        self.calls.append(("epoch", stage.name, epoch, sorted(logs)[:2]))
        if (stage.name, epoch) == self.fail_at:
            raise RuntimeError("the tracking server went away")

    def on_stage_end(self, session, stage, outcome):
        self.calls.append(("end", stage.name, len(outcome.history), outcome.evaluation is not None))

    def on_session_end(self, session, result):
        self.calls.append(("session_end", sorted(result.evaluations)))

    def on_session_failed(self, session, error):
        self.calls.append(("failed", type(error).__name__))


def session_on(image_folder, options=None):
    recipe = load_recipe(tiny_recipe())
    session = TrainingSession(recipe, options or SessionOptions(verbose=0))
    session.check_points()
    return session.load_data(prepare_data(image_folder, recipe.data.val_split, recipe.seed, progress=False))


def test_the_session_runs_the_plan_between_its_hooks(image_folder):
    hooks = Recording()
    result = session_on(image_folder).run(hooks)
    assert hooks.calls == [
        ("begin", "head"),
        ("epoch", "head", 0, ["accuracy", "learning_rate"]),
        ("epoch", "head", 1, ["accuracy", "learning_rate"]),
        ("end", "head", 2, True),
        ("begin", "finetune"),
        ("epoch", "finetune", 0, ["accuracy", "learning_rate"]),
        ("end", "finetune", 1, True),
        ("session_end", ["val"]),
    ]
    assert list(result.history["stage"]) == ["head", "head", "finetune"]
    assert result.stage_runs == {"head": "run-0", "finetune": "run-1"}, "what the hooks returned, by stage"
    assert result.state.stage == 2 and [len(rows) for rows in result.state.histories] == [2, 1]
    assert set(result.metrics) >= {"val_accuracy", "val_loss"}


def test_a_failure_reaches_the_hooks_and_is_raised(image_folder):
    hooks = Recording(fail_at=("head", 1))
    with pytest.raises(RuntimeError, match="went away"):
        session_on(image_folder).run(hooks)
    assert hooks.calls[-1] == ("failed", "RuntimeError") and ("end", "head", 2, True) not in hooks.calls


def test_models_and_optimizers_are_created_in_the_distribution_scope(image_folder):
    """The multi-device issue builds on this: a strategy's scope wraps backbone, classifier and optimizer creation."""
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    session = session_on(image_folder, SessionOptions(verbose=0, distribution=strategy))
    session.run()
    model = session.training.model
    assert all(strategy.extended.variable_created_in_scope(v.value) for v in model.weights)
    assert all(strategy.extended.variable_created_in_scope(v.value) for v in model.optimizer.variables)
    plain = session_on(image_folder)
    assert not any(strategy.extended.variable_created_in_scope(v.value) for v in plain.training.model.weights)
