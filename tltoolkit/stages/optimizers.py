"""A stage's optimizer and learning-rate schedule, built fresh for every stage."""

from __future__ import annotations

import keras

from tltoolkit.recipe import OptimizerConfig, ScheduleConfig


def learning_rate_schedule(
    learning_rate: float, schedule: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The stage's learning rate: a constant, or Keras's `CosineDecay` (which also does linear warm-up).

    A constant with warm-up is a `CosineDecay` with `alpha=1` (it decays to 100% of its value, so stays flat).
    """
    warmup_steps = round(schedule.warmup_epochs * steps_per_epoch)
    if schedule.name == "constant" and warmup_steps == 0:
        return learning_rate
    total = max(1, steps_per_epoch * epochs)
    alpha = 1.0 if schedule.name == "constant" else schedule.min_lr_ratio
    if warmup_steps == 0:
        return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=total, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(1, total - warmup_steps),
        alpha=alpha,
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )


def build_optimizer(
    config: OptimizerConfig, schedule: ScheduleConfig, steps_per_epoch: int, epochs: int
) -> keras.optimizers.Optimizer:
    """A new optimizer for one stage (so no state, such as Adam's moments, leaks between stages)."""
    lr = learning_rate_schedule(config.learning_rate, schedule, steps_per_epoch, epochs)
    common = {"learning_rate": lr, "clipnorm": config.clipnorm}
    if config.weight_decay:
        common["weight_decay"] = config.weight_decay
    if config.name == "adam":
        return keras.optimizers.Adam(**common)
    if config.name == "adamw":
        return keras.optimizers.AdamW(**common)
    if config.name == "sgd":
        return keras.optimizers.SGD(momentum=config.momentum, nesterov=config.nesterov, **common)
    return keras.optimizers.RMSprop(momentum=config.momentum, **common)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the optimizer applies at its current step."""
    lr = optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(lr(optimizer.iterations) if callable(lr) else lr))
