"""Reading flat state dicts from disk and mapping them strictly onto Flax params.

`load_state_dict` returns `{key: np.ndarray}` from `.bin`/`.pth`/`.pt`/`.ckpt` (PyTorch
zip-pickle, read by a restricted unpickler: no PyTorch, no code execution), `.safetensors`
and `.npz`. `StrictStateDict` records every key a converter takes, so that a conversion
fails with one error that lists every missing, unexpected and misshapen key at once.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from softdimo_jax.conversion.torch_pickle import check_member_name, check_member_size, load_torch_file
from softdimo_jax.runtime.errors import BadInput


class ConversionError(BadInput):
    """A checkpoint does not fit the model it is converted into."""


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def load_state_dict(path: str, *, subkey: str | None = None) -> dict[str, np.ndarray]:
    """Loads a flat `{name: array}` state dict from a PyTorch, safetensors or npz file.

    Args:
      path: the checkpoint file.
      subkey: for PyTorch files that wrap the weights in a dict (`model_state_dict`,
        Lightning's `state_dict`): the entry to take. None takes the top level, or, when
        the top level holds exactly one of the usual wrapper keys, that one.
    """
    if not os.path.exists(path):
        raise CheckpointNotFound(f"checkpoint not found: {path!r} — check the path")
    if os.path.isdir(path):
        raise BadInput(f"{path!r} is a directory — pass the checkpoint file inside it")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        sd = _load_safetensors(path)
    elif lower.endswith(".npz"):
        sd = _load_npz(path)
    elif lower.endswith((".bin", ".pth", ".pt", ".ckpt")):
        obj = load_torch_file(path)
        sd = _unwrap(obj, subkey, path)
    else:
        raise ConversionError(
            f"unknown checkpoint format for {path!r}: expected .bin/.pth/.pt/.ckpt "
            "(PyTorch zip-pickle), .safetensors or .npz"
        )
    if subkey is not None and not lower.endswith((".bin", ".pth", ".pt", ".ckpt")):
        prefix = subkey + "."
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} or sd
    return sd


class CheckpointNotFound(BadInput, FileNotFoundError):
    """The checkpoint file does not exist."""


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    # The header declares every tensor's byte range; safetensors checks it against the file
    # size before reading, so a truncated or inflated file is refused without allocating.
    try:
        return dict(load_file(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise BadInput(f"{path!r} is not a readable .safetensors file ({' '.join(str(e).split())}) "
                       "— re-download or re-export it") from e


def check_npz(path: str) -> None:
    """Refuses an .npz whose members escape the archive, would inflate like a zip bomb, hold
    objects, or declare an array larger than the bytes that member holds — checked on the
    headers, before numpy allocates anything."""
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            check_member_name(info.filename, path)
            check_member_size(info, path)
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                header = f.tell()
            if dtype.hasobject:
                raise BadInput(f"{path}: member {info.filename} holds Python objects — save plain arrays")
            numel = 1
            for n in shape:
                numel *= int(n)
            if numel * dtype.itemsize != info.file_size - header:
                raise BadInput(f"{path}: member {info.filename} declares {shape} {dtype} "
                               f"({numel * dtype.itemsize} bytes) but holds {info.file_size - header} "
                               "— the file is truncated or corrupt; re-create it")


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        check_npz(path)
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            # Parity fixtures keep weights under `sd/`; accept them directly.
            if any(k.startswith("sd/") for k in keys):
                return {k[3:]: np.asarray(z[k]) for k in keys if k.startswith("sd/")}
            return {k: np.asarray(z[k]) for k in keys}
    except BadInput:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise BadInput(f"{path!r} is not a readable .npz file ({type(e).__name__}: "
                       f"{' '.join(str(e).split())}) — re-create or re-copy it") from e


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


def _unwrap(obj: Any, subkey: str | None, path: str) -> dict[str, np.ndarray]:
    if subkey is not None:
        if not isinstance(obj, Mapping) or subkey not in obj:
            have = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise ConversionError(f"{path!r} has no entry {subkey!r}; top-level entries: {have}")
        obj = obj[subkey]
    elif isinstance(obj, Mapping) and not any(isinstance(v, np.ndarray) for v in obj.values()):
        found = [k for k in _WRAPPER_KEYS if k in obj]
        if len(found) == 1:
            obj = obj[found[0]]
        else:
            raise ConversionError(
                f"{path!r} holds no flat state dict; top-level entries: {list(obj)}. "
                "Pass the entry that holds the weights (e.g. --subkey model_state_dict)."
            )
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path!r} does not hold a state dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            out[str(k)] = v
        elif isinstance(v, (int, float)) and str(k).endswith("num_batches_tracked"):
            out[str(k)] = np.asarray(v)
    return out


class StrictStateDict:
    """A state dict that remembers which keys a converter used.

    `take(key, shape)` returns the array (as float32 unless `dtype` says otherwise) and
    records a missing key or a shape mismatch instead of raising, so that `finish()` can
    report every problem at once. `aliases` maps legacy names to current ones
    (e.g. MaskBit's `token_emb.` -> `input_proj.`); two source keys that land on one name
    (a key and its legacy alias, a wrapped `module.x` and a plain `x`) are an error naming
    both, never one silently overwriting the other. `ignore_prefixes` names keys that are
    known not to belong to the model (Lightning's `loss.`); they are reported in
    `self.ignored` and never count as unexpected.
    """
    def __init__(
        self,
        sd: Mapping[str, np.ndarray],
        *,
        name: str = "checkpoint",
        aliases: Mapping[str, str] | None = None,
        ignore_prefixes: Iterable[str] = (),
        strip_prefixes: Iterable[str] = (),
    ):
        self.name = name
        self._sd: dict[str, np.ndarray] = {}
        self.ignored: list[str] = []
        self.duplicates: list[str] = []
        origin: dict[str, str] = {}
        ignore_prefixes = tuple(ignore_prefixes)
        for key, value in sd.items():
            new = key
            for p in strip_prefixes:
                if new.startswith(p):
                    new = new[len(p):]
            for old, cur in (aliases or {}).items():
                if new.startswith(old):
                    new = cur + new[len(old):]
            if ignore_prefixes and new.startswith(ignore_prefixes):
                self.ignored.append(key)
                continue
            if new in origin:
                self.duplicates.append(f"{origin[new]} and {key} both map to {new}")
                continue
            origin[new] = key
            self._sd[new] = np.asarray(value)
        self._used: set[str] = set()
        self.missing: list[str] = []
        self.misshapen: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def keys(self):
        return self._sd.keys()

    def shape(self, key: str) -> tuple[int, ...] | None:
        return tuple(self._sd[key].shape) if key in self._sd else None

    def take(
        self,
        key: str,
        shape: Iterable[int] | None = None,
        *,
        dtype: Any = np.float32,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        optional: bool = False,
    ) -> np.ndarray | None:
        """Marks `key` used and returns it; `shape` is checked on the source layout."""
        if key not in self._sd:
            if not optional:
                self.missing.append(key + (f" {_fmt_shape(shape)}" if shape is not None else ""))
            if shape is None:
                return None
            return np.zeros(tuple(shape), dtype=dtype)
        self._used.add(key)
        arr = self._sd[key]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            self.misshapen.append(
                f"{key}: checkpoint {_fmt_shape(arr.shape)}, model expects {_fmt_shape(shape)}"
            )
            return np.zeros(tuple(shape), dtype=dtype)
        if dtype is not None:
            arr = arr.astype(dtype)
        if transform is not None:
            arr = transform(arr)
        return arr

    def skip(self, *keys: str) -> None:
        """Marks keys as deliberately unused (buffers the port recomputes)."""
        for k in keys:
            if k in self._sd:
                self._used.add(k)

    @property
    def unexpected(self) -> list[str]:
        return sorted(k for k in self._sd if k not in self._used)

    def finish(self) -> None:
        """Raises ConversionError listing every duplicate / missing / unexpected / misshapen key."""
        unexpected = self.unexpected
        if not (self.missing or unexpected or self.misshapen or self.duplicates):
            return
        lines = [f"{self.name}: the checkpoint does not match the model."]
        for title, items in (
            ("duplicate keys (keep one copy of each)", self.duplicates),
            ("missing keys", self.missing),
            ("unexpected keys", unexpected),
            ("misshapen keys", self.misshapen),
        ):
            if items:
                shown = items[:50]
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {k}" for k in shown]
                if len(items) > len(shown):
                    lines.append(f"    ... and {len(items) - len(shown)} more")
        lines.append(
            "  — check that the checkpoint belongs to this model family and that the config "
            "(sizes, bits, depth) matches the checkpoint."
        )
        raise ConversionError("\n".join(lines))


def check_params_match(params: Any, expected: Any, *, name: str = "params") -> None:
    """Checks that a converted params tree has exactly the expected structure and shapes.

    `expected` is e.g. `jax.eval_shape(model.init, ...)['params']`: every target
    parameter must be filled, with the right shape, and nothing extra.
    """
    from flax import traverse_util

    got = traverse_util.flatten_dict(_unfreeze(params), sep="/")
    want = traverse_util.flatten_dict(_unfreeze(expected), sep="/")
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = [
        f"{k}: converted {_fmt_shape(np.shape(got[k]))}, module expects {_fmt_shape(want[k].shape)}"
        for k in sorted(set(got) & set(want))
        if tuple(np.shape(got[k])) != tuple(want[k].shape)
    ]
    if missing or extra or bad:
        lines = [f"{name}: converted parameters do not match the Flax module."]
        for title, items in (("unfilled", missing), ("extra", extra), ("misshapen", bad)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:30]))
        raise ConversionError("\n".join(lines))


def _unfreeze(tree):
    try:
        from flax.core import unfreeze

        return unfreeze(tree)
    except Exception:  # already a plain dict
        return tree
