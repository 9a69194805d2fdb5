"""Reading PyTorch `torch.save` files into numpy without PyTorch and without running code.

`load_torch_file(path)` handles the zip format (torch >= 1.6: `<prefix>/data.pkl` plus
raw storages under `<prefix>/data/<key>`) and the legacy single-stream format. The
pickle is read by `RestrictedUnpickler`, whose `find_class` resolves only the handful of
globals that `torch.save` emits for tensors and plain containers, each mapped to a small
function of OUR OWN that rebuilds data (never the named callable). Anything else raises
`RefusedGlobalError` naming the global, before any of it could run.

Tensors come back as `np.ndarray` (bfloat16 as `ml_dtypes.bfloat16`, which `astype`
converts exactly); views / non-contiguous tensors are rebuilt from storage offset and
strides and copied. Containers come back as dict / OrderedDict / list / tuple; plain
Python scalars and strings (Lightning metadata) pass through.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np


class RefusedGlobalError(pickle.UnpicklingError):
    """The pickle names a global outside the tensor allow-list (it may try to run code)."""


# torch storage class name -> numpy dtype.
_STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,
}

# torch dtype attribute name -> numpy dtype (dtype objects pickle as GLOBAL torch.<name>).
_TORCH_DTYPES: dict[str, Any] = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
}


class _StorageType:
    """Stand-in for a torch storage class: only its dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
    """A storage whose bytes may arrive later (legacy format)."""

    def __init__(self, dtype, numel: int, data: np.ndarray | None = None):
        self.dtype = np.dtype(dtype)
        self.numel = int(numel)
        self.data = data

    def array(self) -> np.ndarray:
        if self.data is None:
            raise pickle.UnpicklingError("tensor storage was never read (truncated file?)")
        return self.data


class _StorageView:
    """Legacy-format view into a root storage (offset, size in elements)."""

    def __init__(self, root: _Storage, offset: int, size: int):
        self.root, self.offset, self.size = root, int(offset), int(size)
        self.dtype = root.dtype

    def array(self) -> np.ndarray:
        return self.root.array()[self.offset : self.offset + self.size]


class _PendingTensor:
    """A tensor whose storage bytes are read after the pickle (legacy format)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def resolve(self) -> np.ndarray:
        return _strided(self.storage.array(), self.offset, self.size, self.stride)


def _strided(flat: np.ndarray, offset: int, size, stride) -> np.ndarray:
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    if any(s == 0 for s in size):
        return np.zeros(size, flat.dtype)
    last = int(offset) + sum((n - 1) * st for n, st in zip(size, stride))
    if offset < 0 or any(st < 0 for st in stride) or last >= flat.size:
        raise pickle.UnpicklingError(
            f"tensor (offset {offset}, size {size}, stride {stride}) reads outside its storage "
            f"of {flat.size} elements"
        )
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[int(offset) :], shape=size, strides=tuple(st * item for st in stride), writeable=False
    )
    return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride, requires_grad,
    backward_hooks[, metadata]) -> array; autograd fields are ignored."""
    if isinstance(storage, (_Storage, _StorageView)):
        if isinstance(storage, _StorageView) or storage.data is None:
            return _PendingTensor(storage, storage_offset, size, stride)
        return _strided(storage.data, storage_offset, size, stride)
    raise pickle.UnpicklingError(f"tensor rebuilt from a non-storage object {type(storage).__name__}")


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *state):
    return data


def _torch_size(*args):
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1').
    if not isinstance(obj, str) or not isinstance(encoding, str):
        raise pickle.UnpicklingError("_codecs.encode called with unexpected arguments")
    return obj.encode(encoding, errors)


def _np_scalar(dtype, data=None):
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("object-dtype numpy scalars are refused")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_dtype(name, *args):
    dt = np.dtype(name)
    if dt.hasobject:
        raise pickle.UnpicklingError("object numpy dtypes are refused")
    return dt


class _SafeNDArray:
    """Receives numpy's `_reconstruct` + `__setstate__` protocol and builds a plain array."""

    def __init__(self, *unused):
        self.value = None

    def __setstate__(self, state):
        _, shape, dtype, fortran, raw = state[:5]
        dtype = np.dtype(dtype)
        if dtype.hasobject or not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError("object numpy arrays are refused")
        arr = np.frombuffer(bytes(raw), dtype=dtype).reshape(shape, order="F" if fortran else "C")
        self.value = arr.copy()


def _np_reconstruct(cls, shape, dtype_code):
    return _SafeNDArray()


def _device(*args):
    return str(args[0]) if args else "cpu"


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): lambda storage, offset, size, stride, *rest: _rebuild_tensor(
        storage, offset, size, stride
    ),
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): _device,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _codecs_encode,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy", "dtype"): _np_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy", "ndarray"): _SafeNDArray,
}


class UnknownObject:
    """Inert record of an object whose class is not allow-listed (only with
    `stub_unknown=True`): keeps the global's name, the constructor args and the pickled
    state, and never calls anything from the file."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"UnknownObject({self.qualname})"


def _unknown_global(qualname: str) -> type:
    # A fresh subclass so that both REDUCE (call) and NEWOBJ (cls.__new__) work inertly.
    return type("UnknownObject", (UnknownObject,), {"qualname": qualname})


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals (to our own safe stand-ins).

    With `stub_unknown=True`, other globals become inert `UnknownObject` records instead
    of an error (for Lightning checkpoints whose metadata holds e.g. config objects); the
    named code is still never imported or run.
    """

    def __init__(self, file: BinaryIO, storage_loader, stub_unknown: bool = False):
        super().__init__(file, encoding="utf-8")
        self._storage_loader = storage_loader
        self._stub_unknown = stub_unknown

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles (torch's default) may use Python 2 names (__builtin__.set).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return np.dtype(_TORCH_DTYPES[name])
        if self._stub_unknown:
            return _unknown_global(f"{module}.{name}")
        raise RefusedGlobalError(
            f"refusing to unpickle global {module}.{name}: only tensors, plain containers and "
            "scalars are read from PyTorch files (no code is executed). If this file holds "
            "other objects, re-save just the state dict: torch.save(model.state_dict(), path), "
            "or load with load_torch_file(path, stub_unknown=True) to keep them as inert records."
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self._storage_loader(pid)


def _storage_dtype(storage_type) -> np.dtype:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    if isinstance(storage_type, np.dtype):
        return storage_type
    raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")


def _finalise(obj: Any) -> Any:
    """Replaces pending tensors and numpy stand-ins in nested containers."""
    if isinstance(obj, _PendingTensor):
        return obj.resolve()
    if isinstance(obj, _SafeNDArray):
        return obj.value
    if isinstance(obj, UnknownObject):
        obj.args, obj.state = _finalise(obj.args), _finalise(obj.state)
        return obj
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _finalise(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _finalise(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finalise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finalise(v) for v in obj)
    return obj


def _load_zip(path: str, stub_unknown: bool) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise pickle.UnpicklingError(
                f"{path}: not a torch.save zip archive (found {len(pkl)} top-level data.pkl entries)"
            )
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in names:
            big_endian = zf.read(prefix + "byteorder").decode().strip() == "big"
        cache: dict[str, _Storage] = {}

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            key = str(key)
            if key not in cache:
                dtype = _storage_dtype(storage_type)
                raw = zf.read(f"{prefix}data/{key}")
                dt = dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype
                arr = np.frombuffer(raw, dtype=dt)
                if arr.dtype != dtype:
                    arr = arr.astype(dtype)
                cache[key] = _Storage(dtype, arr.size, arr)
            return cache[key]

        with zf.open(pkl[0]) as f:
            obj = RestrictedUnpickler(io.BytesIO(f.read()), load_storage, stub_unknown).load()
    return _finalise(obj)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy header records, which hold only plain Python values."""

    def find_class(self, module, name):
        raise RefusedGlobalError(f"refusing to unpickle global {module}.{name} in a torch file header")


def _load_legacy(path: str, stub_unknown: bool) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _PlainUnpickler(f).load()
        except RefusedGlobalError:
            raise
        except Exception as e:
            raise pickle.UnpicklingError(f"{path}: not a PyTorch file ({e})") from e
        if magic != _LEGACY_MAGIC:
            raise pickle.UnpicklingError(f"{path}: not a PyTorch file (bad magic number)")
        _PlainUnpickler(f).load()  # protocol version
        sys_info = _PlainUnpickler(f).load()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        roots: dict[str, _Storage] = {}

        def load_storage(pid):
            _, storage_type, root_key, _location, numel = pid[:5]
            view = pid[5] if len(pid) > 5 else None
            root_key = str(root_key)
            if root_key not in roots:
                roots[root_key] = _Storage(_storage_dtype(storage_type), numel)
            root = roots[root_key]
            if view is not None:
                view_key, offset, size = view
                return _StorageView(root, offset, size)
            return root

        obj = RestrictedUnpickler(f, load_storage, stub_unknown).load()
        try:
            keys = _PlainUnpickler(f).load()
        except EOFError as e:
            raise pickle.UnpicklingError(f"{path}: truncated legacy PyTorch file (no storage list)") from e
        for key in keys:
            storage = roots[str(key)]
            (numel,) = struct.unpack("<q" if little else ">q", f.read(8))
            raw = f.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise pickle.UnpicklingError(f"{path}: storage {key} is truncated")
            dt = storage.dtype if little or storage.dtype.itemsize == 1 else storage.dtype.newbyteorder(">")
            storage.data = np.frombuffer(raw, dtype=dt).astype(storage.dtype)
    return _finalise(obj)


def load_torch_file(path: str | os.PathLike, *, stub_unknown: bool = False) -> Any:
    """Loads a `torch.save` file as nested containers of numpy arrays, without PyTorch.

    Raises `RefusedGlobalError` (a `pickle.UnpicklingError`) if the file references any
    global outside the tensor allow-list (unless `stub_unknown`, see RestrictedUnpickler);
    nothing from the file is executed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PyTorch file not found: {path!r}")
    if zipfile.is_zipfile(path):
        return _load_zip(path, stub_unknown)
    return _load_legacy(path, stub_unknown)
