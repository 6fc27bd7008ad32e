"""torch's `.pth`/`.pt` files read without torch: the zip archive `torch.save` writes, into numpy arrays.

    state_dict = read_torch_file("alexnet-owt-7be5be79.pth")   # {"features.0.weight": ndarray, ...}

The format (torch >= 1.6, `torch/serialization.py`): a zip archive whose `<name>/data.pkl`
is a pickle of the saved object, in which each tensor is a call of
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and each storage a
persistent id `("storage", torch.FloatStorage, key, location, numel)` whose bytes are the
archive's `<name>/data/<key>`. `<name>/byteorder` says the bytes' order (little when absent).

The pickle is never given to `pickle`: this module walks its opcodes (`pickletools.genops`
parses them, executing nothing) on a stack machine of its own that knows the opcodes a
saved state_dict uses and the names torch's `weights_only=True` loader accepts for one:
the tensor and parameter rebuild functions, the typed storages, `OrderedDict`, `torch.Size`,
`torch.device` and the primitive types. These become numpy arrays, dicts, tuples and
strings; any other name is refused before anything runs ("the file asks to run code
(posix.system)"), as is any other opcode. Storages shared by several tensors are read once;
every view is bounds-checked against its storage before it is taken, and each tensor comes
back as its own C-contiguous array, bit for bit what `torch.load` gives (tests/test_torch_file.py).

Files in torch's legacy format (before 1.6, not a zip) are left to torch: `is_torch_zip`
tells them apart, and `read_torch_file` refuses them in one line (any other non-zip file
too, walked the same way: a pickle that names code is refused as such, garbage as corrupt).
"""

from __future__ import annotations

import collections
import os
import pickletools
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first local header, which torch.save's archive starts with
# The typed storage classes a persistent id names, and the element type of their bytes.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class TorchFileError(ValueError):
    """A torch file this reader will not or cannot read; the message is one line saying why."""


class UnsafePickle(TorchFileError):
    """A pickle that names something outside the allowed set (it would run code): nothing of it was run."""


class _Storage:
    """A storage's element type, from the class a persistent id names."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Device(str):
    """`torch.device("cpu")` as the string that names it."""


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> np.ndarray:
    """torch's `_rebuild_tensor_v2` for a numpy storage: the strided view, bounds-checked, as a contiguous copy."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise TorchFileError("a tensor without a storage")
    size, stride = tuple(size), tuple(stride)
    ints = (offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        raise TorchFileError(f"a tensor with a bad layout (offset {offset}, size {size}, stride {stride})")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size:
        raise TorchFileError(f"a tensor reaches element {last} of a storage of {storage.size}: truncated or corrupt")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * storage.itemsize for s in stride), writeable=False
    )
    return np.array(view, order="C")


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None) -> np.ndarray:
    """torch's `_rebuild_parameter` (and `_with_state`): an `nn.Parameter` is its data."""
    if not isinstance(data, np.ndarray):
        raise TorchFileError("a parameter without a tensor")
    return data


def _size(shape=()) -> tuple:
    return tuple(shape)


def _device(*args) -> _Device:
    return _Device(":".join(str(a) for a in args))


# (module, name) -> what it becomes here; the names torch's weights-only loader allows in a state_dict.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    **{("torch", name): _Storage(name) for name in STORAGE_DTYPES},
}
_CALLABLE = (collections.OrderedDict, _rebuild_tensor_v2, _rebuild_parameter, _size, _device)


class _Mark:
    pass


_MARK = _Mark()


def _pop_mark(stack: list) -> list:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1 :]
            del stack[i:]
            return items
    raise TorchFileError("a pickle without its mark: corrupt")


def _global(module: str, name: str) -> Any:
    try:
        return ALLOWED_GLOBALS[module, name]
    except KeyError:
        raise UnsafePickle(f"refused: the file asks to run code ({module}.{name}); it was not executed") from None


def unpickle(data: bytes, persistent_load: Callable[[Any], Any]) -> Any:
    """The object a pickle holds, built from the allowed names and opcodes only; nothing else is run.

    **Raises:** UnsafePickle for a name outside `ALLOWED_GLOBALS`; TorchFileError for an
    opcode a saved state_dict does not use, or a pickle that is cut short or malformed.
    """
    stack: list = []
    memo: dict[int, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name = opcode.name
            if name in ("PROTO", "FRAME", "STOP"):
                if name == "STOP":
                    break
            elif name in ("EMPTY_DICT",):
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "MARK":
                stack.append(_MARK)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo[arg])
            elif name in ("GLOBAL",):
                module, _, attr = arg.partition(" ")
                stack.append(_global(module, attr))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                if not (isinstance(module, str) and isinstance(attr, str)):
                    raise TorchFileError("a global without its name: corrupt")
                stack.append(_global(module, attr))
            elif name in (
                "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "BININT", "BININT1", "BININT2",
                "LONG1", "LONG4", "INT", "LONG", "BINFLOAT", "FLOAT", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8",
                "SHORT_BINSTRING", "BINSTRING",
            ):  # fmt: skip
                stack.append(arg)
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name == "TUPLE":
                stack.append(tuple(_pop_mark(stack)))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "LIST":
                stack.append(_pop_mark(stack))
            elif name == "DICT":
                items = _pop_mark(stack)
                stack.append(dict(zip(items[::2], items[1::2])))
            elif name == "APPEND":
                value = stack.pop()
                stack[-1].append(value)
            elif name == "APPENDS":
                items = _pop_mark(stack)
                stack[-1].extend(items)
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                _setitem(stack[-1], key, value)
            elif name == "SETITEMS":
                items = _pop_mark(stack)
                for key, value in zip(items[::2], items[1::2]):
                    _setitem(stack[-1], key, value)
            elif name == "REDUCE":
                args, fn = stack.pop(), stack.pop()
                if not any(fn is allowed for allowed in _CALLABLE) or not isinstance(args, tuple):
                    raise TorchFileError("a call of something that is not a tensor or dict rebuild: corrupt")
                stack.append(fn(*args))
            elif name == "BUILD":
                # OrderedDict's attributes: a state_dict's `_metadata` (layer versions), which is kept aside.
                state = stack.pop()
                if not isinstance(stack[-1], collections.OrderedDict) or not isinstance(state, dict):
                    raise TorchFileError("a state set on something that is not a dict: corrupt")
            elif name in ("BINPERSID", "PERSID"):
                stack.append(persistent_load(stack.pop() if name == "BINPERSID" else arg))
            elif name == "POP":
                stack.pop()
            else:
                raise TorchFileError(
                    f"refused: corrupt, or a pickle with an instruction a state_dict does not use ({name})"
                )
        else:
            raise TorchFileError("truncated or corrupt (the pickle has no end)")
    except TorchFileError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, AttributeError) as e:
        # genops' parse errors (an unknown opcode, a cut-short argument) and a stack that does not add up.
        raise TorchFileError(
            "refused: corrupt, or a pickle with instructions that a weights-only loader does not allow "
            f"({type(e).__name__})"
        ) from None
    if len(stack) != 1:
        raise TorchFileError("refused: corrupt pickle (its stack does not end with one object)")
    return stack[0]


def _setitem(target: Any, key: Any, value: Any) -> None:
    if not isinstance(target, dict):
        raise TorchFileError("an item set on something that is not a dict: corrupt")
    target[key] = value


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's legacy format (torch/serialization.py)


def _refuse_legacy(data: bytes) -> None:
    """Refuse a file that is not a zip archive, saying what it is: legacy torch, code to run, or corrupt.

    Its first pickle is walked as any other (nothing runs), so a pickle that names code
    is refused as one, as torch's weights-only loader refuses it.
    """

    def no_storages(pid: Any) -> Any:
        raise TorchFileError("refused: a storage outside a torch archive")

    first = unpickle(data, no_storages)
    if first == LEGACY_MAGIC:
        raise TorchFileError(
            "torch's legacy format (before torch 1.6) needs torch to read: pip install 'alexnet-jax[convert]', "
            "or re-save it with torch.save in a current torch"
        )
    raise TorchFileError(f"not a readable PyTorch file (a pickle of {type(first).__name__}, not torch.save's archive)")


def is_torch_zip(path: str | os.PathLike) -> bool:
    """Whether `path` starts as a zip archive does: torch.save's format since 1.6 (or a cut-short one)."""
    with Path(path).open("rb") as f:
        return f.read(len(ZIP_MAGIC)) == ZIP_MAGIC


def read_torch_file(path: str | os.PathLike) -> Any:
    """The object `torch.save` wrote to `path`, tensors as numpy arrays (bfloat16 as ml_dtypes'), without torch.

    **Returns:** what was saved: for a state_dict an OrderedDict {name: ndarray}.
    **Raises:** UnsafePickle (the file names code to run; nothing ran), TorchFileError (legacy
    format, truncated, corrupt, an instruction a state_dict does not use), OSError (unreadable).
    """
    path = Path(path)
    if not is_torch_zip(path):
        _refuse_legacy(path.read_bytes())
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise TorchFileError("a zip archive, but not torch.save's (no <name>/data.pkl in it)")
            prefix = pickles[0][: -len("data.pkl")]
            order = "little"
            if f"{prefix}byteorder" in names:
                order = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
                if order not in ("little", "big"):
                    raise TorchFileError(f"truncated or corrupt (byteorder {order!r})")
            storages: dict[str, np.ndarray] = {}

            def persistent_load(pid: Any) -> np.ndarray:
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                    raise TorchFileError(f"refused: a persistent id that is not a storage ({str(pid)[:40]})")
                _, storage, key, _, numel = pid
                if not isinstance(storage, _Storage) or not isinstance(key, str) or not isinstance(numel, int):
                    raise TorchFileError("refused: a malformed storage record")
                if key not in storages:
                    entry = f"{prefix}data/{key}"
                    if entry not in names:
                        raise TorchFileError(f"truncated or corrupt (storage {key} is missing)")
                    dtype = storage.dtype.newbyteorder("<" if order == "little" else ">")
                    size = archive.getinfo(entry).file_size  # checked before reading: no decompression bomb
                    if size != numel * dtype.itemsize:
                        raise TorchFileError(f"truncated or corrupt (storage {key}: {size} bytes for {numel} elements)")
                    raw = archive.read(entry)
                    storages[key] = np.frombuffer(raw, dtype).astype(storage.dtype, copy=False)
                array = storages[key]
                if array.dtype != storage.dtype:
                    raise TorchFileError(f"truncated or corrupt (storage {key} read as two types)")
                return array

            return unpickle(archive.read(pickles[0]), persistent_load)
    except zipfile.BadZipFile as e:
        raise TorchFileError(f"truncated or corrupt (BadZipFile: {e})") from None
    except (EOFError, zipfile.LargeZipFile, NotImplementedError) as e:
        raise TorchFileError(f"truncated or corrupt ({type(e).__name__}: {e})") from None
