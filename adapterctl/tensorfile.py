"""Safetensors files read header-first: names, dtypes, shapes and byte ranges, tensors on demand.

Reading a header costs a few kilobytes whatever the file size; a tensor is read only when
asked for, with one seek and one read of exactly its bytes. ``BYTES_READ`` counts every byte
this module reads so tests (and curious users) can check that headers-only work stays small.

A file need not be on this disk: a ``RemoteFile`` (a Hub file at one commit) is read by byte
ranges, under the same header rules (``parse_header``).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterctl.errors import BrokenFile, UsageError

if TYPE_CHECKING:
    import numpy as np
    import torch

# Header JSON larger than this is not a real safetensors file (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec"
_U64 = 2**64  # shapes and offsets are unsigned 64-bit integers in the format

# safetensors dtype name -> bits per element (every dtype the format defines)
DTYPE_BITS: dict[str, int] = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
    "C64": 64,
}  # fmt: skip
# safetensors dtype name -> bytes per element (fractional for the 4- and 6-bit floats)
DTYPE_SIZES: dict[str, float] = {name: bits / 8 for name, bits in DTYPE_BITS.items()}

TORCH_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}  # fmt: skip


# safetensors dtype name -> the numpy dtype its tensors are held in: their own where NumPy has
# it; for the float formats NumPy lacks (bfloat16, float8), the unsigned integer of the same
# width, holding the raw bits that ``adapterctl.floats`` converts.
NUMPY_DTYPE_NAMES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "uint16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
    "F8_E4M3": "uint8", "F8_E5M2": "uint8",
}  # fmt: skip


def numpy_dtype(dtype: str) -> np.dtype[Any]:
    """The numpy dtype a tensor of safetensors dtype ``dtype`` is held in, byte for byte.

    NumPy has no bfloat16 or float8, so ``BF16`` is held as ``uint16`` and ``F8_E4M3`` /
    ``F8_E5M2`` as ``uint8``: their raw bit patterns, which ``adapterctl.floats`` widens to
    float32 (``floats.widen``) and rounds back (``floats.round_bf16``). The dtype says how to
    store, not what the values are: carry the safetensors name along to read them.

    Raises:
        KeyError: NumPy cannot hold ``dtype`` (the 4- and 6-bit floats, F8_E8M0).

    Example:
        >>> numpy_dtype("BF16"), numpy_dtype("F16")
        (dtype('uint16'), dtype('float16'))
    """
    import numpy as np

    return np.dtype(NUMPY_DTYPE_NAMES[dtype])


class _Counter:
    """Bytes read from disk by this module (headers and tensors); safe to add to from threads."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


BYTES_READ = _Counter()


def check_not_pointer(path: Path) -> None:
    """Raise BrokenFile if ``path`` is empty or a Git LFS pointer instead of real data."""
    if path.exists() and not (path.is_file() or path.is_dir()):  # a FIFO would block forever
        raise BrokenFile(f"{path}: not a regular file; replace it with the real file")
    size = path.stat().st_size
    if size == 0:
        raise BrokenFile(f"{path}: file is empty; re-download it or re-save the adapter")
    with open(path, "rb") as fh:
        head = fh.read(len(LFS_POINTER_PREFIX))
    BYTES_READ.add(len(head))
    if head == LFS_POINTER_PREFIX:
        raise BrokenFile(
            f"{path}: is a Git LFS pointer, not the weights; run `git lfs pull` in its repository"
        )


class RemoteFile(ABC):
    """A file that is not on this disk, read by byte ranges (``adapterctl.hub.base.HubFile``:
    a Hub repository's file at one commit).

    ``str()`` of one names it in messages; ``size`` is its length in bytes. Subclasses are
    frozen dataclasses, so a remote file can key a dict as a ``Path`` does.
    """

    size: int

    @abstractmethod
    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``start`` up to ``end`` (exclusive) of the file.

        Raises:
            BrokenFile: the file ends before ``end``.
            AdapterctlError: the store could not be read (not found, auth, network).
        """


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype (safetensors name), shape and absolute byte range.

    ``path`` is a local file, or a ``RemoteFile`` for a checkpoint read from the Hub: reading
    such a tensor (``array``/``load``) costs one ranged request of exactly its bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path | RemoteFile
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def local_path(self) -> Path:
        """The local file holding this tensor, for code that maps or copies whole tensors.

        Raises:
            UsageError: the tensor is in a remote file (a Hub base is read from its headers
                only; its weights are not here) (exit 2).
        """
        if isinstance(self.path, RemoteFile):
            raise UsageError(
                f"{self.path}: the base's weights are not on this disk (a Hub base is read from "
                "its headers only); download the base and pass its folder"
            )
        return self.path

    def _read(self, known: dict[str, str], lib: str) -> bytearray:
        """This tensor's bytes (one seek, one read), after checking ``lib`` can hold its dtype."""
        if self.dtype not in known:
            raise BrokenFile(
                f"{self.path}: tensor {self.name} has dtype {self.dtype}, which {lib} cannot "
                "load; re-save it as float32, float16 or bfloat16"
            )
        if isinstance(self.path, RemoteFile):
            data = bytearray(self.path.read_range(self.start, self.end))
            got = len(data)
        else:
            data = bytearray(self.nbytes)
            view, got = memoryview(data), 0
            with open(self.path, "rb", buffering=0) as fh:  # straight into `data`: no copy
                fh.seek(self.start)
                while got < self.nbytes:
                    n = fh.readinto(view[got:])
                    if not n:
                        break
                    got += n
        BYTES_READ.add(got)
        if got != self.nbytes:
            raise BrokenFile(f"{self.path}: truncated inside tensor {self.name}; re-download it")
        return data

    def load(self) -> torch.Tensor:
        """Read this tensor into a CPU torch tensor of its own dtype."""
        import torch

        data = self._read(TORCH_DTYPE_NAMES, "torch")
        dtype = getattr(torch, TORCH_DTYPE_NAMES[self.dtype])
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(self.shape)

    def array(self) -> np.ndarray[Any, Any]:
        """Read this tensor into a numpy array of its own dtype, except the floats NumPy lacks
        (BF16, F8_E4M3, F8_E5M2), which come widened to float32 exactly (``floats.widen``),
        so reading never imports torch."""
        import numpy as np

        from adapterctl.floats import widen

        data = self._read(NUMPY_DTYPE_NAMES, "numpy")
        held = np.frombuffer(data, dtype=numpy_dtype(self.dtype)).reshape(self.shape)
        return widen(held, self.dtype)


@dataclass
class SafetensorsHeader:
    """The parsed header of one safetensors file (local, or a ``RemoteFile``)."""

    path: Path | RemoteFile
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    data_offset: int = 0
    file_size: int = 0


def read_header(path: str | os.PathLike[str] | RemoteFile) -> SafetensorsHeader:
    """Parse a safetensors header without touching tensor data.

    Args:
        path: the ``.safetensors`` file, or a ``RemoteFile`` (read by two byte ranges: the
            length, then the JSON).

    Returns:
        The header with every tensor's dtype, shape and absolute byte range.

    Raises:
        BrokenFile: empty file, LFS pointer, truncated file, header length past the end or
            over the 100 MB cap, a header that is not strict UTF-8 JSON (NaN/Infinity, a
            duplicate key, a lone surrogate), an entry with an unknown dtype or a shape or
            offset that is not an unsigned 64-bit integer, a byte range that disagrees with
            its shape and dtype, or ranges that overlap, leave a gap or stop short of the end.
    """
    if isinstance(path, RemoteFile):
        return parse_header(path, path.size, path.read_range)
    p = Path(path)
    check_not_pointer(p)
    size = p.stat().st_size
    with open(p, "rb") as fh:

        def read(start: int, end: int) -> bytes:
            fh.seek(start)
            return fh.read(end - start)

        return parse_header(p, size, read)


def parse_header(
    file: Path | RemoteFile, size: int, read: Callable[[int, int], bytes]
) -> SafetensorsHeader:
    """The safetensors header rules, wherever the bytes come from, at least as strict as the
    reference reader (``safetensors``' ``read_metadata`` and ``Metadata::validate``): a length
    within the 100 MB cap that fits the file; strict UTF-8 JSON (no NaN/Infinity, no duplicate
    key, no lone surrogate); an object of entries whose dtype is known, whose shape and
    ``data_offsets`` are unsigned 64-bit integers agreeing with each other; string-to-string
    ``__metadata__``; and data ranges that, sorted, tile the data area from its start to the
    end of the file without a gap or an overlap.

    Args:
        file: the file, named in messages and recorded in each ``TensorInfo``.
        size: its length in bytes.
        read: ``read(start, end)``: its bytes ``start`` up to ``end``.

    Returns:
        The header with every tensor's absolute byte range.

    Raises:
        BrokenFile: as ``read_header``.
    """
    if size < 8:
        raise BrokenFile(f"{file}: too short to be safetensors ({size} bytes); re-download it")
    (n,) = struct.unpack("<Q", read(0, 8))
    if n > MAX_HEADER_BYTES:
        raise BrokenFile(
            f"{file}: header length {n} is over the safetensors limit of {MAX_HEADER_BYTES} "
            "bytes: not safetensors; re-download or re-save it"
        )
    if 8 + n > size:
        raise BrokenFile(
            f"{file}: header length {n} is larger than the file ({size} bytes): "
            "truncated or not safetensors; re-download or re-save it"
        )
    raw = read(8, 8 + n)
    BYTES_READ.add(8 + len(raw))
    header = _load_json(file, raw)
    if not isinstance(header, dict):
        raise BrokenFile(f"{file}: header is not a JSON object; re-save the file")
    data_offset = 8 + n
    metadata = _parse_metadata(file, header.pop("__metadata__", None))
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(file, name, entry, data_offset, size)
    _check_tiling(file, tensors, data_offset, size)
    return SafetensorsHeader(
        path=file, tensors=tensors, metadata=metadata, data_offset=data_offset, file_size=size
    )


class _Constant:
    """``NaN``/``Infinity``/``-Infinity`` met in a header: not JSON (the reference reader
    refuses them), kept as a marker so the entry holding one can be named."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __repr__(self) -> str:
        return self.token


def _load_json(file: Path | RemoteFile, raw: bytes) -> Any:
    """The header's JSON, decoded as strict UTF-8, refusing duplicate keys and numbers that
    overflow a double; ``NaN``/``Infinity`` come back as ``_Constant`` markers."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise BrokenFile(
                    f"{file}: header has the key {_shown(key)} twice (the safetensors "
                    "format allows each name once); re-save the file"
                )
            obj[key] = value
        return obj

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise BrokenFile(f"{file}: header number {text:.40} overflows; re-save the file")
        return value

    try:
        return json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=unique,
            parse_constant=_Constant,
            parse_float=finite,
        )
    except BrokenFile:
        raise
    except UnicodeDecodeError:
        raise BrokenFile(f"{file}: header is not UTF-8 text; re-save the file") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or an int too long to read
        why = getattr(exc, "msg", None) or "a number too long to read"
        raise BrokenFile(f"{file}: header is not valid JSON ({why}); re-save the file") from None


def _shown(text: str) -> str:
    """``repr`` of a header string, safe to print (escapes included), cut to 200 characters
    (a real tensor name fits; a hostile one does not flood the terminal)."""
    shown = repr(text)
    return shown if len(shown) <= 200 else shown[:197] + "..."


def _is_text(value: str) -> bool:
    """True when ``value`` can be written as UTF-8 (JSON's ``\\ud800`` escapes give lone
    surrogates, which Python's json accepts and the reference reader refuses)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_value(value: Any) -> str | None:
    """What makes a parsed JSON value unacceptable anywhere in a header (a NaN/Infinity, a
    string that is not UTF-8), found without recursion; None when nothing does."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, _Constant):
            return f"{v.token} (not a JSON number)"
        if isinstance(v, str) and not _is_text(v):
            return f"the string {_shown(v)}, which is not valid UTF-8"
        if isinstance(v, dict):
            bad_keys = [k for k in v if not _is_text(k)]
            if bad_keys:
                return f"the key {_shown(bad_keys[0])}, which is not valid UTF-8"
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def _parse_metadata(file: Path | RemoteFile, meta: Any) -> dict[str, str]:
    """``__metadata__``: absent (or null), or an object of strings to strings."""
    if meta is None:
        return {}
    bad = _bad_value(meta)
    if not isinstance(meta, dict) or bad is not None:
        raise BrokenFile(
            f"{file}: __metadata__ must map strings to strings"
            + (f" (it holds {bad})" if bad else "")
            + "; re-save the file"
        )
    wrong = [k for k, v in meta.items() if not isinstance(v, str)]
    if wrong:
        raise BrokenFile(
            f"{file}: __metadata__ must map strings to strings, but {_shown(wrong[0])} is "
            f"{meta[wrong[0]]!r:.40}; re-save the file"
        )
    return meta


def _parse_entry(
    p: Path | RemoteFile, name: str, entry: Any, data_offset: int, size: int
) -> TensorInfo:
    """One tensor's entry, checked alone: its name, dtype, shape and byte range."""
    if not _is_text(name):
        raise BrokenFile(
            f"{p}: tensor name {_shown(name)} is not valid UTF-8 (a lone surrogate escape); "
            "re-save the file"
        )
    shown = _shown(name)
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("dtype"), str)
        or not isinstance(entry.get("shape"), list)
        or not isinstance(entry.get("data_offsets"), list)
        or len(entry["data_offsets"]) != 2
    ):
        raise BrokenFile(
            f"{p}: malformed header entry for tensor {shown} (needs dtype, shape and two "
            "data_offsets); re-save the file"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise BrokenFile(
            f"{p}: tensor {shown} has unknown dtype {_shown(dtype)}; re-save it with a "
            "standard dtype"
        )
    for what, values in (("shape", shape), ("data_offsets", offsets)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise BrokenFile(
                    f"{p}: tensor {shown} has {what} entry {v!r:.40}, not an integer; "
                    "re-save the file"
                )
            if v < 0:
                raise BrokenFile(
                    f"{p}: tensor {shown} has a negative {what} entry ({v}); re-save the file"
                )
            if v >= _U64:
                raise BrokenFile(
                    f"{p}: tensor {shown} has {what} entry {v:.3g}, past the format's 64-bit "
                    "range; re-save the file"
                )
    bad = _bad_value(entry)
    if bad is not None:
        raise BrokenFile(f"{p}: header entry for tensor {shown} holds {bad}; re-save the file")
    begin, end = offsets
    bits = DTYPE_BITS[dtype]
    for d in shape:  # the reference reader's checked products: no 64-bit overflow on the way
        bits *= d
        if bits >= _U64:
            raise BrokenFile(
                f"{p}: tensor {shown} has shape {shape}, too large for the format; re-save the file"
            )
    if bits % 8:
        raise BrokenFile(
            f"{p}: tensor {shown} ({dtype} {shape}) does not fill a whole number of bytes; "
            "re-save the file"
        )
    if end < begin or end - begin != bits // 8:
        raise BrokenFile(
            f"{p}: tensor {shown} byte range does not match its shape and dtype; re-save the file"
        )
    if data_offset + end > size:
        raise BrokenFile(
            f"{p}: truncated: tensor {shown} ends at byte {data_offset + end} "
            f"but the file has {size}; re-download it"
        )
    return TensorInfo(name, dtype, tuple(shape), p, data_offset + begin, data_offset + end)


def _check_tiling(
    p: Path | RemoteFile, tensors: dict[str, TensorInfo], data_offset: int, size: int
) -> None:
    """The data ranges, sorted, must follow each other from the start of the data area to the
    end of the file: no overlap (two tensors sharing bytes), no gap, nothing after the last."""
    at, previous = data_offset, None
    for info in sorted(tensors.values(), key=lambda i: (i.start, i.end)):
        if info.start < at:
            raise BrokenFile(
                f"{p}: tensors {_shown(previous or '')} and {_shown(info.name)} overlap (bytes "
                f"{info.start - data_offset}-{at - data_offset} of the data); re-save the file"
            )
        if info.start > at:
            raise BrokenFile(
                f"{p}: {info.start - at} bytes before tensor {_shown(info.name)} belong to no "
                "tensor (the format allows no gap); re-save the file"
            )
        at, previous = info.end, info.name
    if at != size:
        raise BrokenFile(
            f"{p}: {size - at} bytes after the last tensor's data belong to no tensor (the "
            "format ends the file there); re-save or re-download the file"
        )


def header_bytes(
    entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]
) -> bytes:
    """A complete safetensors header (length prefix + JSON, space-padded to 8 bytes).

    Args:
        entries: (name, dtype, shape, nbytes) in the order the data will be written.
        metadata: string-to-string ``__metadata__``.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_tensors(path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """Write torch tensors as a safetensors file, byte-reproducibly: tensors in name order,
    metadata keys sorted (the safetensors library writes its metadata map in an order that
    changes from run to run, so the same tensors got different bytes and digests).

    Args:
        path: the file to write (created or truncated).
        tensors: name → contiguous CPU torch tensor.
        metadata: string-to-string ``__metadata__``.
    """
    import torch

    names = {v: k for k, v in TORCH_DTYPE_NAMES.items()}
    entries = []
    blobs = []
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()  # (nbytes,)
        entries.append((name, names[str(t.dtype).removeprefix("torch.")], tuple(t.shape), raw.size))
        blobs.append(raw)
    with open(path, "wb") as fh:
        fh.write(header_bytes(entries, dict(sorted(metadata.items()))))
        for raw in blobs:
            fh.write(memoryview(raw))


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``dtype`` (safetensors name) and ``shape`` takes."""
    n = DTYPE_BITS[dtype]
    for d in shape:
        n *= d
    return n // 8
