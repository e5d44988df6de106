"""What both merge engines need to write tensors: byte copies, size checks, float16 overflow."""

from __future__ import annotations

import threading

from adapterctl.files import copy_range
from adapterctl.tensorfile import TensorInfo


class Overflow:
    """Values that became ±inf when rounded into a float16 output, per tensor. The engines
    count them (only for float16 outputs, where a bf16 or float32 value beyond ±65504 does
    not fit); ``run_merge`` turns the counts into a warning. Safe to add to from threads."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, n: int) -> None:
        if n:
            with self._lock:
                self.counts[name] = self.counts.get(name, 0) + n

    def warning(self) -> str | None:
        if not self.counts:
            return None
        name, n = max(self.counts.items(), key=lambda kv: kv[1])
        return (
            f"{len(self.counts)} tensor(s) hold values beyond float16's range (±65504) that "
            f"became ±inf, e.g. {n} in {name}; write bf16 or fp32 (--dtype) instead"
        )


def require_inside(info: TensorInfo, size: int) -> None:
    """Refuse a base file that has shrunk below a tensor since it was opened."""
    if info.end > size:
        from adapterctl.errors import BrokenFile

        raise BrokenFile(f"{info.path}: truncated inside {info.name}; re-download it")


def copy_tensor_bytes(info: TensorInfo, fd: int, offset: int) -> None:
    """Copy a tensor's bytes from the base file into ``fd`` at ``offset`` (in the kernel where
    possible)."""
    try:
        copy_range(info.local_path, info.start, info.nbytes, fd, offset)
    except EOFError:
        from adapterctl.errors import BrokenFile

        raise BrokenFile(f"{info.path}: truncated inside {info.name}; re-download it") from None


# ----------------------------------------------------------------------------- side files
