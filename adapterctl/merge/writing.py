"""What both merge engines need to write tensors: byte copies, size checks, overflow counts."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import NoReturn

from adapterctl.files import copy_range
from adapterctl.tensorfile import TORCH_DTYPE_NAMES, TensorInfo


class Overflow:
    """Merged values that came out non-finite (±inf, NaN) where the base value was finite,
    per tensor: an update too large for the output dtype (float16's ±65504, or float32's
    range). The engines count them while writing; ``run_merge`` refuses the result
    (``check``) before the staged output is moved into place. Safe to add to from threads."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, n: int) -> None:
        if n:
            with self._lock:
                self.counts[name] = self.counts.get(name, 0) + n

    def check(self, out_dtypes: Mapping[str, str]) -> None:
        """Raise if any value came out non-finite.

        Args:
            out_dtypes: each tensor's output dtype (safetensors name), for the fix to suggest.

        Raises:
            ValidationFailed: naming the tensor with the most such values and their count
                (exit 3).
        """
        if not self.counts:
            return
        from adapterctl.errors import ValidationFailed

        name, n = max(self.counts.items(), key=lambda kv: kv[1])
        more = len(self.counts) - 1
        others = f" (and {more} more tensor(s))" if more else ""
        if out_dtypes.get(name) == "F16":
            fix = (
                "values beyond float16's range (±65504); write bf16 or fp32 instead (--dtype bf16)"
            )
        else:
            dtype = TORCH_DTYPE_NAMES.get(out_dtypes.get(name, ""), "the output dtype")
            fix = (
                f"the update is too large for {dtype}; check the adapter's lora_alpha and the "
                "weights (-w) with: adapterctl validate SOURCE"
            )
        raise ValidationFailed(
            f"{name}: {n} merged value(s) came out as inf or NaN{others}; nothing was written: "
            f"{fix}"
        )


def shrank(info: TensorInfo) -> NoReturn:
    """Raise the error for a base file that shrank below a tensor after it was opened (another
    process rewrote or truncated it while the merge read it): exit 1, nothing written."""
    from adapterctl.errors import OperationalError

    raise OperationalError(
        f"{info.path}: the file shrank while the merge read {info.name} (another process "
        "is writing it?); nothing was written: run the merge again once the file is complete"
    )


def copy_tensor_bytes(info: TensorInfo, fd: int, offset: int) -> None:
    """Copy a tensor's bytes from the base file into ``fd`` at ``offset`` (in the kernel where
    possible)."""
    try:
        copy_range(info.local_path, info.start, info.nbytes, fd, offset)
    except EOFError:
        shrank(info)


# ----------------------------------------------------------------------------- side files
