"""Reads PyTorch checkpoints (state dicts) into NumPy arrays without importing torch.

Both formats `torch.save` has written: the zip archive (PyTorch >= 1.6) and the legacy stream of pickles before it.
The unpickler resolves only the handful of globals a state dict needs (tensor rebuilders, typed storages,
`OrderedDict`); anything else in the file is refused, never imported or executed. No well-kept library reads the
legacy format without torch, hence this module.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from tltoolkit.errors import BackboneError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Storage:
    """A typed storage read lazily: `data` is filled from the file once its bytes are reached."""

    def __init__(self, dtype, numel: int):
        self.dtype = np.dtype(dtype)
        self.numel = numel
        self.data: np.ndarray | None = None


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    return ("tensor", storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *_unused):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str, storages: dict, read_storage=None):
        super().__init__(file)
        self.source = source
        self.storages = storages
        self.read_storage = read_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise BackboneError(
            f"{self.source} holds a {module}.{name} object; only plain state dicts of tensors can be read "
            "(save the model with `torch.save(model.state_dict(), path)`)."
        )

    def persistent_load(self, saved_id):
        if not (isinstance(saved_id, tuple) and saved_id and saved_id[0] == "storage"):
            raise BackboneError(f"{self.source}: unsupported object reference {saved_id[:1]!r} in the checkpoint.")
        dtype, key, _location, numel = saved_id[1:5]
        if len(saved_id) > 5 and saved_id[5] is not None:
            raise BackboneError(f"{self.source}: storage views are not supported.")
        if key not in self.storages:
            self.storages[key] = _Storage(dtype, numel)
            if self.read_storage is not None:
                self.storages[key].data = self.read_storage(key, self.storages[key])
        return self.storages[key]


def _to_arrays(obj, source: str):
    """Replaces the `("tensor", ...)` placeholders in the unpickled object by NumPy arrays."""
    if isinstance(obj, tuple) and len(obj) == 5 and obj[0] == "tensor":
        _, storage, offset, size, stride = obj
        flat = storage.data
        if flat is None:
            raise BackboneError(f"{source} is truncated: a tensor's data is missing.")
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
        )
        return np.array(view)
    if isinstance(obj, dict):
        return OrderedDict((k, _to_arrays(v, source)) for k, v in obj.items())
    return obj


def _load_zip(file: Path) -> object:
    with zipfile.ZipFile(file) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise BackboneError(f"{file} is a zip file but not a PyTorch checkpoint (no data.pkl inside).")
        prefix = pkl[: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in names and archive.read(byteorder).decode().strip() != "little":
            raise BackboneError(f"{file} was saved on a big-endian machine; re-save it on a little-endian one.")

        def read(key, storage: _Storage) -> np.ndarray:
            raw = archive.read(f"{prefix}data/{key}")
            return np.frombuffer(raw, dtype=storage.dtype, count=storage.numel)

        unpickler = _StateDictUnpickler(io.BytesIO(archive.read(pkl)), str(file), {}, read)
        return unpickler.load()


def _load_legacy(file: Path) -> object:
    with open(file, "rb") as stream:
        if pickle.load(stream) != _LEGACY_MAGIC:
            raise BackboneError(f"{file} is not a PyTorch checkpoint (wrong magic number).")
        pickle.load(stream)  # protocol version
        sys_info = pickle.load(stream)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise BackboneError(f"{file} was saved on a big-endian machine; re-save it on a little-endian one.")
        storages: dict[str, _Storage] = {}
        result = _StateDictUnpickler(stream, str(file), storages).load()
        keys = pickle.load(stream)
        for key in keys:
            storage = storages[key]
            numel = int.from_bytes(stream.read(8), "little")
            raw = stream.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise BackboneError(f"{file} is truncated; download it again.")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
        return result


def read_state_dict(path: str | Path) -> OrderedDict[str, np.ndarray]:
    """The tensors of a PyTorch state-dict checkpoint, by name, as NumPy arrays.

    Args:
        path: A file written by `torch.save(state_dict, path)`, zip or legacy format. A checkpoint that wraps the
            state dict (`{"state_dict": ...}` or `{"model": ...}`) is unwrapped.

    Raises:
        BackboneError: The file is missing, is not a PyTorch checkpoint, or holds anything but tensors.
    """
    file = Path(path)
    if not file.is_file():
        raise BackboneError(f"PyTorch checkpoint {file} does not exist.")
    try:
        obj = _load_zip(file) if zipfile.is_zipfile(file) else _load_legacy(file)
    except BackboneError:
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise BackboneError(f"{file} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc}).") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise BackboneError(f"{file} holds a {type(obj).__name__}, not a state dict of tensors.")
    return _to_arrays(obj, str(file))
