"""The float formats NumPy lacks, as bit arithmetic: bfloat16 and float8, NumPy only.

NumPy has no bfloat16 or float8 dtype, so their values travel as raw bit patterns in the
unsigned integer of the same width (``tensorfile.numpy_dtype``: BF16 → ``uint16``, F8 →
``uint8``) and are converted here, exactly as torch converts them:

- bfloat16 → float32 (``widen_bf16``): a bfloat16 is the upper half of a float32, so its bits
  shifted up by 16 are the float32 of the same value, NaN payloads included.
- float32 → bfloat16 (``round_bf16``): round to nearest, ties to even, by integer addition
  on the float32 bits — torch's rounding bit for bit, overflow to ±inf and subnormals
  included. A NaN stays a quiet NaN of the same sign (its payload's top bits kept, quiet bit
  set), as the compiled merge kernel makes it, so NumPy and kernel merges write the same
  bytes. torch itself writes 0xFFFF for every NaN on AVX2/AVX-512 CPUs and 0x7FC0 without
  them: any NaN is a NaN to torch.
- float8 (F8_E4M3, that is float8_e4m3fn, and F8_E5M2) → float32 (``widen_f8``): a 256-entry
  table built from the bit layout.

float32 → float16 needs nothing here: NumPy's ``astype(np.float16)`` rounds to nearest, ties
to even, and gives torch's bits for every value but NaN (a signalling NaN stays signalling in
NumPy, torch quiets it; both keep the sign).
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# safetensors dtype name -> (exponent bits, mantissa bits, IEEE specials: an all-ones exponent
# means inf or NaN; without them, as in float8_e4m3fn, only all-ones bits are NaN, no inf).
LAYOUTS: dict[str, tuple[int, int, bool]] = {
    "F64": (11, 52, True), "F32": (8, 23, True), "F16": (5, 10, True), "BF16": (8, 7, True),
    "F8_E4M3": (4, 3, False), "F8_E5M2": (5, 2, True),
}  # fmt: skip

# Values rounded per step: one merge chunk (plan.CHUNK_ELEMENTS) in one step, since each step
# is seven NumPy calls (the merge engine's workers measured slower with 4 steps per chunk:
# more calls, more GIL hand-offs between them); each thread's work arrays (1.25 MiB) are kept.
_BLOCK = 1 << 18


def eps(dtype: str) -> float:
    """Machine epsilon of a safetensors float dtype: the gap between 1 and the next value.

    Args:
        dtype: ``BF16``, ``F16``, ``F32``, ``F64``, ``F8_E4M3`` or ``F8_E5M2``.

    Raises:
        KeyError: ``dtype`` is not a float dtype named in ``LAYOUTS``.

    Example:
        >>> eps("BF16")
        0.0078125
    """
    return 2.0 ** -LAYOUTS[dtype][1]


def widen_bf16(
    bits: np.ndarray[Any, Any], out: np.ndarray[Any, Any] | None = None
) -> np.ndarray[Any, Any]:
    """bfloat16 values, given as their raw 16-bit patterns, widened to float32 exactly.

    Args:
        bits: any array of 2-byte elements (``uint16`` or ``int16``).
        out: a float32 array of the same shape to write into (no other allocation).

    Returns:
        ``out``, or a new float32 array of the same shape.

    Example:
        >>> widen_bf16(np.array([0x3F80, 0xC000], dtype=np.uint16))
        array([ 1., -2.], dtype=float32)
    """
    import numpy as np

    if out is None:
        out = np.empty(bits.shape, np.float32)
    wide = out.view(np.uint32)
    np.copyto(wide, bits.view(np.uint16))  # zero-extended: int16 would sign-extend
    wide <<= 16
    return out


class _Scratch(threading.local):
    """Each thread's work arrays for ``round_bf16``, allocated once: fresh ones per call would
    be handed back to the OS and faulted in again on every chunk of a merge."""

    arrays: tuple[Any, Any] | None = None


_SCRATCH = _Scratch()


def _scratch() -> tuple[Any, Any]:
    import numpy as np

    if _SCRATCH.arrays is None:
        _SCRATCH.arrays = (np.empty(_BLOCK, np.uint32), np.empty(_BLOCK, np.bool_))
    return _SCRATCH.arrays


def round_bf16(
    x: np.ndarray[Any, Any], out: np.ndarray[Any, Any] | None = None
) -> np.ndarray[Any, Any]:
    """float32 values rounded to bfloat16, as raw 16-bit patterns: to nearest, ties to even.

    torch's ``.to(torch.bfloat16)`` bit for bit for every non-NaN value: ±0, subnormals,
    overflow to ±inf. A NaN becomes a quiet NaN of the same sign (see the module docstring).
    Works through the array in blocks of 2^18 values with work arrays kept per thread (1.25
    MiB), so it allocates nothing beyond ``out`` after a thread's first call; safe to call
    from several threads at once (NumPy releases the GIL).

    Args:
        x: a float32 array.
        out: a C-contiguous ``uint16`` array of ``x``'s shape to write into.

    Returns:
        ``out``, or a new ``uint16`` array of ``x``'s shape.

    Raises:
        TypeError: ``x`` is not float32 (rounding float64 through float32 would round twice).
        ValueError: ``out`` has another shape or dtype, or is not C-contiguous.

    Example:
        >>> round_bf16(np.array([1.0, 1.00390625, 1.01171875], dtype=np.float32))
        array([16256, 16256, 16258], dtype=uint16)
    """
    import numpy as np

    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"round_bf16 takes float32 values, not {x.dtype}")
    if out is None:
        out = np.empty(x.shape, np.uint16)
    elif out.shape != x.shape or out.dtype != np.uint16 or not out.flags.c_contiguous:
        raise ValueError(f"round_bf16: out must be C-contiguous uint16 of shape {x.shape}")
    u = np.ascontiguousarray(x).reshape(-1).view(np.uint32)
    o = out.reshape(-1)  # a view: out is contiguous
    t, nan = _scratch()
    for start in range(0, u.size, _BLOCK):
        ub, ob = u[start : start + _BLOCK], o[start : start + _BLOCK]
        tb = t[: ub.size]
        # bits + 0x7FFF + (lowest kept bit): above half a bfloat16 ulp carries into the kept
        # bits, below does not, an exact half carries only onto an odd value (ties to even).
        # A carry out of the mantissa raises the exponent: the largest values round to inf.
        np.right_shift(ub, 16, out=tb)
        tb &= 1
        tb += 0x7FFF
        tb += ub
        np.right_shift(tb, 16, out=ob, casting="unsafe")
        isnan = np.isnan(ub.view(np.float32), out=nan[: ub.size])
        if isnan.any():  # the carry would turn a NaN into inf (or wrap it): keep it a NaN
            i = np.flatnonzero(isnan)
            ob[i] = (ub[i] >> 16) | 0x40  # sign, exponent, payload's top bits; quiet bit set
    return out


def widen_f8(bits: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    """float8 values, given as their raw bytes, widened to float32 exactly.

    A NaN keeps its sign and payload (at the top of float32's mantissa, quiet bit set), as
    torch widens it.

    Args:
        bits: any array of 1-byte elements (``uint8`` or ``int8``).
        dtype: ``F8_E4M3`` (float8_e4m3fn: no infinities, ±0x7F is NaN) or ``F8_E5M2``.

    Returns:
        A new float32 array of the same shape.

    Example:
        >>> widen_f8(np.array([0x38, 0x7E], dtype=np.uint8), "F8_E4M3")
        array([  1., 448.], dtype=float32)
    """
    import numpy as np

    return np.take(_f8_table(dtype), bits.view(np.uint8))


def widen(bits: np.ndarray[Any, Any], dtype: str) -> np.ndarray[Any, Any]:
    """A tensor held as ``tensorfile.numpy_dtype(dtype)`` as NumPy numbers: BF16 and float8
    widened to float32 exactly (a new array), any other dtype's array returned as it is."""
    if dtype == "BF16":
        return widen_bf16(bits)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return widen_f8(bits, dtype)
    return bits


@functools.cache
def _f8_table(dtype: str) -> np.ndarray[Any, Any]:
    """The float32 value of each of the 256 bit patterns of float8 ``dtype`` (read-only)."""
    import numpy as np

    if dtype not in ("F8_E4M3", "F8_E5M2"):
        raise ValueError(f"widen_f8: {dtype} is not a float8 dtype (F8_E4M3 or F8_E5M2)")
    e_bits, m_bits, ieee = LAYOUTS[dtype]
    code = np.arange(256, dtype=np.uint32)
    sign = code >> 7
    exp = (code >> m_bits) & ((1 << e_bits) - 1)
    man = code & ((1 << m_bits) - 1)
    bias = (1 << (e_bits - 1)) - 1
    # Normal: (2^m + man) · 2^(exp - bias - m); subnormal (exp 0): man · 2^(1 - bias - m).
    significand = man + np.where(exp > 0, 1 << m_bits, 0)
    power = np.maximum(exp, 1).astype(np.int64) - bias - m_bits
    magnitude = np.ldexp(significand.astype(np.float64), power)
    value = np.where(sign == 1, -magnitude, magnitude).astype(np.float32)  # exact; -0 kept
    top = exp == (1 << e_bits) - 1
    if ieee:
        inf, nan = top & (man == 0), top & (man != 0)
    else:
        inf, nan = np.zeros(256, np.bool_), top & (man == (1 << m_bits) - 1)
    special = (sign << 31) | 0x7F800000  # ±inf: all-ones exponent
    table = value.view(np.uint32)
    table = np.where(inf, special, table)
    table = np.where(nan, special | 0x400000 | (man << (23 - m_bits)), table)
    table = table.astype(np.uint32).view(np.float32)
    table.flags.writeable = False
    return table
