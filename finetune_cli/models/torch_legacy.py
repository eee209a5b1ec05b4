"""Read a PyTorch state dict saved in the legacy (non-zip) format, without torch.

The legacy `.pth` layout (PyTorch's `serialization.py`, `_legacy_save`) is five
parts back to back:

1. a pickle of the magic number 0x1950a86a20f9469cfc6c;
2. a pickle of the protocol version, 1001;
3. a pickle of system facts (`little_endian`, `type_sizes`);
4. the pickled object. Tensors are `torch._utils._rebuild_tensor_v2(storage,
   offset, size, stride, requires_grad, hooks)` calls whose storages are
   persistent ids `('storage', torch.FloatStorage, key, location, numel, view)`;
5. a pickle of the storage keys in file order, then per key an int64
   element count followed by the raw little-endian elements.

Unpickling can run arbitrary code, so this reader allows only the handful of
globals a state dict needs (an ordered dict, the tensor rebuilders and the
storage types) and refuses any other with `UnsafeFileError`, before anything
is called.
"""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune_cli.errors import BackboneError, UnsafeFileError

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

#: Storage type -> numpy dtype of its elements (little-endian).
STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?",
}


@dataclass
class _Storage:
    """A storage named in the pickle; its elements are read after it."""

    kind: str
    numel: int
    data: np.ndarray | None = None


@dataclass
class _Tensor:
    """A tensor view onto a storage: offset, size and stride in elements."""

    storage: _Storage
    offset: int
    size: tuple
    stride: tuple

    def array(self) -> np.ndarray:
        """The elements, copied; a view that reaches outside its storage raises ValueError."""
        flat = self.storage.data
        numbers = (self.offset, *self.size, *self.stride)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise ValueError(f"a tensor has a negative or non-integer offset, size or stride: {numbers!r:.80}")
        if len(self.size) != len(self.stride):
            raise ValueError("a tensor's size and stride differ in length")
        if 0 not in self.size:
            last = self.offset + sum((n - 1) * step for n, step in zip(self.size, self.stride))
            if last >= len(flat):
                raise ValueError(f"a tensor reaches element {last} of a storage of {len(flat)}")
        if self.storage.kind == "BFloat16Storage":
            flat = (flat.astype(np.uint32) << 16).view(np.float32)
        if not self.size:
            return np.array(flat[self.offset])
        strides = tuple(s * flat.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.size, strides=strides)
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *_rest):
    if not isinstance(storage, _Storage):
        raise UnsafeFileError("a tensor in the file does not refer to a storage")
    return _Tensor(storage, int(offset), tuple(size), tuple(stride))


def _storage_type(name: str):
    return type(name, (), {"kind": name})


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    **{("torch", name): _storage_type(name) for name in STORAGE_DTYPES},
}


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that resolves no global at all: plain values only."""

    allowed: dict = {}

    def __init__(self, handle, source: str):
        super().__init__(handle)
        self.source = source

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"{self.source} is not a plain PyTorch state dict: it names {module}.{name}, which could "
                "run code when loaded; refused. Use a state dict of tensors only"
            ) from None

    def persistent_load(self, pid):
        raise UnsafeFileError(f"{self.source} holds an object reference where plain values belong")


class _StateDictUnpickler(_PlainUnpickler):
    """An unpickler that resolves only `_ALLOWED` globals and storage persistent ids."""

    allowed = _ALLOWED

    def __init__(self, handle, source: str):
        super().__init__(handle, source)
        self.storages: dict[str, _Storage] = {}

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafeFileError(f"{self.source} holds an object that is not a tensor storage: {pid!r:.60}")
        _, kind, key, _location, numel, view = pid
        if getattr(kind, "kind", None) not in STORAGE_DTYPES:
            raise UnsafeFileError(f"{self.source} names an unknown storage type {kind!r:.60}")
        if view is not None:
            raise UnsafeFileError(f"{self.source} uses storage views, which this reader does not support")
        storage = self.storages.setdefault(str(key), _Storage(kind.kind, int(numel)))
        if (storage.kind, storage.numel) != (kind.kind, int(numel)):
            raise UnsafeFileError(f"{self.source} names storage {key} twice with different types or sizes")
        return storage


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a legacy-format PyTorch state dict, name -> numpy array.

    Raises:
        UnsafeFileError: the file names a global outside the allowlist.
        BackboneError: the file is not in the legacy format, or is damaged.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        if handle.read(2) == b"PK":
            raise BackboneError(f"{path} is in PyTorch's zip format; only the legacy format is read here")
        handle.seek(0)
        try:
            magic, version, _facts = (_PlainUnpickler(handle, path.name).load() for _ in range(3))
            if magic != MAGIC_NUMBER or version != PROTOCOL_VERSION:
                raise BackboneError(f"{path} is not a legacy PyTorch file (bad magic number or version)")
            unpickler = _StateDictUnpickler(handle, path.name)
            state = unpickler.load()
            _read_storages(handle, _PlainUnpickler(handle, path.name).load(), unpickler.storages)
            if not isinstance(state, dict):
                raise BackboneError(f"{path} holds a {type(state).__name__}, not a state dict")
            return {str(name): value.array() for name, value in state.items() if isinstance(value, _Tensor)}
        except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError, IndexError) as exc:
            raise BackboneError(f"{path} is damaged or not a PyTorch state dict: {exc}") from None


def _read_storages(handle, keys, storages: dict[str, _Storage]) -> None:
    """Fill each storage, in `keys` order, from its int64 count and raw elements."""
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise ValueError(f"storage {key} is listed but no tensor uses it")
        (count,) = struct.unpack("<q", handle.read(8))
        dtype = np.dtype(STORAGE_DTYPES[storage.kind])
        raw = handle.read(count * dtype.itemsize)
        if count != storage.numel or len(raw) != count * dtype.itemsize:
            raise ValueError(f"storage {key} is truncated")
        storage.data = np.frombuffer(raw, dtype=dtype)
    missing = [k for k, s in storages.items() if s.data is None]
    if missing:
        raise ValueError(f"{len(missing)} storages have no data")
