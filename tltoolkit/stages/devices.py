"""Where a session trains: the recipe's `runtime` section made into a `tf.distribute` strategy and a dtype policy.

`strategy: mirrored` is TensorFlow's `MirroredStrategy`: one replica per device, each global batch split between
them, gradients summed across replicas. On a machine without GPUs, `devices: N` splits the CPU into N logical
devices (TensorFlow's own `set_logical_device_configuration`), which is how the path runs on any machine. Strategies
are kept per device set for the process: variables made under one strategy cannot be trained under another, and a
search's trials reuse backbones. Mixed precision is Keras's `mixed_float16` policy; the output layer keeps float32.

Example:
    >>> from tltoolkit.recipe import RuntimeConfig
    >>> precision_policy(RuntimeConfig(), gpus=[])
    'float32'
    >>> precision_policy(RuntimeConfig(mixed_precision="on"), gpus=[])
    'mixed_float16'
"""

from __future__ import annotations

import contextlib
import functools
import logging

import keras

from tltoolkit.errors import RecipeError
from tltoolkit.recipe import RuntimeConfig

MIXED = "mixed_float16"
_logger = logging.getLogger(__name__)


def precision_policy(runtime: RuntimeConfig, gpus: list | None = None) -> str:
    """The Keras dtype policy for `runtime`: `mixed_float16` when on, or `auto` on GPUs of compute capability 7.0+
    (Volta and newer, whose tensor cores make float16 faster); `float32` otherwise."""
    if runtime.mixed_precision != "auto":
        return MIXED if runtime.mixed_precision == "on" else "float32"
    gpus = _gpus() if gpus is None else gpus
    return MIXED if gpus and all(_capability(gpu) >= (7, 0) for gpu in gpus) else "float32"


def distribution_for(runtime: RuntimeConfig):
    """The `tf.distribute` strategy for `runtime`, or `None` for one device (TensorFlow's default placement)."""
    if runtime.strategy == "none":
        return None
    return _mirrored(tuple(_device_names(runtime.devices)))


@contextlib.contextmanager
def runtime_scope(strategy, policy: str):
    """Layers and variables made inside take `policy` and `strategy`; the global policy is restored on leaving (the
    layers keep theirs, so saved models and later predictions compute as trained)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            yield
    finally:
        keras.config.set_dtype_policy(previous)


def describe(strategy, policy: str) -> str:
    """One line for the log: `2 replicas on /job:localhost/replica:0/task:0/device:CPU:0, ...; float32`."""
    if strategy is None:
        return f"one device; {policy}"
    devices = ", ".join(strategy.extended.worker_devices)
    return f"MirroredStrategy, {strategy.num_replicas_in_sync} replicas on {devices}; {policy}"


@functools.cache
def _mirrored(devices: tuple[str, ...]):
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(list(devices))


def _device_names(devices: int | list[str] | None) -> list[str]:
    """The devices to mirror over: the named ones, the first N GPUs, or N logical CPU devices without GPUs."""
    import tensorflow as tf

    gpus = [device.name for device in tf.config.list_logical_devices("GPU")] if _gpus() else []
    if isinstance(devices, list):
        known = {_short(name) for name in gpus + [d.name for d in tf.config.list_logical_devices("CPU")]}
        missing = [name for name in devices if _short(name) not in known]
        if missing:
            raise RecipeError(
                f"runtime.devices names {missing}, which this machine does not have; it has {sorted(known)}."
            )
        return devices
    if gpus:
        count = len(gpus) if devices is None else devices
        if count > len(gpus):
            raise RecipeError(
                f"runtime.devices {count}: this machine has {len(gpus)} GPU(s) ({', '.join(gpus)}); use at most "
                f"{len(gpus)}."
            )
        return gpus[:count]
    return _cpu_devices(devices or 1)


def _cpu_devices(count: int) -> list[str]:
    """`count` logical CPU devices: the CPU split before TensorFlow starts, or the split it already has."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    with contextlib.suppress(RuntimeError):  # TensorFlow has started: its logical devices are fixed.
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    logical = [device.name for device in tf.config.list_logical_devices("CPU")]
    if len(logical) < count:
        raise RecipeError(
            f"runtime.devices {count}: TensorFlow already started in this process with {len(logical)} CPU "
            "device(s), and a CPU can only be split before it starts. Run in a fresh process (the `tltoolkit` "
            "command does), or call `tltoolkit.run` before anything else uses TensorFlow."
        )
    if count > 1:
        _logger.info("No GPU: the CPU split into %d logical devices, one replica each (they share its cores).", count)
    return logical[:count]


def _gpus() -> list:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def _capability(gpu) -> tuple[int, int]:
    import tensorflow as tf

    return tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability", (0, 0)))


def _short(name: str) -> str:
    """`/job:localhost/replica:0/task:0/device:GPU:0` and `/gpu:0` both become `gpu:0`."""
    return name.lower().rsplit("/", 1)[-1].replace("device:", "")
