"""Safetensors files read header-first: names, dtypes, shapes and byte ranges, tensors on demand.

Reading a header costs a few kilobytes whatever the file size; a tensor is read only when
asked for, with one seek and one read of exactly its bytes. ``BYTES_READ`` counts every byte
this module reads so tests (and curious users) can check that headers-only work stays small.

A file need not be on this disk: a ``RemoteFile`` (a Hub file at one commit) is read by byte
ranges, under the same header rules (``parse_header``).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
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

# safetensors dtype name -> bytes per element
DTYPE_SIZES: dict[str, float] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E8M0": 1, "F6_E2M3": 0.75, "F6_E3M2": 0.75, "F4": 0.5,
}  # fmt: skip

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
        BrokenFile: empty file, LFS pointer, truncated file, header length past the end,
            invalid header JSON or offsets outside the data area.
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
    """The safetensors header rules, wherever the bytes come from: a length that fits the
    file, a JSON object, and entries whose dtype, shape and offsets agree and stay inside it.

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
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise BrokenFile(
            f"{file}: header length {n} is larger than the file ({size} bytes): "
            "truncated or not safetensors; re-download or re-save it"
        )
    raw = read(8, 8 + n)
    BYTES_READ.add(8 + len(raw))
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        why = getattr(exc, "msg", None) or type(exc).__name__
        raise BrokenFile(f"{file}: header is not valid JSON ({why}); re-save the file") from None
    if not isinstance(header, dict):
        raise BrokenFile(f"{file}: header is not a JSON object; re-save the file")
    data_offset = 8 + n
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(file, name, entry, data_offset, size)
    return SafetensorsHeader(
        path=file,
        tensors=tensors,
        metadata={str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {},
        data_offset=data_offset,
        file_size=size,
    )


def _parse_entry(
    p: Path | RemoteFile, name: str, entry: Any, data_offset: int, size: int
) -> TensorInfo:
    try:
        dtype = str(entry["dtype"])
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(x) for x in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise BrokenFile(
            f"{p}: malformed header entry for tensor {name!r}; re-save the file"
        ) from None
    if dtype not in DTYPE_SIZES:
        raise BrokenFile(
            f"{p}: tensor {name!r} has unknown dtype {dtype!r}; re-save it with a standard dtype"
        )
    if any(d < 0 for d in shape) or begin < 0:
        raise BrokenFile(f"{p}: tensor {name!r} has a negative shape or offset; re-save the file")
    expected = 1
    for d in shape:
        expected *= d
    if end < begin or (end - begin) != int(expected * DTYPE_SIZES[dtype]):
        raise BrokenFile(
            f"{p}: tensor {name!r} byte range does not match its shape and dtype; re-save the file"
        )
    if data_offset + end > size:
        raise BrokenFile(
            f"{p}: truncated: tensor {name!r} ends at byte {data_offset + end} "
            f"but the file has {size}; re-download it"
        )
    return TensorInfo(name, dtype, shape, p, data_offset + begin, data_offset + end)


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


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of ``dtype`` (safetensors name) and ``shape`` takes."""
    n = 1
    for d in shape:
        n *= d
    return int(n * DTYPE_SIZES[dtype])
