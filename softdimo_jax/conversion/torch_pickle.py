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

Hostile files are refused with a `TorchFileError` (one line, a `BadInput`) while memory
stays near the process's baseline: shared references stay shared (a `[l, l]` tower costs
one node per level, cycles are kept), nesting deeper than `MAX_DEPTH` is refused, a view
that reads one element more than once (stride 0, overlapping strides) is refused, copies
of views are capped at a few times the storage the file really holds, every storage's
declared size is checked against its zip member (and the bytes left in a legacy file)
before anything is read, deflated members that would expand more than `MAX_RATIO`-fold
are refused, and no allow-listed constructor allocates from a number in the file.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from softdimo_jax.runtime.errors import BadInput

# Containers nested deeper than this are refused (a state dict is 2-4 levels deep).
MAX_DEPTH = 256
# A deflated zip member may expand at most this much (torch.save stores members raw)...
MAX_RATIO = 64
# ...unless it is this small once expanded.
SMALL_MEMBER = 16 << 20
# data.pkl holds names and shapes only; the weights are separate members.
MAX_PICKLE_BYTES = 1 << 30


class TorchFileError(BadInput, pickle.UnpicklingError):
    """The file is not a PyTorch checkpoint we can read safely (corrupt, truncated, hostile)."""


class RefusedGlobalError(TorchFileError):
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
            raise TorchFileError("tensor storage was never read (truncated file?) — re-save the checkpoint")
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

    def resolve(self, budget: "_Budget") -> np.ndarray:
        return _strided(self.storage.array(), self.offset, self.size, self.stride, budget)


class _Budget:
    """Bytes that tensor copies may still take: a few times what the file's storages hold,
    so that many views of one storage cannot multiply it."""

    def __init__(self):
        self.storage_bytes = 0
        self.copied = 0

    def spend(self, nbytes: int, what: str) -> None:
        self.copied += nbytes
        if self.copied > 4 * self.storage_bytes + (64 << 20):
            raise TorchFileError(
                f"{what}: its tensors would take {self.copied / 2**20:.0f} MiB, far more than the "
                f"{self.storage_bytes / 2**20:.0f} MiB of storage in the file (views repeated many "
                "times) — re-save the state dict with contiguous, unshared tensors"
            )


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) for v in values):
        raise TorchFileError(f"tensor {what} {values!r} is not a tuple of integers — the file is corrupt")
    return tuple(int(v) for v in values)


def _strided(flat: np.ndarray, offset: int, size, stride, budget: "_Budget") -> np.ndarray:
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if not isinstance(offset, int):
        raise TorchFileError(f"tensor offset {offset!r} is not an integer — the file is corrupt")
    if len(size) != len(stride):
        raise TorchFileError(f"tensor size {size} and stride {stride} differ in rank — the file is corrupt")
    if any(s < 0 for s in size):
        raise TorchFileError(f"tensor size {size} is negative — the file is corrupt")
    if any(s == 0 for s in size):
        return np.zeros(size, flat.dtype)
    last = int(offset) + sum((n - 1) * st for n, st in zip(size, stride))
    if offset < 0 or any(st < 0 for st in stride) or last >= flat.size:
        raise TorchFileError(
            f"tensor (offset {offset}, size {size}, stride {stride}) reads outside its storage "
            f"of {flat.size} elements — the file is corrupt"
        )
    numel = 1
    for n in size:
        numel *= n
    # A view reads each element at most once iff, with dims sorted by stride, every stride
    # is at least the extent of the smaller ones (stride 0 or interleaved dims fail).
    extent = 1
    for n, st in sorted(((n, st) for n, st in zip(size, stride) if n > 1), key=lambda p: p[1]):
        if st < extent:
            raise TorchFileError(
                f"tensor of size {size} with stride {stride} repeats storage elements "
                f"({numel} elements over a storage of {flat.size}) — stride-0 / overlapping views "
                "are refused; re-save with tensor.contiguous()"
            )
        extent = st * (n - 1) + extent
    budget.spend(numel * flat.dtype.itemsize, f"tensor of size {size}")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[int(offset) :], shape=size, strides=tuple(st * item for st in stride), writeable=False
    )
    return np.array(view, copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    """torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride, requires_grad,
    backward_hooks[, metadata]) -> a pending tensor, copied out of its storage by
    `_finalise` (under the load's byte budget); autograd fields are ignored."""
    if isinstance(storage, (_Storage, _StorageView)):
        return _PendingTensor(storage, storage_offset, size, stride)
    raise TorchFileError(f"tensor rebuilt from a non-storage object {type(storage).__name__} — the file is corrupt")


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *state):
    return data


def _torch_size(*args):
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1').
    if not isinstance(obj, str) or not isinstance(encoding, str) or not isinstance(errors, str):
        raise TorchFileError("_codecs.encode called with unexpected arguments — the file is corrupt")
    return obj.encode(encoding, errors)


def _np_scalar(dtype, data=None):
    dtype = _np_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise TorchFileError("a numpy scalar's bytes do not match its dtype — the file is corrupt")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _np_dtype(name, *args):
    if isinstance(name, np.dtype):
        dt = name
    elif isinstance(name, str) and len(name) <= 16 and name.isalnum():
        dt = np.dtype(name)  # plain names only: a structured dtype string could be huge
    else:
        raise TorchFileError(f"numpy dtype {name!r} is refused (plain dtype names only)")
    if dt.hasobject:
        raise TorchFileError("object numpy dtypes are refused")
    return dt


class _SafeNDArray:
    """Receives numpy's `_reconstruct` + `__setstate__` protocol and builds a plain array."""

    def __init__(self, *unused):
        self.value = None

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 5:
            raise TorchFileError("a numpy array's pickled state is malformed — the file is corrupt")
        _, shape, dtype, fortran, raw = state[:5]
        dtype = _np_dtype(dtype)
        if not isinstance(raw, (bytes, bytearray)):
            raise TorchFileError("object numpy arrays are refused")
        shape = _ints(shape, "numpy shape")
        numel = 1
        for n in shape:
            numel *= n
        if numel * dtype.itemsize != len(raw):
            raise TorchFileError(f"a numpy array of shape {shape} does not match its {len(raw)} bytes — "
                                 "the file is corrupt")
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
    # Not bytearray / bytes / range: they allocate from a number in the file.
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
            "scalars are read from PyTorch files (no code is executed) — if this file holds "
            "other objects, re-save just the state dict: torch.save(model.state_dict(), path), "
            "or load with load_torch_file(path, stub_unknown=True) to keep them as inert records."
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise TorchFileError(f"unsupported persistent id {str(pid)[:80]} — the file is corrupt")
        if not isinstance(pid[4], int) or pid[4] < 0:
            raise TorchFileError(f"storage size {pid[4]!r} is not a count — the file is corrupt")
        return self._storage_loader(pid)


def _storage_dtype(storage_type) -> np.dtype:
    if isinstance(storage_type, _StorageType):
        return storage_type.dtype
    if isinstance(storage_type, np.dtype):
        return storage_type
    raise TorchFileError(f"unknown storage type {str(storage_type)[:80]} — the file is corrupt")


def _finalise(obj: Any, budget: _Budget) -> Any:
    """Replaces pending tensors and numpy stand-ins in nested containers.

    Each object is rebuilt once (memo by id), so shared references stay shared and a
    cycle stays a cycle; containers deeper than MAX_DEPTH are refused.
    """
    memo: dict[int, Any] = {}
    keep: list[Any] = []  # holds the originals so that their ids stay unique

    def walk(o: Any, depth: int) -> Any:
        if isinstance(o, (str, bytes, int, float, bool, complex, type(None), np.ndarray, np.generic)):
            return o
        key = id(o)
        if key in memo:
            return memo[key]
        if depth > MAX_DEPTH:
            raise TorchFileError(f"containers nested deeper than {MAX_DEPTH} levels — not a state dict; "
                                 "re-save just model.state_dict()")
        keep.append(o)
        if isinstance(o, _PendingTensor):
            memo[key] = out = o.resolve(budget)
        elif isinstance(o, _SafeNDArray):
            memo[key] = out = o.value
        elif isinstance(o, UnknownObject):
            memo[key] = out = o
            o.args, o.state = walk(o.args, depth + 1), walk(o.state, depth + 1)
        elif isinstance(o, dict):  # OrderedDict included; fill after memo for cycles
            memo[key] = out = collections.OrderedDict() if isinstance(o, collections.OrderedDict) else {}
            for k, v in list(o.items()):
                out[k] = walk(v, depth + 1)
        elif isinstance(o, list):
            memo[key] = out = []
            out.extend(walk(v, depth + 1) for v in list(o))
        elif isinstance(o, tuple):
            out = tuple(walk(v, depth + 1) for v in o)
            memo[key] = out = memo.get(key, out)
        else:
            memo[key] = out = o
        return out

    return walk(obj, 0)


def check_member_name(name: str, path: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise TorchFileError(f"{path}: zip member {name!r} points outside the archive — not a torch.save file")


def check_member_size(info: zipfile.ZipInfo, path: str, limit: int | None = None) -> None:
    if limit is not None and info.file_size > limit:
        raise TorchFileError(f"{path}: zip member {info.filename} is {info.file_size} bytes, over the "
                             f"{limit}-byte limit — not a state dict torch.save would write")
    if (info.compress_type != zipfile.ZIP_STORED and info.file_size > SMALL_MEMBER
            and info.file_size > MAX_RATIO * max(info.compress_size, 1)):
        raise TorchFileError(
            f"{path}: zip member {info.filename} would expand {info.compress_size} -> {info.file_size} "
            "bytes (a decompression bomb; torch.save stores members uncompressed) — re-save the checkpoint")


def _load_zip(path: str, stub_unknown: bool) -> Any:
    budget = _Budget()
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        for name in infos:
            check_member_name(name, path)
        names = list(infos)
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise TorchFileError(
                f"{path}: not a torch.save zip archive (found {len(pkl)} top-level data.pkl entries) — "
                "pass a file written by torch.save"
            )
        prefix = pkl[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in names:
            check_member_size(infos[prefix + "byteorder"], path, limit=16)
            big_endian = zf.read(prefix + "byteorder").decode("ascii", "replace").strip() == "big"
        cache: dict[str, _Storage] = {}

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            key = str(key)
            if key not in cache:
                dtype = _storage_dtype(storage_type)
                member = f"{prefix}data/{key}"
                if member not in infos:
                    raise TorchFileError(f"{path}: storage {key} has no zip member {member} — the file is "
                                         "truncated or corrupt")
                info = infos[member]
                # Checked before reading: the declared size must be the member's real size.
                if info.file_size != numel * dtype.itemsize:
                    raise TorchFileError(
                        f"{path}: storage {key} declares {numel} x {dtype.itemsize} bytes but its zip member "
                        f"holds {info.file_size} — the file is corrupt")
                check_member_size(info, path)
                raw = zf.read(member)
                dt = dtype.newbyteorder(">") if big_endian and dtype.itemsize > 1 else dtype
                arr = np.frombuffer(raw, dtype=dt)
                if arr.dtype != dtype:
                    arr = arr.astype(dtype)
                budget.storage_bytes += arr.nbytes
                cache[key] = _Storage(dtype, arr.size, arr)
            return cache[key]

        check_member_size(infos[pkl[0]], path, limit=MAX_PICKLE_BYTES)
        with zf.open(pkl[0]) as f:
            obj = RestrictedUnpickler(io.BytesIO(f.read()), load_storage, stub_unknown).load()
    return _finalise(obj, budget)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy header records, which hold only plain Python values."""

    def find_class(self, module, name):
        raise RefusedGlobalError(f"refusing to unpickle global {module}.{name} in a torch file header — "
                                 "not a torch.save file")


def _load_legacy(path: str, stub_unknown: bool) -> Any:
    budget = _Budget()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(4).startswith(b"PK"):
            raise TorchFileError(f"{path}: a truncated or corrupt zip archive (no central directory) — "
                                 "re-download or re-save the checkpoint")
        f.seek(0)
        try:
            magic = _PlainUnpickler(f).load()
        except RefusedGlobalError:
            raise
        except Exception as e:
            raise TorchFileError(f"{path}: not a PyTorch file ({type(e).__name__}: {e}) — pass a file "
                                 "written by torch.save") from e
        if magic != _LEGACY_MAGIC:
            raise TorchFileError(f"{path}: not a PyTorch file (bad magic number) — pass a file written by torch.save")
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
            raise TorchFileError(f"{path}: truncated legacy PyTorch file (no storage list) — re-save the checkpoint") from e
        if not isinstance(keys, list) or any(str(k) not in roots for k in keys):
            raise TorchFileError(f"{path}: the storage list does not match the tensors — the file is corrupt")
        for key in keys:
            storage = roots[str(key)]
            head = f.read(8)
            if len(head) != 8:
                raise TorchFileError(f"{path}: storage {key} is truncated — re-save the checkpoint")
            (numel,) = struct.unpack("<q" if little else ">q", head)
            nbytes = numel * storage.dtype.itemsize
            # Checked before reading: never ask for more bytes than the file has left.
            if numel < 0 or numel != storage.numel or nbytes > size - f.tell():
                raise TorchFileError(f"{path}: storage {key} declares {numel} elements "
                                     f"({storage.numel} in the pickle, {size - f.tell()} bytes left) — "
                                     "the file is truncated or corrupt")
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise TorchFileError(f"{path}: storage {key} is truncated — re-save the checkpoint")
            dt = storage.dtype if little or storage.dtype.itemsize == 1 else storage.dtype.newbyteorder(">")
            storage.data = np.frombuffer(raw, dtype=dt).astype(storage.dtype)
            budget.storage_bytes += storage.data.nbytes
    return _finalise(obj, budget)


def load_torch_file(path: str | os.PathLike, *, stub_unknown: bool = False) -> Any:
    """Loads a `torch.save` file as nested containers of numpy arrays, without PyTorch.

    Raises `RefusedGlobalError` (a `pickle.UnpicklingError`) if the file references any
    global outside the tensor allow-list (unless `stub_unknown`, see RestrictedUnpickler);
    nothing from the file is executed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"PyTorch file not found: {path!r}")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, stub_unknown)
        return _load_legacy(path, stub_unknown)
    except TorchFileError:
        raise
    except RecursionError as e:
        raise TorchFileError(f"{path}: nested too deeply to read — not a state dict") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, zipfile.BadZipFile, zlib.error, OverflowError, UnicodeDecodeError) as e:
        raise TorchFileError(f"{path}: not a readable PyTorch file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}) — the file is truncated or corrupt; "
                             "re-download or re-save it") from e
